"""The processor's internal messages and table entries, typed.

Messages are pydantic models whose JSON is what the processor has always written (``{"flush": ...}``,
``{"op": ..., "episode_id": ...}``), so records already in the topics are read back unchanged. Table
entries are TypedDicts: Faust stores them as JSON, and the abandonment timer reads every open entry on each
tick, so they stay plain dicts (no validation) with their shape declared here.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

from pydantic import BaseModel, ConfigDict, TypeAdapter

from oel.episodes import CompletedEpisode


class BatchFlush(BaseModel):
    """On ``oel.episodes`` (key = namespace): extract the namespace's pending batch now, if it is still the
    batch that starts with episode ``flush`` (a timer sends it once the batch has waited ``batch_window_s``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flush: str

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


EpisodesRecord = CompletedEpisode | BatchFlush
"""What ``oel.episodes`` carries: a completed episode, or a batch flush."""

_EPISODES_RECORD: TypeAdapter[EpisodesRecord] = TypeAdapter(EpisodesRecord)


def parse_episodes_record(value: bytes) -> EpisodesRecord:
    """A record of ``oel.episodes`` as its type (raises pydantic's ValidationError for anything else)."""
    return _EPISODES_RECORD.validate_json(value)


class ControlCommand(BaseModel):
    """On the processor's control topic, on the episode's own partition: ``abandon`` an idle open episode,
    or ``purge`` a closed episode's tombstone from the ``episodes`` table (Faust tables change only inside
    a stream, never from a timer, hence commands)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["abandon", "purge"]
    episode_id: str


class OpenEntry(TypedDict):
    """``episodes`` table, an open episode: the partition its events arrive on and its buffer
    (``EpisodeBuffer.model_dump(mode="json")``)."""

    partition: int
    buffer: dict[str, Any]


class ClosedEntry(TypedDict):
    """``episodes`` table, a closed episode's tombstone (a late duplicate cannot reopen it);
    ``truncated`` when it was closed at its size limit."""

    partition: int
    closed_at: float
    truncated: NotRequired[bool]


EpisodeEntry = OpenEntry | ClosedEntry
"""A value of the ``episodes`` table (key = episode id)."""


class KbEntry(TypedDict):
    """``kb`` table (key = namespace): the namespace's KB state (``KBState.model_dump(mode="json")``)."""

    state: dict[str, Any]
