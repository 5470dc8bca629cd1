"""The load generator: realistic episode shapes, pacing, bounded runs, replay, and the `oel loadgen` command."""

from __future__ import annotations

import random
import statistics
import time
import uuid
from collections import Counter, defaultdict

from click.testing import CliRunner
from confluent_kafka import Consumer, TopicPartition

from oel.cli import cli
from oel.ops.topics import admin_client, ensure_topics
from oel.schemas import EventKind, TrajectoryEvent, decode
from oel.settings import Settings, load_settings
from oel.topics import TopicSpec
from producers import Recorder
from reference.loadgen import TokenBucket, read_episodes, replay_episodes, run, synthetic_episodes


def make_topic(settings: Settings, name: str) -> str:
    ensure_topics(admin_client(settings.kafka), [TopicSpec(name, 3, 1, {"retention.ms": "3600000"})])
    return name


def read_all(settings: Settings, topic: str, n: int, timeout_s: float = 30.0) -> list[TrajectoryEvent]:
    c = Consumer({**settings.kafka.client_config(), "group.id": f"read-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False})
    md = c.list_topics(topic, timeout=10).topics[topic]
    c.assign([TopicPartition(topic, p, 0) for p in md.partitions])
    out = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        msg = c.poll(0.5)
        if msg is not None and msg.error() is None:
            out.append(decode(msg.value(), TrajectoryEvent))
    extra = c.poll(1.0)  # nothing beyond n
    c.close()
    assert len(out) == n and (extra is None or extra.error() is not None), f"expected {n} events, read {len(out)}+"
    return out


def test_synthetic_episodes_look_like_a_chat_agents():
    """No broker: sizes and shapes of what the generator sends (the recorder's tap sees the exact bytes)."""
    sent: list[bytes] = []
    rec = Recorder(load_settings(kafka={"bootstrap_servers": "127.0.0.1:9"}), tap=sent.append)  # nothing is delivered
    gen = synthetic_episodes(random.Random(1), ["a", "b"])
    turns = Counter()
    for _ in range(300):
        spec = next(gen)
        turns[len(spec.steps)] += 1
        with rec.episode(spec.namespace, spec.agent_id, spec.model_version, task=spec.task, metadata=spec.metadata) as ep:
            for step in spec.steps:
                ep.step(**step)
            ep.end(spec.outcome, spec.success)
    rec.close(0.1, raise_on_loss=False)
    sizes = [len(b) for b in sent]
    assert set(turns) == {1, 2, 3, 4, 5}
    assert min(sizes) >= 350 and max(sizes) <= 2100, (min(sizes), max(sizes))
    assert 800 <= statistics.mean(sizes) <= 1400
    kinds = Counter(decode(b, TrajectoryEvent).kind for b in sent)
    assert kinds[EventKind.start] == kinds[EventKind.end] == 300


def test_token_bucket_paces_to_the_rate():
    bucket = TokenBucket(500)
    t0 = time.monotonic()
    for _ in range(250):
        bucket.take()
    elapsed = time.monotonic() - t0
    assert 0.4 <= elapsed <= 1.0, elapsed  # 250 events at 500/s = 0.5 s (minus the 10-event burst)


def test_loadgen_sends_complete_episodes_at_the_target_rate_then_replays_them(kafka, unique, tmp_path):
    topic = make_topic(kafka, f"t-{unique}.trajectories")
    recording = tmp_path / "episodes.jsonl"
    with Recorder(kafka, topic=topic) as rec, open(recording, "w") as fh:
        report = run(rec, synthetic_episodes(random.Random(2), ["shop"]), rate=400, episodes=40, record=fh)
    assert report.episodes == 40 and report.stats.delivered == report.events and report.stats.failed == 0
    assert 300 <= report.rate <= 440, report.summary()
    assert 0.5 * 1024 <= report.bytes / report.events <= 2 * 1024

    events = read_all(kafka, topic, report.events)
    by_ep = defaultdict(list)
    for e in events:
        by_ep[e.episode_id].append(e)
    assert len(by_ep) == 40
    for evs in by_ep.values():  # every episode complete: start, 1-5 steps, end
        kinds = [e.kind for e in sorted(evs, key=lambda e: e.seq)]
        assert kinds[0] is EventKind.start and kinds[-1] is EventKind.end and 1 <= len(kinds) - 2 <= 5

    # replay the recording: same episodes, fresh ids
    recorded = read_episodes(recording)
    assert len(recorded) == 40
    topic2 = make_topic(kafka, f"t-{unique}.replay")
    with Recorder(kafka, topic=topic2) as rec:
        again = run(rec, replay_episodes(recording, loop=False), rate=None, episodes=100)
    assert again.episodes == 40 and again.events == report.events
    replayed = read_all(kafka, topic2, again.events)
    assert not {e.episode_id for e in replayed} & set(by_ep)
    original = sorted((e.kind.value, e.step.response if e.step else None) for e in events)
    assert sorted((e.kind.value, e.step.response if e.step else None) for e in replayed) == original


def test_oel_loadgen_command(kafka, unique):
    topic = make_topic(kafka, f"t-{unique}.trajectories")
    result = CliRunner().invoke(cli, ["loadgen", "--rate", "200", "--duration", "1.5", "--topic", topic, "--namespace", "shop"])
    assert result.exit_code == 0, result.output
    assert "loadgen: synthetic episodes for shop" in result.output
    assert "[   1.0s]" in result.output  # progress
    final = result.output.strip().splitlines()[-1]
    assert final.startswith("sent ") and "events/s (target 200)" in final and "failed 0" in final
