"""docs/events.md and docs/schemas/: the published wire format is current and its example works end to end."""

import json
import re
from pathlib import Path

import pytest

from oel.schemas import PUBLISHED_SCHEMAS, TrajectoryEvent, decode, json_schema

DOCS = Path(__file__).resolve().parent.parent / "docs"


def example_records() -> list[tuple[bytes, bytes]]:
    """The page's hand-written episode, as the (key, value) records `kcat -K'|'` would produce."""
    block = re.search(r"```jsonl\n(.*?)\n```", (DOCS / "events.md").read_text(), re.S)
    assert block, "docs/events.md has no jsonl example"
    return [tuple(part.encode() for part in line.split("|", 1)) for line in block.group(1).splitlines()]


@pytest.mark.parametrize("name", sorted(PUBLISHED_SCHEMAS))
def test_published_schema_is_current(name):
    assert (DOCS / "schemas" / f"{name}.json").read_text() == json_schema(name), "stale: run `oel schema > docs/schemas/...`"


def test_the_example_is_a_valid_episode():
    records = example_records()
    events = [decode(value, TrajectoryEvent) for _, value in records]
    assert [e.seq for e in events] == [0, 1, 2] and [e.kind.value for e in events] == ["start", "step", "end"]
    assert all(key.decode() == e.episode_id for (key, _), e in zip(records, events, strict=True))
    schema = json.loads((DOCS / "schemas" / "trajectory-event.json").read_text())
    assert set(schema["required"]) <= set(json.loads(records[0][1]))


@pytest.mark.stack
def test_the_example_reaches_the_store_through_the_real_broker_and_processor(kafka, s3_store, unique, tmp_path):
    from test_processor import Env, wait_for

    env = Env(unique, BATCH_SIZE="1", EXTRACTION_VARIANT="grounded", TRUSTED_FEEDBACK="")
    key = "trajectories/docs-example/hand-written-1.json"
    with env.worker(tmp_path / "worker.log"):
        env.produce(example_records())
        wait_for(lambda: env.store.exists(key), 240, "the documented episode stored")
    stored = env.store.get_json(key)
    assert stored["status"] == "completed" and stored["steps"][0]["response"] == "It left our warehouse yesterday."
    assert env.read(env.settings.topics.trajectories + ".dlq", 1, timeout=2) == []
