"""Recorder throughput next to a bare confluent-kafka producer loop, same broker, same run.

Both sides send ~1 KB trajectory events to the same fresh topic (6 partitions, like
``oel.trajectories``) with the same producer configuration (idempotent, acks=all, the recorder's
compression, linger and buffer limits: :func:`producers.recorder.producer_config_for`), and both
are timed from the first send until the broker has acknowledged every event.

* **bare**: a loop over pre-serialised events — ``produce(topic, value, key, on_delivery=cb)`` with a
  callback that counts errors, ``poll(0)`` after each produce, ``poll`` on BufferError, ``flush`` at
  the end. It does no validation and no bookkeeping: the ceiling.
* **bare+json** (for reference, not the target's baseline): the same loop, but each event built as a
  dict and ``json.dumps``-ed in the loop, with no validation — what an agent without the SDK would
  at least do.
* **recorder**: the SDK as an agent uses it — ``with recorder.episode(...) as ep: ep.step(...)*8;
  ep.end(...)`` — validating every payload, encoding, counting deliveries per episode, then
  ``close()``.

The variants alternate ``--repeats`` times (bare, bare+json, recorder, bare, ...) so that load from other processes on
the machine falls on both alike; the table reports the median of each. Target: recorder >= 80% of bare.

    .venv/bin/python bench/bench_recorder.py [--events 50000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka import Producer  # noqa: E402

from oel.ops.topics import admin_client, ensure_topics  # noqa: E402
from oel.settings import Settings, load_settings  # noqa: E402
from oel.topics import TopicSpec  # noqa: E402
from producers.recorder import Recorder, producer_config_for  # noqa: E402

STEPS = 8  # steps per episode: start + 8 steps + end = 10 events


def _text(n: int, salt: int) -> str:
    words = ("order", "refund", "the", "customer", "reply", "policy", "number", "please", "support", "ticket")
    out, i = [], salt
    while sum(len(w) + 1 for w in out) < n:
        out.append(words[i % len(words)])
        i = i * 7 + 3
    return " ".join(out)[:n]


def episode_payloads(salt: int) -> dict:
    """One episode's content, sized so that every event is ~1 KB of JSON."""
    return {
        "task": _text(700, salt),
        "steps": [
            {
                "prompt": [{"role": "system", "content": _text(250, salt + k)}, {"role": "user", "content": _text(300, salt + 2 * k)}],
                "response": _text(250, salt + 3 * k),
                "action": "reply",
                "feedback": _text(60, salt + 5 * k),
            }
            for k in range(STEPS)
        ],
        "outcome": _text(750, salt + 11),
    }


def run_recorder(settings: Settings, topic: str, episodes: list[dict]) -> tuple[float, int, int]:
    rec = Recorder(settings, topic=topic)
    with rec.episode("bench", "warm-up", "v1") as ep:  # connect and fetch metadata before timing
        ep.end("warm-up", wait=True)
    base = rec.stats()
    sent_bytes = 0
    t0 = time.perf_counter()
    for i, content in enumerate(episodes):
        with rec.episode("bench", f"agent-{i % 64}", "v1", task=content["task"]) as ep:
            for step in content["steps"]:
                ep.step(**step)
            ep.end(content["outcome"], success=True)
        sent_bytes += ep.bytes_sent
    report = rec.close(60)
    elapsed = time.perf_counter() - t0
    return elapsed, report.delivered - base.delivered, sent_bytes


def serialised_events(settings: Settings, episodes: list[dict]) -> list[tuple[bytes, str]]:
    """The exact (value, key) pairs the recorder sends for these episodes (via its tap, broker-less)."""
    events: list[bytes] = []
    offline = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"bootstrap_servers": "127.0.0.1:9"})})
    unbounded = {"queue.buffering.max.messages": 10_000_000, "queue.buffering.max.kbytes": 2_097_151}
    rec = Recorder(offline, topic="unused", tap=events.append, producer_config=unbounded)
    keys = []
    for i, content in enumerate(episodes):
        with rec.episode("bench", f"agent-{i % 64}", "v1", task=content["task"]) as ep:
            for step in content["steps"]:
                ep.step(**step)
            ep.end(content["outcome"], success=True)
        keys.extend([ep.episode_id] * (STEPS + 2))
    rec.close(0, raise_on_loss=False)
    return list(zip(events, keys))


def run_bare(settings: Settings, topic: str, events: list[tuple[bytes, str]]) -> tuple[float, int, int]:
    errors = 0

    def on_delivery(err, msg) -> None:
        nonlocal errors
        if err is not None:
            errors += 1

    p = Producer({**settings.kafka.client_config(), **producer_config_for(settings)})
    p.produce(topic, b"warm-up", "warm-up")
    p.flush(30)
    t0 = time.perf_counter()
    for value, key in events:
        while True:
            try:
                p.produce(topic, value, key, on_delivery=on_delivery)
                break
            except BufferError:
                p.poll(0.01)
        p.poll(0)
    left = p.flush(60)
    elapsed = time.perf_counter() - t0
    if left or errors:
        raise SystemExit(f"bare producer: {left} undelivered, {errors} failed")
    return elapsed, len(events), sum(len(v) for v, _ in events)


def run_bare_json(settings: Settings, topic: str, episodes: list[dict]) -> tuple[float, int, int]:
    """The bare loop, building each event's JSON itself (json.dumps of a dict, no validation)."""
    from datetime import UTC, datetime

    errors = 0

    def on_delivery(err, msg) -> None:
        nonlocal errors
        if err is not None:
            errors += 1

    p = Producer({**settings.kafka.client_config(), **producer_config_for(settings)})
    p.produce(topic, b"warm-up", "warm-up")
    p.flush(30)
    n = size = 0
    t0 = time.perf_counter()
    for i, content in enumerate(episodes):
        episode_id = uuid.uuid4().hex
        kinds = [("start", {"task": content["task"], "metadata": {}})]
        kinds += [("step", step) for step in content["steps"]]
        kinds.append(("end", {"outcome": content["outcome"], "success": True}))
        for seq, (kind, payload) in enumerate(kinds):
            event = {
                "schema_version": 1,
                "event_id": f"{episode_id}.{seq}",
                "namespace": "bench",
                "episode_id": episode_id,
                "agent_id": f"agent-{i % 64}",
                "model_version": "v1",
                "seq": seq,
                "ts": datetime.now(UTC).isoformat(),
                "kind": kind,
                kind: payload,
            }
            value = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()
            while True:
                try:
                    p.produce(topic, value, episode_id, on_delivery=on_delivery)
                    break
                except BufferError:
                    p.poll(0.01)
            p.poll(0)
            n += 1
            size += len(value)
    left = p.flush(60)
    elapsed = time.perf_counter() - t0
    if left or errors:
        raise SystemExit(f"bare+json producer: {left} undelivered, {errors} failed")
    return elapsed, n, size


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _with_cpu(run, *args) -> tuple[float, int, int, float]:
    """(seconds, events, bytes, CPU seconds of this process: every thread, librdkafka's included)."""
    c0 = _cpu_s()
    elapsed, n, size = run(*args)
    return elapsed, n, size, _cpu_s() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=50_000, help="events per run (rounded to whole episodes of 10)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    ap.add_argument("--keep-topic", action="store_true", help="do not delete the benchmark topic")
    args = ap.parse_args()

    settings = load_settings()
    admin = admin_client(settings.kafka)
    topic = f"bench-{uuid.uuid4().hex[:8]}.trajectories"
    ensure_topics(admin, [TopicSpec(topic, 6, 1, {"retention.ms": "600000"})])
    n_episodes = max(1, args.events // (STEPS + 2))
    episodes = [episode_payloads(i) for i in range(n_episodes)]
    events = serialised_events(settings, episodes)

    results: dict[str, list[tuple[float, int, int, float]]] = {"bare": [], "bare+json": [], "recorder": []}
    try:
        for r in range(args.repeats):
            results["bare"].append(_with_cpu(run_bare, settings, topic, events))
            results["bare+json"].append(_with_cpu(run_bare_json, settings, topic, episodes))
            results["recorder"].append(_with_cpu(run_recorder, settings, topic, episodes))
            line = ", ".join(f"{k} {v[-1][1] / v[-1][0]:,.0f}" for k, v in results.items())
            print(f"  run {r + 1} (events/s): {line}", flush=True)
    finally:
        if not args.keep_topic:
            admin.delete_topics([topic])

    cfg = producer_config_for(settings)
    rows = []
    for name, runs in results.items():
        rates = [r[1] / r[0] for r in runs]
        mbs = [r[2] / r[0] / 1e6 for r in runs]
        cpu_us = [r[3] / r[1] * 1e6 for r in runs]
        rows.append(
            (
                name,
                runs[0][1],
                statistics.median(rates),
                min(rates),
                max(rates),
                statistics.median(mbs),
                runs[0][2] / runs[0][1],
                statistics.median(cpu_us),
            )
        )
    bare_rate = rows[0][2]
    print()
    print(f"command: .venv/bin/python bench/bench_recorder.py --events {args.events} --repeats {args.repeats}")
    print(
        f"broker {settings.kafka.bootstrap_servers}, topic with 6 partitions; producer: idempotence, acks=all, "
        f"compression={cfg['compression.type']}, linger.ms={cfg['linger.ms']:g}, batch.size={cfg['batch.size']}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print()
    print(
        f"| {'producer':<9} | {'events':>7} | {'bytes/event':>11} | {'events/s (median)':>17} | {'min..max':>17} | {'MB/s':>5} | {'CPU us/event':>12} | {'vs bare':>7} |"
    )
    print(f"|{'-' * 11}|{'-' * 9}|{'-' * 13}|{'-' * 19}|{'-' * 19}|{'-' * 7}|{'-' * 14}|{'-' * 9}|")
    for name, n, med, lo, hi, mb, size, cpu in rows:
        print(
            f"| {name:<9} | {n:>7,} | {size:>11.0f} | {med:>17,.0f} | {f'{lo:,.0f}..{hi:,.0f}':>17} | {mb:>5.1f} | {cpu:>12.1f} | {med / bare_rate:>6.0%} |"
        )
    ratio = rows[2][2] / bare_rate
    print()
    print(
        f"recorder / bare = {ratio:.0%} (target >= 80%): {'met' if ratio >= 0.8 else 'NOT met'}; "
        f"recorder / bare+json = {rows[2][2] / rows[1][2]:.0%}"
    )


if __name__ == "__main__":
    main()
