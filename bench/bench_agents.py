"""Batched agents vs one episode at a time: episodes per minute on the same model and settings.

    .venv/bin/python bench/bench_agents.py --env frozenlake --episodes 16 --batch-size 16

Where the time goes: every turn's prompt is prefilled in full (the backend keeps no KV cache across
calls), and prefill costs the same batched or not, so the ratio grows with the response length: with
the free mode's 128-token answers it is well above 4x; with very short answers (``--mode short``, or
``--max-new-tokens 32``) prefill dominates and the ratio drops (3.6x at 32 tokens here).

Runs the same seeds twice with :func:`oel.rollout.run_episodes` on the backend the settings name
(:func:`oel.model.factory.make_backend`; the in-process one by default): once with ``batch_size=1`` (one generation call per
episode turn) and once with ``batch_size=B`` (one call for up to B live episodes), same sampling
settings, and prints episodes/min, generated tokens/s and generation calls side by side, with the
ratio. Target: batched >= 4x the one-at-a-time rate. The order of the two runs alternates with
``--repeat`` so that load changes on a shared machine hit both. Greedy decoding by default, so both
runs play the same episodes (and the comparison is like for like).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oel.envs import eval_seeds, make_env  # noqa: E402
from oel.rollout import AgentConfig, run_episodes, summarize  # noqa: E402
from oel.settings import load_settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--env", default="frozenlake", choices=["frozenlake", "sokoban", "house-rules"])
    ap.add_argument("--mode", default="free", choices=["free", "short", "choice"])
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="Default: the mode's default (free 128, short 8, choice 32).")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--repeat", type=int, default=1, help="Runs of each (alternating order); the best of each is reported.")
    args = ap.parse_args()

    from oel.model.factory import make_backend

    backend = make_backend(load_settings(), max_batch_size=args.batch_size)
    seeds = eval_seeds(args.episodes)
    calls: dict[str, int] = {}

    class Counting:
        """Counts generation calls and generated tokens without changing the backend."""

        def __init__(self, inner, key):
            self.inner, self.key = inner, key

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def generate(self, conversations, params, adapter=None):
            calls[self.key] = calls.get(self.key, 0) + 1
            return self.inner.generate(conversations, params, adapter)

    warm = AgentConfig(mode=args.mode, max_new_tokens=4, temperature=0.0, batch_size=args.batch_size)
    run_episodes(backend, lambda: make_env(args.env), seeds[:2], warm)  # load kernels, caches

    best: dict[str, tuple[float, object, float]] = {}
    for r in range(args.repeat):
        order = ("one-at-a-time", "batched") if r % 2 == 0 else ("batched", "one-at-a-time")
        for key in order:
            bs = 1 if key == "one-at-a-time" else args.batch_size
            config = AgentConfig(mode=args.mode, max_new_tokens=args.max_new_tokens, temperature=args.temperature, batch_size=bs, seed=0)
            calls[key] = 0
            t0 = time.monotonic()
            eps = run_episodes(Counting(backend, key), lambda: make_env(args.env), seeds, config)
            seconds = time.monotonic() - t0
            stats = summarize(eps, seconds)
            tok_s = stats.response_tokens / seconds
            if key not in best or stats.episodes_per_minute > best[key][0]:
                best[key] = (stats.episodes_per_minute, stats, tok_s, calls[key])
            print(f"  run {r + 1} {key:14s} {seconds:7.1f} s  {stats.episodes_per_minute:7.1f} episodes/min", flush=True)

    one, bat = best["one-at-a-time"], best["batched"]
    print()
    print(f"command: .venv/bin/python bench/bench_agents.py {shlex.join(sys.argv[1:])}")
    print(
        f"model: {backend.base_model}  env={args.env} mode={args.mode} episodes={args.episodes} "
        f"max_new_tokens={args.max_new_tokens or 'mode default'} temperature={args.temperature} "
        f"batch (max_batch_size)={args.batch_size}"
    )
    print()
    print(f"| {'':24s} | {'one-at-a-time':>14s} | {f'batched (B={args.batch_size})':>16s} | {'ratio':>6s} |")
    print(f"|{'-' * 26}|{'-' * 16}|{'-' * 18}|{'-' * 8}|")
    print(f"| {'episodes/min':24s} | {one[0]:14.1f} | {bat[0]:16.1f} | {bat[0] / one[0]:5.2f}x |")
    print(f"| {'generated tokens/s':24s} | {one[2]:14.1f} | {bat[2]:16.1f} | {bat[2] / one[2]:5.2f}x |")
    print(f"| {'generation calls':24s} | {one[3]:14d} | {bat[3]:16d} | {'':6s} |")
    print(f"| {'seconds':24s} | {one[1].seconds:14.1f} | {bat[1].seconds:16.1f} | {'':6s} |")
    print(f"| {'pass rate':24s} | {one[1].pass_rate:14.1%} | {bat[1].pass_rate:16.1%} | {'':6s} |")
    print(f"| {'mean turns':24s} | {one[1].mean_turns:14.2f} | {bat[1].mean_turns:16.2f} | {'':6s} |")
    print()
    verdict = "meets" if bat[0] / one[0] >= 4 else "MISSES"
    print(f"batched / one-at-a-time = {bat[0] / one[0]:.2f}x episodes/min ({verdict} the 4x target)")


if __name__ == "__main__":
    main()
