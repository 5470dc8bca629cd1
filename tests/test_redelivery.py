"""The processor's guard against records Faust read but never delivered (processors.redelivery)."""

from processors.redelivery import REAL_HOLE_AFTER_S, DeliveryGuard

TP = ("oel.episodes", 0)


def test_a_hole_at_the_committed_offset_holds_later_records_until_the_seek():
    guard = DeliveryGuard("oel.episodes")
    assert not guard.admit(TP, 3, committed=2)  # offset 2 was dropped: 3 must wait
    assert not guard.admit(TP, 4, committed=2)
    assert guard.take_seeks() == {TP: 2}
    assert [guard.admit(TP, o, committed=2) for o in (2, 3, 4)] == [True, True, True]
    assert guard.take_seeks() == {}


def test_a_hole_in_the_middle_and_duplicates_after_a_seek():
    guard = DeliveryGuard("oel.episodes")
    assert [guard.admit(TP, o, committed=2) for o in (2, 3)] == [True, True]
    assert not guard.admit(TP, 5, committed=2)  # 4 was dropped
    assert guard.take_seeks() == {TP: 4}
    assert guard.admit(TP, 3, committed=2)  # an old record delivered again: the stages ignore it
    assert [guard.admit(TP, o, committed=2) for o in (4, 5)] == [True, True]


def test_without_a_committed_offset_the_first_record_sets_the_expectation():
    guard = DeliveryGuard("oel.episodes")
    assert guard.admit(TP, 40, committed=None)  # retention may have removed the log's start
    assert not guard.admit(TP, 42, committed=None)
    assert guard.take_seeks() == {TP: 41}


def test_a_tail_the_agent_never_received_is_sought_after_two_idle_checks():
    guard = DeliveryGuard("oel.episodes")
    assert [guard.admit(TP, o, committed=2) for o in (2, 3)] == [True, True]
    assert guard.stalled({TP: 6}, {TP: 2}) == {}  # records 4 and 5 may still be on their way
    assert guard.stalled({TP: 6}, {TP: 2}) == {TP: 4}
    guard.busy = 1
    assert guard.stalled({TP: 6}, {TP: 2}) == {}  # an agent handling records is not waiting for them
    guard.busy = 0
    assert guard.stalled({TP: 4}, {TP: 2}) == {}  # all received
    assert guard.stalled({TP: 4}, {TP: 2}) == {}


def test_reset_forgets_everything():
    guard = DeliveryGuard("oel.episodes")
    guard.admit(TP, 5, committed=2)
    guard.reset()
    assert guard.take_seeks() == {} and guard.admit(TP, 7, committed=7)


def test_a_hole_the_log_really_has_is_passed_over_after_a_while(monkeypatch):
    """A transaction marker of an outside producer occupies an offset no record has: seeking cannot fill it."""
    now = [0.0]
    monkeypatch.setattr("processors.redelivery.time.monotonic", lambda: now[0])
    guard = DeliveryGuard("oel.trajectories")
    assert guard.admit(TP, 10, committed=10)
    for _ in range(5):  # the record after the marker, delivered again after every seek
        assert not guard.admit(TP, 12, committed=10)
        assert guard.take_seeks() == {TP: 11}
        now[0] += 5
    now[0] += REAL_HOLE_AFTER_S
    assert guard.admit(TP, 12, committed=10) and guard.take_seeks() == {}
    assert guard.admit(TP, 13, committed=10)
