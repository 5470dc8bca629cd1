"""The trajectory recorder: what an agent in production uses to stream its episodes to Kafka.

An agent wraps each episode in a context manager and reports every turn; the recorder turns that
into :class:`~oel.schemas.TrajectoryEvent` messages on ``oel.trajectories``::

    from producers import Recorder

    with Recorder() as recorder:                       # settings from OEL_* / stack.env
        with recorder.episode("support-bot", "agent-7", "v12", task="refund order 123") as ep:
            reply = model(prompt)
            ep.step(prompt, reply, action="send", feedback="missing the order number")
            ...
            ep.end("accepted on turn 2", success=True)

From asyncio code the same API is awaited (nothing blocks the event loop)::

    async with recorder.aepisode("support-bot", "agent-7", follower) as ep:
        await ep.step(prompt, reply, feedback=feedback)
        await ep.end("accepted")                        # returns once the broker has every event

Guarantees and what they cost:

* **Order and no duplicates.** Events are keyed by episode id, so an episode's events share one
  partition; the producer is idempotent with ``acks=all``, so a retry after a lost acknowledgement
  never writes an event twice and never reorders. ``seq`` runs 0 (start), 1, 2, ... per episode, and
  the event id is deterministic, ``<episode_id>.<seq>`` (a hash of it for episode ids over 117
  characters), so a consumer can also deduplicate anything re-sent by the application itself.
* **Validation at the call site.** Every event is validated against the schema (and the topic's
  size limit) before it is buffered; a bad one raises :class:`InvalidEvent` in the agent's code,
  naming the field, and consumes no sequence number. (Plain ``str``/``dict``/``list`` input, and
  lists of ``ChatMessage``, take a fast path that accepts only what the schema accepts and writes the same bytes as
  ``TrajectoryEvent.to_bytes()``; anything else goes through the pydantic models. Tests check both.)
* **Bounded memory, back-pressure.** The buffer holds at most ``recorder.buffer_max_events`` events
  and ``recorder.buffer_max_kbytes`` KB. When it is full the call blocks until the broker takes
  events, up to ``recorder.block_timeout_s`` (``when_full="block"``, the default), or raises
  :class:`BufferFull` at once (``when_full="raise"``). Either way memory never grows unbounded.
* **No silent loss.** Every event is accounted for by a delivery report (:meth:`Recorder.stats`,
  and the ``oel_recorder_*`` Prometheus metrics). :meth:`Recorder.close` flushes, and if any event
  was not delivered it logs and raises :class:`UndeliveredEvents` with how many and why. Recorders
  still open at interpreter exit are closed by an ``atexit`` hook, which logs any loss.

Threads: a Recorder may be shared by any number of threads and asyncio tasks; one episode belongs to
one agent at a time (its methods are not meant to be called concurrently).

Episodes that end by an exception. If the ``with`` block raises, the episode is ended with the
outcome ``"abandoned: <ExceptionType>: <message>"`` and ``success=None`` (nobody judged it, so it
must not count as a failure of the model in pass rates), and the exception propagates. A block left
without :meth:`Episode.end` is ended the same way with ``"abandoned: ended without an outcome"``.
Consumers recognise both by :data:`ABANDONED_PREFIX`.

Model versions. ``model_version`` is a version name, a :class:`~oel.schemas.ModelVersion`, or a
:class:`~producers.versions.VersionFollower`; a follower is sampled once when the episode starts and
the episode keeps that version (``ep.version``, ``ep.kb``) to its end, so an agent never switches
adapters in the middle of an episode.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import os
import re
import threading
import time
import uuid
import weakref
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from confluent_kafka import KafkaError, Producer
from pydantic import TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError
from pydantic_core import to_json as _to_json

from oel import metrics
from oel.logs import client_logger
from oel.schemas import (
    ID_MAX_CHARS,
    ID_PATTERN,
    ChatMessage,
    EndPayload,
    ModelVersion,
    StartPayload,
    StepPayload,
    ToolCall,
    TrajectoryEvent,
    describe_validation_error,
)
from oel.settings import Settings, load_settings
from oel.topics import producer_max_bytes

log = logging.getLogger(__name__)

ABANDONED_PREFIX = "abandoned: "
"""Outcome prefix of an episode the agent did not finish (an exception, or no ``end()`` call)."""


_POLL_INTERVAL_S = 0.01
"""Longest wait of the poll thread for delivery reports: bounds how long close() waits for the thread."""
_PURGE_ERRORS = (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT)  # noqa: SLF001 (librdkafka's names)


# --- errors ------------------------------------------------------------------------------------


class RecorderError(RuntimeError):
    """Base class of the recorder's errors."""


class InvalidEvent(RecorderError, ValueError):
    """An event failed validation; raised where the agent reported it, before anything was buffered."""


class BufferFull(RecorderError):
    """The bounded buffer is full and (in ``block`` mode) did not drain within the block timeout."""


class RecorderClosed(RecorderError):
    """The recorder (or the episode) is closed; nothing more can be sent through it."""


class DeliveryFailed(RecorderError):
    """Some of an episode's events were not delivered (see :attr:`reasons`)."""

    def __init__(self, message: str, reasons: Mapping[str, int]):
        super().__init__(message)
        self.reasons = dict(reasons)


class UndeliveredEvents(RecorderError):
    """Raised by :meth:`Recorder.close` when events were lost; :attr:`report` says how many and why."""

    def __init__(self, report: CloseReport):
        super().__init__(report.describe())
        self.report = report


# --- reports -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecorderStats:
    """A snapshot of the recorder's counters (every event accepted ends up delivered or failed).

    ``accepted``  events validated and buffered (= delivered + failed + buffered);
    ``delivered`` events the broker acknowledged (acks=all);
    ``failed``    events whose delivery report was an error, including those purged at close;
    ``buffered``  events in the buffer or in flight right now;
    ``invalid``   events rejected by validation at the call site (never buffered);
    ``full``      times a send found the buffer full (blocked or raised);
    ``reasons``   failed events by error name (e.g. ``_MSG_TIMED_OUT``, ``_PURGE_QUEUE``);
    ``last_broker_error`` the last connection-level error the client reported, if any.
    """

    accepted: int
    delivered: int
    failed: int
    buffered: int
    invalid: int
    full: int
    reasons: dict[str, int]
    last_broker_error: str | None


@dataclass(frozen=True)
class CloseReport:
    """What :meth:`Recorder.close` found: ``lost`` = ``failed_before_close`` + ``undelivered_at_close``."""

    delivered: int
    failed_before_close: int
    undelivered_at_close: int
    flush_timeout_s: float
    reasons: dict[str, int]
    last_broker_error: str | None
    lost_event_ids: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.failed_before_close + self.undelivered_at_close

    def describe(self) -> str:
        if not self.lost:
            return f"all {self.delivered} events delivered"
        parts = [f"{self.lost} trajectory events were not delivered ({self.delivered} were)"]
        if self.undelivered_at_close:
            parts.append(f"{self.undelivered_at_close} were still buffered after a {self.flush_timeout_s:g}s flush at close")
        if self.failed_before_close:
            parts.append(f"{self.failed_before_close} failed earlier")
        parts.append("by reason: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.reasons.items())))
        if self.last_broker_error:
            parts.append(f"last broker error: {self.last_broker_error}")
        if self.lost_event_ids:
            parts.append("e.g. event ids " + ", ".join(self.lost_event_ids[:5]))
        return "; ".join(parts)


# --- versions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PinnedVersion:
    """What one episode runs with, fixed when it starts: the model version and (in-context mode) the KB.

    ``version`` is None while the namespace has no promoted version (the base model; ``name`` is then
    :data:`oel.versions.BASE_VERSION`) or when a plain version name was given. ``kb`` is whatever the follower's KB
    hook returned, or None.
    """

    name: str
    version: ModelVersion | None = None
    kb: Any = None


class VersionSource(Protocol):
    """Anything that can say which version (and KB) the next episode should use: a VersionFollower."""

    def pin(self) -> PinnedVersion: ...


def _pin(model_version: str | ModelVersion | VersionSource) -> PinnedVersion:
    if isinstance(model_version, str):
        return PinnedVersion(model_version)
    if isinstance(model_version, ModelVersion):
        return PinnedVersion(model_version.version, model_version)
    if hasattr(model_version, "pin"):
        return model_version.pin()
    raise TypeError(f"model_version must be a str, a ModelVersion or a VersionFollower, got {type(model_version).__name__}")


# --- JSON encoding ------------------------------------------------------------------------------------
#
# An event's JSON is assembled from parts, in the schema's field order, so that it is byte-for-byte
# what TrajectoryEvent.to_bytes() gives. The identity fields are validated once per episode with the
# schema; payloads given as plain str/dict/list (or lists of ChatMessage) take the fast functions
# below, which accept only input the schema accepts (exact types; else they return None and the
# pydantic model decides) and serialise it with pydantic-core's own JSON writer (``to_json``, the
# one the models use, hence the same bytes; about 4x faster than escaping each string in Python).

_ROLES = frozenset(("system", "user", "assistant"))
_ROLE_CONTENT = ("role", "content")
_JSON = TypeAdapter(str).dump_json
_ID = re.compile(ID_PATTERN)


def _fast_step(prompt: Any, response: Any, action: Any, feedback: Any, _dump: Callable = _to_json) -> bytes | None:
    if (
        type(response) is not str
        or (action is not None and type(action) is not str)
        or (feedback is not None and type(feedback) is not str)
    ):
        return None
    if type(prompt) is str:
        prompt = ({"role": "user", "content": prompt},)
    elif type(prompt) is list and prompt:
        for m in prompt:
            if type(m) is dict:
                # exactly role then content (the schema's order, so the bytes are the schema's)
                if tuple(m) != _ROLE_CONTENT or m["role"] not in _ROLES or type(m["content"]) is not str:
                    return None
            elif type(m) is not ChatMessage:  # a ChatMessage was validated when it was built
                return None
    else:
        return None
    try:
        return _dump({"prompt": prompt, "response": response, "action": action, "feedback": feedback})
    except PydanticSerializationError:  # lone surrogates: let the schema path report it
        return None


def _fast_start(task: Any, metadata: Any, _dump: Callable = _to_json) -> bytes | None:
    if (task is not None and type(task) is not str) or type(metadata) is not dict:
        return None
    for k, v in metadata.items():
        if type(k) is not str or type(v) is not str:
            return None
    try:
        return _dump({"task": task, "metadata": metadata})
    except PydanticSerializationError:
        return None


def _fast_end(outcome: Any, success: Any, _dump: Callable = _to_json) -> bytes | None:
    if type(outcome) is not str or not (success is None or type(success) is bool):
        return None
    try:
        return _dump({"outcome": outcome, "success": success})
    except PydanticSerializationError:
        return None


_START = b'","kind":"start","start":'
_STEP = b'","kind":"step","start":null,"step":'
_END = b'","kind":"end","start":null,"step":null,"end":'
_TAILS = {_START: b',"step":null,"end":null}', _STEP: b',"end":null}', _END: b"}"}
_ts_cache: tuple[int, bytes] = (-1, b"")


def _now_json() -> bytes:
    """The current UTC time as pydantic serialises an aware datetime (``2026-01-02T03:04:05.123456Z``)."""
    global _ts_cache
    us_total = time.time_ns() // 1000
    second, us = divmod(us_total, 1_000_000)
    cached_second, prefix = _ts_cache
    if second != cached_second:
        prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S").encode()
        _ts_cache = (second, prefix)
    return prefix + (b".%06dZ" % us if us else b"Z")


# --- the recorder ------------------------------------------------------------------------------------


class _NamespaceCounters:
    """Per-namespace counts behind the ``oel_recorder_*`` metrics. Prometheus children are cached and
    the counters published in batches by the poll thread, not once per event."""

    __slots__ = ("_accepted", "accepted", "settled", "sent_delta", "failed_delta", "sent", "failed", "pending_gauge", "episodes")

    def __init__(self, namespace: str):
        self._accepted = itertools.count(1)  # next() is atomic: safe from any number of sending threads
        self.accepted = 0
        self.settled = 0  # this and the deltas: written only by the thread serving delivery reports
        self.sent_delta = 0
        self.failed_delta = 0
        self.sent = metrics.RECORDER_EVENTS_SENT.labels(namespace=namespace)
        self.failed = metrics.RECORDER_EVENTS_FAILED.labels(namespace=namespace)
        self.pending_gauge = metrics.RECORDER_PENDING_EVENTS.labels(namespace=namespace)
        self.pending_gauge.set_function(lambda: max(self.accepted - self.settled, 0))
        self.episodes = metrics.AGENT_EPISODES.labels(namespace=namespace)

    def publish(self) -> None:
        if self.sent_delta:
            n, self.sent_delta = self.sent_delta, 0
            self.sent.inc(n)
        if self.failed_delta:
            n, self.failed_delta = self.failed_delta, 0
            self.failed.inc(n)


_open_recorders: weakref.WeakSet[Recorder] = weakref.WeakSet()


@atexit.register
def _close_open_recorders() -> None:
    for recorder in list(_open_recorders):
        try:
            recorder.close(raise_on_loss=False)
        except Exception:  # noqa: BLE001 - at exit, log and keep closing the others
            log.exception("closing a trajectory recorder at exit failed")


class Recorder:
    """Streams agents' episodes to Kafka as TrajectoryEvents. Thread-safe; one per process is enough.

    ``settings`` default to :func:`oel.settings.load_settings` (``OEL_*`` variables, stack.env).
    ``topic`` overrides ``settings.topics.trajectories``. ``producer_config`` entries are passed to
    confluent-kafka last (tests, tuning); ``when_full`` and ``block_timeout_s`` override the
    settings' back-pressure policy. ``tap``, if given, is called with every accepted event's JSON
    bytes (recording, debugging). ``producer`` replaces the Kafka producer with any object that has
    confluent-kafka ``Producer``'s ``produce``/``poll``/``flush``/``purge``/``len`` (the in-process bus of
    ``oel demo``, :class:`oel.bus.BusProducer`). See the module docstring for the guarantees.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        topic: str | None = None,
        producer_config: Mapping[str, Any] | None = None,
        when_full: Literal["block", "raise"] | None = None,
        block_timeout_s: float | None = None,
        tap: Callable[[bytes], None] | None = None,
        producer: Any | None = None,
    ):
        self.settings = settings or load_settings()
        rs = self.settings.recorder
        self.topic = topic or self.settings.topics.trajectories
        self.when_full = when_full or rs.when_full
        self.block_timeout_s = rs.block_timeout_s if block_timeout_s is None else block_timeout_s
        self.max_event_bytes = self.settings.topics.max_event_bytes
        self.max_episode_bytes = self.settings.topics.max_episode_bytes
        self.tap = tap
        self.config: dict[str, Any] = {
            **self.settings.kafka.client_config(),
            **producer_config_for(self.settings),
            "error_cb": self._on_client_error,
            "logger": _ClientLog(self),
            **(producer_config or {}),
        }
        self._producer = producer if producer is not None else Producer(self.config)
        self._lock = threading.Lock()
        self._space = threading.Condition(threading.Lock())
        self._waiting = 0
        self._delivered = 0  # these four: written only by the thread serving delivery reports
        self._failed = 0
        self._reasons: Counter[str] = Counter()
        self._lost_ids: deque[str] = deque(maxlen=20)
        self._invalid = 0  # these two: under _lock (rare paths)
        self._full = 0
        self._last_broker_error: str | None = None
        self._fatal: KafkaError | None = None
        self._last_failure_log = 0.0
        self._namespaces: dict[str, _NamespaceCounters] = {}
        self._identities: dict[tuple[str, str, str], tuple[bytes, _NamespaceCounters]] = {}
        self._episode_prefix = os.urandom(8).hex()
        self._episode_counter = itertools.count()
        self._closed = False
        self._report: CloseReport | None = None
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="oel-recorder-poll", daemon=True)
        self._poller.start()
        _open_recorders.add(self)

    # -- episodes ---------------------------------------------------------------------------------

    def episode(
        self,
        namespace: str,
        agent_id: str,
        model_version: str | ModelVersion | VersionSource,
        *,
        task: str | None = None,
        metadata: Mapping[str, str] | None = None,
        episode_id: str | None = None,
    ) -> Episode:
        """A new episode; use it as ``with recorder.episode(...) as ep:`` (the start event is sent on entry).

        ``model_version`` is fixed here for the whole episode (a follower is sampled now, once).
        ``episode_id`` defaults to a new unique id; give one only if it is unique and stable.
        Raises :class:`InvalidEvent` at once if a field is invalid (e.g. the namespace).
        """
        return Episode(self, namespace, agent_id, _pin(model_version), task, metadata, episode_id)

    def aepisode(
        self,
        namespace: str,
        agent_id: str,
        model_version: str | ModelVersion | VersionSource,
        *,
        task: str | None = None,
        metadata: Mapping[str, str] | None = None,
        episode_id: str | None = None,
    ) -> AsyncEpisode:
        """The asyncio variant of :meth:`episode`: ``async with recorder.aepisode(...) as ep: await ep.step(...)``."""
        return AsyncEpisode(self, namespace, agent_id, _pin(model_version), task, metadata, episode_id)

    # -- sending ----------------------------------------------------------------------------------

    def send(self, event: TrajectoryEvent) -> None:
        """Buffer one already-built (hence validated) event; for tools that re-send recorded events.
        Agents use :meth:`episode`. Blocks or raises per ``when_full`` when the buffer is full."""
        value = TrajectoryEvent.__pydantic_serializer__.to_json(event)
        self._check(value, event.episode_id)
        counters = self._counters(event.namespace)
        self._produce(value, event.episode_id, _Single(self, counters).on_delivery)
        counters.accepted = next(counters._accepted)
        self._tapped(value)

    def _counters(self, namespace: str) -> _NamespaceCounters:
        counters = self._namespaces.get(namespace)
        if counters is None:
            with self._lock:
                counters = self._namespaces.setdefault(namespace, _NamespaceCounters(namespace))
        return counters

    def _identity(self, namespace: str, agent_id: str, model_version: str) -> tuple[bytes, _NamespaceCounters]:
        """The validated, encoded identity fields (cached: agents repeat them in every episode)."""
        key = (namespace, agent_id, model_version)
        found = self._identities.get(key)
        if found is not None:
            return found
        try:
            TrajectoryEvent(namespace=namespace, episode_id="x", agent_id=agent_id, model_version=model_version, seq=0, kind="start")
        except ValidationError as exc:
            self._count_invalid()
            raise InvalidEvent(f"invalid episode identity: {describe_validation_error(exc)}") from None
        encoded = (
            b'","namespace":' + _JSON(namespace),
            b',"agent_id":' + _JSON(agent_id) + b',"model_version":' + _JSON(model_version) + b',"seq":',
        )
        found = (encoded, self._counters(namespace))
        if len(self._identities) > 10_000:
            self._identities.clear()
        self._identities[key] = found
        return found

    def _new_episode_id(self) -> str:
        return f"{self._episode_prefix}{next(self._episode_counter):016x}"

    def _count_invalid(self) -> None:
        with self._lock:
            self._invalid += 1

    def _check(self, value: bytes, key: str) -> None:
        """Everything that can refuse an encoded event before it is buffered (cheap when all is well)."""
        if self._closed:
            raise RecorderClosed("the recorder is closed")
        if self._fatal is not None:
            raise RecorderError(f"the Kafka producer failed fatally and cannot send: {self._fatal.str()}")
        if len(value) > self.max_event_bytes:
            self._count_invalid()
            raise InvalidEvent(
                f"an event of episode {key} is {len(value)} bytes, over the limit of {self.max_event_bytes} "
                "(OEL_TOPICS__MAX_EVENT_BYTES): shorten the prompt or the response"
            )

    def _produce(self, value: bytes, key: str, callback: Callable) -> None:
        try:
            self._producer.produce(self.topic, value, key, on_delivery=callback)
        except BufferError:
            with self._lock:
                self._full += 1
            if self.when_full == "raise":
                raise BufferFull(self._full_message()) from None
            self._wait_for_space(value, key, callback)

    def _wait_for_space(self, value: bytes, key: str, callback: Callable) -> None:
        deadline = time.monotonic() + self.block_timeout_s
        while True:
            with self._space:
                self._waiting += 1
                try:
                    self._space.wait(min(0.05, max(deadline - time.monotonic(), 0)))
                finally:
                    self._waiting -= 1
            if self._closed:
                raise RecorderClosed("the recorder was closed while a send waited for buffer space")
            try:
                self._producer.produce(self.topic, value, key, on_delivery=callback)
                return
            except BufferError:
                if time.monotonic() >= deadline:
                    raise BufferFull(self._full_message()) from None

    async def _aproduce(self, value: bytes, key: str, callback: Callable) -> None:
        """:meth:`_produce` for asyncio: waits for buffer space with ``await``, never blocking the loop."""
        try:
            self._producer.produce(self.topic, value, key, on_delivery=callback)
            return
        except BufferError:
            with self._lock:
                self._full += 1
            if self.when_full == "raise":
                raise BufferFull(self._full_message()) from None
        deadline = time.monotonic() + self.block_timeout_s
        pause = 0.001
        while True:
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)
            if self._closed:
                raise RecorderClosed("the recorder was closed while a send waited for buffer space")
            try:
                self._producer.produce(self.topic, value, key, on_delivery=callback)
                return
            except BufferError:
                if time.monotonic() >= deadline:
                    raise BufferFull(self._full_message()) from None

    def _tapped(self, value: bytes) -> None:
        if self.tap is not None:
            self.tap(value)

    def _full_message(self) -> str:
        rs = self.settings.recorder
        waited = "" if self.when_full == "raise" else f" and did not drain within {self.block_timeout_s:g}s"
        why = f"; last broker error: {self._last_broker_error}" if self._last_broker_error else ""
        return (
            f"the recorder's buffer is full ({len(self._producer)} events buffered; limits "
            f"{rs.buffer_max_events} events / {rs.buffer_max_kbytes} KB){waited}: the broker at "
            f"{self.settings.kafka.bootstrap_servers} is not keeping up or not reachable{why}"
        )

    # -- delivery reports (served by the poll thread, or by close() once it has stopped) ----------

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(_POLL_INTERVAL_S)  # returns at once when there are reports to serve
            self._publish_metrics()

    def _publish_metrics(self) -> None:
        for counters in list(self._namespaces.values()):
            counters.publish()

    def _on_failure(self, counters: _NamespaceCounters, err: KafkaError, value: bytes | None) -> None:
        self._failed += 1
        counters.settled += 1
        counters.failed_delta += 1
        self._reasons[err.name()] += 1
        event_id = _event_id(value)
        self._lost_ids.append(event_id)
        if err.code() not in _PURGE_ERRORS and time.monotonic() - self._last_failure_log > 1.0:
            self._last_failure_log = time.monotonic()
            log.error("trajectory event %s was not delivered: %s (%d failed so far)", event_id, err.str(), self._failed)
        self._wake_senders()

    def _wake_senders(self) -> None:
        if self._waiting:
            with self._space:
                self._space.notify_all()

    def _on_client_error(self, err: KafkaError) -> None:
        # "1/1 brokers are down" says less than the connection error before it: keep the latter
        if err.code() != KafkaError._ALL_BROKERS_DOWN or self._last_broker_error is None:  # noqa: SLF001
            self._last_broker_error = err.str()
        if err.fatal():
            self._fatal = err
            log.error("the Kafka producer failed fatally: %s", err.str())
        else:
            log.debug("kafka client error: %s", err.str())

    # -- state --------------------------------------------------------------------------------------

    def stats(self) -> RecorderStats:
        """The counters now (cheap; safe from any thread)."""
        delivered, failed = self._delivered, self._failed
        buffered = len(self._producer) if not self._closed else 0
        return RecorderStats(
            accepted=delivered + failed + buffered,
            delivered=delivered,
            failed=failed,
            buffered=buffered,
            invalid=self._invalid,
            full=self._full,
            reasons=dict(self._reasons),
            last_broker_error=self._last_broker_error,
        )

    @property
    def closed(self) -> bool:
        return self._closed

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait until every buffered event is delivered or failed, up to ``timeout_s``; returns how many remain."""
        deadline = time.monotonic() + timeout_s
        while len(self._producer) and time.monotonic() < deadline and not self._closed:
            time.sleep(0.005)  # the poll thread serves the delivery reports
        return len(self._producer)

    def close(self, timeout_s: float | None = None, *, raise_on_loss: bool = True) -> CloseReport:
        """Flush (up to ``timeout_s``, default ``recorder.close_timeout_s``), then stop.

        Events still buffered after the flush are purged and counted as lost (reason
        ``_PURGE_QUEUE``/``_PURGE_INFLIGHT``; the report's ``last_broker_error`` says why the broker
        did not take them). If anything was lost over the recorder's life, logs it and raises
        :class:`UndeliveredEvents` (with ``raise_on_loss=False`` it only returns the report).
        Calling it again returns the same report.
        """
        with self._lock:
            if self._closed:
                report = self._report
                if report is None:  # another thread is closing it right now
                    raise RecorderClosed("the recorder is being closed by another thread")
                return report
            self._closed = True
        timeout = self.settings.recorder.close_timeout_s if timeout_s is None else timeout_s
        failed_before = self._failed
        deadline = time.monotonic() + timeout
        # the poll thread serves delivery reports while the buffer drains; it is stopped only then, so
        # that close() returns as soon as the broker has everything (not a poll interval later)
        while len(self._producer) and time.monotonic() < deadline:
            time.sleep(0.002)
        self._stop.set()
        self._poller.join()
        remaining = self._producer.flush(max(deadline - time.monotonic(), 0.0))
        if remaining:
            self._producer.purge(in_queue=True, in_flight=True, blocking=True)
            self._producer.flush(1.0)  # serve the purged messages' delivery reports
        self._publish_metrics()
        report = CloseReport(
            delivered=self._delivered,
            failed_before_close=failed_before,
            undelivered_at_close=self._failed - failed_before,
            flush_timeout_s=timeout,
            reasons=dict(self._reasons),
            last_broker_error=self._last_broker_error,
            lost_event_ids=list(self._lost_ids),
        )
        self._report = report
        _open_recorders.discard(self)
        if report.lost:
            log.error("trajectory recorder closed with loss: %s", report.describe())
            if raise_on_loss:
                raise UndeliveredEvents(report)
        return report

    async def aclose(self, timeout_s: float | None = None, *, raise_on_loss: bool = True) -> CloseReport:
        """:meth:`close` in a worker thread, so the event loop keeps running while it flushes."""
        return await asyncio.to_thread(self.close, timeout_s, raise_on_loss=raise_on_loss)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(raise_on_loss=exc[0] is None)

    async def __aenter__(self) -> Recorder:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose(raise_on_loss=exc[0] is None)


class _ClientLog:
    """librdkafka's log lines, to the ``producers.recorder.librdkafka`` logger (at most at WARNING:
    connection failures are expected while a broker restarts, and undelivered events are reported
    by the recorder itself). The last connection failure is kept as the "why" of undelivered events,
    since the error callback often says only "1/1 brokers are down"."""

    _log = client_logger("producers.recorder.librdkafka")

    def __init__(self, recorder: Recorder):
        self._recorder = weakref.ref(recorder)

    def log(self, level: int, fmt: str, *args: Any) -> None:
        # args = (facility, client name, message); FAIL = a broker connection failed or was lost
        if level >= logging.WARNING or (args and args[0] == "FAIL"):
            recorder = self._recorder()
            if recorder is not None and args:
                recorder._last_broker_error = str(args[-1]).split("]: ", 1)[-1]
        self._log.log(min(level, logging.WARNING), fmt, *args)


def producer_config_for(settings: Settings) -> dict[str, Any]:
    """The delivery settings of the recorder's producer (the benchmark's bare producer uses the same)."""
    rs = settings.recorder
    return {
        "enable.idempotence": True,  # retries never duplicate or reorder
        "acks": "all",
        "compression.type": rs.compression,
        "linger.ms": rs.linger_ms,
        "batch.size": rs.batch_max_kbytes * 1024,
        "queue.buffering.max.messages": rs.buffer_max_events,
        "queue.buffering.max.kbytes": rs.buffer_max_kbytes,
        "message.timeout.ms": int(rs.delivery_timeout_s * 1000),
        "message.max.bytes": producer_max_bytes(settings.topics),  # one size policy (oel.topics)
    }


def _event_id(value: bytes | None) -> str:
    """The event id of a serialised event (only on the failure path; no full parse)."""
    if not value:
        return "?"
    marker = b'"event_id":"'
    i = value.find(marker)
    if i < 0:
        return "?"
    j = value.find(b'"', i + len(marker))
    return value[i + len(marker) : j].decode(errors="replace")


class _Single:
    """Delivery report of one event sent with :meth:`Recorder.send` (outside any episode)."""

    __slots__ = ("recorder", "counters")

    def __init__(self, recorder: Recorder, counters: _NamespaceCounters):
        self.recorder, self.counters = recorder, counters

    def on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is None:
            self.recorder._delivered += 1
            self.counters.settled += 1
            self.counters.sent_delta += 1
            self.recorder._wake_senders()
        else:
            self.recorder._on_failure(self.counters, err, msg.value())


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


# --- episodes ------------------------------------------------------------------------------------------


class _EpisodeBase:
    """State, validation and encoding shared by :class:`Episode` and :class:`AsyncEpisode`.

    Validation is complete but each value is validated once: the identity fields (namespace, agent
    id, model version, a custom episode id) with the schema when the episode is created (cached per
    identity), each payload (start, step, end) when it is reported. The fields the episode generates
    (event id ``<episode_id>.<seq>``, seq, timestamp, kind) are valid by construction.
    """

    def __init__(
        self,
        recorder: Recorder,
        namespace: str,
        agent_id: str,
        pinned: PinnedVersion,
        task: str | None,
        metadata: Mapping[str, str] | None,
        episode_id: str | None,
    ):
        self.recorder = recorder
        self.pinned = pinned
        if episode_id is None:
            episode_id = recorder._new_episode_id()
            j = b'"' + episode_id.encode() + b'"'  # hex digits: nothing to escape
        elif type(episode_id) is not str or not 1 <= len(episode_id) <= ID_MAX_CHARS or not _ID.match(episode_id):
            recorder._count_invalid()
            raise InvalidEvent(
                f"invalid episode id {episode_id!r}: expected 1 to {ID_MAX_CHARS} characters, letters and digits, then also . _ : @ + = -"
            )
        else:
            j = _JSON(episode_id)
        self.episode_id = episode_id
        self.namespace = namespace
        self.agent_id = agent_id
        self.task = task
        self.metadata = dict(metadata) if metadata else {}
        (ns_part, agent_part), self._counters = recorder._identity(namespace, agent_id, pinned.name)
        self._start_json = _fast_start(task, self.metadata) or self._slow(StartPayload, "start", task=task, metadata=self.metadata)
        self._head = b'{"schema_version":1,"event_id":' + j[:-1] + b"."
        self._long_id = len(episode_id) > 128 - 1 - 10  # "<id>.<seq>" could pass the 128-character limit
        self._mid = ns_part + b',"episode_id":' + j + agent_part
        self.seq = 0
        """The sequence number the next event gets (0 = the start event)."""
        self.bytes_sent = 0
        """Bytes of JSON this episode has buffered so far."""
        self.started = False
        self.ended = False
        # delivery bookkeeping: _settled and _failures are written only by the delivery-report thread;
        # the failure counter and the condition are made on first use (most episodes need neither)
        self._settled = 0
        self._failures: Counter[str] | None = None
        self._cond: threading.Condition | None = None
        self._waiting = False
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future, int]] = []
        self._callback = self._on_delivery  # one bound method for every event of the episode

    @property
    def model_version(self) -> str:
        """The version name every event of this episode carries."""
        return self.pinned.name

    @property
    def version(self) -> ModelVersion | None:
        """The ModelVersion this episode runs with (None = base model, or a plain name was given)."""
        return self.pinned.version

    @property
    def kb(self) -> Any:
        """In-context mode: the KB snapshot fetched for this episode (None if no KB hook)."""
        return self.pinned.kb

    # -- encoding -------------------------------------------------------------------------------------

    def _slow(self, model: type, kind: str, **fields: Any) -> bytes:
        """Validate and encode a payload with the schema's own model (any input type it accepts)."""
        try:
            payload = model(**fields)
            return model.__pydantic_serializer__.to_json(payload)
        except ValidationError as exc:
            self.recorder._count_invalid()
            where = "; ".join(f"{kind}." + ".".join(str(p) for p in e["loc"]) + f": {e['msg']}" for e in exc.errors())
            raise InvalidEvent(f"invalid {kind} event of episode {self.episode_id}: {where}") from None
        except PydanticSerializationError as exc:
            self.recorder._count_invalid()
            raise InvalidEvent(f"invalid {kind} event of episode {self.episode_id}: {exc}") from None

    def _step_json(self, prompt: Any, response: Any, action: Any, feedback: Any, tool_calls: Any = None) -> bytes:
        value = _fast_step(prompt, response, action, feedback) if tool_calls is None else None
        if value is None:
            if isinstance(prompt, ChatMessage):
                prompt = [prompt]
            value = self._slow(
                StepPayload, "step", prompt=prompt, response=response, tool_calls=tool_calls, action=action, feedback=feedback
            )
        return value

    def _end_json(self, outcome: Any, success: Any) -> bytes:
        return _fast_end(outcome, success) or self._slow(EndPayload, "end", outcome=outcome, success=success)

    def _encode(self, kind: bytes, payload: bytes) -> bytes:
        """The event's JSON, for the next seq, and the checks that can refuse it before it is buffered."""
        seq = b"%d" % self.seq
        value = b"".join((self._head, seq, self._mid, seq, b',"ts":"', _now_json(), kind, payload, _TAILS[kind]))
        recorder = self.recorder
        if self._long_id:  # a long custom episode id: the event id would pass 128 characters; hash it
            eid = uuid.uuid5(uuid.NAMESPACE_URL, f"{self.episode_id}.{self.seq}").hex.encode()
            value = b'{"schema_version":1,"event_id":"' + eid + value[len(self._head) + len(seq) :]
        if recorder._closed or recorder._fatal is not None or len(value) > recorder.max_event_bytes:
            recorder._check(value, self.episode_id)
        if self.bytes_sent + len(value) > recorder.max_episode_bytes:
            recorder._count_invalid()
            raise InvalidEvent(
                f"episode {self.episode_id} would be {self.bytes_sent + len(value)} bytes, over the episode limit of "
                f"{recorder.max_episode_bytes} (OEL_TOPICS__MAX_EPISODE_BYTES): end it and record the rest as another episode"
            )
        return value

    def _sent(self, kind: bytes, value: bytes) -> int:
        seq = self.seq
        self.seq = seq + 1
        self.bytes_sent += len(value)
        counters = self._counters
        counters.accepted = next(counters._accepted)
        if kind is not _STEP:
            if kind is _START:
                self.started = True
            else:
                self.ended = True
        if self.recorder.tap is not None:
            self.recorder.tap(value)
        return seq

    # -- delivery reports (on the recorder's poll thread) ------------------------------------------------

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        recorder = self.recorder
        counters = self._counters
        if err is None:
            recorder._delivered += 1
            counters.settled += 1
            counters.sent_delta += 1
            if recorder._waiting:
                recorder._wake_senders()
        else:
            recorder._on_failure(counters, err, msg.value())
            if self._failures is None:
                self._failures = Counter()
            self._failures[err.name()] += 1
        self._settled += 1
        if self._waiting:  # set only under self._cond, which exists by then
            with self._cond:  # type: ignore[union-attr]
                self._cond.notify_all()
                ready = [(lp, f) for lp, f, target in self._async_waiters if self._settled >= target]
                self._async_waiters = [w for w in self._async_waiters if self._settled < w[2]]
            for loop, fut in ready:
                loop.call_soon_threadsafe(_resolve, fut)

    def _condition(self) -> threading.Condition:
        """The condition delivery reports notify, made on first use."""
        if self._cond is None:
            with self.recorder._lock:
                if self._cond is None:
                    self._cond = threading.Condition(threading.Lock())
        return self._cond

    def _raise_failures(self) -> None:
        if self._failures:
            n = sum(self._failures.values())
            raise DeliveryFailed(
                f"{n} events of episode {self.episode_id} were not delivered: " + ", ".join(f"{k} x{v}" for k, v in self._failures.items()),
                self._failures,
            )

    def _timeout(self, timeout_s: float | None) -> float:
        return self.recorder.settings.recorder.delivery_timeout_s + 5 if timeout_s is None else timeout_s

    # -- misc ------------------------------------------------------------------------------------------

    def _check_open(self, what: str) -> None:
        if self.ended:
            raise RecorderClosed(f"episode {self.episode_id} has ended; cannot {what}")

    @staticmethod
    def _abandoned(exc: BaseException | None) -> str:
        if exc is None:
            return ABANDONED_PREFIX + "ended without an outcome"
        text = str(exc).strip() or "(no message)"
        return f"{ABANDONED_PREFIX}{type(exc).__name__}: {text}"[:4000]

    def _count_played(self, outcome: str) -> None:
        if not outcome.startswith(ABANDONED_PREFIX):
            self._counters.episodes.inc()

    def __repr__(self) -> str:
        state = "ended" if self.ended else ("open" if self.started else "new")
        return f"<{type(self).__name__} {self.namespace}/{self.episode_id} {self.model_version} seq={self.seq} {state}>"


class Episode(_EpisodeBase):
    """One episode of one agent, recorded as start, step..., end events.

    Create it with :meth:`Recorder.episode`. Each method validates first (raising
    :class:`InvalidEvent` without consuming a sequence number), then buffers the event (blocking
    or raising :class:`BufferFull` per the back-pressure policy) and returns its ``seq``.
    """

    def start(self) -> int:
        """Send the start event (done by ``with``; call it yourself only without ``with``)."""
        self._check_open("start")
        if self.started:
            raise RecorderError(f"episode {self.episode_id} was already started")
        return self._send(_START, self._start_json)

    def step(
        self,
        prompt: str | Sequence[ChatMessage | Mapping[str, str]],
        response: str,
        action: str | None = None,
        feedback: str | None = None,
        tool_calls: Sequence[ToolCall | Mapping[str, Any]] | None = None,
    ) -> int:
        """Record one turn: the conversation the model saw (a string = one user message, or chat
        messages, tool calls and results included), its raw response and the tool calls it made, the action
        parsed from it, and the text feedback it got."""
        payload = (_fast_step(prompt, response, action, feedback) if tool_calls is None else None) or self._step_json(
            prompt, response, action, feedback, tool_calls
        )
        if self.ended:
            self._check_open("record a step")
        if not self.started:
            self._send(_START, self._start_json)
        return self._send(_STEP, payload)

    def end(self, outcome: str, success: bool | None = None, *, wait: bool = False, timeout_s: float | None = None) -> int:
        """Record how the episode ended: the outcome as text (what the extractor reads), and whether it
        succeeded (metrics and evaluation only; never used for learning). With ``wait=True``, returns
        only once every event of the episode is delivered, raising :class:`DeliveryFailed` otherwise."""
        payload = self._end_json(outcome, success)
        self._check_open("end it again")
        if not self.started:
            self._send(_START, self._start_json)
        seq = self._send(_END, payload)
        self._count_played(outcome)
        if wait:
            self.wait_delivered(timeout_s)
        return seq

    def wait_delivered(self, timeout_s: float | None = None) -> None:
        """Block until every event sent so far is delivered; DeliveryFailed on a failure, TimeoutError on timeout."""
        timeout, target = self._timeout(timeout_s), self.seq
        cond = self._condition()
        with cond:
            self._waiting = True
            ok = cond.wait_for(lambda: self._settled >= target, timeout)
        if not ok:
            raise TimeoutError(f"episode {self.episode_id}: {target - self._settled} events undelivered after {timeout:g}s")
        self._raise_failures()

    def _send(self, kind: bytes, payload: bytes) -> int:
        value = self._encode(kind, payload)
        recorder = self.recorder
        try:
            recorder._producer.produce(recorder.topic, value, self.episode_id, on_delivery=self._callback)
        except BufferError:
            recorder._produce(value, self.episode_id, self._callback)  # counts it, then blocks or raises
        return self._sent(kind, value)

    def __enter__(self) -> Episode:
        if not self.started:
            self.start()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self.ended or self.recorder.closed:
            return
        if exc is None:
            log.warning("episode %s left its with-block without end(); recorded as abandoned", self.episode_id)
        try:
            self.end(self._abandoned(exc), success=None)
        except RecorderError:
            if exc is None:
                raise
            log.exception("could not record the end of abandoned episode %s", self.episode_id)


class AsyncEpisode(_EpisodeBase):
    """The asyncio variant of :class:`Episode`: the same methods, awaited. Waiting for buffer space and
    for delivery happens with ``await``; the event loop is never blocked."""

    async def start(self) -> int:
        """Send the start event (done by ``async with``)."""
        self._check_open("start")
        if self.started:
            raise RecorderError(f"episode {self.episode_id} was already started")
        return await self._send(_START, self._start_json)

    async def step(
        self,
        prompt: str | Sequence[ChatMessage | Mapping[str, str]],
        response: str,
        action: str | None = None,
        feedback: str | None = None,
        tool_calls: Sequence[ToolCall | Mapping[str, Any]] | None = None,
    ) -> int:
        """Record one turn (see :meth:`Episode.step`)."""
        payload = self._step_json(prompt, response, action, feedback, tool_calls)
        self._check_open("record a step")
        if not self.started:
            await self._send(_START, self._start_json)
        return await self._send(_STEP, payload)

    async def end(self, outcome: str, success: bool | None = None, *, wait: bool = True, timeout_s: float | None = None) -> int:
        """Record the end (see :meth:`Episode.end`); by default awaits the delivery of every event of the episode."""
        payload = self._end_json(outcome, success)
        self._check_open("end it again")
        if not self.started:
            await self._send(_START, self._start_json)
        seq = await self._send(_END, payload)
        self._count_played(outcome)
        if wait:
            await self.wait_delivered(timeout_s)
        return seq

    async def wait_delivered(self, timeout_s: float | None = None) -> None:
        """Await the delivery of every event sent so far; DeliveryFailed on a failure, TimeoutError on timeout."""
        timeout, target = self._timeout(timeout_s), self.seq
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._condition():
            self._waiting = True
            if self._settled >= target:
                fut.set_result(None)
            else:
                self._async_waiters.append((loop, fut, target))
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise TimeoutError(f"episode {self.episode_id}: {target - self._settled} events undelivered after {timeout:g}s") from None
        self._raise_failures()

    async def _send(self, kind: bytes, payload: bytes) -> int:
        value = self._encode(kind, payload)
        await self.recorder._aproduce(value, self.episode_id, self._callback)
        return self._sent(kind, value)

    async def __aenter__(self) -> AsyncEpisode:
        if not self.started:
            await self.start()
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self.ended or self.recorder.closed:
            return
        if exc is None:
            log.warning("episode %s left its async-with block without end(); recorded as abandoned", self.episode_id)
        try:
            await self.end(self._abandoned(exc), success=None, wait=exc is None)
        except RecorderError:
            if exc is None:
                raise
            log.exception("could not record the end of abandoned episode %s", self.episode_id)
