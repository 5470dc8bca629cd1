"""Evaluation speed: the base model next to a candidate adapter, unmerged (peft) and merged into a copy.

The gate and ``oel eval`` play held-out episodes (:func:`evaluation.evaluator.evaluate_policy`) and score the
OOD prompts (:func:`evaluation.ood.ood_score`) with a candidate's adapter. This times both, in one process
with one backend, for three subjects: the base model, the adapter run by peft as separate LoRA matmuls
(``merge_adapters`` off) and the adapter merged into a copy of the weights (on; the backend's default for
float32 weights). Answers differ in length between subjects (an adapter that passes in one turn plays
shorter episodes), so speed is compared as generated tokens per second. Each cell is the best of ``--repeats`` runs, the subjects alternating run by run so that
each sees the same background load. It also checks that merged and unmerged give the same results (pass
counts and OOD score), which is what makes the merged run a faithful evaluation.

Run (the demo's promoted adapter, or any LoRA folder for the default model)::

    .venv/bin/python bench/bench_eval.py --adapter oel-demo/adapters/house-rules/<version> --episodes 32 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from evaluation.evaluator import EvalSpec, evaluate_policy
from evaluation.ood import ood_score
from oel.model.hf_backend import HFBackend, resolve_dtype
from oel.model.prepare import resolve_model_path
from oel.settings import Settings

SUBJECTS = ("base", "adapter, unmerged", "adapter, merged")


def run_subject(backend: HFBackend, subject: str, spec: EvalSpec) -> dict[str, float]:
    adapter = None if subject == "base" else "candidate"
    backend.merge_adapters = subject == "adapter, merged"
    backend._merged = None  # noqa: SLF001 - time the merge as part of the run, as a fresh gate pays it
    t0 = time.monotonic()
    result = evaluate_policy(backend, spec, adapter=adapter)
    policy_s = time.monotonic() - t0
    t1 = time.monotonic()
    ood = ood_score(backend, adapter)
    ood_s = time.monotonic() - t1
    tokens = result.n_episodes * result.mean_turns * result.mean_response_tokens
    return {
        "episodes_per_s": result.n_episodes / policy_s,
        "tokens_per_s": tokens / policy_s,
        "ood_tokens_per_s": ood.prompts * ood.mean_response_tokens / ood_s,
        "policy_s": policy_s,
        "ood_s": ood_s,
        "passed": result.passed,
        "ood_score": ood.score,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", type=Path, required=True, help="a LoRA adapter folder for the configured model")
    ap.add_argument("--env", default="house-rules")
    ap.add_argument("--rules", default="greeting", help="house rules (comma-separated) for --env house-rules")
    ap.add_argument("--episodes", type=int, default=32, help="held-out episodes per run")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    settings = Settings()
    dtype = resolve_dtype(settings.model.dtype)
    backend = HFBackend(resolve_model_path(settings), dtype=dtype, max_batch_size=16)
    backend.load_adapter("candidate", args.adapter)
    options = {"rules": tuple(args.rules.split(","))} if args.env == "house-rules" else {}
    spec = EvalSpec.from_settings(settings, args.env, episodes=args.episodes, env_options=options)
    print(
        f"model {backend.base_model} ({dtype}), {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {args.episodes} episodes of {args.env}"
    )
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in SUBJECTS}
    for r in range(args.repeats):
        for subject in SUBJECTS:
            runs[subject].append(run_subject(backend, subject, spec))
            m = runs[subject][-1]
            print(
                f"  repeat {r + 1} {subject:>18}: {m['episodes_per_s']:.2f} episodes/s, {m['tokens_per_s']:.1f} tok/s, "
                f"OOD {m['ood_s']:.1f} s, passed {m['passed']}"
            )
    best = {s: min(runs[s], key=lambda m: m["policy_s"] + m["ood_s"]) for s in SUBJECTS}
    base = best["base"]
    print(f"\nload {os.getloadavg()[0]:.1f} at the end; best of {args.repeats}:")
    print(
        f"{'subject':>18}  {'episodes/s':>10}  {'tok/s':>6}  {'vs base':>7}  {'OOD s':>6}  {'OOD tok/s':>9}  {'vs base':>7}"
        f"  {'passed':>6}  {'OOD score':>9}"
    )
    for s in SUBJECTS:
        m = best[s]
        print(
            f"{s:>18}  {m['episodes_per_s']:>10.2f}  {m['tokens_per_s']:>6.1f}  {m['tokens_per_s'] / base['tokens_per_s']:>6.2f}x"
            f"  {m['ood_s']:>6.1f}  {m['ood_tokens_per_s']:>9.1f}  {m['ood_tokens_per_s'] / base['ood_tokens_per_s']:>6.2f}x"
            f"  {m['passed']:>6}  {m['ood_score']:>9.2f}"
        )
    same = all(best["adapter, unmerged"][k] == best["adapter, merged"][k] for k in ("passed", "ood_score"))
    print(f"merged and unmerged results identical: {same}")


if __name__ == "__main__":
    main()
