"""Fault suite: kill -9 the processor and the learner under load, restart the broker and the object store, and count.

Runs on a private local stack (its own ports and state directory, started and stopped here), so the
broker and MinIO it restarts are its own. Agents are `oel loadgen`'s synthetic episodes sent through the
Recorder at a steady rate, spread over several trusted namespaces; the processor runs the grounded
extraction (no model call, so a kill lands in the streaming path, not in a 5-second generation).

For each fault it prints: episodes sent; episodes that reached the store (``trajectories/<ns>/<id>``);
lost (sent, never stored after the drain); duplicated (an episode in the sources of two KB updates); and
seconds to recover after each fault: from the fault until the first episode started after it is stored
(compare with the baseline, the median time from an episode's start to its stored trajectory).

    .venv/bin/python bench/faults.py --kills 10 --out bench/results/faults.json

The learner consolidates into a tiny random model (two OPCD steps, no gates, every version promoted), so a
round takes seconds, and with knowledge arriving in several namespaces the learner keeps training, so kills
land in every phase of a round; for it the suite prints versions published twice,
rounds trained twice (two versions of one round), KB versions never consolidated, and seconds from a kill
until the learner is back in its group (its log's assignment) and every KB version that existed at the
kill is in a published model version.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.support: the tiny model
PORT_VARS = (
    "OEL_STACK_KAFKA_PORT",
    "OEL_STACK_KAFKA_CONTROLLER_PORT",
    "OEL_STACK_MINIO_PORT",
    "OEL_STACK_MINIO_CONSOLE_PORT",
    "OEL_STACK_PROMETHEUS_PORT",
)
NS_PREFIX = "house-rules-faults"  # trusted by default: grounded items from the loadgen reviewer's rules


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def sh(env: dict, *args: str) -> None:
    subprocess.run(args, env=env, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class Service:
    """One service process (``oel <command>``), killed with SIGKILL and restarted with the same instance id."""

    def __init__(self, command: list[str], env: dict, log: Path):
        self.command, self.env, self.log = command, env, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "oel.cli", *self.command], env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO
            )

    def check_alive(self) -> None:
        """Raise if the process ended by itself (a configuration error, a crash): the suite would measure nothing."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"oel {' '.join(self.command)} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        assert self.proc is not None
        self.check_alive()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def processor(env: dict, state: Path) -> Service:
    """A worker with static membership, running the grounded extraction (no model call)."""
    return Service(
        ["processor", "--loglevel", "warning"],
        {
            **env,
            "OEL_PROCESSOR__EXTRACTION_VARIANT": "grounded",
            "OEL_PROCESSOR__BATCH_SIZE": "8",
            "OEL_PROCESSOR__BATCH_WINDOW_S": "2",
            "OEL_PROCESSOR__ABANDON_AFTER_S": "120",
            "OEL_PROCESSOR__INSTANCE_ID": "faults-worker",
            "OEL_METRICS__PORT": "0",
        },
        state / "processor.log",
    )


def learner(env: dict, state: Path) -> Service:
    """A learner with static membership that consolidates every KB update at once into a tiny model (two OPCD
    steps, no gates, auto-promotion): rounds of seconds, so that kills land in every phase of a round."""
    from tests.support.tiny_model import save_tiny_model

    model = save_tiny_model(state / "tiny-model")
    return Service(
        ["learner", "run"],
        {
            **env,
            "OEL_MODEL__PATH": str(model),
            "OEL_LEARNER__MIN_NEW_ITEMS": "1",
            "OEL_LEARNER__COOLDOWN_S": "0",
            "OEL_LEARNER__STEPS": "2",
            "OEL_LEARNER__BATCH_SIZE": "2",
            "OMP_NUM_THREADS": "1",
            "OEL_LEARNER__MAX_NEW_TOKENS": "6",
            "OEL_LEARNER__WARMUP_STEPS": "0",
            "OEL_LEARNER__CHECK_EVERY": "0",
            "OEL_LEARNER__AUTO_PROMOTE": "true",
            "OEL_LEARNER__GATE_ENABLED": "false",
            "OEL_LEARNER__KNOWLEDGE_GATE_ENABLED": "false",
            "OEL_LEARNER__INSTANCE_ID": "faults-learner",
            "OEL_METRICS__PORT": "0",
        },
        state / "learner.log",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10, help="kill -9 of the processor (default 10)")
    ap.add_argument("--learner-kills", type=int, default=5, help="kill -9 of the learner (default 5)")
    ap.add_argument("--seed", type=int, default=7, help="seed of the fault order and timing (default 7)")
    ap.add_argument(
        "--namespaces",
        type=int,
        default=8,
        help="namespaces the episodes spread over (default 8): each learns the reviewer's rules on its own, "
        "so new knowledge keeps coming and the learner keeps training",
    )
    ap.add_argument("--rate", type=float, default=20.0, help="events/s sent (default 20)")
    ap.add_argument("--every-s", type=float, default=15.0, help="seconds between faults (default 15)")
    ap.add_argument("--drain-s", type=float, default=180.0, help="how long to wait for the last episodes (default 180)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--show", type=Path, metavar="JSON", help="print the table of a saved run and exit")
    args = ap.parse_args()
    if args.show:
        print_table(json.loads(args.show.read_text()))
        return

    state = Path(tempfile.mkdtemp(prefix="oel-faults-"))
    env = {**os.environ, "OEL_PATHS__STATE_DIR": str(state)}
    env.update({v: str(p) for v, p in zip(PORT_VARS, free_ports(len(PORT_VARS)), strict=True)})
    os.environ.update({k: env[k] for k in ("OEL_PATHS__STATE_DIR", *PORT_VARS)})
    print(f"private stack in {state} ...", flush=True)
    sh(env, sys.executable, "-m", "oel.cli", "stack", "up")
    sh(env, sys.executable, "-m", "oel.cli", "topics", "create")
    services = {"processor": processor(env, state), "learner": learner(env, state)}
    try:
        results = run(env, services, args)
    finally:
        for service in services.values():
            service.stop()
        subprocess.run([sys.executable, "-m", "oel.cli", "stack", "down"], env=env, cwd=REPO, capture_output=True)
    print_table(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")


def run(env: dict, services: dict[str, Service], args: argparse.Namespace) -> list[dict]:
    from oel.schemas import ExperienceUpdate, ModelVersion
    from oel.settings import load_settings
    from oel.store import S3Store
    from producers.recorder import Recorder
    from reference import loadgen

    settings = load_settings()
    store = S3Store(settings.s3)
    store.ensure_bucket()
    namespaces = [f"{NS_PREFIX}-{i}" for i in range(args.namespaces)]
    for service in services.values():
        service.start()

    stored_at: dict[str, float] = {}
    updates: list[tuple[float, ExperienceUpdate]] = []  # (seen at, update), in log order
    versions: list[tuple[float, ModelVersion]] = []
    stop = threading.Event()

    def watch() -> None:  # the store, the experience topic and the versions topic, twice a second
        from confluent_kafka import Consumer

        consumer = Consumer({**settings.kafka.client_config(), "group.id": f"faults-{time.time_ns()}", "auto.offset.reset": "earliest"})
        consumer.subscribe([settings.topics.experience, settings.topics.model_versions])
        while not stop.is_set():
            try:
                for key in store.list("trajectories/"):
                    stored_at.setdefault(key.rsplit("/", 1)[1][:-5], time.monotonic())
            except Exception:  # the store may be the thing restarting
                pass
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                if msg.topic() == settings.topics.experience:
                    updates.append((time.monotonic(), ExperienceUpdate.model_validate_json(msg.value())))
                else:
                    versions.append((time.monotonic(), ModelVersion.model_validate_json(msg.value())))
        consumer.close()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    started_at: dict[str, float] = {}

    def tap(value: bytes) -> None:
        event = json.loads(value)
        if event["kind"] == "start":
            started_at[event["episode_id"]] = time.monotonic()

    recorder = Recorder(settings, tap=tap)
    rng = random.Random(args.seed)
    kills = ["processor kill -9"] * args.kills + ["learner kill -9"] * args.learner_kills
    rng.shuffle(kills)
    faults = [*kills, "broker restart", "object store restart"]
    gaps = [args.every_s * rng.uniform(1.0, 1.5) for _ in faults]  # at random points of the services' work, one at a time
    duration = sum(gaps) + 120  # restarts take time too: episodes keep coming after the last fault
    sender = threading.Thread(
        target=lambda: loadgen.run(
            recorder,
            loadgen.synthetic_episodes(random.Random(7), namespaces, max_turns=3),
            rate=args.rate,
            duration_s=duration,
            concurrency=8,
        ),
        daemon=True,
    )
    sender.start()
    rows: dict[str, dict] = {}
    pending: list[tuple[str, float]] = []
    for fault, gap in zip(faults, gaps, strict=True):
        time.sleep(gap)
        for service in services.values():
            service.check_alive()
        t = time.monotonic()
        print(f"{fault} at {t:.0f}", flush=True)
        if fault.endswith("kill -9"):
            service = services[fault.split()[0]]
            service.kill()
            service.start()
        elif fault == "broker restart":
            sh(env, "bash", "infra/local/kafka.sh", "down")
            sh(env, "bash", "infra/local/kafka.sh", "up")
        else:
            sh(env, "bash", "infra/local/minio.sh", "down")
            sh(env, "bash", "infra/local/minio.sh", "up")
        pending.append((fault, t))
    sender.join()
    recorder.close()
    sent = set(started_at)
    kb_index: dict[tuple[str, str], int] = {}  # (namespace, KB version) -> its position among the namespace's
    first_seen: dict[tuple[str, str], float] = {}  # (namespace, KB version) -> when its first update was seen

    def index_updates() -> None:
        for at, u in list(updates):
            key = (u.namespace, u.kb_version)
            if key not in kb_index:
                kb_index[key] = sum(1 for ns, _ in kb_index if ns == u.namespace)
                first_seen[key] = at

    def consolidated_at(ns: str, index: int, after: float = 0.0) -> float | None:
        """When the first promoted version of ``ns`` holding its index-th KB version (or a later one) was published."""
        seen = [
            at
            for at, v in versions
            if v.namespace == ns and v.status.value == "promoted" and at >= after and kb_index.get((ns, v.kb_version or ""), -1) >= index
        ]
        return min(seen) if seen else None

    def last_index(ns: str, before: float = float("inf")) -> int:
        return max((i for (n, kb), i in kb_index.items() if n == ns and first_seen[(n, kb)] <= before), default=-1)

    def all_consolidated(before: float = float("inf")) -> float | None:
        """When every KB version seen before ``before`` was in a published model version (None: not yet)."""
        times = [consolidated_at(ns, last_index(ns, before)) for ns in {n for n, _ in kb_index} if last_index(ns, before) >= 0]
        return None if None in times else max(times, default=0.0)

    deadline = time.monotonic() + args.drain_s
    while time.monotonic() < deadline and not (index_updates() or sent <= set(stored_at) and kb_index and all_consolidated() is not None):
        time.sleep(1)
    stop.set()
    watcher.join(10)
    index_updates()

    # recovery: from the fault until the first episode started after it is in the store (the learner: until it
    # is back in its group and every KB version that existed at the kill is in a published model version); the
    # same latencies without a fault (medians over all episodes and KB versions) are the baselines to compare with
    for fault, t in pending:
        if fault == "learner kill -9":
            back = next((a for a in assigned_at(services["learner"].log) if a > t), None)
            done = all_consolidated(before=t)
            recovery = max(back, done) - t if back is not None and done is not None else None
        else:
            after = [stored_at[e] for e, s in started_at.items() if s > t and e in stored_at]
            recovery = min(after) - t if after else None
        row = rows.setdefault(fault, {"fault": fault, "count": 0, "recovery_s": []})
        row["count"] += 1
        row["recovery_s"].append(round(recovery, 1) if recovery is not None else None)
    latency = [stored_at[e] - s for e, s in started_at.items() if e in stored_at]
    consolidation = [done - first_seen[(ns, kb)] for (ns, kb), i in kb_index.items() if (done := consolidated_at(ns, i)) is not None]
    sources: dict[str, int] = {}
    distinct = {u.model_dump_json(): u for _, u in updates}  # an update re-sent as is (a replayed batch) counts once
    for u in distinct.values():
        for e in u.source_episode_ids:
            sources[e] = sources.get(e, 0) + 1
    published = Counter((v.version, v.status.value) for _, v in versions)
    rounds = Counter(round_id for round_id, _ in {(v.round_id, v.version) for _, v in versions})
    never = 0
    for ns in {n for n, _ in kb_index}:
        last = max(
            (kb_index.get((ns, v.kb_version or ""), -1) for _, v in versions if v.namespace == ns and v.status.value == "promoted"),
            default=-1,
        )
        never += last_index(ns) - last
    reached = sent & set(stored_at)
    summary = {
        "fault": "all (one run)",
        "sent": len(sent),
        "reached_store": len(reached),
        "lost": len(sent - reached),
        "duplicated": sum(1 for n in sources.values() if n > 1),
        "kb_updates": len(distinct),
        "kb_updates_resent": len(updates) - len(distinct),
        "kb_versions": len(kb_index),
        "lost_ids": sorted(sent - reached),
        "duplicated_ids": sorted(e for e, n in sources.items() if n > 1),
        "latency_s_median": round(statistics.median(latency), 1) if latency else None,
        "versions": len({v for v, _ in published}),
        "published_twice": sum(1 for n in published.values() if n > 1),
        "rounds_trained_twice": sum(1 for n in rounds.values() if n > 1),
        "kb_versions_never_consolidated": never,
        "consolidation_s_median": round(statistics.median(consolidation), 1) if consolidation else None,
    }
    return [summary, *rows.values()]


def assigned_at(log: Path) -> list[float]:
    """When the learner's log says its partitions were assigned, on this process's monotonic clock."""
    offset = time.monotonic() - time.time()
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if "learner: assigned" in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")  # logging's asctime: local time
            out.append(stamp.timestamp() + offset)
    return out


def print_table(results: list[dict]) -> None:
    summary, *faults = results
    print(
        f"\nsent {summary['sent']} episodes; reached the store {summary['reached_store']}; lost {summary['lost']}; "
        f"duplicated in KB updates {summary['duplicated']} ({summary['kb_updates']} updates, "
        f"{summary.get('kb_updates_resent', 0)} more re-sent as they were)"
    )
    print(
        f"{summary['kb_versions']} KB versions; {summary['versions']} model versions published; published twice {summary['published_twice']}; rounds trained twice "
        f"{summary['rounds_trained_twice']}; KB versions never consolidated {summary['kb_versions_never_consolidated']}"
    )
    print(
        f"baselines (medians over all): an episode's start to its stored trajectory {summary['latency_s_median']} s; "
        f"a new KB version to its published model version {summary['consolidation_s_median']} s"
    )
    print(f"{'fault':<24}{'times':>6}{'recovery s (median)':>22}{'max':>8}{'median over baseline':>22}")
    for row in faults:
        rec = [r for r in row["recovery_s"] if r is not None]
        base = None if row["fault"].startswith("learner") else summary["latency_s_median"]  # the learner's measure is no latency
        med = f"{statistics.median(rec):.1f}" if rec else "-"
        mx = f"{max(rec):.1f}" if rec else "-"
        over = f"{statistics.median(rec) - base:.1f}" if rec and base is not None else "-"
        print(f"{row['fault']:<24}{row['count']:>6}{med:>22}{mx:>8}{over:>22}")


if __name__ == "__main__":
    main()
