"""The whole loop on the real stack: recorder -> Kafka -> Faust processor -> MinIO KB -> learner service
-> OPCD round -> gate -> model-versions topic -> the agent loads the new version and plays with it.

The processor and the learner service run as their own processes (started by :class:`StackLoop`) on
topics, a bucket, consumer groups and a namespace private to this test. Round 1 (two episodes) makes a
version; the agent follows the topic to it and plays two more episodes with it, and the episodes the
processor stores carry that version.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from learner.versions import ModelRegistry
from oel.schemas import VersionStatus
from oel.settings import load_settings
from recipes.demo import DemoConfig
from recipes.demo_stack import StackLoop

pytestmark = [pytest.mark.stack, pytest.mark.model, pytest.mark.slow]


def test_loop_on_the_real_stack_makes_a_version_the_agent_then_uses(kafka, s3_store, unique, tmp_path, monkeypatch):
    ns = f"loop-{unique[:8]}"
    env = {
        "OEL_TOPICS__TRAJECTORIES": f"l-{unique}.trajectories",
        "OEL_TOPICS__EXPERIENCE": f"l-{unique}.experience",
        "OEL_TOPICS__MODEL_VERSIONS": f"l-{unique}.model-versions",
        "OEL_TOPICS__EPISODES": f"l-{unique}.episodes",
        "OEL_PROCESSOR__APP_ID": f"l-{unique}",
        "OEL_LEARNER__GROUP_ID": f"l-{unique}-learner",
        "OEL_S3__BUCKET": f"l-{unique}",
        "OEL_METRICS__PORT": "0",
        # Small round; the gate runs for real on 2 held-out tickets with tolerances too wide to reject
        # on such a sample (its decisions are tested in tests/test_gate.py).
        "OEL_LEARNER__BATCH_SIZE": "2",
        "OEL_LEARNER__MAX_NEW_TOKENS": "24",
        "OEL_LEARNER__OOD_MAX_NEW_TOKENS": "24",
        "OEL_LEARNER__GATE_PASS_RATE_TOLERANCE": "1.0",
        "OEL_LEARNER__GATE_OOD_TOLERANCE": "1.0",
        "OEL_LEARNER__KNOWLEDGE_GATE_MARGIN": "-1",  # the knowledge gate measures too, and lets any KB through
        "OEL_PROCESSOR__TRUSTED_FEEDBACK": "loop-*",  # the house-rules feedback of this namespace is trusted (grounded items)
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = load_settings()
    config = DemoConfig(
        rounds=2, episodes=2, eval_episodes=2, steps=1, agent_batch=2, extraction_tokens=48, namespace=ns, out_dir=tmp_path / "run"
    )
    lines: list[str] = []
    with StackLoop(settings, config, service_env=env, timeout_s=600, progress=lines.append) as loop:
        # The default model's extractions are sampled: a round can add no item (then no round is due).
        # Play rounds until one makes a version, three at most.
        for r in range(1, 4):
            r0 = loop.run_round(r)
            if r0.version is not None:
                break
        registry = ModelRegistry(loop.store)
        assert r0.version is not None, f"three rounds added no item to the KB: {lines}"
        assert r0.version is not None and r0.status == VersionStatus.promoted.value, lines
        assert loop.agent.follower.current().version == r0.version, "the agent follows the topic to the new version"
        # Round 1: the agent plays with the new version and the processor takes the episodes in (no
        # second consolidation: that would only repeat round 0).
        _, _, played_with = loop.play(r0.round + 1)
        assert played_with == r0.version
        loop.process()
        stored = [loop.store.get_json(k) for k in loop.store.list(f"trajectories/{ns}/")]
        by_round: dict[int, set[str]] = {}
        for ep in stored:
            by_round.setdefault(int(ep["episode_id"].split("-r")[1].split("-")[0]), set()).add(ep["model_version"])
        assert by_round == {**{r: {"base"} for r in range(1, r0.round + 1)}, r0.round + 1: {r0.version}}, (
            "the processor saw the next round played by the new version"
        )
        record = registry.get(ns, r0.version)
        assert record.manifest.kb_version == r0.kb_version and record.manifest.parent_version is None
        assert record.manifest.eval.get("gate_accepted") == 1.0 and "ood_score" in record.manifest.eval, (
            "the learner service ran the gate and recorded its numbers"
        )
        procs = [proc for proc, _ in loop.services.values()]
    assert procs and all(proc.poll() is not None for proc in procs), "closing the loop stops the services it started"


def test_agents_serve_records_every_episode_with_the_version_it_played(kafka, s3_store, unique, monkeypatch):
    """`oel agents serve` (the Kubernetes sample agent) for one batch: every episode reaches the
    trajectories topic, start to end, in order, stamped with the version it ran with (the base model:
    the namespace has none), and the process exits cleanly."""
    from confluent_kafka import Consumer, TopicPartition

    from oel.ops.topics import admin_client, ensure_topics
    from oel.schemas import TrajectoryEvent
    from oel.topics import topic_specs

    env = {
        "OEL_TOPICS__TRAJECTORIES": f"a-{unique}.trajectories",
        "OEL_TOPICS__MODEL_VERSIONS": f"a-{unique}.model-versions",
        "OEL_METRICS__PORT": "0",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = load_settings()
    ensure_topics(admin_client(settings.kafka), topic_specs(settings))
    ns = f"serve-{unique[:8]}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "oel.cli",
            "agents",
            "serve",
            "--env",
            "house-rules",
            "--namespace",
            ns,
            "--batch-size",
            "2",
            "--max-batches",
            "1",
            "--agent-id",
            "sample-agent",
        ],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch 0: base: pass rate" in done.stderr
    topic = settings.topics.trajectories
    consumer = Consumer({**settings.kafka.client_config(), "group.id": f"check-{unique}", "auto.offset.reset": "earliest"})
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in parts])
    events: list[TrajectoryEvent] = []
    while (msg := consumer.poll(5.0)) is not None:
        if msg.error() is None:
            events.append(TrajectoryEvent.model_validate_json(msg.value()))
    consumer.close()
    by_episode: dict[str, list[TrajectoryEvent]] = {}
    for ev in events:
        by_episode.setdefault(ev.episode_id, []).append(ev)
    assert len(by_episode) == 2
    for evs in by_episode.values():
        assert [e.seq for e in evs] == list(range(len(evs))) and evs[0].kind == "start" and evs[-1].kind == "end"
        assert {e.namespace for e in evs} == {ns} and {e.model_version for e in evs} == {"base"}
        assert {e.agent_id for e in evs} == {"sample-agent"} and len(evs) >= 3
