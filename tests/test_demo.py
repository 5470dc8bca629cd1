"""`oel demo`'s loop in one process, with the default model, a local store and the in-process bus.

Two short rounds on the house-rules tasks (the greeting rule): agents play, the processor's core assembles
the episodes and the grounded variant lifts the rule from the environment's (trusted) feedback, the
learner's core runs the real knowledge gate, an OPCD round and the real evaluation gate, the version is
published on the bus, and the agents of the next round play with it. Round 2 adds no new knowledge (the KB
already holds the rule), so it makes no version. Sizes are tiny (a few episodes, one OPCD step) and the gates'
margins so wide that they measure without deciding (their decisions are tested in test_knowledge_gate.py
and test_gate.py); what is checked is the plumbing and its invariants, not learning.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from learner.versions import ModelRegistry
from oel.kb import latest_snapshot
from oel.schemas import ModelVersion, VersionStatus, decode
from recipes.demo import DemoConfig, DemoLoop

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from oel.settings import load_settings

    settings = load_settings()
    settings = settings.model_copy(
        update={
            # The gate runs for real, on 2 held-out tickets; tolerances so wide it cannot reject on such a
            # tiny sample (its decisions are tested in tests/test_gate.py).
            "learner": settings.learner.model_copy(
                update={
                    "gate_pass_rate_tolerance": 1.0,
                    "gate_ood_tolerance": 1.0,
                    "knowledge_gate_margin": -1.0,
                    "ood_max_new_tokens": 24,
                    "max_new_tokens": 24,
                    "batch_size": 2,
                }
            ),
        }
    )
    out = tmp_path_factory.mktemp("demo")
    config = DemoConfig(rounds=2, episodes=4, eval_episodes=2, steps=1, agent_batch=4, out_dir=out)
    lines: list[str] = []
    loop = DemoLoop(settings, config, progress=lines.append)
    loop.bus.publish(loop.TRAJECTORIES, "broken", b"{not json")  # an invalid event among the real ones
    reports = loop.run()
    table = loop.final_table()
    return loop, reports, lines, out, table


def test_rounds_roll_out_what_the_gate_accepts_and_agents_use_it(demo_run):
    loop, reports, *_ = demo_run
    r0, r1 = reports
    assert r0.played_with == "base"
    assert r0.episodes == 4 and r1.episodes == 4
    assert r0.new_items >= 1, "the grounded variant lifted the rule from the feedback"
    registry = ModelRegistry(loop.store)
    versions = {r.manifest.version: r for r in registry.list("house-rules")}
    assert list(versions) == [r0.version], "one version: round 2 brought no new knowledge"
    record = versions[r0.version]
    assert record.status is VersionStatus.promoted and r0.status == "promoted" and record.reason
    m = record.manifest
    assert m.kb_version == r0.kb_version and m.parent_version is None and m.round_config["init_adapter"] is None
    assert m.eval["knowledge_accepted"] == 1.0 and m.eval["gate_accepted"] == 1.0, "both gates measured and recorded"
    assert m.knowledge["variants"] == {"grounded": r0.kb_items}
    assert all(i["sources"] and i["sources"][0].startswith("environment:") for i in m.knowledge["items"])
    assert r1.played_with == r0.version, "round 2's agents play with what round 1 rolled out"
    assert r1.new_items == 0 and r1.version is None
    published = [decode(m.value, ModelVersion) for m in loop.bus.read(loop.VERSIONS, "test-reader")]
    assert [p.version for p in published] == [r0.version], "exactly the promoted version is published"
    assert loop.serving == r0.version


def test_events_are_real_trajectories_and_bad_ones_go_to_the_dlq(demo_run):
    loop, reports, *_ = demo_run
    assert reports[0].invalid_events == 1 and loop.bus.size(loop.TRAJECTORIES + ".dlq") == 1
    for r in reports:
        stored = [k for k in loop.store.list("trajectories/house-rules/") if f"-r{r.round}-" in k]
        assert len(stored) == r.episodes, "every played episode is stored as training data"
        # start + one step per turn + end, per episode
        turns = sum(len(loop.store.get_json(k)["steps"]) for k in stored)
        assert r.events == turns + 2 * r.episodes


def test_kb_holds_the_rule_with_its_provenance(demo_run):
    from oel.envs.house_rules import GREETING
    from oel.kb import ExperienceItem, item_key

    loop, reports, lines, out, table = demo_run
    snap = latest_snapshot(loop.store, "house-rules")
    assert snap.version == reports[-1].kb_version and len(snap.items) == reports[-1].kb_items >= 1
    assert any(GREETING in text for text in snap.items), snap.items
    for item_id in snap.item_ids:
        item = ExperienceItem.model_validate(loop.store.get_json(item_key("house-rules", item_id)))
        assert item.variant == "grounded" and item.sources and len(item.source_episode_ids) >= 2
    doc = json.loads((Path(out) / "demo.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    assert any(line.startswith("round 2: played with") for line in lines)


def test_the_final_table_has_every_condition_and_is_saved(demo_run):
    loop, reports, _, out, table = demo_run
    assert [row.version for row in table.rows] == [reports[0].version]
    [row] = table.rows
    assert row.round == 1 and row.status == "promoted" and row.variants == {"grounded": reports[0].kb_items}
    for cell in (row.none, row.in_context, row.consolidated):
        assert cell["n_episodes"] == 2 and 0.0 <= cell["pass_rate"] <= 1.0
    assert table.base_ood is not None and row.ood is not None
    doc = table.to_dict()
    assert set(doc["rows"][0]) >= {"none", "in_context", "consolidated"} and "stderr" in doc["rows"][0]["none"]
    md, png = loop.table_paths
    assert md.read_text() == table.to_markdown() and "±" in md.read_text() and "grounded" in md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
