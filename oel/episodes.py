"""Episode assembly: turning a stream of trajectory events into complete episodes.

Events of one episode share a key (the episode id) and so arrive on one partition, normally in order;
this module still tolerates duplicates (same event id or sequence number) and steps that arrive out
of order. An episode is *complete* when its end event is in and every sequence number before it has
arrived. An episode that receives nothing for a while is *abandoned*: it is closed with what it has
and handled like any other (its outcome says it was abandoned), so no trajectory is ever lost.

Everything here is pure data and functions; the Faust processor keeps :class:`EpisodeBuffer` in a
table and calls :func:`add_event` / :func:`close`.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from oel.schemas import ChatMessage, EndPayload, EventKind, StartPayload, StepPayload, TrajectoryEvent


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
