"""Reading the model-versions topic to its end (oel/ops/versions.py), as the agents' follower does at start
and the learner does after a crash, on a stand-in consumer (the real topic: tests/test_versions.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from confluent_kafka import KafkaError

import oel.ops.versions as reader
from oel.schemas import ModelVersion, VersionStatus
from oel.settings import load_settings
from oel.versions import VersionTopicError


def version(name: str, status: str = "promoted", parent: str | None = None, ns: str = "shop") -> ModelVersion:
    return ModelVersion(
        namespace=ns,
        version=name,
        adapter_uri=f"adapters/{ns}/{name}",
        base_model="m",
        base_model_hash="sha256:0",
        parent_version=parent,
        status=VersionStatus(status),
    )


class Msg:
    def __init__(self, partition: int, offset: int, key: str | None, value: bytes | None, error=None):
        self._p, self._o, self._k, self._v, self._e = partition, offset, key, value, error

    def error(self):
        return self._e

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def key(self):
        return None if self._k is None else self._k.encode()

    def value(self):
        return self._v

    def topic(self):
        return "versions"


class FakeConsumer:
    """One topic whose partitions hold the given messages; ``poll`` hands them out in order."""

    def __init__(self, partitions: dict[int, list[tuple[str | None, bytes | None]]] | None):
        self.partitions = partitions
        self.queue: list[Msg] = []
        self.positions: dict[int, int] = {}
        self.closed = False

    def list_topics(self, topic, timeout):
        tmd = None if self.partitions is None else SimpleNamespace(error=None, partitions={p: None for p in self.partitions})
        return SimpleNamespace(topics={} if tmd is None else {topic: tmd})

    def get_watermark_offsets(self, tp, timeout):
        return 0, len(self.partitions[tp.partition])

    def assign(self, tps):
        for tp in tps:
            self.positions[tp.partition] = 0
            self.queue += [Msg(tp.partition, o, k, v) for o, (k, v) in enumerate(self.partitions[tp.partition])]
        self.queue.append(Msg(0, -1, None, None, error=SimpleNamespace(code=lambda: KafkaError._PARTITION_EOF)))

    def poll(self, timeout):
        if not self.queue:
            return None
        msg = self.queue.pop(0)
        if msg.error() is None:
            self.positions[msg.partition()] = msg.offset() + 1
        return msg

    def position(self, tps):
        return [SimpleNamespace(partition=tp.partition, offset=self.positions[tp.partition]) for tp in tps]

    def close(self):
        self.closed = True


def test_the_current_version_is_what_the_messages_say_at_the_end_of_the_topic(monkeypatch):
    v1, v2, v3 = version("v1"), version("v2", parent="v1"), version("v3", parent="v2")
    consumer = FakeConsumer(
        {
            0: [("shop", v1.to_bytes()), ("other", version("o1", ns="other").to_bytes()), ("shop", v2.to_bytes())],
            1: [("shop", b"{not json"), ("shop", v3.to_bytes()), ("shop", version("v3", "rolled_back", parent="v2").to_bytes())],
        }
    )
    monkeypatch.setattr(reader, "Consumer", lambda config: consumer)
    current = reader.read_current_version("shop", load_settings(), topic="versions", timeout_s=5)
    assert current == v2 and consumer.closed  # v3 rolled back to its parent; other namespaces and bad bytes skipped


def test_an_empty_topic_is_the_base_model_and_a_missing_one_an_error(monkeypatch):
    monkeypatch.setattr(reader, "Consumer", lambda config: FakeConsumer({0: []}))
    assert reader.read_current_version("shop", load_settings(), topic="versions", timeout_s=5) is None
    monkeypatch.setattr(reader, "Consumer", lambda config: FakeConsumer(None))
    with pytest.raises(VersionTopicError, match="oel topics create"):
        reader.read_current_version("shop", load_settings(), topic="versions", timeout_s=5)


def test_a_tombstone_is_the_base_model():
    assert reader.namespace_message(Msg(0, 0, "shop", None), "shop") == (True, None)
    assert reader.namespace_message(Msg(0, 0, "other", None), "shop") == (False, None)


def test_the_follower_reads_the_same_at_start_and_follows_what_comes_after(monkeypatch):
    import producers.versions as follower_module
    from producers import VersionFollower

    v1, v2 = version("v1"), version("v2", parent="v1")
    consumer = FakeConsumer({0: [("shop", v1.to_bytes()), ("shop", v2.to_bytes())]})
    monkeypatch.setattr(follower_module, "Consumer", lambda config: consumer)
    changes = []
    with VersionFollower(
        "shop",
        load_settings(),
        topic="versions",
        start_timeout_s=5,
        on_change=lambda old, new: changes.append(new.version if new else None),
    ) as follower:
        assert follower.current() == v2 and follower.messages_seen == 2 and follower.pin().name == "v2"
        consumer.queue.append(Msg(0, 2, "shop", version("v2", "rolled_back", parent="v1").to_bytes()))
        assert follower.wait_for(lambda v: v is not None and v.version == "v1", 5) == v1
    assert changes == ["v1", "v2", "v1"] and consumer.closed
