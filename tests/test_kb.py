"""Knowledge-base appends: dedup, oldest-first budget, deterministic versions, idempotent writes."""

from __future__ import annotations

from datetime import UTC, datetime

from oel import kb
from oel.store import LocalStore

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def items(*texts: str, ns: str = "ns") -> list[kb.ExperienceItem]:
    from oel.extraction import item_id

    return [
        kb.ExperienceItem(id=item_id(ns, t), namespace=ns, text=t, source_episode_ids=["e"], extracted_by="base", variant="structured")
        for t in texts
    ]


def test_append_dedups_and_versions_deterministically():
    state = kb.KBState(namespace="ns")
    s1, snap1, new1, dup1 = kb.append(
        state, items("rule one", "rule two", "rule one"), episode_ids=["e1"], budget=1000, count=kb.approx_tokens, as_of=NOW
    )
    assert [i.text for i in new1] == ["rule one", "rule two"] and dup1 == 1
    assert snap1.items == ["rule one", "rule two"] and snap1.seq == 1 and snap1.parent_version is None
    again, snap_again, _, _ = kb.append(
        state, items("rule one", "rule two", "rule one"), episode_ids=["e1"], budget=1000, count=kb.approx_tokens, as_of=NOW
    )
    assert snap_again == snap1 and again == s1  # same input, same version: replays agree
    s2, snap2, new2, dup2 = kb.append(
        s1, items("rule two", "rule three"), episode_ids=["e2"], budget=1000, count=kb.approx_tokens, as_of=NOW
    )
    assert [i.text for i in new2] == ["rule three"] and dup2 == 1
    assert snap2.parent_version == snap1.version and snap2.version.startswith("000002-")
    assert s2.applied_episodes == {"e1": snap1.version, "e2": snap2.version}
    s3, snap3, new3, _ = kb.append(s2, items("rule one"), episode_ids=["e3"], budget=1000, count=kb.approx_tokens, as_of=NOW)
    assert snap3 is None and new3 == [] and s3.version == s2.version and s3.applied_episodes["e3"] == s2.version


def test_budget_drops_oldest_items_first():
    count = lambda text: 10  # noqa: E731  (every item costs 10 tokens)
    state = kb.KBState(namespace="ns")
    state, snap, _, _ = kb.append(state, items("a rule 1", "a rule 2", "a rule 3"), episode_ids=["e1"], budget=25, count=count, as_of=NOW)
    assert snap.items == ["a rule 2", "a rule 3"] and snap.tokens == 20
    assert snap.dropped_item_ids == [items("a rule 1")[0].id]
    state, snap, _, _ = kb.append(state, items("a rule 4"), episode_ids=["e2"], budget=25, count=count, as_of=NOW)
    assert snap.items == ["a rule 3", "a rule 4"]
    assert len(state.all_ids) == 4  # dropped items stay known, so they are not re-added as new


def test_writes_are_idempotent_and_latest_snapshot_is_found(tmp_path):
    store = LocalStore(tmp_path)
    state = kb.KBState(namespace="ns")
    state, snap1, new, _ = kb.append(state, items("rule one"), episode_ids=["e1"], budget=100, count=kb.approx_tokens, as_of=NOW)
    kb.write_append(store, snap1, new)
    kb.write_append(store, snap1, new)  # a replay: same keys, same bytes, no error
    state, snap2, new, _ = kb.append(state, items("rule two"), episode_ids=["e2"], budget=100, count=kb.approx_tokens, as_of=NOW)
    kb.write_append(store, snap2, new)
    assert kb.latest_snapshot(store, "ns") == snap2
    assert kb.load_snapshot(store, "ns", snap1.version) == snap1
    assert len(store.list("kb/ns/items/")) == 2
    assert kb.latest_snapshot(store, "empty") is None
