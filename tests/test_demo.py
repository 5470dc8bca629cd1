"""`oel demo`'s loop in one process, with the default model, a local store and the in-process bus.

Two short rounds on the house-rules tasks: agents play, the processor's core assembles and extracts,
the learner's core runs an OPCD round and the real evaluation gate, the version is published on the bus,
and the agents of the next round play with it. Sizes are tiny (a few episodes, one OPCD step); what is
checked is the plumbing and its invariants, not learning.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from learner.demo import DemoConfig, DemoLoop
from learner.versions import ModelRegistry
from oel.kb import latest_snapshot
from oel.schemas import ModelVersion, VersionStatus, decode


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from oel.settings import load_settings

    settings = load_settings()
    settings = settings.model_copy(update={
        # The gate runs for real, on 2 held-out tickets; tolerances so wide it cannot reject on such a
        # tiny sample (its decisions are tested in tests/test_gate.py).
        "learner": settings.learner.model_copy(update={"gate_pass_rate_tolerance": 1.0, "gate_ood_tolerance": 1.0,
                                                       "ood_max_new_tokens": 24, "max_new_tokens": 24, "batch_size": 2}),
    })
    out = tmp_path_factory.mktemp("demo")
    config = DemoConfig(rounds=2, episodes=3, eval_episodes=2, steps=1, agent_batch=3, extraction_tokens=48, out_dir=out)
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
    assert r0.episodes == 3 and r1.episodes == 3
    registry = ModelRegistry(loop.store)
    versions = {r.manifest.version: r for r in registry.list("house-rules")}
    if r0.new_items:
        assert r0.version in versions, "a round with new items makes a version"
        record = versions[r0.version]
        assert record.status.value == r0.status and record.reason
        assert record.manifest.kb_version == r0.kb_version
        expected = r0.version if record.status is VersionStatus.promoted else "base"
        assert r1.played_with == expected, "round 2's agents play with what round 1 rolled out"
    published = [decode(m.value, ModelVersion) for m in loop.bus.read(loop.VERSIONS, "test-reader")]
    promoted = [v.manifest.version for v in versions.values() if v.status is VersionStatus.promoted]
    assert sorted({p.version for p in published}) == sorted(promoted), "exactly the promoted versions are published"
    assert loop.serving == (promoted and max(promoted, key=lambda n: versions[n].manifest.generation) or None)


def test_events_are_real_trajectories_and_bad_ones_go_to_the_dlq(demo_run):
    loop, reports, *_ = demo_run
    assert reports[0].invalid_events == 1 and loop.bus.size(loop.TRAJECTORIES + ".dlq") == 1
    for r in reports:
        stored = [k for k in loop.store.list("trajectories/house-rules/") if f"-r{r.round}-" in k]
        assert len(stored) == r.episodes, "every played episode is stored as training data"
        # start + one step per turn + end, per episode
        turns = sum(len(loop.store.get_json(k)["steps"]) for k in stored)
        assert r.events == turns + 2 * r.episodes


def test_kb_and_run_record(demo_run):
    loop, reports, lines, out, table = demo_run
    snap = latest_snapshot(loop.store, "house-rules")
    assert (snap is None) == (reports[-1].kb_items == 0)
    if snap is not None:
        assert snap.version == reports[-1].kb_version and len(snap.items) <= reports[-1].kb_items
    doc = json.loads((Path(out) / "demo.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    assert any(line.startswith("round 2: played with") for line in lines)


def test_the_final_table_has_a_row_per_version_and_is_saved(demo_run):
    loop, reports, _, out, table = demo_run
    made = [r.version for r in reports if r.version]
    if not made:
        assert table is None
        return
    assert sorted(row.version for row in table.rows) == sorted(made)
    for row in table.rows:
        for cell in (row.none, row.in_context, row.consolidated):
            assert cell["n_episodes"] == 2 and 0.0 <= cell["pass_rate"] <= 1.0
    md, png = loop.table_paths
    assert md.read_text() == table.to_markdown() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
