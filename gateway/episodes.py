"""The gateway's open episodes: which call belongs to which episode, and when a step is recorded.

A call names its episode by the ``X-OEL-Episode-Id`` header or ``metadata.oel_episode_id``; a call that
names none starts a new episode, whose id comes back in the ``X-OEL-Episode-Id`` response header. Each
answered call is one step. A step is held until the episode's next call, its feedback, its end or its
idle end, so that feedback posted after the answer lands in the step it is about; then it is recorded
through the Recorder. An episode keeps the model version it started with to its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from gateway.openai_format import Answer
from oel import metrics
from oel.schemas import ChatMessage
from producers.recorder import AsyncEpisode, Recorder

log = logging.getLogger(__name__)

IDLE_OUTCOME = "ended by the gateway after {seconds:g} s without a call (no outcome was reported)"


class UnknownEpisode(KeyError):
    """Feedback or an end for an episode the gateway has no open record of."""


@dataclass
class _Pending:
    prompt: list[ChatMessage]
    answer: Answer
    feedback: str | None = None


@dataclass
class OpenEpisode:
    """One episode in progress: the recorder's episode, its held step, when it was last used."""

    episode: AsyncEpisode
    model: str
    """What the upstream serves this episode (the adapter of its version, or the base model's name)."""
    last_used: float
    pending: _Pending | None = None

    @property
    def version(self) -> str:
        return self.episode.model_version

    async def flush(self) -> None:
        """Record the held step, if any."""
        if self.pending is not None:
            p, self.pending = self.pending, None
            await self.episode.step(p.prompt, p.answer.text, feedback=p.feedback, tool_calls=p.answer.tool_calls)
            metrics.GATEWAY_STEPS.labels(namespace=self.episode.namespace).inc()


class OpenEpisodes:
    """Open episodes by id (see the module docstring). ``clock`` returns monotonic seconds."""

    def __init__(self, recorder: Recorder, idle_end_s: float, clock: Callable[[], float] = time.monotonic):
        self.recorder = recorder
        self.idle_end_s = idle_end_s
        self.clock = clock
        self._open: dict[str, OpenEpisode] = {}
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # episode id -> (its lock, coroutines using it)

    @contextlib.asynccontextmanager
    async def lock(self, episode_id: str) -> AsyncIterator[None]:
        """Hold the episode: its calls, feedback and end happen one at a time, in the order they came."""
        lock, users = self._locks.get(episode_id, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[episode_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[episode_id]
            if users > 1:
                self._locks[episode_id] = (lock, users - 1)
            else:
                del self._locks[episode_id]

    def _busy(self, episode_id: str) -> bool:
        return episode_id in self._locks

    def find(self, episode_id: str) -> OpenEpisode | None:
        return self._open.get(episode_id)

    def get(self, episode_id: str) -> OpenEpisode:
        try:
            return self._open[episode_id]
        except KeyError:
            raise UnknownEpisode(episode_id) from None

    def new(self, namespace: str, agent_id: str, episode_id: str, version: str, model: str) -> OpenEpisode:
        """A new open episode with ``version`` (served as ``model``); its start is recorded with its first step."""
        ep = self.recorder.aepisode(namespace, agent_id, version, episode_id=episode_id)
        entry = self._open[episode_id] = OpenEpisode(ep, model, self.clock())
        metrics.GATEWAY_OPEN_EPISODES.set(len(self._open))
        return entry

    async def answered(self, entry: OpenEpisode, prompt: list[ChatMessage], answer: Answer, feedback: str | None = None) -> None:
        """A call of the episode was answered (hold the episode's lock): record the step held before, hold this one."""
        await entry.flush()
        entry.pending = _Pending(prompt, answer, feedback)
        entry.last_used = self.clock()

    async def feedback(self, episode_id: str, text: str) -> None:
        """Feedback on the episode's last answer: it is recorded with that step, now."""
        async with self.lock(episode_id):
            entry = self.get(episode_id)
            if entry.pending is None:
                raise UnknownEpisode(f"{episode_id}: no answer waits for feedback (feedback comes once, after a call)")
            entry.pending.feedback = text
            entry.last_used = self.clock()
            await entry.flush()

    async def end(self, episode_id: str, outcome: str, success: bool | None) -> None:
        async with self.lock(episode_id):
            await self._close(episode_id, self.get(episode_id), outcome, success)

    async def end_idle(self) -> int:
        """End every episode idle for ``idle_end_s``; returns how many."""
        now, ended = self.clock(), 0
        for episode_id, entry in list(self._open.items()):
            if now - entry.last_used >= self.idle_end_s and not self._busy(episode_id):
                async with self.lock(episode_id):
                    await self._close(episode_id, entry, IDLE_OUTCOME.format(seconds=self.idle_end_s), None)
                ended += 1
        return ended

    async def end_all(self, outcome: str) -> None:
        """End every open episode (the gateway stops): nothing held is lost."""
        for episode_id, entry in list(self._open.items()):
            async with self.lock(episode_id):
                await self._close(episode_id, entry, outcome, None)

    async def _close(self, episode_id: str, entry: OpenEpisode, outcome: str, success: bool | None) -> None:
        if self._open.get(episode_id) is not entry:
            return  # ended meanwhile
        try:
            if not entry.episode.started and entry.pending is None:
                return  # no call of it was ever answered: nothing was recorded, nothing to end
            await entry.flush()
            await entry.episode.end(outcome, success, wait=False)
        finally:
            del self._open[episode_id]
            metrics.GATEWAY_OPEN_EPISODES.set(len(self._open))
        log.info("%s/%s ended after %d steps: %s", entry.episode.namespace, episode_id, entry.episode.seq - 2, outcome)

    def __len__(self) -> int:
        return len(self._open)
