"""The compacted ``oel.model-versions`` topic on Kafka (the protocol: :mod:`oel.versions`): publishing a
version, and reading a namespace's messages to the end of the topic (the agents' follower does it at
start, the learner to learn what is published after a crash)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from oel import metrics
from oel.schemas import InvalidMessage, ModelVersion, decode
from oel.settings import Settings, load_settings
from oel.versions import VersionState, VersionTopicError

log = logging.getLogger(__name__)


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
        raise VersionTopicError(f"could not publish {version.namespace}/{version.version}: {why}")
    if own:
        del producer
    metrics.MODEL_VERSIONS_PUBLISHED.labels(namespace=version.namespace).inc()


def reader_config(settings: Settings, namespace: str, logger: str) -> dict[str, Any]:
    """A consumer that reads the topic from its beginning and never commits (a group of its own)."""
    return {
        **settings.kafka.client_config(),
        "group.id": f"oel-version-follower-{namespace}-{uuid.uuid4().hex[:8]}",  # never commits
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "logger": logging.getLogger(logger),
    }


def assign_from_beginning(consumer: Consumer, topic: str, timeout_s: float, where: str) -> dict[int, int]:
    """Assign every partition of ``topic`` from its first offset; returns the end offset of each non-empty
    partition as of now (``where``: the brokers, for the error message)."""
    try:
        md = consumer.list_topics(topic, timeout=timeout_s)
    except Exception as exc:  # KafkaException: broker down
        raise VersionTopicError(f"cannot read {topic} at {where}: {exc}") from None
    tmd = md.topics.get(topic)
    if tmd is None or tmd.error is not None or not tmd.partitions:
        why = tmd.error.str() if tmd is not None and tmd.error is not None else "no such topic"
        raise VersionTopicError(f"cannot follow {topic}: {why} (create it with `oel topics create`)")
    ends: dict[int, int] = {}
    deadline = time.monotonic() + timeout_s
    for p in sorted(tmd.partitions):
        while True:  # a partition just created (or whose leader moved) answers NOT_LEADER for a moment
            try:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
                break
            except KafkaException as exc:
                err = exc.args[0]
                if not err.retriable() and err.code() != KafkaError.NOT_LEADER_FOR_PARTITION or time.monotonic() > deadline:
                    raise VersionTopicError(f"cannot read the end offsets of {topic}[{p}]: {err.str()}") from None
                time.sleep(0.1)
        if high > low:
            ends[p] = high
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(tmd.partitions)])
    return ends


def read_to(consumer: Consumer, topic: str, ends: dict[int, int], handle: Callable[[Message], None], timeout_s: float) -> None:
    """Consume (giving every message to ``handle``) until each partition's position reaches its end in ``ends``."""
    deadline = time.monotonic() + timeout_s
    pending = dict(ends)
    while pending:
        msg = consumer.poll(0.2)
        if msg is not None:
            handle(msg)
            if msg.error() is None and msg.partition() in pending and msg.offset() + 1 >= pending[msg.partition()]:
                del pending[msg.partition()]
        if pending:  # a compacted log may have gaps: the fetch position is the truth
            positions = consumer.position([TopicPartition(topic, p) for p in pending])
            for tp in positions:
                if tp.offset >= 0 and tp.offset >= pending[tp.partition]:
                    del pending[tp.partition]
        if pending and time.monotonic() > deadline:
            raise VersionTopicError(f"could not read {topic} to its end within {timeout_s:g}s (partitions {sorted(pending)})")


def namespace_message(msg: Message, namespace: str) -> tuple[bool, ModelVersion | None]:
    """Whether ``msg`` is one of ``namespace``'s messages, and its version (None = a tombstone). Errors,
    other namespaces' messages and invalid ones are not (invalid ones are logged)."""
    err = msg.error()
    if err is not None:
        if err.code() != KafkaError._PARTITION_EOF:  # noqa: SLF001
            log.warning("%s: error reading %s: %s", namespace, msg.topic(), err.str())
        return False, None
    key = msg.key()
    if key is None or key.decode(errors="replace") != namespace:
        return False, None
    if msg.value() is None:
        return True, None
    try:
        version = decode(msg.value(), ModelVersion)
    except InvalidMessage as exc:
        log.warning("%s: skipping an invalid message at %s[%d]@%d: %s", namespace, msg.topic(), msg.partition(), msg.offset(), exc.reason)
        return False, None
    if version.namespace != namespace:
        log.warning("%s: skipping a version of namespace %s published under this key", namespace, version.namespace)
        return False, None
    return True, version


def read_current_version(namespace: str, settings: Settings, *, topic: str | None = None, timeout_s: float = 30.0) -> ModelVersion | None:
    """The namespace's current version per the topic, read to its end now (None = the base model)."""
    topic = topic or settings.topics.model_versions
    state = VersionState(namespace)

    def handle(msg: Message) -> None:
        mine, version = namespace_message(msg, namespace)
        if mine:
            state.apply(version)

    consumer = Consumer(reader_config(settings, namespace, "oel.ops.versions.librdkafka"))
    try:
        read_to(consumer, topic, assign_from_beginning(consumer, topic, timeout_s, settings.kafka.bootstrap_servers), handle, timeout_s)
    finally:
        consumer.close()
    return state.current
