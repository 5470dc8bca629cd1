"""The learner's trigger policy: thresholds, cool-down, duplicate updates, deterministic round ids."""

from __future__ import annotations

import pytest

from learner.policy import TriggerPolicy, kb_seq, round_id
from oel.schemas import ExperienceUpdate
from oel.settings import LearnerSettings


def update(ns: str, seq: int, items: list[str], total: int = 0) -> ExperienceUpdate:
    return ExperienceUpdate(namespace=ns, kb_version=f"{seq:06d}-{seq:012x}", new_item_ids=items, total_items=total)


def test_no_round_below_the_threshold_then_one_at_it():
    p = TriggerPolicy(min_new_items=3, cooldown_s=0)
    p.observe(update("shop", 1, ["a", "b"]))
    assert p.new_items("shop") == 2
    assert p.due("shop", now=100.0) is None
    p.observe(update("shop", 2, ["c"]))
    t = p.due("shop", now=100.0)
    assert t is not None
    assert (t.namespace, t.kb_version, t.new_items, t.parent_version) == ("shop", "000002-000000000002", 3, None)
    assert t.kb_versions == ("000001-000000000001", "000002-000000000002")
    assert p.due("other", now=100.0) is None  # namespaces are independent


def test_duplicate_updates_and_repeated_item_ids_count_once():
    p = TriggerPolicy(min_new_items=3, cooldown_s=0)
    u = update("shop", 1, ["a", "b"])
    assert p.observe(u) is True
    assert p.observe(u) is False  # delivered twice
    assert p.observe(update("shop", 1, ["a", "b"])) is False  # same KB version, new message object
    assert p.new_items("shop") == 2
    p.observe(update("shop", 2, ["b"]))  # an id seen before (not a new item)
    assert p.new_items("shop") == 2
    assert p.due("shop", 0.0) is None


def test_cooldown_since_the_last_round_start():
    p = TriggerPolicy(min_new_items=1, cooldown_s=600)
    p.observe(update("shop", 1, ["a"]))
    t1 = p.due("shop", now=1000.0)
    assert t1 is not None  # no round yet: no cool-down
    p.round_started(t1, now=1000.0)
    p.round_finished(t1, new_version="g0001-x")
    assert p.new_items("shop") == 0
    p.observe(update("shop", 2, ["b"]))
    assert p.due("shop", now=1599.0) is None
    assert p.cooldown_left("shop", 1599.0) == pytest.approx(1.0)
    t2 = p.due("shop", now=1600.0)
    assert t2 is not None and t2.parent_version == "g0001-x" and t2.kb_version == "000002-000000000002"
    assert t2.round_id != t1.round_id


def test_consolidated_versions_are_not_counted_again_after_a_restart():
    # A restarted learner re-reads uncommitted updates; the registry says KB version 2 is consolidated.
    p = TriggerPolicy(min_new_items=2, cooldown_s=0)
    p.restore("shop", parent_version="g0001-x", consolidated_kb_version="000002-000000000002", last_round_at=None)
    assert p.observe(update("shop", 1, ["a"])) is False
    assert p.observe(update("shop", 2, ["b", "c"])) is False
    assert p.observe(update("shop", 3, ["d"])) is True
    assert p.new_items("shop") == 1
    p.observe(update("shop", 4, ["e"]))
    t = p.due("shop", 0.0)
    assert t is not None and t.parent_version == "g0001-x" and t.kb_versions == ("000003-000000000003", "000004-000000000004")


def test_restore_drops_pending_updates_already_consolidated():
    p = TriggerPolicy(min_new_items=1, cooldown_s=0)
    p.observe(update("shop", 1, ["a"]))
    p.observe(update("shop", 2, ["b"]))
    p.restore("shop", parent_version="v", consolidated_kb_version="000001-000000000001", last_round_at=None)
    assert p.new_items("shop") == 1


def test_round_id_is_deterministic_and_depends_on_all_three_inputs():
    a = round_id("shop", None, "000003-abc")
    assert a == round_id("shop", None, "000003-abc")
    assert len(a) == 24 and int(a, 16) >= 0
    assert (
        len({a, round_id("shop", "g0001-x", "000003-abc"), round_id("shop", None, "000004-abc"), round_id("shoe", None, "000003-abc")}) == 4
    )
    # Two policies (before and after a restart) fed the same updates compute the same id.
    ids = []
    for _ in range(2):
        p = TriggerPolicy(min_new_items=2, cooldown_s=0)
        for u in (update("shop", 1, ["a"]), update("shop", 2, ["b"])):
            p.observe(u)
        ids.append(p.due("shop", 5.0).round_id)
    assert ids[0] == ids[1] == round_id("shop", None, "000002-000000000002")


def test_versions_without_sequence_prefix_use_arrival_order():
    assert kb_seq("000012-ab") == 12 and kb_seq("custom") is None
    p = TriggerPolicy(min_new_items=1, cooldown_s=0)
    for v in ("zeta", "alpha"):
        p.observe(ExperienceUpdate(namespace="shop", kb_version=v, new_item_ids=[v], total_items=1))
    t = p.due("shop", 0.0)
    assert t.kb_version == "alpha" and t.kb_versions == ("zeta", "alpha")
    p.round_finished(t, "g0001-x")
    assert p.new_items("shop") == 0


def test_from_settings_and_bad_values():
    p = TriggerPolicy.from_settings(LearnerSettings(min_new_items=5, cooldown_s=30))
    assert (p.min_new_items, p.cooldown_s) == (5, 30)
    with pytest.raises(ValueError):
        TriggerPolicy(min_new_items=0, cooldown_s=0)
    with pytest.raises(ValueError):
        TriggerPolicy(min_new_items=1, cooldown_s=-1)
