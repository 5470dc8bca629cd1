"""Which model version an agent should use, read from the compacted ``oel.model-versions`` topic.

The topic holds one :class:`~oel.schemas.ModelVersion` per namespace (key = namespace; compaction
keeps the last value). A :class:`VersionFollower` reads the topic to its end at start, then follows
it in a background thread::

    follower = VersionFollower("support-bot").start()
    while serving:
        with recorder.episode("support-bot", agent_id, follower) as ep:   # samples follower.pin()
            backend.use_adapter(ep.version)          # fixed for the whole episode
            ...

Rules, in message order (the last one decides):

* ``promoted``: this version becomes current;
* ``rolled_back`` / ``rejected`` of the *current* version: fall back to its ``parent_version`` if that
  was seen promoted and is not itself bad, else to the newest good promoted version seen, else to
  the base model (``current()`` is None; agents record :data:`~producers.recorder.BASE_VERSION`);
  of any other version: nothing changes (a rejected candidate never served);
* ``candidate``: ignored (not serving yet);
* a tombstone (null value): the namespace has no version; the base model.

Publishers: because compaction keeps only the last message per namespace, the last message must be
the version to serve. :func:`rollback` therefore publishes ``rolled_back`` for the bad version and
then republishes the previous good version as ``promoted``, which simply wins — also for followers
that start after compaction. A ``rejected`` message published after the promoted one would hide it
from followers started later; publish rejections elsewhere, or republish the promoted version after
them (:func:`publish_version`).

Agents ask for the version only at episode boundaries (:meth:`VersionFollower.pin`, called by
:meth:`~producers.recorder.Recorder.episode`); a version that arrives mid-episode is used from the next
episode on. In-context mode: give the follower a ``kb_snapshot`` hook; :meth:`~VersionFollower.pin`
calls it between episodes and the episode carries the snapshot (``ep.kb``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from oel import metrics
from oel.schemas import InvalidMessage, ModelVersion, VersionStatus, decode
from oel.settings import Settings, load_settings
from producers.recorder import BASE_VERSION, PinnedVersion

log = logging.getLogger(__name__)

KbSnapshot = Callable[[str, ModelVersion | None], Any]
"""In-context mode hook: ``(namespace, version) -> KB snapshot`` (any object; the agent's prompt uses it)."""

VersionChange = Callable[[ModelVersion | None, ModelVersion | None], None]
"""Called as ``(old, new)`` on the follower's thread when the current version changes."""


class VersionFollowerError(RuntimeError):
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
            **self.settings.kafka.client_config(),
            "group.id": f"oel-version-follower-{namespace}-{uuid.uuid4().hex[:8]}",  # never commits
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "logger": logging.getLogger("producers.versions.librdkafka"),
            **(consumer_config or {}),
        }
        self._consumer: Consumer | None = None
        self._cond = threading.Condition()
        self._state = VersionState(namespace)
        self._messages = 0
        self._invalid = 0
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
            self.namespace, self.topic, current.version if current else BASE_VERSION, self._messages,
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
        try:
            md = consumer.list_topics(self.topic, timeout=self.start_timeout_s)
        except Exception as exc:  # KafkaException: broker down
            raise VersionFollowerError(f"cannot read {self.topic} at {self.settings.kafka.bootstrap_servers}: {exc}") from None
        tmd = md.topics.get(self.topic)
        if tmd is None or tmd.error is not None or not tmd.partitions:
            why = tmd.error.str() if tmd is not None and tmd.error is not None else "no such topic"
            raise VersionFollowerError(f"cannot follow {self.topic}: {why} (create it with `oel topics create`)")
        ends: dict[int, int] = {}
        deadline = time.monotonic() + self.start_timeout_s
        for p in sorted(tmd.partitions):
            while True:  # a partition just created (or whose leader moved) answers NOT_LEADER for a moment
                try:
                    low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=self.start_timeout_s)
                    break
                except KafkaException as exc:
                    err = exc.args[0]
                    if not err.retriable() and err.code() != KafkaError.NOT_LEADER_FOR_PARTITION or time.monotonic() > deadline:
                        raise VersionFollowerError(f"cannot read the end offsets of {self.topic}[{p}]: {err.str()}") from None
                    time.sleep(0.1)
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in sorted(tmd.partitions)])
        return ends

    def _read_to(self, ends: dict[int, int]) -> None:
        """Consume until every partition's position reaches its end offset as of start."""
        assert self._consumer is not None
        deadline = time.monotonic() + self.start_timeout_s
        pending = dict(ends)
        while pending:
            msg = self._consumer.poll(0.2)
            if msg is not None:
                self._handle(msg)
                if msg.error() is None and msg.partition() in pending and msg.offset() + 1 >= pending[msg.partition()]:
                    del pending[msg.partition()]
            if pending:  # a compacted log may have gaps: the fetch position is the truth
                positions = self._consumer.position([TopicPartition(self.topic, p) for p in pending])
                for tp in positions:
                    if tp.offset >= 0 and tp.offset >= pending[tp.partition]:
                        del pending[tp.partition]
            if pending and time.monotonic() > deadline:
                raise VersionFollowerError(
                    f"could not read {self.topic} to its end within {self.start_timeout_s:g}s (partitions {sorted(pending)})"
                )

    def _follow(self) -> None:
        assert self._consumer is not None
        while not self._stop.is_set():
            msg = self._consumer.poll(0.25)
            if msg is not None:
                self._handle(msg)

    def _handle(self, msg) -> None:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:  # noqa: SLF001
                log.warning("%s: error reading %s: %s", self.namespace, self.topic, err.str())
            return
        key = msg.key()
        if key is None or key.decode(errors="replace") != self.namespace:
            return
        if msg.value() is None:
            self._apply(None)
            return
        try:
            version = decode(msg.value(), ModelVersion)
        except InvalidMessage as exc:
            self._invalid += 1
            log.warning("%s: skipping an invalid message at %s[%d]@%d: %s", self.namespace, msg.topic(), msg.partition(), msg.offset(), exc.reason)
            return
        if version.namespace != self.namespace:
            log.warning("%s: skipping a version of namespace %s published under this key", self.namespace, version.namespace)
            return
        self._apply(version)

    def _apply(self, version: ModelVersion | None) -> None:
        """One message, in topic order: update the current version per the rules in the module docstring."""
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


class VersionState:
    """The rules of the module docstring as plain state: feed it a namespace's messages in topic order
    (:meth:`apply`); :attr:`current` is the version to serve (None = the base model). The Kafka
    :class:`VersionFollower` and the in-process demo both use it."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self.current: ModelVersion | None = None
        self._promoted: list[ModelVersion] = []  # every promoted message seen, in order
        self._bad: set[str] = set()  # versions rolled back or rejected (until promoted again)

    def apply(self, version: ModelVersion | None) -> tuple[ModelVersion | None, ModelVersion | None]:
        """Take one message (None = a tombstone); returns (old current, new current)."""
        old = self.current
        if version is None:
            new = None
        elif version.status is VersionStatus.promoted:
            self._bad.discard(version.version)
            self._promoted.append(version)
            new = version
        elif version.status in (VersionStatus.rolled_back, VersionStatus.rejected):
            self._bad.add(version.version)
            new = self._fallback(version) if old is not None and old.version == version.version else old
        else:  # candidate: not serving yet
            new = old
        self.current = new
        return old, new

    def _fallback(self, bad: ModelVersion) -> ModelVersion | None:
        good = [v for v in self._promoted if v.version not in self._bad]
        for v in reversed(good):
            if v.version == bad.parent_version:
                return v
        if good:
            return good[-1]
        log.warning(
            "%s: version %s was %s and no earlier good version is known; falling back to the base model",
            self.namespace, bad.version, bad.status.value,
        )
        return None


# --- publishing (the learner's side; here so the protocol lives in one place) -------------------------


def publish_version(
    version: ModelVersion,
    settings: Settings | None = None,
    *,
    topic: str | None = None,
    producer: Producer | None = None,
    timeout_s: float = 15.0,
) -> None:
    """Publish one ModelVersion on the compacted topic (key = namespace) and wait for the broker's ack."""
    settings = settings or load_settings()
    own = producer is None
    producer = producer or Producer({**settings.kafka.client_config(), "enable.idempotence": True, "acks": "all"})
    result: list = []
    producer.produce(
        topic or settings.topics.model_versions,
        version.to_bytes(),
        version.namespace,
        on_delivery=lambda err, msg: result.append(err),
    )
    producer.flush(timeout_s)
    if not result or result[0] is not None:
        why = result[0].str() if result else f"no acknowledgement within {timeout_s:g}s"
        raise VersionFollowerError(f"could not publish {version.namespace}/{version.version}: {why}")
    if own:
        del producer
    metrics.MODEL_VERSIONS_PUBLISHED.labels(namespace=version.namespace).inc()


def rollback(
    bad: ModelVersion,
    to: ModelVersion,
    reason: str,
    settings: Settings | None = None,
    *,
    topic: str | None = None,
) -> ModelVersion:
    """Roll ``bad`` back to the earlier good version ``to``: publish ``bad`` as rolled_back, then
    republish ``to`` as promoted (a fresh message, so it is the last one and wins after compaction).
    Returns the republished version."""
    rolled, again = rollback_events(bad, to, reason)
    settings = settings or load_settings()
    producer = Producer({**settings.kafka.client_config(), "enable.idempotence": True, "acks": "all"})
    publish_version(rolled, settings, topic=topic, producer=producer)
    publish_version(again, settings, topic=topic, producer=producer)
    return again


def rollback_events(bad: ModelVersion, to: ModelVersion, reason: str) -> tuple[ModelVersion, ModelVersion]:
    """The two messages of a rollback, in publishing order: ``bad`` as rolled_back, then ``to`` as promoted."""
    if bad.namespace != to.namespace:
        raise ValueError(f"cannot roll {bad.namespace} back to a version of {to.namespace}")
    if bad.version == to.version:
        raise ValueError(f"cannot roll {bad.version} back to itself")
    rolled = bad.model_copy(update={"status": VersionStatus.rolled_back, "reason": reason, "ts": _now()})
    again = to.model_copy(update={"status": VersionStatus.promoted, "reason": f"rollback of {bad.version}: {reason}", "ts": _now()})
    return rolled, again


def _now():
    from datetime import UTC, datetime

    return datetime.now(UTC)
