"""The processor's internal messages, typed.

They are pydantic models whose JSON is what the processor has always written (``{"flush": ...}``,
``{"op": ..., "episode_id": ...}``), so records already in the topics are read back unchanged.
"""

from __future__ import annotations

from typing import Literal

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
