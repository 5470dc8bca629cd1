"""Fault suite: kill -9 the processor under load, restart the broker and the object store, and count.

Runs on a private local stack (its own ports and state directory, started and stopped here), so the
broker and MinIO it restarts are its own. Agents are `oel loadgen`'s synthetic episodes sent through the
Recorder at a steady rate; the processor runs the grounded extraction of a trusted namespace (no model
call, so a kill lands in the streaming path, not in a 5-second generation).

For each scenario it prints: episodes sent; episodes that reached the store (``trajectories/<ns>/<id>``);
lost (sent, never stored after the drain); duplicated (an episode in the sources of two KB updates); and
seconds to recover after each fault: from the fault until the first episode started after it is stored
(compare with the baseline, the median time from an episode's start to its stored trajectory).

    .venv/bin/python bench/faults.py --kills 10 --out bench/results/faults.json

Not run here: kill -9 of the learner (no learner in this suite yet; rounds take minutes on this CPU).
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PORT_VARS = ("OEL_STACK_KAFKA_PORT", "OEL_STACK_KAFKA_CONTROLLER_PORT", "OEL_STACK_MINIO_PORT",
             "OEL_STACK_MINIO_CONSOLE_PORT", "OEL_STACK_PROMETHEUS_PORT")
NS = "house-rules-faults"  # trusted by default: grounded items from the loadgen reviewer's rules


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


class Processor:
    """One processor worker process, killed with SIGKILL and restarted with the same instance id."""

    def __init__(self, env: dict, log: Path):
        self.env = {**env, "OEL_PROCESSOR__EXTRACTION_VARIANT": "grounded", "OEL_PROCESSOR__BATCH_SIZE": "8",
                    "OEL_PROCESSOR__BATCH_WINDOW_S": "2", "OEL_PROCESSOR__ABANDON_AFTER_S": "120",
                    "OEL_PROCESSOR__INSTANCE_ID": "faults-worker", "OEL_METRICS__PORT": "0"}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "oel.cli", "processor", "--loglevel", "warning"],
                                         env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10, help="kill -9 of the processor (default 10)")
    ap.add_argument("--rate", type=float, default=20.0, help="events/s sent (default 20)")
    ap.add_argument("--every-s", type=float, default=15.0, help="seconds between faults (default 15)")
    ap.add_argument("--drain-s", type=float, default=180.0, help="how long to wait for the last episodes (default 180)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()

    state = Path(tempfile.mkdtemp(prefix="oel-faults-"))
    env = {**os.environ, "OEL_PATHS__STATE_DIR": str(state)}
    env.update({v: str(p) for v, p in zip(PORT_VARS, free_ports(len(PORT_VARS)), strict=True)})
    os.environ.update({k: env[k] for k in ("OEL_PATHS__STATE_DIR", *PORT_VARS)})
    print(f"private stack in {state} ...", flush=True)
    sh(env, sys.executable, "-m", "oel.cli", "stack", "up")
    sh(env, sys.executable, "-m", "oel.cli", "topics", "create")
    processor = Processor(env, state / "processor.log")
    try:
        results = run(env, state, processor, args)
    finally:
        processor.stop()
        subprocess.run([sys.executable, "-m", "oel.cli", "stack", "down"], env=env, cwd=REPO, capture_output=True)
    print_table(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")


def run(env: dict, state: Path, processor: Processor, args: argparse.Namespace) -> list[dict]:
    from oel.schemas import ExperienceUpdate
    from oel.settings import load_settings
    from oel.store import S3Store
    from producers.recorder import Recorder
    from reference import loadgen

    settings = load_settings()
    store = S3Store(settings.s3)
    store.ensure_bucket()
    processor.start()

    stored_at: dict[str, float] = {}
    updates: list[ExperienceUpdate] = []
    stop = threading.Event()

    def watch() -> None:  # the store and the experience topic, twice a second
        from confluent_kafka import Consumer

        consumer = Consumer({**settings.kafka.client_config(), "group.id": f"faults-{time.time_ns()}", "auto.offset.reset": "earliest"})
        consumer.subscribe([settings.topics.experience])
        while not stop.is_set():
            try:
                for key in store.list(f"trajectories/{NS}/"):
                    stored_at.setdefault(key.rsplit("/", 1)[1][:-5], time.monotonic())
            except Exception:  # the store may be the thing restarting
                pass
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                updates.append(ExperienceUpdate.model_validate_json(msg.value()))
        consumer.close()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    started_at: dict[str, float] = {}

    def tap(value: bytes) -> None:
        event = json.loads(value)
        if event["kind"] == "start":
            started_at[event["episode_id"]] = time.monotonic()

    recorder = Recorder(settings, tap=tap)
    faults = ["processor kill -9"] * args.kills + ["broker restart", "object store restart"]
    duration = args.every_s * (len(faults) + 1) + 60  # restarts take time too: episodes keep coming after the last
    sender = threading.Thread(target=lambda: loadgen.run(
        recorder, loadgen.synthetic_episodes(random.Random(7), [NS], max_turns=3), rate=args.rate,
        duration_s=duration, concurrency=8), daemon=True)
    sender.start()
    rows: dict[str, dict] = {}
    pending: list[tuple[str, float]] = []
    for fault in faults:
        time.sleep(args.every_s)
        t = time.monotonic()
        print(f"{fault} at {t:.0f}", flush=True)
        if fault == "processor kill -9":
            processor.kill()
            processor.start()
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
    deadline = time.monotonic() + args.drain_s
    while time.monotonic() < deadline and not sent <= set(stored_at):
        time.sleep(1)
    stop.set()
    watcher.join(10)

    # recovery: from the fault until the first episode started after it is in the store; the same
    # latency without a fault (start to stored, median over all episodes) is the baseline to compare with
    for fault, t in pending:
        after = [stored_at[e] for e, s in started_at.items() if s > t and e in stored_at]
        row = rows.setdefault(fault, {"fault": fault, "count": 0, "recovery_s": []})
        row["count"] += 1
        row["recovery_s"].append(round(min(after) - t, 1) if after else None)
    latency = [stored_at[e] - s for e, s in started_at.items() if e in stored_at]
    sources: dict[str, int] = {}
    for u in updates:
        for e in u.source_episode_ids:
            sources[e] = sources.get(e, 0) + 1
    reached = sent & set(stored_at)
    summary = {"fault": "all (one run)", "sent": len(sent), "reached_store": len(reached), "lost": len(sent - reached),
               "duplicated": sum(1 for n in sources.values() if n > 1), "kb_updates": len(updates),
               "latency_s_median": round(statistics.median(latency), 1) if latency else None}
    return [summary, *rows.values()]


def print_table(results: list[dict]) -> None:
    summary, *faults = results
    print(f"\nsent {summary['sent']} episodes; reached the store {summary['reached_store']}; lost {summary['lost']}; "
          f"duplicated in KB updates {summary['duplicated']} ({summary['kb_updates']} updates)")
    print(f"an episode's start to its stored trajectory, median over all: {summary['latency_s_median']} s (the baseline)")
    print(f"{'fault':<24}{'times':>6}{'recovery s (median)':>22}{'max':>8}")
    for row in faults:
        rec = [r for r in row["recovery_s"] if r is not None]
        med = f"{statistics.median(rec):.1f}" if rec else "-"
        mx = f"{max(rec):.1f}" if rec else "-"
        print(f"{row['fault']:<24}{row['count']:>6}{med:>22}{mx:>8}")


if __name__ == "__main__":
    main()
