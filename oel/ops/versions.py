"""Publishing on the compacted ``oel.model-versions`` topic (the protocol: :mod:`oel.versions`)."""

from __future__ import annotations

from confluent_kafka import Producer

from oel import metrics
from oel.schemas import ModelVersion
from oel.settings import Settings, load_settings
from oel.versions import VersionTopicError


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
