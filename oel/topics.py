"""The Kafka topic layout OEL needs, derived from the settings (pure data; no Kafka client here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from oel.settings import Settings

DLQ_SUFFIX = ".dlq"


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


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Every topic, in a stable order: each input topic followed by its dead-letter topic."""
    t = settings.topics
    rf = t.replication_factor
    max_bytes = str(t.max_event_bytes + 64 * 1024)  # the broker must accept what the DLQ will reject
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
                {**delete, "retention.ms": str(t.dlq_retention_ms)},
                f"events of {spec.name} that failed validation, reason in the 'oel.error' header",
            )
        )
    specs.append(
        TopicSpec(
            t.episodes,
            t.episodes_partitions,
            rf,
            {**delete, "retention.ms": str(t.experience_retention_ms)},
            "completed episodes and batch flushes, key = namespace (processor-internal)",
        )
    )
    return specs
