"""Version following on the real compacted model-versions topic, and agents that switch versions only
between episodes."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, TopicPartition

from oel.ops.topics import admin_client, ensure_topics
from oel.ops.versions import publish_version
from oel.schemas import ModelVersion, TrajectoryEvent, VersionStatus, decode
from oel.settings import Settings
from oel.topics import TopicSpec
from oel.versions import rollback_events
from producers import BASE_VERSION, Recorder, VersionFollower, VersionFollowerError


def make_topics(settings: Settings, unique: str) -> tuple[str, str]:
    versions, trajectories = f"t-{unique}.model-versions", f"t-{unique}.trajectories"
    ensure_topics(
        admin_client(settings.kafka),
        [
            TopicSpec(versions, 1, 1, {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}),
            TopicSpec(trajectories, 3, 1, {"retention.ms": "3600000"}),
        ],
    )
    return versions, trajectories


def version(ns: str, name: str, status: str = "promoted", parent: str | None = None) -> ModelVersion:
    return ModelVersion(
        namespace=ns,
        version=name,
        adapter_uri=f"adapters/{ns}/{name}",
        base_model="SmolLM2-135M-Instruct",
        base_model_hash="sha256:0",
        parent_version=parent,
        status=VersionStatus(status),
    )


def read_events(settings: Settings, topic: str, n: int, timeout_s: float = 30.0) -> list[TrajectoryEvent]:
    c = Consumer({**settings.kafka.client_config(), "group.id": f"read-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False})
    md = c.list_topics(topic, timeout=10).topics[topic]
    c.assign([TopicPartition(topic, p, 0) for p in md.partitions])
    out: list[TrajectoryEvent] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n:
        assert time.monotonic() < deadline, f"read {len(out)} of {n} events"
        msg = c.poll(0.5)
        if msg is not None and msg.error() is None:
            out.append(decode(msg.value(), TrajectoryEvent))
    c.close()
    return out


def test_follower_reads_the_latest_promoted_version_at_start_and_follows(kafka, unique):
    topic, _ = make_topics(kafka, unique)
    publish_version(version("shop", "v1"), kafka, topic=topic)
    publish_version(version("other", "o7"), kafka, topic=topic)  # another namespace: ignored
    publish_version(version("shop", "v2", parent="v1"), kafka, topic=topic)
    publish_version(version("shop", "v3", "candidate", parent="v2"), kafka, topic=topic)  # not serving yet
    changes = []
    with VersionFollower("shop", kafka, topic=topic, on_change=lambda old, new: changes.append((old, new))) as f:
        assert f.current().version == "v2"  # right on return from start(): the topic was read to its end
        assert f.messages_seen == 3
        publish_version(version("shop", "v3", parent="v2"), kafka, topic=topic)
        assert f.wait_for(lambda v: v is not None and v.version == "v3", 30).adapter_uri == "adapters/shop/v3"
        # a rejected candidate that never served changes nothing
        publish_version(version("shop", "v4", "rejected", parent="v3"), kafka, topic=topic)
        publish_version(version("shop", "v5", parent="v3"), kafka, topic=topic)
        f.wait_for(lambda v: v is not None and v.version == "v5", 30)
        assert [(o.version if o else None, n.version) for o, n in changes] == [(None, "v1"), ("v1", "v2"), ("v2", "v3"), ("v3", "v5")]


def test_rollback_republishes_the_previous_good_version_which_wins(kafka, unique):
    topic, _ = make_topics(kafka, unique)
    v1, v2 = version("shop", "v1"), version("shop", "v2", parent="v1")
    publish_version(v1, kafka, topic=topic)
    publish_version(v2, kafka, topic=topic)
    with VersionFollower("shop", kafka, topic=topic) as running:
        assert running.current().version == "v2"
        # the two messages ModelRegistry.rollback publishes, in its order
        rolled, again = rollback_events(v2, v1, "pass rate fell")
        publish_version(rolled, kafka, topic=topic)
        publish_version(again, kafka, topic=topic)
        assert again.status is VersionStatus.promoted and "rollback of v2" in again.reason
        running.wait_for(lambda v: v is not None and v.version == "v1", 30)
    # a follower started afterwards sees the same: the republished v1 is the last message
    with VersionFollower("shop", kafka, topic=topic) as fresh:
        assert fresh.current().version == "v1"


def test_a_rolled_back_current_version_falls_back_per_the_message(kafka, unique):
    topic, _ = make_topics(kafka, unique)
    publish_version(version("shop", "v1"), kafka, topic=topic)
    publish_version(version("shop", "v2", parent="v1"), kafka, topic=topic)
    publish_version(version("shop", "v3", parent="v2"), kafka, topic=topic)
    with VersionFollower("shop", kafka, topic=topic) as f:
        # a bare rolled_back message (no republish): back to its parent, if that was good
        publish_version(version("shop", "v3", "rolled_back", parent="v2"), kafka, topic=topic)
        f.wait_for(lambda v: v is not None and v.version == "v2", 30)
        publish_version(version("shop", "v2", "rolled_back", parent="v1"), kafka, topic=topic)
        f.wait_for(lambda v: v is not None and v.version == "v1", 30)
    # only a rolled_back message left on a fresh topic (compacted history): the base model
    topic2, _ = make_topics(kafka, unique + "b")
    publish_version(version("shop", "v9", "rolled_back", parent="v8"), kafka, topic=topic2)
    with VersionFollower("shop", kafka, topic=topic2) as f2:
        assert f2.current() is None and f2.pin().name == BASE_VERSION


def test_follower_on_an_empty_topic_is_the_base_model_and_a_missing_topic_is_an_error(kafka, unique):
    topic, _ = make_topics(kafka, unique)
    with VersionFollower("shop", kafka, topic=topic) as f:
        assert f.current() is None and f.pin().name == BASE_VERSION
    with pytest.raises(VersionFollowerError, match="oel topics create"):
        VersionFollower("shop", kafka, topic=f"t-{unique}.missing", start_timeout_s=5).start()


def test_agents_switch_versions_only_between_episodes(kafka, unique):
    versions_topic, trajectories = make_topics(kafka, unique)
    publish_version(version("shop", "v1"), kafka, topic=versions_topic)
    kb_calls = []

    def kb_snapshot(namespace: str, v: ModelVersion | None) -> str:  # in-context mode hook
        kb_calls.append(v.version if v else None)
        return f"- EXPERIENCE ITEM: kb for {v.version if v else 'base'}"

    with (
        VersionFollower("shop", kafka, topic=versions_topic, kb_snapshot=kb_snapshot) as follower,
        Recorder(kafka, topic=trajectories) as rec,
    ):
        with rec.episode("shop", "agent-1", follower, task="first") as ep1:
            assert ep1.version.version == "v1" and ep1.kb == "- EXPERIENCE ITEM: kb for v1"
            ep1.step("turn 1", "reply 1")
            # a new version is promoted while the episode is open ...
            publish_version(version("shop", "v2", parent="v1"), kafka, topic=versions_topic)
            follower.wait_for(lambda v: v is not None and v.version == "v2", 30)
            # ... the open episode keeps the version it started with
            ep1.step("turn 2", "reply 2")
            assert ep1.model_version == "v1" and ep1.version.adapter_uri == "adapters/shop/v1"
            ep1.end("done", success=True)
        with rec.episode("shop", "agent-1", follower, task="second") as ep2:  # the next one uses v2
            assert ep2.version.version == "v2" and ep2.kb == "- EXPERIENCE ITEM: kb for v2"
            ep2.step("turn 1", "reply 1")
            ep2.end("done", success=True)
        ep2.wait_delivered(30)
    assert kb_calls == ["v1", "v2"]  # fetched once per episode, between episodes
    events = read_events(kafka, trajectories, 7)
    by_episode = {}
    for e in events:
        by_episode.setdefault(e.episode_id, set()).add(e.model_version)
    assert by_episode == {ep1.episode_id: {"v1"}, ep2.episode_id: {"v2"}}
