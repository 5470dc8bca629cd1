"""Which model version an agent should use, read from the compacted ``oel.model-versions`` topic.

The topic holds one :class:`~oel.schemas.ModelVersion` per namespace (key = namespace; compaction
keeps the last value). A :class:`VersionFollower` reads the topic to its end at start, then follows
it in a background thread::

    follower = VersionFollower("support-bot").start()
    while serving:
        with recorder.episode("support-bot", agent_id, follower) as ep:   # samples follower.pin()
            backend.use_adapter(ep.version)          # fixed for the whole episode
            ...

What the messages mean (promoted, rolled back, rejected, candidate, tombstone) is the protocol of
:mod:`oel.versions` (:class:`~oel.versions.VersionState`); the learner publishes them
(:func:`oel.ops.versions.publish_version`, :meth:`learner.versions.ModelRegistry.rollback`).

Agents ask for the version only at episode boundaries (:meth:`VersionFollower.pin`, called by
:meth:`~producers.recorder.Recorder.episode`); a version that arrives mid-episode is used from the next
episode on. In-context mode: give the follower a ``kb_snapshot`` hook; :meth:`~VersionFollower.pin`
calls it between episodes and the episode carries the snapshot (``ep.kb``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import Consumer

from oel import metrics
from oel.ops.versions import assign_from_beginning, namespace_message, read_to, reader_config
from oel.schemas import ModelVersion, VersionStatus
from oel.settings import Settings, load_settings
from oel.versions import BASE_VERSION, VersionState, VersionTopicError
from producers.recorder import PinnedVersion

log = logging.getLogger(__name__)

KbSnapshot = Callable[[str, ModelVersion | None], Any]
"""In-context mode hook: ``(namespace, version) -> KB snapshot`` (any object; the agent's prompt uses it)."""

VersionChange = Callable[[ModelVersion | None, ModelVersion | None], None]
"""Called as ``(old, new)`` on the follower's thread when the current version changes."""


VersionFollowerError = VersionTopicError
"""The model-versions topic could not be read (missing topic, broker down at start)."""


class VersionFollower:
    """Follows one namespace's current model version. Start it with :meth:`start` (or ``with``).

    ``kb_snapshot`` is the optional in-context-mode hook, called by :meth:`pin` between episodes.
    ``on_change(old, new)`` is called on the follower's thread whenever the current version changes.
    """

    def __init__(
        self,
        namespace: str,
        settings: Settings | None = None,
        *,
        topic: str | None = None,
        kb_snapshot: KbSnapshot | None = None,
        on_change: VersionChange | None = None,
        start_timeout_s: float = 30.0,
        consumer_config: Mapping[str, Any] | None = None,
    ):
        self.namespace = namespace
        self.settings = settings or load_settings()
        self.topic = topic or self.settings.topics.model_versions
        self.kb_snapshot = kb_snapshot
        self.on_change = on_change
        self.start_timeout_s = start_timeout_s
        self._consumer_config = {
            **reader_config(self.settings, namespace, "producers.versions.librdkafka"),
            **(consumer_config or {}),
        }
        self._consumer: Consumer | None = None
        self._cond = threading.Condition()
        self._state = VersionState(namespace)
        self._messages = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the agent's side -----------------------------------------------------------------------

    def current(self) -> ModelVersion | None:
        """The namespace's current (promoted) version; None = the base model."""
        with self._cond:
            return self._state.current

    def pin(self) -> PinnedVersion:
        """What the next episode runs with: the current version and, in in-context mode, a KB snapshot.

        Call it only between episodes (the recorder does, when an episode starts); the episode keeps
        the result to its end.
        """
        if self._thread is None:
            raise VersionFollowerError(f"the follower of {self.namespace} is not running: call start() (or use `with`) first")
        version = self.current()
        kb = self.kb_snapshot(self.namespace, version) if self.kb_snapshot is not None else None
        return PinnedVersion(version.version if version else BASE_VERSION, version, kb)

    def wait_for(self, predicate: Callable[[ModelVersion | None], bool], timeout_s: float = 30.0) -> ModelVersion | None:
        """Block until ``predicate(current())`` holds; returns that version, or raises TimeoutError."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self._state.current), timeout_s):
                name = self._state.current.version if self._state.current else BASE_VERSION
                raise TimeoutError(f"{self.namespace}: condition not met within {timeout_s:g}s (current: {name})")
            return self._state.current

    @property
    def messages_seen(self) -> int:
        """Messages of this namespace read so far (valid ones)."""
        return self._messages

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> VersionFollower:
        """Read the topic to its end (so ``current()`` is right on return), then follow it in a thread."""
        if self._thread is not None:
            return self
        consumer = Consumer(self._consumer_config)
        try:
            ends = self._assign_from_beginning(consumer)
            self._consumer = consumer
            self._read_to(ends)
        except BaseException:
            consumer.close()
            self._consumer = None
            raise
        self._thread = threading.Thread(target=self._follow, name=f"oel-version-follower-{self.namespace}", daemon=True)
        self._thread.start()
        current = self.current()
        log.info(
            "%s: following %s from version %s (%d messages read)",
            self.namespace,
            self.topic,
            current.version if current else BASE_VERSION,
            self._messages,
        )
        return self

    def stop(self) -> None:
        """Stop following (the last version stays readable)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def __enter__(self) -> VersionFollower:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reading ----------------------------------------------------------------------------------

    def _assign_from_beginning(self, consumer: Consumer) -> dict[int, int]:
        return assign_from_beginning(consumer, self.topic, self.start_timeout_s, self.settings.kafka.bootstrap_servers)

    def _read_to(self, ends: dict[int, int]) -> None:
        """Consume until every partition's position reaches its end offset as of start."""
        assert self._consumer is not None
        read_to(self._consumer, self.topic, ends, self._handle, self.start_timeout_s)

    def _follow(self) -> None:
        assert self._consumer is not None
        while not self._stop.is_set():
            msg = self._consumer.poll(0.25)
            if msg is not None:
                self._handle(msg)

    def _handle(self, msg) -> None:
        mine, version = namespace_message(msg, self.namespace)
        if mine:
            self._apply(version)

    def _apply(self, version: ModelVersion | None) -> None:
        """One message, in topic order: update the current version per the protocol (:class:`VersionState`)."""
        with self._cond:
            self._messages += 1
            old, new = self._state.apply(version)
            if new is not old:
                self._cond.notify_all()
        if (old.version if old else None) != (new.version if new else None):
            name = new.version if new else BASE_VERSION
            log.info("%s: current model version %s -> %s", self.namespace, old.version if old else BASE_VERSION, name)
            # A rolled_back message that moves the current version, read live (not while catching up at
            # start), is a rollback: counted in oel_model_rollbacks_total (alert OELModelRollback).
            rolled_back = version is not None and version.status is VersionStatus.rolled_back and self._thread is not None
            metrics.set_current_version(self.namespace, name, rollback=rolled_back)
            if self.on_change is not None:
                try:
                    self.on_change(old, new)
                except Exception:  # noqa: BLE001 - a bad hook must not stop the follower
                    log.exception("%s: on_change hook failed", self.namespace)
