"""A reference agent in production: plays episodes with its namespace's current model version, records
them with the recorder SDK, and follows the model-versions topic.

:class:`LiveAgent` ties the agent-side pieces together the way a deployed agent would:

* a :class:`~producers.versions.VersionFollower` on the compacted ``oel.model-versions`` topic, with an
  :class:`~producers.adapters.AdapterLoader` hook that fetches and loads each new version's adapter;
* the version is pinned once per batch of episodes (:meth:`VersionFollower.pin`), so an episode never
  switches adapters midway; the previous adapter is unloaded once no episode uses it any more;
* every finished episode goes to ``oel.trajectories`` through a :class:`~producers.recorder.Recorder`
  (start, one step per turn, end).

``oel agents serve`` runs one until stopped (the Kubernetes sample agent); ``oel demo --stack`` uses one
as the agent side of the loop.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from oel.model.backend import Backend
from oel.rollout import AgentConfig, Episode, run_episodes
from oel.schemas import TrajectoryEvent, decode
from oel.settings import Settings
from oel.store import ObjectStore
from oel.versions import BASE_VERSION
from producers.adapters import AdapterLoader
from producers.recorder import Recorder
from producers.versions import VersionFollower

log = logging.getLogger(__name__)


def record_episode(
    recorder: Recorder, episode: Episode, namespace: str, agent_id: str, version: str, *, episode_id: str | None = None
) -> int:
    """Record one played episode with the recorder SDK: start (the task, the metadata), one step per turn,
    end (``success`` only for metrics, as everywhere); returns how many events were sent."""
    with recorder.episode(namespace, agent_id, version, task=episode.first_prompt, metadata=episode.metadata, episode_id=episode_id) as rec:
        for turn in episode.turns:
            rec.step(turn.prompt, turn.response, action=turn.action, feedback=turn.feedback)
        rec.end(episode.outcome, success=episode.passed)
    return rec.seq


def episode_events(
    episode: Episode, namespace: str, episode_id: str, agent_id: str, version: str, settings: Settings | None = None
) -> list[TrajectoryEvent]:
    """The events the recorder sends for a played episode (recorded by :func:`record_episode` on an
    in-process bus), for tools that assemble episodes themselves."""
    from oel.bus import BusProducer, InProcessBus
    from oel.settings import load_settings

    bus = InProcessBus()
    with Recorder(settings or load_settings(), topic="episode", producer=BusProducer(bus)) as recorder:
        record_episode(recorder, episode, namespace, agent_id, version, episode_id=episode_id)
    return [decode(m.value, TrajectoryEvent) for m in bus.read("episode", "episode_events")]


class LiveAgent:
    """See the module docstring. ``make_env`` builds a fresh environment; ``agent`` says how to act (its
    ``adapter`` is ignored: the followed version decides)."""

    def __init__(
        self,
        settings: Settings,
        namespace: str,
        make_env: Callable,
        backend: Backend,
        store: ObjectStore,
        *,
        agent: AgentConfig = AgentConfig(),  # noqa: B008 - frozen, so sharing the default is safe
        agent_id: str | None = None,
        adapter_cache: str | Path | None = None,
        settle_s: float = 30.0,
    ):
        self.namespace = namespace
        self.make_env = make_env
        self.backend = backend
        self.agent = agent
        self.agent_id = agent_id or f"agent-{uuid.uuid4().hex[:8]}"
        self.loader = AdapterLoader(backend, store, cache_dir=adapter_cache)
        # OEL_MODEL__ADAPTERS=served: the servers' adapter sync loads versions (Kubernetes); this agent only checks
        # that its server lists a version before it plays with it, and never loads or unloads one itself.
        self.served = getattr(settings.model, "adapters", "load") == "served"
        self.settle_s = settle_s
        self._first_seen: dict[str, float] = {}
        self._played: set[str] = set()
        self.recorder = Recorder(settings)
        self.follower = VersionFollower(namespace, settings, on_change=None if self.served else self.loader).start()
        self.serving = BASE_VERSION

    def play(
        self, seeds: Iterable[int], episode_id: Callable[[Episode], str] | None = None, on_episode: Callable[[Episode], None] | None = None
    ) -> list[Episode]:
        """Play one batch of episodes (one per seed) with the version current now, recording each as it ends."""
        pinned = self.follower.pin()
        if pinned.version is not None and not self._usable(pinned.version):
            log.warning(
                "%s: the adapter of %s is not %s; playing this batch with %s",
                self.namespace,
                pinned.name,
                "served everywhere yet" if self.served else "loadable",
                self.serving,
            )
        else:
            self._switch(pinned.name)
        adapter = None if self.serving == BASE_VERSION else self.serving
        version = self.serving

        def record(ep: Episode) -> None:
            eid = episode_id(ep) if episode_id is not None else None
            record_episode(self.recorder, ep, self.namespace, self.agent_id, version, episode_id=eid)
            if on_episode is not None:
                on_episode(ep)

        return run_episodes(self.backend, self.make_env, seeds, replace(self.agent, adapter=adapter), on_episode=record)

    def _usable(self, version) -> bool:
        """Whether this batch can play with ``version``. Loading mode: its adapter is (now) loaded. Served mode: the
        server lists it, and it is one this agent played before (a rollback target) or was first seen at least
        ``settle_s`` ago, so that the other replicas behind the same Service have loaded it too."""
        if version.adapter_uri is None:
            return True
        if not self.served:
            return self.loader.load(version)
        import time

        name = version.version
        first = self._first_seen.setdefault(name, time.monotonic())
        try:
            listed = name in self.backend.list_adapters()
        except Exception as exc:  # noqa: BLE001 - the server is down or busy: keep the current version
            log.warning("%s: cannot list the server's adapters: %s", self.namespace, exc)
            return False
        return listed and (name in self._played or time.monotonic() - first >= self.settle_s)

    def _switch(self, name: str) -> None:
        """Serve ``name`` from the next batch on; the old adapter is unloaded (no episode uses it any more), unless
        the servers manage adapters themselves (served mode)."""
        self._played.add(name)
        if name == self.serving:
            return
        old, self.serving = self.serving, name
        log.info("%s: agent %s now plays with %s (was %s)", self.namespace, self.agent_id, name, old)
        if not self.served and old != BASE_VERSION and old in self.backend.list_adapters():
            self.backend.unload_adapter(old)

    def close(self) -> None:
        """Flush the recorder (raising if events were lost) and stop following."""
        try:
            self.recorder.close()
        finally:
            self.follower.stop()

    def __enter__(self) -> LiveAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
