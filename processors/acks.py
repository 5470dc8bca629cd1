"""Acks handed to Faust in offset order, per partition.

The extraction stage acks a record only once its namespace's batch is in the KB, and several namespaces
share a partition of ``oel.episodes``, so its acks come out of offset order. faust-streaming's commit
(``Consumer._new_offset``) guards the head of a partition with ``min(acked) - committed > 1``, where
``committed`` is the next offset to read: with the record at that offset still un-acked and the next one
acked, the difference is 1 and it commits past the un-acked record. A worker killed then loses it (the
fault suite lost one episode this way with 8 namespaces, none with 1).

:class:`InOrderAcks` holds every ack until all records delivered before it on the same partition are
acked, so Faust never sees an ack past an un-acked record.
"""

from __future__ import annotations

import heapq
from typing import Any


class InOrderAcks:
    """Per partition: the offsets delivered and not yet released, and the acks waiting for earlier ones."""

    def __init__(self) -> None:
        self._open: dict[Any, list[int]] = {}  # partition -> heap of offsets delivered, not yet released
        self._listed: dict[Any, set[int]] = {}  # the same offsets, for membership
        self._acked: dict[tuple[Any, int], list[Any]] = {}  # (partition, offset) -> its acked events, held

    def delivered(self, tp: Any, offset: int) -> None:
        """A record the stage now handles (and will ack); a record delivered again is one entry."""
        listed = self._listed.setdefault(tp, set())
        if offset not in listed:
            listed.add(offset)
            heapq.heappush(self._open.setdefault(tp, []), offset)

    def ack(self, tp: Any, offset: int, event: Any) -> list[Any]:
        """The stage is done with ``event``: the events that may be acked now, in offset order."""
        self.delivered(tp, offset)  # (an event acked without being announced holds nothing back)
        self._acked.setdefault((tp, offset), []).append(event)
        heap, listed, out = self._open[tp], self._listed[tp], []
        while heap and (tp, heap[0]) in self._acked:
            first = heapq.heappop(heap)
            listed.discard(first)
            out.extend(self._acked.pop((tp, first)))
        return out

    def held(self) -> int:
        """Acks waiting for an earlier record of their partition."""
        return sum(len(v) for v in self._acked.values())

    def reset(self) -> None:
        """Partitions moved: what was delivered is read again by their next owner."""
        self._open.clear()
        self._listed.clear()
        self._acked.clear()
