"""One learning round end to end, and where its time goes.

Runs ``oel demo``'s loop (:class:`recipes.demo.DemoLoop`: the same core code the services run, in one
process, a fresh local store) for one round with the demo's defaults, and prints the wall time of each
stage and its share of the round: the agents' play, the extraction of the batch, then the learner's
stages (:data:`learner.rounds.STAGES`: the knowledge gate's evaluations, OPCD's setup, sampling, updates
and agreement checks, the evaluation gate, publishing), plus how many evaluations the round measured (each
is cached in the store under ``evals/``, so none is measured twice).

Run (about 10 minutes on two CPU cores with the default model)::

    .venv/bin/python bench/bench_round.py
    .venv/bin/python bench/bench_round.py --merge-adapters off      # the evaluations with peft's unmerged LoRA
    .venv/bin/python bench/bench_round.py --steps 20 --eval-episodes 16 --out-dir bench-out/round
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from learner.rounds import STAGES
from oel.settings import Settings
from recipes.demo import DemoConfig, DemoLoop


def main() -> None:
    defaults = DemoConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rule", action="append", help=f"house rule(s) (default {','.join(defaults.rules)})")
    ap.add_argument("--episodes", type=int, default=defaults.episodes, help="training episodes the agents play")
    ap.add_argument("--eval-episodes", type=int, default=defaults.eval_episodes, help="held-out episodes per gate evaluation")
    ap.add_argument("--steps", type=int, default=defaults.steps, help="OPCD steps")
    ap.add_argument("--variant", default=defaults.variant, help="extraction variant (auto, grounded, structured, unstructured)")
    ap.add_argument("--merge-adapters", choices=("auto", "on", "off"), default=None, help="OEL_MODEL__MERGE_ADAPTERS for the run")
    ap.add_argument("--out-dir", type=Path, default=None, help="keep the run's store and demo.json here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if args.merge_adapters:
        os.environ["OEL_MODEL__MERGE_ADAPTERS"] = args.merge_adapters
    settings = Settings()
    with tempfile.TemporaryDirectory(prefix="oel-bench-round-") as tmp:
        out_dir = args.out_dir or Path(tmp)
        config = DemoConfig(
            rules=tuple(args.rule or defaults.rules),
            rounds=1,
            episodes=args.episodes,
            eval_episodes=args.eval_episodes,
            steps=args.steps,
            variant=args.variant,
            out_dir=out_dir,
        )
        load_before = os.getloadavg()[0]
        t0 = time.monotonic()
        loop = DemoLoop(settings, config, progress=lambda line: print(line, flush=True))
        load_s = time.monotonic() - t0
        report = loop.run_round(1)
        evaluations = len(loop.store.list("evals/"))
    stages = {"model load": load_s, "play": report.seconds["play"], "extract": report.seconds["extract"]}
    stages.update({s: report.stages.get(s, 0.0) for s in STAGES})
    learn_other = report.seconds["consolidate+gate"] - sum(report.stages.values())
    stages["learner, other"] = max(learn_other, 0.0)
    total = sum(stages.values())
    print(
        f"\none round: {config.episodes} episodes, {config.eval_episodes} held-out episodes per evaluation, up to {config.steps} "
        f"OPCD steps; status {report.status}; load {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(f"{'stage':>16}  {'seconds':>8}  {'share':>6}")
    for stage, seconds in stages.items():
        print(f"{stage:>16}  {seconds:>8.1f}  {seconds / total:>6.1%}")
    print(f"{'total':>16}  {total:>8.1f}  ({total / 60:.1f} min)")
    steps = report.training.get("steps")
    print(f"OPCD steps run: {steps}; evaluations measured (each once, cached under evals/): {evaluations}")
    if args.json:
        args.json.write_text(json.dumps({"stages": stages, "total": total, "report": report.__dict__}, indent=2, default=str))


if __name__ == "__main__":
    main()
