"""processors.acks.InOrderAcks: out-of-order acks reach Faust in offset order (its commit skips an un-acked head)."""

from __future__ import annotations

from processors.acks import InOrderAcks


def test_an_ack_waits_for_every_earlier_record_of_its_partition():
    acks = InOrderAcks()
    for offset in (484, 485, 486):
        acks.delivered("p0", offset)
    acks.delivered("p1", 7)
    # another namespace's batch (485, 486) is in the KB before the one holding 484: nothing may be acked yet
    assert acks.ack("p0", 486, "e486") == [] and acks.ack("p0", 485, "e485") == []
    assert acks.ack("p1", 7, "e7") == ["e7"]  # other partitions are not held back
    assert acks.held() == 2
    assert acks.ack("p0", 484, "e484") == ["e484", "e485", "e486"]
    assert acks.held() == 0


def test_a_record_delivered_twice_is_one_entry_and_both_of_its_events_are_acked():
    acks = InOrderAcks()
    acks.delivered("p0", 10)
    acks.delivered("p0", 10)  # read again after a seek
    acks.delivered("p0", 11)
    assert acks.ack("p0", 11, "b") == []
    assert acks.ack("p0", 10, "a1") == ["a1", "b"]
    assert acks.ack("p0", 10, "a2") == ["a2"]  # the second delivery's event, acked with its batch later


def test_reset_forgets_what_was_delivered():
    acks = InOrderAcks()
    acks.delivered("p0", 1)
    acks.delivered("p0", 2)
    assert acks.ack("p0", 2, "x") == []
    acks.reset()
    assert acks.held() == 0 and acks.ack("p0", 5, "y") == ["y"]
