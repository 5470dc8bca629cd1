"""Records that Faust read from a partition but never handed to the agent: found and read again.

After a rebalance, faust-streaming resumes the flow of records while it restores its tables, seeks the
stream partitions to their committed offsets, and then resumes the flow once more, which empties the
agents' queues. Records fetched between the seek and that last resume are dropped from the queue while
the fetcher counts them as read, so they are never delivered (seen on a restarted worker: one or two of
the last episodes never reached extraction). Worse, when the one record dropped is the one at the
committed offset, Faust's commit treats the next acked offset as contiguous and commits past it.

:class:`DeliveryGuard` keeps, per partition, the offset of the next record its agent must receive (the
committed offset after an assignment). OEL's topics are written without transactions, so their offsets
have no holes: a record past the expected one means records were dropped. The agent then leaves that
record un-acked and unprocessed and seeks the partition back, so records are handled in log order, as
in a run without the drop. Records at the end of a partition cannot show a hole; a partition whose high
watermark stays past the expected offset while the agent waits for records, over two checks, is sought
back too. A seek that was not needed only delivers records again, which both stages ignore.

A hole that stays after :data:`REAL_HOLE_AFTER_S` of seeking is taken as one the log really has (a
transaction marker of an outside producer that used transactions, or compaction) and passed over.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

REAL_HOLE_AFTER_S = 30.0
"""Seconds of seeking after which a hole in a partition's offsets is taken as real (no record there)."""


@dataclass
class DeliveryGuard:
    """The delivery state of one agent's topic (see the module docstring). Partitions are Faust ``TP``s."""

    topic: str
    expected: dict[Any, int] = field(default_factory=dict)
    """Per partition, the offset after the last record the agent received in order."""
    busy: int = 0
    """How many records or batches the agent is handling now (it is not waiting for records)."""
    seeks: dict[Any, int] = field(default_factory=dict)
    """Per partition, where the agent must seek before records of it are admitted again."""
    _suspects: dict[Any, int] = field(default_factory=dict)
    _hole_since: dict[tuple[Any, int], float] = field(default_factory=dict)

    def admit(self, tp: Any, offset: int, committed: int | None) -> bool:
        """Whether the agent may handle this record now; if not, a seek for its partition is due.

        ``committed``: the partition's committed offset, the start of the first record expected after an
        assignment (None if unknown: then the first record sets the expectation)."""
        if tp in self.seeks:
            return False
        expected = self.expected.get(tp, committed)
        if expected is not None and offset > expected:
            since = self._hole_since.setdefault((tp, expected), time.monotonic())
            if time.monotonic() - since < REAL_HOLE_AFTER_S:
                self.seeks[tp] = expected
                return False
            log.warning(
                "%s: no record at offsets %d-%d after %.0fs of reading again; going on", tp, expected, offset - 1, REAL_HOLE_AFTER_S
            )
        self._hole_since.pop((tp, expected), None)
        if expected is None or offset + 1 > expected:
            self.expected[tp] = offset + 1
        return True

    def take_seeks(self) -> dict[Any, int]:
        """The seeks due (the agent performs them); records of those partitions are admitted again."""
        seeks, self.seeks = self.seeks, {}
        return seeks

    def reset(self) -> None:
        """Partitions were revoked or assigned: Faust seeks them to their committed offsets itself."""
        self.expected.clear()
        self.seeks.clear()
        self._suspects.clear()
        self._hole_since.clear()

    def stalled(self, highwaters: dict[Any, int | None], committed: dict[Any, int | None]) -> dict[Any, int]:
        """Partitions whose records the agent has not received although the log has them, unchanged
        since the previous check, while the agent was idle at both checks: where to seek them."""
        if self.busy:
            self._suspects.clear()
            return {}
        seek: dict[Any, int] = {}
        suspects: dict[Any, int] = {}
        for tp, high in highwaters.items():
            start = self.expected.get(tp, committed.get(tp))
            if high is None or start is None or high <= start:
                continue
            if self._suspects.get(tp) == start:
                seek[tp] = start
            else:
                suspects[tp] = start
        self._suspects = suspects
        return seek
