"""One OPCD recipe on the default model, measured the way the learner's gates measure it.

Plays ``--episodes`` training episodes of one house rule with the base model (cached as prefixes under
``--work``), lifts the rule from the trusted feedback with the grounded variant, checks it in context,
trains a fresh LoRA adapter with the given recipe (the trainer the learner runs), and prints one JSON line:
held-out pass rate without experience (none, with the item in context, consolidated), the OOD score of the
base model and of the adapter, and the training time. Figures and the recipes tried: bench/README.md.

    .venv/bin/python bench/bench_opcd_recipe.py --rule greeting --steps 40 --batch 8 --lr 2e-3 --tokens 8 --anchors 0.25
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rule", default="greeting")
    ap.add_argument("--episodes", type=int, default=16, help="training episodes (their turn-prefixes are the OPCD prompts)")
    ap.add_argument("--eval-episodes", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--tokens", type=int, default=8, help="longest sampled answer")
    ap.add_argument("--anchors", type=float, default=0.25, help="anchor_fraction")
    ap.add_argument("--schedule", choices=["constant", "cosine"], default="constant", help="learning-rate schedule")
    ap.add_argument("--warmup", type=int, default=0, help="warm-up steps")
    ap.add_argument("--forward", type=float, default=0.0, help="forward_kl_weight")
    ap.add_argument("--prefix-turns", choices=["all", "first"], default="all", help="which turn-prefixes the student answers")
    ap.add_argument("--no-prompt-gradient", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--check-every",
        type=int,
        default=0,
        help="agreement checks every N steps, the best check's weights kept (OEL_LEARNER__CHECK_EVERY)",
    )
    ap.add_argument("--stop-agreement", type=float, default=None, help="stop at this agreement (OEL_LEARNER__STOP_AGREEMENT)")
    ap.add_argument(
        "--save-every",
        type=int,
        default=0,
        help="also save the adapter every N steps and evaluate each checkpoint (held-out pass, no experience)",
    )
    ap.add_argument("--work", type=Path, default=Path("bench-out/opcd-recipe"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from evaluation.evaluator import EvalSpec, evaluate_policy
    from evaluation.ood import ood_score
    from learner.opcd import OPCDConfig, OPCDTrainer
    from oel.envs import make_env, train_seeds
    from oel.episodes import add_event, close
    from oel.grounded import grounded_items, trusted_sources
    from oel.model.hf_backend import HFBackend
    from oel.model.prepare import resolve_model_path
    from oel.rollout import AgentConfig, run_episodes
    from oel.settings import load_settings
    from reference.live_agent import episode_events

    settings = load_settings()
    backend = HFBackend.from_settings(settings, max_batch_size=16)
    args.work.mkdir(parents=True, exist_ok=True)
    played = args.work / f"episodes-{args.rule}-{args.episodes}.json"
    if not played.exists():
        eps = run_episodes(
            backend,
            lambda: make_env("house-rules", rules=(args.rule,)),
            train_seeds(args.episodes),
            AgentConfig(mode="free", batch_size=16, seed=args.seed),
        )
        completed = []
        for ep in eps:
            buffer = None
            for event in episode_events(ep, "house-rules", f"e{ep.seed}", "agent", "base"):
                buffer, _ = add_event(buffer, event, 0.0)
            completed.append(close(buffer, abandoned=False).model_dump(mode="json"))
        played.write_text(json.dumps(completed))
    from oel.episodes import CompletedEpisode

    episodes = [CompletedEpisode.model_validate(e) for e in json.loads(played.read_text())]
    items = [g.text for g in grounded_items(episodes, trusted_sources("house-rules", "house-rules*"))]
    prefixes = [[m.model_dump() for m in p] for ep in episodes for p in ep.training_prefixes]

    spec = EvalSpec(env="house-rules", episodes=args.eval_episodes, env_options={"rules": (args.rule,)})
    baseline_file = (
        args.work / f"baseline-{args.rule}-{args.episodes}-{args.eval_episodes}-{str(backend.model.dtype).removeprefix('torch.')}.json"
    )
    if not baseline_file.exists():  # the base model's numbers do not depend on the recipe: measured once
        none, in_context = evaluate_policy(backend, spec), evaluate_policy(backend, spec, experience=items)
        baseline_file.write_text(
            json.dumps(
                {
                    "items": items,
                    "none": f"{none.passed}/{none.n_episodes}",
                    "in_context": f"{in_context.passed}/{in_context.n_episodes}",
                    "ood": ood_score(backend).score,
                }
            )
        )
    baseline = json.loads(baseline_file.read_text())
    t0 = time.monotonic()
    config = OPCDConfig(
        model_path=resolve_model_path(settings),
        steps=args.steps,
        batch_size=args.batch,
        learning_rate=args.lr,
        max_new_tokens=args.tokens,
        anchor_fraction=args.anchors,
        seed=args.seed,
        prompt_gradient=not args.no_prompt_gradient,
        lr_schedule=args.schedule,
        warmup_steps=args.warmup,
        prefix_turns=args.prefix_turns,
        forward_kl_weight=args.forward,
        check_every=args.check_every,
        stop_agreement=args.stop_agreement,
    )
    trainer = OPCDTrainer(config, prefixes, [items])
    out = (
        args.work
        / f"adapter-{args.rule}-{args.steps}x{args.batch}-{args.lr}-{args.schedule}-w{args.warmup}-{args.prefix_turns}-f{args.forward}-{args.tokens}-{args.anchors}-s{args.seed}"
    )
    checkpoints: dict[str, Path] = {}

    def at_step(m) -> None:
        if args.save_every and m.step % args.save_every == 0:
            # trainer is bound when train() calls this (pyflakes sees only the `del trainer` below)
            checkpoints[f"step {m.step}"] = trainer.save(out.with_name(f"{out.name}-step{m.step}"))  # noqa: F821

    result = trainer.train(callback=at_step)
    trainer.save(out, result)
    kept_step = result.kept_step if result.kept_step is not None else len(result.steps)
    checkpoints.pop(f"step {kept_step}", None)  # the same weights as the kept adapter: evaluated once, as that
    checkpoints[f"kept (step {kept_step})"] = out
    agreements = {c.step: round(c.agreement, 3) for c in result.checks}
    train_s = time.monotonic() - t0
    del trainer
    passes: dict[str, str] = {}
    for i, (label, folder) in enumerate(checkpoints.items()):
        backend.load_adapter(f"candidate-{i}", folder)
        consolidated = evaluate_policy(backend, spec, adapter=f"candidate-{i}")
        passes[label] = f"{consolidated.passed}/{consolidated.n_episodes}"
        logging.info("%s: held-out pass %s", label, passes[label])
    print(
        json.dumps(
            {
                "rule": args.rule,
                "items": items,
                "steps": args.steps,
                "batch": args.batch,
                "lr": args.lr,
                "tokens": args.tokens,
                "anchors": args.anchors,
                "schedule": args.schedule,
                "warmup": args.warmup,
                "prefix_turns": args.prefix_turns,
                "forward_kl_weight": args.forward,
                "prompt_gradient": not args.no_prompt_gradient,
                "seed": args.seed,
                "pass_none": baseline["none"],
                "pass_in_context": baseline["in_context"],
                "pass_consolidated": f"{consolidated.passed}/{consolidated.n_episodes}",
                "ood_base": baseline["ood"],
                "ood_consolidated": ood_score(backend, f"candidate-{len(checkpoints) - 1}").score,
                "train_s": round(train_s),
                "steps_run": len(result.steps),
                "first_loss": result.steps[0].loss if result.steps else None,
                "last_loss": result.steps[-1].loss if result.steps else None,
                "agreement_by_step": agreements,
                "kept_step": result.kept_step,
                "pass_by_checkpoint": passes,
            }
        )
    )


if __name__ == "__main__":
    main()
