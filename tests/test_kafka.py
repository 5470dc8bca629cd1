"""The real broker: topic creation, and a consumer group that resumes exactly after its last commit."""

from __future__ import annotations

from confluent_kafka import Consumer, Producer, TopicPartition

from oel.ops.topics import admin_client, describe_topics, ensure_topics
from oel.settings import load_settings
from oel.topics import TopicSpec, topic_specs


def _settings_with_unique_topics(unique: str):
    return load_settings(
        topics={
            "trajectories": f"t-{unique}.trajectories",
            "experience": f"t-{unique}.experience",
            "model_versions": f"t-{unique}.model-versions",
            "episodes": f"t-{unique}.episodes",
            "trajectories_partitions": 3,
            "trajectories_retention_ms": 3_600_000,
        }
    )


def test_topic_creation_is_idempotent_and_configs_are_as_asked(kafka, unique):
    s = _settings_with_unique_topics(unique)
    admin = admin_client(s.kafka)
    specs = topic_specs(s)
    first = ensure_topics(admin, specs)
    assert [c.action for c in first] == ["created"] * len(specs)
    second = ensure_topics(admin, specs)
    assert [c.action for c in second] == ["unchanged"] * len(specs)

    states = describe_topics(admin, [t.name for t in specs])
    assert set(states) == {t.name for t in specs}
    for spec in specs:
        state = states[spec.name]
        assert state.partitions == spec.partitions
        assert state.replication_factor == spec.replication_factor
        for key, value in spec.config.items():
            assert state.config[key] == value, (spec.name, key)
    assert states[s.topics.model_versions].config["cleanup.policy"] == "compact"
    assert states[s.topics.trajectories].partitions == 3
    assert states[s.topics.trajectories].config["retention.ms"] == "3600000"
    assert {f"{n}.dlq" for n in (s.topics.trajectories, s.topics.experience, s.topics.model_versions)} <= set(states)


def test_ensure_topics_repairs_drift(kafka, unique):
    admin = admin_client(kafka.kafka)
    name = f"t-{unique}.drift"
    ensure_topics(admin, [TopicSpec(name, 1, 1, {"retention.ms": "1000"})])
    changes = ensure_topics(admin, [TopicSpec(name, 2, 1, {"retention.ms": "2000"})])
    assert changes[0].action == "altered"
    state = describe_topics(admin, [name])[name]
    assert (state.partitions, state.config["retention.ms"]) == (2, "2000")


def test_consumer_group_resumes_after_last_commit(kafka, unique):
    topic = f"t-{unique}.resume"
    ensure_topics(admin_client(kafka.kafka), [TopicSpec(topic, 2, 1)])
    producer = Producer({**kafka.kafka.client_config(), "enable.idempotence": True, "acks": "all"})
    for i in range(12):
        producer.produce(topic, key=f"k{i % 5}", value=f"m{i}".encode())
    assert producer.flush(15) == 0

    group = f"g-{unique}"

    def consumer() -> Consumer:
        c = Consumer({**kafka.kafka.client_config(), "group.id": group, "enable.auto.commit": False, "auto.offset.reset": "earliest"})
        c.subscribe([topic])
        return c

    def read(c: Consumer, n: int) -> list:
        out = []
        while len(out) < n:
            msg = c.poll(15)
            assert msg is not None, f"timed out after {len(out)} of {n} messages"
            assert msg.error() is None, msg.error()
            out.append(msg)
        return out

    c1 = consumer()
    everything = read(c1, 12)
    by_partition: dict[int, list] = {}
    for m in everything:
        by_partition.setdefault(m.partition(), []).append(m)
    # Commit half of each partition, then "crash": the rest was read but never committed.
    commit_at = {p: ms[len(ms) // 2].offset() for p, ms in by_partition.items()}
    c1.commit(offsets=[TopicPartition(topic, p, o) for p, o in commit_at.items()], asynchronous=False)
    c1.close()

    c2 = consumer()
    expected = sorted((m.partition(), m.offset()) for m in everything if m.offset() >= commit_at[m.partition()])
    rest = read(c2, len(expected))
    assert sorted((m.partition(), m.offset()) for m in rest) == expected
    for p, ms in by_partition.items():
        _, high = c2.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        assert high == ms[-1].offset() + 1  # and nothing else is left to deliver
    c2.close()
