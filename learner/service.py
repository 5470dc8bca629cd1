"""The learner service: consume ``oel.experience``, apply the trigger policy, run rounds.

One loop in one thread (confluent-kafka consumer, group ``learner.group_id``, no auto-commit):

* every :class:`~oel.schemas.ExperienceUpdate` is validated (invalid ones go to ``<topic>.dlq`` with the
  reason in the ``oel.error`` header) and given to the :class:`~learner.policy.TriggerPolicy`;
* when a namespace's round is due (checked after every poll, so a cool-down ends on time), the round runs
  in the loop (:class:`~learner.rounds.RoundRunner`; ``max.poll.interval.ms`` is one hour for that);
* **offsets are committed only after a round's outcome is recorded**, and only up to the first update
  that is not consolidated yet: per partition, the committed offset is the smallest offset of a pending
  (observed but not yet trained) update of any namespace on it, or the end when none is pending. A
  restart therefore re-reads exactly the updates whose items still count towards the next round, and the
  registry (newest version, its KB version and time) restores what was consolidated. After a crash
  mid-round the trigger's updates are read again: if the round's manifest was written, they count as
  consolidated and the version's remaining steps (gate, promotion) run at start-up; if not, the round
  runs again under the same id. Either way one round gives one version, and it is published once: the
  start-up step reads the versions topic first, in case the crash came between publishing and recording.

Partitions are keyed by namespace, so each namespace has one learner. On a rebalance (eager protocol:
everything is revoked) the in-memory state is dropped; the committed offsets make the new owner
rebuild it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from learner.consolidator import Consolidator
from learner.policy import RoundTrigger, TriggerPolicy
from learner.rounds import RoundOutcome, RoundRunner
from learner.versions import ModelRegistry
from oel import metrics
from oel.logs import client_logger
from oel.schemas import ExperienceUpdate, InvalidMessage, ModelVersion, decode
from oel.settings import Settings
from oel.store import ObjectStore
from oel.topics import dead_letter, producer_max_bytes

log = logging.getLogger(__name__)


class LearnerService:
    """The learner's consume-decide-train loop (see the module docstring). ``runner`` defaults to a
    :class:`RoundRunner` on ``store``; ``clock`` returns Unix seconds (tests pass a fake one)."""

    def __init__(
        self,
        settings: Settings,
        store: ObjectStore,
        *,
        runner: RoundRunner | None = None,
        policy: TriggerPolicy | None = None,
        clock: Callable[[], float] = time.time,
        consumer_config: Mapping[str, Any] | None = None,
        on_round: Callable[[RoundOutcome], None] | None = None,
    ):
        self.settings = settings
        self.store = store
        self.core = Consolidator(
            runner or RoundRunner(store, settings, registry=ModelRegistry(store)),
            policy or TriggerPolicy.from_settings(settings.learner),
            clock=clock,
            published=self._published,
        )
        self.registry = self.core.registry
        self.runner = self.core.runner
        self.on_round = on_round
        self.topic = settings.topics.experience
        self._consumer_config = {
            **settings.kafka.client_config(),
            "group.id": settings.learner.group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "max.poll.interval.ms": 3_600_000,
            # failover: a dead learner's partitions move after session_timeout_s (librdkafka's default is 45 s);
            # with an instance id a restarted learner takes them back at once
            "session.timeout.ms": int(settings.learner.session_timeout_s * 1000),
            "heartbeat.interval.ms": int(min(3.0, settings.learner.session_timeout_s / 3) * 1000),
            **({"group.instance.id": settings.learner.instance_id} if settings.learner.instance_id else {}),
            "logger": client_logger("learner.service.librdkafka"),
            **(consumer_config or {}),
        }
        self._pending: dict[tuple[int, str], int] = {}  # (partition, namespace) -> first pending offset
        self._next: dict[int, int] = {}  # partition -> offset after the last message read
        self._committed: dict[int, int] = {}
        self._stop = threading.Event()
        self.heartbeat = metrics.Heartbeat("the learner's consume loop", max_age_s=120.0)
        self._in_round = False
        self._consumer: Consumer | None = None
        self._dlq: Producer | None = None

    def _published(self, namespace: str) -> ModelVersion | None:
        """The namespace's current version on the versions topic (read to its end)."""
        from oel.ops.versions import read_current_version

        return read_current_version(namespace, self.settings, topic=self.runner.topic)

    @property
    def policy(self) -> TriggerPolicy:
        return self.core.policy

    @property
    def rounds(self) -> list[RoundOutcome]:
        return self.core.rounds

    # --- lifecycle ------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def run(self, max_rounds: int | None = None, poll_s: float = 1.0) -> None:
        """Consume until :meth:`stop` (or ``max_rounds`` rounds ran). A consumer that hits a fatal error (e.g.
        fenced: another member took its static instance id) is replaced by a new one; what was not committed
        is read again, as after a restart."""
        try:
            while not self._stop.is_set():
                try:
                    self._consume(max_rounds, poll_s)
                    return
                except KafkaException as exc:
                    if not _fatal(exc):
                        raise
                    log.error("learner: the consumer failed for good (%s); a new one reads the uncommitted updates again", exc.args[0])
                    self._forget()
        finally:
            if self._dlq is not None:
                self._dlq.flush(10)

    def _consume(self, max_rounds: int | None, poll_s: float) -> None:
        consumer = Consumer(self._consumer_config)
        self._consumer = consumer
        consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        log.info("learner: consuming %s as group %s", self.topic, self._consumer_config["group.id"])
        fatal = False
        try:
            while not self._stop.is_set():
                msg = consumer.poll(poll_s)
                self.heartbeat.beat()
                if msg is not None:
                    self._handle(msg)
                for trigger in self.core.due():
                    self._round(trigger)
                    if max_rounds is not None and len(self.rounds) >= max_rounds:
                        return
                self._commit()
                self._observe_lag()
        except KafkaException as exc:
            fatal = _fatal(exc)
            raise
        finally:
            if not fatal:
                self._commit()
            consumer.close()
            self._consumer = None

    def _forget(self) -> None:
        """Drop what the lost consumer had read (its partitions' next owner, a new consumer, rebuilds it)."""
        self.core.reset()
        self._pending.clear()
        self._next.clear()
        self._committed.clear()

    # --- messages -------------------------------------------------------------------------------

    def _handle(self, msg) -> None:
        if msg.error() is not None:
            if msg.error().code() != KafkaError._PARTITION_EOF:
                log.warning("learner: consumer error: %s", msg.error())
            return
        partition, offset = msg.partition(), msg.offset()
        self._next[partition] = offset + 1
        metrics.EVENTS_CONSUMED.labels(topic=self.topic).inc()
        try:
            update = decode(msg.value(), ExperienceUpdate, max_bytes=self.settings.topics.max_event_bytes)
        except InvalidMessage as exc:
            self._dead_letter(msg, exc.reason)
            return
        if self.core.observe(update):
            self._pending.setdefault((partition, update.namespace), offset)

    def _dead_letter(self, msg, reason: str) -> None:
        if self._dlq is None:
            self._dlq = Producer(
                {
                    **self.settings.kafka.client_config(),
                    "enable.idempotence": True,
                    "acks": "all",
                    "message.max.bytes": producer_max_bytes(self.settings.topics),
                }
            )
        dlq, headers = dead_letter(msg.topic(), msg.partition(), msg.offset(), reason)
        self._dlq.produce(dlq, msg.value(), msg.key(), headers=headers)
        self._dlq.flush(15)

    # --- rounds ---------------------------------------------------------------------------------

    def liveness_problem(self) -> str | None:
        """For ``/livez``: the consume loop polled within ``heartbeat.max_age_s``; a round in progress counts as
        progress (its length is the OELRoundStuck alert's business, not a reason to kill the pod)."""
        return None if self._in_round else self.heartbeat.problem()

    def _round(self, trigger: RoundTrigger) -> None:
        self._in_round = True
        try:
            outcome = self.core.run_round(trigger)
        finally:
            self._in_round = False
            self.heartbeat.beat()
        if outcome is None:
            return  # failed: the consolidator backs the namespace off; its updates stay uncommitted
        for key in [k for k in self._pending if k[1] == trigger.namespace]:
            del self._pending[key]
        self._commit()  # the outcome is recorded in the registry: the updates it consumed are done
        if self.on_round is not None:
            self.on_round(outcome)

    # --- offsets --------------------------------------------------------------------------------

    def commit_positions(self) -> dict[int, int]:
        """The offset per partition that is safe to commit now (see the module docstring)."""
        out = {}
        for partition, nxt in self._next.items():
            pending = [off for (p, _), off in self._pending.items() if p == partition]
            out[partition] = min(pending) if pending else nxt
        return out

    def _commit(self) -> None:
        if self._consumer is None:
            return
        todo = {p: o for p, o in self.commit_positions().items() if self._committed.get(p) != o}
        if not todo:
            return
        try:
            self._consumer.commit(offsets=[TopicPartition(self.topic, p, o) for p, o in todo.items()], asynchronous=False)
        except KafkaException as exc:
            if _fatal(exc):
                raise
            # the broker or coordinator is away (a restart, a failover): the same offsets are committed next time
            log.warning("learner: committing offsets %s failed (%s); retrying at the next commit", todo, exc.args[0])
            return
        self._committed.update(todo)

    def _observe_lag(self) -> None:
        """``oel_consumer_lag_messages`` of each partition read: its end offset (as of the last fetch, no
        broker round trip) minus the offset the service commits, i.e. updates not yet consolidated
        included (they are re-read after a restart)."""
        if self._consumer is None:
            return
        for partition, committed in self.commit_positions().items():
            _, high = self._consumer.get_watermark_offsets(TopicPartition(self.topic, partition), cached=True)
            if high is not None and high >= 0:
                metrics.CONSUMER_LAG.labels(topic=self.topic, partition=str(partition)).set(max(0, high - committed))

    def _on_assign(self, consumer, partitions) -> None:
        log.info("learner: assigned %s", [p.partition for p in partitions])

    def _on_revoke(self, consumer, partitions) -> None:
        try:
            self._commit()
        except Exception:  # noqa: BLE001 - a failed commit only means more re-reading
            log.warning("learner: commit on revoke failed", exc_info=True)
        self._forget()


def _fatal(exc: KafkaException) -> bool:
    """Whether the consumer is unusable after ``exc`` (a commit reports a fatal error with the _FATAL code only)."""
    err = exc.args[0]
    return err.fatal() or err.code() == KafkaError._FATAL


def serve(settings: Settings) -> None:
    """Run the learner on the settings' Kafka and object store until SIGTERM or Ctrl-C (``oel learner run``)."""
    import signal

    from oel.model.hf_backend import resolve_device
    from oel.store import S3Store

    # OEL_MODEL__DEVICE=cuda on a node without a GPU stops here, not at the first round hours later
    log.info("training on %s (OEL_MODEL__DEVICE=%s)", resolve_device(settings.model.device), settings.model.device)
    store = S3Store(settings.s3)
    store.ensure_bucket()
    from oel.ops.topics import kafka_readiness

    metrics.add_readiness_check("kafka", kafka_readiness(settings.kafka))
    metrics.add_readiness_check("object store", store.unreachable)
    metrics.start_metrics_server(settings.metrics, "learner", default_port=9102)
    service = LearnerService(settings, store)
    metrics.add_liveness_check("experience consumer", service.liveness_problem)
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    try:
        service.run()
    except KeyboardInterrupt:
        service.stop()


def main(argv: list[str] | None = None) -> None:
    """``python -m learner.service``: the same as ``oel learner run``."""
    from oel.settings import load_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(load_settings())


if __name__ == "__main__":
    main()
