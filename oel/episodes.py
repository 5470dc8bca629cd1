"""Episode assembly: turning a stream of trajectory events into complete episodes.

Events of one episode share a key (the episode id) and so arrive on one partition, normally in order;
this module still tolerates duplicates (same event id or sequence number) and steps that arrive out
of order. An episode is *complete* when its end event is in and every sequence number before it has
arrived. An episode that receives nothing for a while is *abandoned*: it is closed with what it has
and handled like any other (its outcome says it was abandoned), so no trajectory is ever lost.

Everything here is pure data and functions. :func:`assemble` is the assembler of one record: the Faust
processor (which keeps :class:`EpisodeBuffer` in a table) and the in-process demo both call it and
then carry out what it says (dead-letter the record, keep the episode open, or close it with
:func:`close`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from oel.schemas import ChatMessage, EndPayload, EventKind, InvalidMessage, StartPayload, StepPayload, TrajectoryEvent, decode


class EpisodeStatus(str, Enum):
    completed = "completed"
    abandoned = "abandoned"


class EpisodeBuffer(BaseModel):
    """The events of one episode received so far (the processor's table value)."""

    model_config = ConfigDict(extra="forbid")

    namespace: str
    episode_id: str
    agent_id: str
    model_version: str
    events: dict[int, TrajectoryEvent] = Field(default_factory=dict, description="By sequence number.")
    event_ids: list[str] = Field(default_factory=list)
    last_event_ts: datetime
    received_at: float = Field(description="Wall-clock time (s) the last event arrived, for abandonment.")
    size_bytes: int = Field(0, ge=0, description="The serialised size of its events together.")

    @property
    def end_seq(self) -> int | None:
        ends = [seq for seq, ev in self.events.items() if ev.kind is EventKind.end]
        return min(ends) if ends else None

    def is_complete(self) -> bool:
        end = self.end_seq
        return end is not None and all(seq in self.events for seq in range(end))


class CompletedEpisode(BaseModel):
    """A whole episode, as stored under ``trajectories/<namespace>/<episode id>.json``.

    ``steps`` keeps every turn's prompt: each is a training prefix for the learner.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str
    episode_id: str
    agent_id: str
    model_version: str
    status: EpisodeStatus
    start: StartPayload | None = None
    steps: list[StepPayload]
    end: EndPayload
    started_at: datetime
    ended_at: datetime
    missing_seqs: list[int] = Field(default_factory=list, description="Sequence numbers that never arrived.")

    @property
    def store_key(self) -> str:
        return episode_key(self.namespace, self.episode_id)

    @property
    def training_prefixes(self) -> list[list[ChatMessage]]:
        return [step.prompt for step in self.steps]


def episode_key(namespace: str, episode_id: str) -> str:
    return f"trajectories/{namespace}/{episode_id}.json"


class AddResult(str, Enum):
    duplicate = "duplicate"
    accepted = "accepted"
    complete = "complete"
    conflict = "conflict"
    too_large = "too_large"


def add_event(
    buffer: EpisodeBuffer | None, event: TrajectoryEvent, now: float, *, size: int = 0, max_bytes: int | None = None
) -> tuple[EpisodeBuffer, AddResult]:
    """Add one event (``size`` bytes serialised) to its episode's buffer (a new buffer if ``None``);
    ``too_large`` (nothing added) when it would take the episode past ``max_bytes``."""
    if buffer is None:
        buffer = EpisodeBuffer(
            namespace=event.namespace,
            episode_id=event.episode_id,
            agent_id=event.agent_id,
            model_version=event.model_version,
            last_event_ts=event.ts,
            received_at=now,
        )
    if event.namespace != buffer.namespace:
        return buffer, AddResult.conflict
    if event.event_id in buffer.event_ids or event.seq in buffer.events:
        return buffer, AddResult.duplicate
    if max_bytes is not None and buffer.size_bytes + size > max_bytes:
        return buffer, AddResult.too_large
    buffer.size_bytes += size
    buffer.events[event.seq] = event
    buffer.event_ids.append(event.event_id)
    buffer.last_event_ts = max(buffer.last_event_ts, event.ts)
    buffer.received_at = now
    return buffer, AddResult.complete if buffer.is_complete() else AddResult.accepted


def close(buffer: EpisodeBuffer, *, abandoned: bool, idle_s: float | None = None, reason: str | None = None) -> CompletedEpisode:
    """Turn a buffer into a :class:`CompletedEpisode` (complete, or abandoned with what arrived: after
    ``idle_s`` without events, or for ``reason``)."""
    end_seq = buffer.end_seq
    ordered = [buffer.events[s] for s in sorted(buffer.events) if end_seq is None or s <= end_seq]
    last = max(buffer.events) if end_seq is None else end_seq
    missing = [s for s in range(last + 1) if s not in buffer.events]
    start = next((ev.start for ev in ordered if ev.kind is EventKind.start), None)
    steps = [ev.step for ev in ordered if ev.kind is EventKind.step and ev.step is not None]
    end_event = buffer.events.get(end_seq) if end_seq is not None else None
    if end_event is not None and end_event.end is not None and not abandoned:
        end = end_event.end
        status = EpisodeStatus.completed
    else:
        why = reason or (f"no event for {idle_s:.0f}s" if idle_s is not None else "closed before its end")
        base = end_event.end.outcome + " " if end_event is not None and end_event.end else ""
        end = EndPayload(outcome=f"{base}(episode abandoned: {why}; {len(steps)} steps received)".strip(), success=None)
        status = EpisodeStatus.abandoned
    times = [ev.ts for ev in ordered] or [buffer.last_event_ts]
    return CompletedEpisode(
        namespace=buffer.namespace,
        episode_id=buffer.episode_id,
        agent_id=buffer.agent_id,
        model_version=buffer.model_version,
        status=status,
        start=start,
        steps=steps,
        end=end,
        started_at=min(times),
        ended_at=max(times),
        missing_seqs=missing,
    )


@dataclass(frozen=True)
class ClosedEpisode:
    """What the assembler remembers of an episode it has closed (the processor's tombstone):
    ``truncated`` when it was closed at its size limit."""

    truncated: bool = False


class Action(str, Enum):
    """What the caller does with a record after :func:`assemble`."""

    dead_letter = "dead_letter"
    """Send the record to its DLQ with :attr:`Assembly.reason`."""
    ignore = "ignore"
    """Nothing (a duplicate, or a late event of an episode closed complete)."""
    keep_open = "keep_open"
    """Keep :attr:`Assembly.buffer` as the episode's open buffer."""
    close = "close"
    """The episode is complete: close :attr:`Assembly.buffer` (not abandoned)."""
    close_truncated = "close_truncated"
    """The record takes the episode past its size limit: dead-letter the record with :attr:`Assembly.reason`
    and close :attr:`Assembly.buffer` (abandoned, for :attr:`Assembly.close_reason`)."""


@dataclass(frozen=True)
class Assembly:
    """The outcome of one record: the :class:`Action`, the decoded event and its episode's buffer (when
    valid), the dead-letter reason, and why a truncated episode is closed."""

    action: Action
    event: TrajectoryEvent | None = None
    buffer: EpisodeBuffer | None = None
    reason: str | None = None
    close_reason: str | None = None


EpisodeLookup = Callable[[str], "EpisodeBuffer | ClosedEpisode | None"]
"""``episode id -> its open buffer, its tombstone, or None (never seen)``."""


def assemble(
    key: bytes | None, value: bytes, lookup: EpisodeLookup, now: float, *, max_event_bytes: int, max_episode_bytes: int
) -> Assembly:
    """Assemble one record of ``oel.trajectories`` (key = episode id): decode and validate it, check its
    key, find its episode (``lookup``) and add the event (:func:`add_event`); returns what to do."""
    try:
        ev = decode(value, TrajectoryEvent, max_bytes=max_event_bytes)
    except InvalidMessage as exc:
        return Assembly(Action.dead_letter, reason=exc.reason)
    decoded_key = key.decode(errors="replace") if key is not None else None
    if decoded_key != ev.episode_id:
        return Assembly(Action.dead_letter, ev, reason=f"record key {decoded_key!r} is not the episode id {ev.episode_id!r}")
    found = lookup(ev.episode_id)
    if isinstance(found, ClosedEpisode):
        if found.truncated:  # not a late duplicate: an event the closed episode never had
            return Assembly(Action.dead_letter, ev, reason=f"episode {ev.episode_id!r} was closed at its size limit")
        return Assembly(Action.ignore, ev)
    size = len(value)
    buffer, result = add_event(found, ev, now, size=size, max_bytes=max_episode_bytes)
    if result is AddResult.too_large:
        limit = f"over the episode limit of {max_episode_bytes} bytes (OEL_TOPICS__MAX_EPISODE_BYTES)"
        return Assembly(
            Action.close_truncated,
            ev,
            buffer,
            reason=f"episode {ev.episode_id!r} would be {buffer.size_bytes + size} bytes, {limit}",
            close_reason=f"closed at event {ev.seq}: {limit}",
        )
    if result is AddResult.conflict:
        return Assembly(
            Action.dead_letter, ev, buffer, reason=f"namespace {ev.namespace!r} differs from the episode's {buffer.namespace!r}"
        )
    if result is AddResult.complete:
        return Assembly(Action.close, ev, buffer)
    if result is AddResult.accepted:
        return Assembly(Action.keep_open, ev, buffer)
    return Assembly(Action.ignore, ev, buffer)  # a duplicate
