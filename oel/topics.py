"""The Kafka topic layout OEL needs, derived from the settings (pure data; no Kafka client here)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from oel import metrics
from oel.settings import Settings, TopicSettings

log = logging.getLogger(__name__)

DLQ_SUFFIX = ".dlq"
ERROR_HEADER = "oel.error"
"""Header of a dead-lettered record: why it failed."""
SOURCE_HEADER = "oel.source"
"""Header of a dead-lettered record: where it was read, ``<topic>/<partition>/<offset>``."""


@dataclass(frozen=True)
class TopicSpec:
    """One topic as it must exist: partitions, replication and the topic-level configs that matter."""

    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str] = field(default_factory=dict)
    purpose: str = ""


def dlq_name(topic: str) -> str:
    """The dead-letter topic of an input topic."""
    return topic + DLQ_SUFFIX


def dlq_reason_label(reason: str) -> str:
    """The bounded metric label of a DLQ reason from :func:`oel.schemas.decode` or an episode size limit."""
    if reason.startswith("not valid JSON") or reason.startswith("empty"):
        return "not_json"
    if "limit" in reason:
        return "too_large"
    return "schema"


def dead_letter(topic: str, partition: int, offset: int, reason: str, label: str | None = None) -> tuple[str, list[tuple[str, bytes]]]:
    """Dead-letter the record at ``topic/partition/offset``: returns its DLQ and the headers to send it
    with (value and key go unchanged); counts it (``label``: the metric's reason label, by default derived
    from ``reason``) and logs it. Every service that dead-letters goes through here."""
    metrics.count_dead_letter(topic, label or dlq_reason_label(reason))
    log.warning("dead-lettered %s/%d@%d: %s", topic, partition, offset, reason)
    return dlq_name(topic), [(ERROR_HEADER, reason.encode()), (SOURCE_HEADER, f"{topic}/{partition}/{offset}".encode())]


HEADROOM_BYTES = 64 * 1024
"""Room over a record's value for its key, headers (a DLQ reason) and the batch framing."""


def event_record_bytes(t: TopicSettings) -> int:
    """What an event topic accepts: more than ``max_event_bytes``, so that an event over the limit reaches
    the processor and is dead-lettered with its reason instead of being refused at the producer."""
    return t.max_event_bytes + HEADROOM_BYTES


def episode_record_bytes(t: TopicSettings) -> int:
    """What the episodes topic, its DLQ and the processor's episode table accept (a whole episode)."""
    return t.max_episode_bytes + 2 * HEADROOM_BYTES


def producer_max_bytes(t: TopicSettings) -> int:
    """The request-size limit of every OEL producer: the largest record any topic accepts, plus framing.
    One number for the recorder, the processor (forwarding, tables, DLQ writes) and the learner."""
    return episode_record_bytes(t) + HEADROOM_BYTES


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Every topic, in a stable order: each input topic followed by its dead-letter topic."""
    t = settings.topics
    rf = t.replication_factor
    max_bytes = str(event_record_bytes(t))
    # a DLQ takes the largest record its input accepts, plus the reason header
    dlq_bytes = str(event_record_bytes(t) + HEADROOM_BYTES)
    delete = {"cleanup.policy": "delete", "max.message.bytes": max_bytes}
    inputs = [
        TopicSpec(
            t.trajectories,
            t.trajectories_partitions,
            rf,
            {**delete, "retention.ms": str(t.trajectories_retention_ms)},
            "agents' trajectory events, key = episode id",
        ),
        TopicSpec(
            t.experience,
            t.experience_partitions,
            rf,
            {**delete, "retention.ms": str(t.experience_retention_ms)},
            "knowledge-base updates, key = namespace",
        ),
        TopicSpec(
            t.model_versions,
            t.model_versions_partitions,
            rf,
            {"cleanup.policy": "compact", "min.compaction.lag.ms": "0", "max.message.bytes": max_bytes},
            "current model version per namespace (compacted), key = namespace",
        ),
    ]
    specs: list[TopicSpec] = []
    for spec in inputs:
        specs.append(spec)
        specs.append(
            TopicSpec(
                dlq_name(spec.name),
                1,
                rf,
                {**delete, "retention.ms": str(t.dlq_retention_ms), "max.message.bytes": dlq_bytes},
                f"events of {spec.name} that failed validation, reason in the 'oel.error' header",
            )
        )
    specs.append(
        TopicSpec(
            t.episodes,
            t.episodes_partitions,
            rf,
            {**delete, "retention.ms": str(t.experience_retention_ms), "max.message.bytes": str(episode_record_bytes(t))},
            "completed episodes and batch flushes, key = namespace (processor-internal)",
        )
    )
    specs.append(
        TopicSpec(
            dlq_name(t.episodes),
            1,
            rf,
            {**delete, "retention.ms": str(t.dlq_retention_ms), "max.message.bytes": str(episode_record_bytes(t) + HEADROOM_BYTES)},
            f"episodes of {t.episodes} whose extraction failed for a reason retrying cannot fix, reason in the 'oel.error' header",
        )
    )
    return specs
