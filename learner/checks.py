"""The comparisons a gate makes, and the reason and kind of its decision (the evaluation gate and the
knowledge gate both decide this way)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GateDecision:
    """What the evaluation gate decided. ``reason``: a sentence for people (recorded as the status
    reason); ``eval``: the numbers measured (stored in the manifest); ``kind``: for a rejection, the
    bounded metric label (one of :data:`oel.metrics.REJECT_REASONS`)."""

    accepted: bool
    reason: str | None = None
    eval: dict[str, float] = field(default_factory=dict)
    kind: str | None = None


EPS = 1e-9
"""Slack in a gate's comparisons, so that equal rates compare equal."""


def at_least(value: float, floor: float) -> bool:
    """``value >= floor``, with :data:`EPS` of slack (a rate equal to its floor passes)."""
    return not value < floor - EPS


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


class Checks:
    """The comparisons of one decision: each adds a line to the reason, marked FAILED when it did not hold."""

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.notes: list[str] = []

    def check(self, name: str, line: str, holds: bool) -> None:
        """Record one comparison; ``name`` goes into the decision's kind if it does not hold."""
        if holds:
            self.notes.append(line)
        else:
            self.failed.append(name)
            self.notes.append("FAILED " + line)

    def note(self, line: str) -> None:
        self.notes.append(line)

    @property
    def kind(self) -> str | None:
        """The failed checks' names joined by ``_and_`` (None when all held)."""
        return "_and_".join(self.failed) or None

    def reason(self, passed: str, failed: str) -> str:
        return (failed if self.failed else passed) + "; ".join(self.notes)
