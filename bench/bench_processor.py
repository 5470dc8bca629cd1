"""Processor streaming throughput and end-to-knowledge latency, next to a bare confluent-kafka consumer
and a bare Faust agent.

What it measures (on the local stack, `oel stack up`):

1. **bare consumer**: a confluent-kafka consumer reading the same pre-filled topic (decode only), events/s;
2. **bare Faust agent**: a Faust worker with the processor's broker settings whose one agent only counts
   the events of the same topic (no decode, no table): what Faust itself costs per event here;
3. **processor, throughput**: one `oel processor` worker (Faust) with extraction replaced by a no-op
   extractor (every episode yields one fixed-form item at once), reading the same pre-filled topic:
   events/s from its first consumed event until every event is consumed (its own counter, scraped from
   its /metrics endpoint), and until every episode's ExperienceUpdate is out (episodes, extractions,
   items and snapshots written to the store: MinIO, or with ``--store local`` a local directory);
4. **processor, latency**: episodes produced at a steady rate while the worker runs; for each episode,
   the time from producing its end event to the ExperienceUpdate naming it (its items are in the store
   by then); model time is zero with the no-op extractor, batching waits are included.

Run:  .venv/bin/python bench/bench_processor.py [--episodes 2000] [--steps 3] [--rate 50] [--store s3|local]
      [--profile FILE]   (cProfile of the worker's main thread)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import Consumer, Producer

from oel.extraction import MARKER
from oel.model.backend import Backend, Generation, SamplingParams
from oel.ops.topics import admin_client, ensure_topics
from oel.schemas import ExperienceUpdate, TrajectoryEvent, decode
from oel.settings import load_settings
from oel.topics import topic_specs

METRICS_PORT = 9119


class NoopBackend(Backend):
    """The no-op extractor: answers every extraction prompt at once with one lesson (bench only)."""

    base_model = "noop"

    def generate(self, conversations, params: SamplingParams, adapter=None):
        out = []
        for conv in conversations:
            tag = abs(hash(conv[-1].content)) % 10**8
            out.append(Generation(f"{MARKER} Lesson {tag}: quote the order number and sign off politely.", [], [], "stop"))
        return out

    def load_adapter(self, name, path):  # pragma: no cover
        raise NotImplementedError

    def unload_adapter(self, name):  # pragma: no cover
        raise NotImplementedError

    def list_adapters(self):
        return []


def env_vars(tag: str, batch: int) -> dict[str, str]:
    return {
        "OEL_TOPICS__TRAJECTORIES": f"bench-{tag}.trajectories",
        "OEL_TOPICS__EXPERIENCE": f"bench-{tag}.experience",
        "OEL_TOPICS__MODEL_VERSIONS": f"bench-{tag}.model-versions",
        "OEL_TOPICS__EPISODES": f"bench-{tag}.episodes",
        "OEL_PROCESSOR__APP_ID": f"bench-{tag}",
        "OEL_PROCESSOR__BATCH_SIZE": str(batch),
        "OEL_PROCESSOR__BATCH_WINDOW_S": "0.5",
        "OEL_S3__BUCKET": f"bench-{tag}",
        "OEL_METRICS__PORT": str(METRICS_PORT),
    }


def episode(i: int, steps: int, tag: str) -> list[TrajectoryEvent]:
    """One episode shaped like a chat agent's: ~1 KB per step event."""
    eid = f"{tag}-{i}"
    base = dict(namespace=f"bench-ns{i % 4}", episode_id=eid, agent_id="bench", model_version="base")
    now = datetime.now(UTC)
    evs = [TrajectoryEvent(**base, seq=0, kind="start", ts=now, start={"task": "Help the customer."})]
    for s in range(1, steps + 1):
        evs.append(
            TrajectoryEvent(
                **base,
                seq=s,
                kind="step",
                ts=now,
                step={
                    "prompt": f"Customer {i}: where is my order #{1000 + i}? " + "context " * 60,
                    "response": "Your order is on its way. " + "detail " * 40,
                    "action": "reply",
                    "feedback": "Rejected: quote the order number.",
                },
            )
        )
    evs.append(TrajectoryEvent(**base, seq=steps + 1, kind="end", ts=now, end={"outcome": "accepted", "success": True}))
    return evs


def producer(settings) -> Producer:
    return Producer(
        {**settings.kafka.client_config(), "enable.idempotence": True, "acks": "all", "linger.ms": 5, "compression.type": "lz4"}
    )


def scrape_consumed(topic: str) -> float:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=2).read().decode()
    except OSError:
        return -1
    for line in text.splitlines():
        if line.startswith("oel_events_consumed_total{") and f'topic="{topic}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0


def run_worker(env: dict) -> None:
    """Child process: a processor worker whose extractor is the no-op backend."""

    from oel.knowledge import KnowledgeWriter
    from oel.metrics import start_metrics_server
    from oel.store import LocalStore, S3Store
    from processors.app import Processor, internal_topic_specs, make_worker

    profile_to = env.get("OEL_BENCH_PROFILE")
    if profile_to:  # cProfile the whole worker; the stats are written when it stops
        import atexit
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        atexit.register(lambda: (prof.disable(), prof.dump_stats(profile_to)))
    s = load_settings()
    ensure_topics(admin_client(s.kafka), topic_specs(s) + internal_topic_specs(s))
    if env.get("OEL_BENCH_STORE") == "local":  # the directory store: the streaming path without S3 requests
        store = LocalStore(Path(env["OEL_BENCH_LOCAL_DIR"]))
    else:
        store = S3Store(s.s3)
        store.ensure_bucket()
    start_metrics_server(s.metrics.for_service(METRICS_PORT), "processor")
    proc = Processor(s, KnowledgeWriter(store, NoopBackend(), "base"))
    make_worker(proc.app, env.get("OEL_BENCH_LOGLEVEL", "warning")).execute_from_commandline()


def logic_rate(events: list[bytes], max_bytes: int) -> float:
    """Events/s of the processor's own per-event work with no Kafka and no Faust: decode and validate,
    add to the episode's buffer, close the complete episode and serialise it (as the assembly agent does)."""
    from oel.episodes import AddResult, add_event, close

    buffers: dict = {}
    t0 = time.perf_counter()
    for raw in events:
        ev = decode(raw, TrajectoryEvent, max_bytes=max_bytes)
        buf, result = add_event(buffers.get(ev.episode_id), ev, 0.0)
        if result is AddResult.complete:
            buffers.pop(ev.episode_id, None)
            close(buf, abandoned=False).model_dump_json()
        else:
            buffers[ev.episode_id] = buf
    return len(events) / (time.perf_counter() - t0)


def run_bare_faust_worker(env: dict) -> None:
    """Child process: a Faust worker with the processor's broker settings whose one agent only counts
    events (no decode, no table): the ceiling of a Faust agent on this machine."""
    import faust

    from oel import metrics
    from oel.metrics import start_metrics_server
    from processors.app import broker_settings, make_worker

    s = load_settings()
    start_metrics_server(s.metrics.for_service(METRICS_PORT), "processor")
    app = faust.App(
        env["OEL_PROCESSOR__APP_ID"] + "-bare",
        **broker_settings(s.kafka),
        store="memory://",
        web_enabled=False,
        topic_disable_leader=True,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        datadir=f"/tmp/oel-bench-{env['OEL_PROCESSOR__APP_ID']}-bare",
    )
    topic = s.topics.trajectories
    counter = metrics.EVENTS_CONSUMED.labels(topic=topic)

    @app.agent(app.topic(topic, key_serializer="raw", value_serializer="raw"), name="count")
    async def count(stream):
        async for _event in stream.events():
            counter.inc()

    make_worker(app, "warning").execute_from_commandline()


def time_worker(args: list[str], env: dict, topic: str, total: int) -> tuple[float, float, float, subprocess.Popen]:
    """Start a worker, return (events/s from its first to its last consumed event, its start time and count, the process)."""
    worker = subprocess.Popen([sys.executable, __file__, *args], env=env)
    t_first = None
    while True:
        consumed = scrape_consumed(topic)
        if worker.poll() is not None:
            sys.exit(f"worker exited with {worker.returncode}")
        if consumed > 0 and t_first is None:
            t_first, c_first = time.monotonic(), consumed
        if consumed >= total:
            break
        time.sleep(0.2)  # each scrape costs the worker CPU: not too often
    return (total - c_first) / (time.monotonic() - t_first), t_first, c_first, worker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="processor batch size")
    ap.add_argument("--rate", type=float, default=50, help="episodes/s in the latency phase")
    ap.add_argument("--latency-episodes", type=int, default=300)
    ap.add_argument(
        "--store",
        choices=["s3", "local"],
        default="s3",
        help="where the worker writes episodes, extractions and the KB: MinIO (s3) or a local directory (the streaming path without S3 requests)",
    )
    ap.add_argument("--profile", metavar="FILE", help="cProfile the worker, write its stats to FILE (slows it down)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bare-faust-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(dict(os.environ))
        return
    if args.bare_faust_worker:
        run_bare_faust_worker(dict(os.environ))
        return

    tag = uuid.uuid4().hex[:8]
    env = env_vars(tag, args.batch)
    env["OEL_BENCH_STORE"] = args.store
    if args.store == "local":
        env["OEL_BENCH_LOCAL_DIR"] = tempfile.mkdtemp(prefix=f"oel-bench-{tag}-")
    if args.profile:
        env["OEL_BENCH_PROFILE"] = os.path.abspath(args.profile)
    os.environ.update(env)
    s = load_settings()
    ensure_topics(admin_client(s.kafka), topic_specs(s))
    topic = s.topics.trajectories

    # Fill the topic.
    p = producer(s)
    total = 0
    raws = []
    for i in range(args.episodes):
        for ev in episode(i, args.steps, tag):
            raws.append(ev.to_bytes())
            p.produce(topic, key=ev.episode_id, value=raws[-1])
            total += 1
            if total % 10000 == 0:
                p.poll(0)
    p.flush(60)
    print(f"filled {topic}: {total} events, {args.episodes} episodes")

    # 1. Bare consumer.
    c = Consumer({**s.kafka.client_config(), "group.id": f"bare-{tag}", "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    n, t_first = 0, None
    while n < total:
        msg = c.poll(5)
        if msg is None or msg.error():
            continue
        t_first = t_first or time.monotonic()
        decode(msg.value(), TrajectoryEvent)
        n += 1
    bare_rate = (n - 1) / (time.monotonic() - t_first)
    c.close()

    logic = logic_rate(raws, s.topics.max_event_bytes)

    # 2. A Faust agent that only counts, on the same topic: Faust's own ceiling here.
    faust_rate, _, _, bare_worker = time_worker(["--bare-faust-worker"], {**os.environ, **env}, topic, total)
    bare_worker.terminate()
    bare_worker.wait(30)

    # 3. Processor on the same pre-filled topic.
    proc_rate, t_first, c_first, worker = time_worker(["--worker"], {**os.environ, **env}, topic, total)
    try:
        # Until every backlog episode is in the KB (items, snapshot and training data stored).
        upd = Consumer({**s.kafka.client_config(), "group.id": f"drain-{tag}", "auto.offset.reset": "earliest"})
        upd.subscribe([s.topics.experience])
        backlog = {f"{tag}-{i}" for i in range(args.episodes)}
        while backlog:
            msg = upd.poll(1.0)
            if worker.poll() is not None:
                sys.exit(f"worker exited with {worker.returncode}")
            if msg is not None and not msg.error():
                backlog -= set(ExperienceUpdate.model_validate_json(msg.value()).source_episode_ids)
        pipeline_rate = (total - c_first) / (time.monotonic() - t_first)
        upd.close()

        # 4. Latency at a steady rate, worker warm.
        upd = Consumer({**s.kafka.client_config(), "group.id": f"lat-{tag}", "auto.offset.reset": "latest"})
        upd.subscribe([s.topics.experience])
        while not upd.assignment():
            upd.poll(0.2)
        sent: dict[str, float] = {}
        latencies: list[float] = []
        next_at = time.monotonic()
        base = args.episodes
        for i in range(base, base + args.latency_episodes):
            for ev in episode(i, args.steps, tag):
                p.produce(topic, key=ev.episode_id, value=ev.to_bytes())
            p.poll(0)
            sent[f"{tag}-{i}"] = time.monotonic()
            next_at += 1 / args.rate
            while time.monotonic() < next_at:
                msg = upd.poll(max(0.0, next_at - time.monotonic()))
                if msg is not None and not msg.error():
                    for e in ExperienceUpdate.model_validate_json(msg.value()).source_episode_ids:
                        if e in sent:
                            latencies.append(time.monotonic() - sent.pop(e))
        p.flush(30)
        deadline = time.monotonic() + 60
        while sent and time.monotonic() < deadline:
            msg = upd.poll(0.5)
            if msg is not None and not msg.error():
                for e in ExperienceUpdate.model_validate_json(msg.value()).source_episode_ids:
                    if e in sent:
                        latencies.append(time.monotonic() - sent.pop(e))
        upd.close()
    finally:
        worker.terminate()
        worker.wait(30)
        if "OEL_BENCH_LOCAL_DIR" in env:
            shutil.rmtree(env["OEL_BENCH_LOCAL_DIR"], ignore_errors=True)

    latencies.sort()
    p50 = statistics.median(latencies) if latencies else float("nan")
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")
    print()
    print(f"{'':38s} {'events/s':>10s}")
    print(f"{'bare confluent-kafka consumer':38s} {bare_rate:10.0f}")
    print(f"{'bare Faust agent (count only)':38s} {faust_rate:10.0f}")
    print(f"{'processor logic alone (no Kafka)':38s} {logic:10.0f}")
    if faust_rate > 0:  # 0 when the backlog was gone before the first scrape (too few events to time)
        print(f"{'  bound: Faust agent + logic, one core':38s} {1 / (1 / faust_rate + 1 / logic):10.0f}")
    print(f"{'oel processor (no-op extractor)':38s} {proc_rate:10.0f}")
    print(f"{'  ... until all episodes are in the KB':38s} {pipeline_rate:10.0f}")
    print(f"{'ratio processor / bare consumer':38s} {proc_rate / bare_rate:10.2f}   (target: >= 5000 events/s per worker)")
    if faust_rate > 0:
        print(f"{'ratio processor / bare Faust agent':38s} {proc_rate / faust_rate:10.2f}")
    print()
    print(f"store: {args.store}; load average {os.getloadavg()[0]:.1f}")
    print(f"end event -> items in store, {len(latencies)} episodes at {args.rate:.0f}/s, batch {args.batch}, window 0.5 s:")
    print(f"  p50 {p50 * 1000:.0f} ms   p99 {p99 * 1000:.0f} ms   (lost: {len(sent)})")
    print(
        json.dumps(
            {
                "bare_events_per_s": bare_rate,
                "faust_events_per_s": faust_rate,
                "logic_events_per_s": logic,
                "processor_events_per_s": proc_rate,
                "pipeline_events_per_s": pipeline_rate,
                "p50_s": p50,
                "p99_s": p99,
            }
        )
    )


if __name__ == "__main__":
    main()
