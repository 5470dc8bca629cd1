"""The recording gateway's cost: the same chat completions sent to vLLM directly and through `oel gateway`.

Latency: calls alternate direct / gateway (one-token answers, so the model's time is small and the gateway's
share shows), p50 and p99 of each, and the difference of the medians. The gateway's own time per call, as
its metric `oel_gateway_overhead_seconds` measures it (the call less the waits for the upstream and the
client), is printed too. Throughput: `--concurrency` clients calling as fast as they can for `--seconds`,
direct, then through the gateway, then direct again (the two direct runs bracket the load's drift).

Needs the local stack (the gateway records to Kafka) and the vLLM server:

    bash infra/local/stack.sh up && bash infra/local/vllm.sh up
    .venv/bin/python bench/bench_gateway.py            # --calls 200 --concurrency 8 --seconds 20
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
BODY = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 1, "temperature": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200, help="latency calls per side (default 200)")
    ap.add_argument("--concurrency", type=int, default=8, help="clients in the throughput runs (default 8)")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each throughput run (default 20)")
    ap.add_argument("--upstream", default=None, help="vLLM's base URL (default: OEL_MODEL__VLLM_URL)")
    args = ap.parse_args()

    from oel.settings import load_settings

    settings = load_settings()
    upstream = (args.upstream or settings.model.vllm_url).rstrip("/")
    base = httpx.get(upstream + "/v1/models", timeout=30).json()["data"][0]["id"]
    port = free_port()
    log = open(REPO / "bench-out" / "gateway.log", "ab") if (REPO / "bench-out").is_dir() else subprocess.DEVNULL
    env = {**os.environ, "OEL_GATEWAY__PORT": str(port), "OEL_GATEWAY__UPSTREAM_URL": upstream, "OEL_GATEWAY__IDLE_END_S": "30"}
    proc = subprocess.Popen([sys.executable, "-m", "oel.cli", "gateway"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    gateway = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(gateway + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the gateway did not start")
            time.sleep(0.3)
        run(args, upstream, gateway, base)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def call(client: httpx.Client, url: str, model: str, headers: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = client.post(url + "/v1/chat/completions", json={**BODY, "model": model}, headers=headers)
    r.raise_for_status()
    return time.perf_counter() - t0


def run(args: argparse.Namespace, upstream: str, gateway: str, base: str) -> None:
    sides = {"direct": (upstream, base, {}), "gateway": (gateway, base, {"X-OEL-Namespace": "bench-gateway"})}
    with httpx.Client(timeout=60) as client:
        for url, model, headers in sides.values():  # warm up both paths
            for _ in range(5):
                call(client, url, model, {**headers, "X-OEL-Episode-Id": "bench-warmup"} if headers else headers)
        times: dict[str, list[float]] = {"direct": [], "gateway": []}
        for i in range(args.calls):
            for name, (url, model, headers) in sides.items():
                h = {**headers, "X-OEL-Episode-Id": f"bench-lat-{i // 20}"} if headers else headers  # 20 steps per episode
                times[name].append(call(client, url, model, h))
        overhead = httpx.get(gateway + "/metrics").text
    s = re.search(r'oel_gateway_overhead_seconds_sum\{route="chat"\} ([0-9.e+-]+)', overhead)
    c = re.search(r'oel_gateway_overhead_seconds_count\{route="chat"\} ([0-9.e+-]+)', overhead)
    own_ms = 1000 * float(s.group(1)) / float(c.group(1)) if s and c else float("nan")

    print(f"\nlatency, {args.calls} one-token chat completions per side, alternating (ms):")
    print(f"{'':<10}{'p50':>8}{'p99':>8}")
    for name, values in times.items():
        print(f"{name:<10}{1000 * statistics.median(values):>8.1f}{1000 * pct(values, 0.99):>8.1f}")
    added = 1000 * (statistics.median(times["gateway"]) - statistics.median(times["direct"]))
    print(f"added by the gateway: p50 {added:.2f} ms (difference of medians); its own time per call (metric): {own_ms:.2f} ms mean")

    rates = []
    for name in ("direct", "gateway", "direct"):
        url, model, headers = sides[name]
        rates.append((name, throughput(url, model, headers, args.concurrency, args.seconds)))
    print(f"\nthroughput, {args.concurrency} clients, {args.seconds:g} s each (requests/s):")
    for name, rate in rates:
        print(f"{name:<10}{rate:>8.1f}")
    direct = (rates[0][1] + rates[2][1]) / 2
    print(f"gateway / direct (mean of the two direct runs): {rates[1][1] / direct:.2f}")


def throughput(url: str, model: str, headers: dict[str, str], clients: int, seconds: float) -> float:
    done = [0] * clients
    stop = time.monotonic() + seconds

    def worker(k: int) -> None:
        with httpx.Client(timeout=60) as client:
            n = 0
            while time.monotonic() < stop:
                h = {**headers, "X-OEL-Episode-Id": f"bench-tp-{k}-{n // 20}"} if headers else headers
                call(client, url, model, h)
                n += 1
            done[k] = n

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.monotonic() - t0)


if __name__ == "__main__":
    main()
