"""Create and inspect OEL's Kafka topics with the admin API, idempotently."""

from __future__ import annotations

import time
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
)

from oel.settings import KafkaSettings
from oel.topics import TopicSpec


class KafkaUnavailable(RuntimeError):
    """The brokers did not answer."""


@dataclass(frozen=True)
class TopicState:
    """A topic as the cluster has it."""

    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str]


@dataclass(frozen=True)
class TopicChange:
    """What ``ensure_topics`` did to one topic: created, altered (and how) or unchanged."""

    name: str
    action: str
    detail: str = ""


def admin_client(kafka: KafkaSettings, timeout_s: float = 10.0) -> AdminClient:
    client = AdminClient(kafka.client_config())
    try:
        client.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise KafkaUnavailable(f"Kafka at {kafka.bootstrap_servers} did not answer within {timeout_s}s: {exc}") from None
    return client


def kafka_readiness(kafka: KafkaSettings, timeout_s: float = 3.0):
    """A ``/readyz`` check: None while the brokers answer a metadata request, else why not."""
    client = AdminClient(kafka.client_config())

    def check() -> str | None:
        try:
            client.list_topics(timeout=timeout_s)
        except KafkaException as exc:
            return f"Kafka at {kafka.bootstrap_servers} did not answer within {timeout_s}s: {exc}"
        return None

    return check


def describe_topics(admin: AdminClient, names: list[str], timeout_s: float = 10.0) -> dict[str, TopicState]:
    """The state of each named topic that exists; missing ones are left out."""
    metadata = admin.list_topics(timeout=timeout_s)
    present = [n for n in names if n in metadata.topics and metadata.topics[n].error is None]
    if not present:
        return {}
    futures = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, n) for n in present])
    configs = {res.name: {k: v.value for k, v in fut.result(timeout_s).items()} for res, fut in futures.items()}
    states = {}
    for name in present:
        partitions = metadata.topics[name].partitions
        rf = len(next(iter(partitions.values())).replicas) if partitions else 0
        states[name] = TopicState(name, len(partitions), rf, configs[name])
    return states


def _wait_visible(admin: AdminClient, names: list[str], timeout_s: float) -> None:
    """Return once every named topic shows in the metadata with its leaders elected (usable right away)."""
    deadline = time.monotonic() + timeout_s
    while True:
        topics = admin.list_topics(timeout=timeout_s).topics
        ready = [n for n in names if n in topics and topics[n].error is None and all(p.leader >= 0 for p in topics[n].partitions.values())]
        if len(ready) == len(names):
            return
        if time.monotonic() > deadline:
            raise KafkaUnavailable(f"topics not ready after {timeout_s}s: {sorted(set(names) - set(ready))}")
        time.sleep(0.1)


def ensure_topics(admin: AdminClient, specs: list[TopicSpec], timeout_s: float = 30.0) -> list[TopicChange]:
    """Make every topic match its spec: create missing ones, raise partition counts, set differing configs.

    Running it twice changes nothing the second time. Partitions are never reduced (Kafka cannot);
    a topic with more partitions than asked is reported, not changed.
    """
    existing = describe_topics(admin, [s.name for s in specs])
    missing = [s for s in specs if s.name not in existing]
    changes: list[TopicChange] = []
    if missing:
        futures = admin.create_topics(
            [NewTopic(s.name, num_partitions=s.partitions, replication_factor=s.replication_factor, config=s.config) for s in missing],
            operation_timeout=timeout_s,
        )
        raced = []
        for name, fut in futures.items():
            try:
                fut.result(timeout_s)
                changes.append(TopicChange(name, "created"))
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                    raise
                raced.append(name)  # created meanwhile (or not yet in our metadata): reconcile it below
        _wait_visible(admin, [s.name for s in missing], timeout_s)
        if raced:
            existing.update(describe_topics(admin, raced))
    for spec in specs:
        state = existing.get(spec.name)
        if state is None:
            continue
        notes: list[str] = []
        altered = False
        if state.partitions < spec.partitions:
            admin.create_partitions([NewPartitions(spec.name, spec.partitions)])[spec.name].result(timeout_s)
            notes.append(f"partitions {state.partitions} -> {spec.partitions}")
            altered = True
        elif state.partitions > spec.partitions:
            notes.append(f"has {state.partitions} partitions, more than the {spec.partitions} asked (kept)")
        differing = {k: v for k, v in spec.config.items() if state.config.get(k) != v}
        if differing:
            resource = ConfigResource(
                ConfigResource.Type.TOPIC,
                spec.name,
                incremental_configs=[ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in differing.items()],
            )
            admin.incremental_alter_configs([resource])[resource].result(timeout_s)
            notes.extend(f"{k}: {state.config.get(k)} -> {v}" for k, v in differing.items())
            altered = True
        if state.replication_factor != spec.replication_factor:
            notes.append(f"replication factor is {state.replication_factor}, spec says {spec.replication_factor} (reassign by hand)")
        changes.append(TopicChange(spec.name, "altered" if altered else "unchanged", "; ".join(notes)))
    order = {s.name: i for i, s in enumerate(specs)}
    return sorted(changes, key=lambda c: order[c.name])
