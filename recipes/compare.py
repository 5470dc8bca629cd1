"""``oel agents compare``: an experiment on the reference agents — pass and valid-action rates without and
with experience in context, on the same seeds, side by side (the composition root, :mod:`oel.cli`, adds it
to the ``oel agents`` group)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from oel.cli_context import settings_of
from oel.envs import ENV_NAMES
from oel.envs.house_rules import DEFAULT_RULES, RULE_NAMES
from reference.agents_cli import ENV_HELP, read_experience


@click.command("compare")
@click.option("--env", "env_name", type=click.Choice(ENV_NAMES), required=True, help=ENV_HELP)
@click.option("--episodes", "-n", type=click.IntRange(1), default=32, show_default=True, help="Per condition.")
@click.option(
    "--mode",
    "modes",
    type=click.Choice(["free", "short", "choice"]),
    multiple=True,
    help="Action modes to measure (repeatable; default: free).",
)
@click.option("--per-rule", is_flag=True, help="House rules: one house per rule (each measured separately).")
@click.option(
    "--rule",
    "rules",
    multiple=True,
    type=click.Choice(RULE_NAMES),
    help="House rules to use (repeatable; default: every rule with --per-rule, else the default house).",
)
@click.option(
    "--experience-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Experience for the with-experience condition (default: the hand-written correct experience).",
)
@click.option("--eval", "use_eval", is_flag=True, help="Use the fixed held-out evaluation seeds.")
@click.option("--seed-start", type=click.IntRange(0), default=0, show_default=True, help="First training seed (without --eval).")
@click.option("--max-turns", type=click.IntRange(1), default=None, help="Turns per episode (default: 5 for the games, 2 for house rules).")
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy.")
@click.option(
    "--max-new-tokens", type=click.IntRange(1), default=None, help="Per response (default: free 128, short 8, choice 32; house rules 48)."
)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Episodes per generation call (both conditions and all rules share the batches).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (irrelevant when greedy).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write episodes as JSON lines here.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@click.pass_context
def compare(
    ctx: click.Context,
    env_name: str,
    episodes: int,
    modes: tuple[str, ...],
    per_rule: bool,
    rules: tuple[str, ...],
    experience_file: Path | None,
    use_eval: bool,
    seed_start: int,
    max_turns: int | None,
    temperature: float,
    max_new_tokens: int | None,
    batch_size: int,
    seed: int,
    out: Path | None,
    as_json: bool,
) -> None:
    """Pass and valid-action rates without and with experience in context, on the same seeds, side by side.

    Both conditions (and, with --per-rule, every rule) run in the same batches. The with-experience
    condition uses the hand-written correct experience unless --experience-file is given.
    """
    from tqdm import tqdm

    from oel.envs import eval_seeds, make_env, reference_experience, train_seeds
    from oel.model.factory import make_backend
    from oel.rollout import AgentConfig, EpisodeSpec, run_specs, summarize

    modes = modes or ("free",)
    if env_name == "house-rules" and set(modes) != {"free"}:
        raise click.UsageError("house rules take free-text replies: use --mode free")
    if (per_rule or rules) and env_name != "house-rules":
        raise click.UsageError("--per-rule and --rule apply to --env house-rules only")
    base: dict = {} if max_turns is None else {"max_turns": max_turns}
    houses: list[tuple[str, dict]] = []
    if env_name == "house-rules":
        chosen = rules or (RULE_NAMES if per_rule else DEFAULT_RULES)
        houses = [(r, {**base, "rules": (r,)}) for r in chosen] if per_rule else [(",".join(chosen), {**base, "rules": chosen})]
    else:
        houses = [(env_name, base)]
    for _, options in houses:
        try:
            make_env(env_name, **options)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    file_items = read_experience(experience_file) if experience_file is not None else None
    seeds = eval_seeds(episodes) if use_eval else train_seeds(episodes, start=seed_start)
    backend = make_backend(settings_of(ctx), max_batch_size=batch_size)

    rows = []
    all_episodes = []
    for mode in modes:
        specs = []
        for label, options in houses:
            exp = file_items if file_items is not None else reference_experience(env_name, **options)
            factory = (lambda o: lambda: make_env(env_name, **o))(options)
            for cond, experience in (("none", None), ("experience", exp)):
                specs += [EpisodeSpec(factory, s, experience, f"{label}|{cond}") for s in seeds]
        config = AgentConfig(mode=mode, temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
        bar = tqdm(total=len(specs), unit="ep", desc=f"{env_name} {mode}", dynamic_ncols=True)
        t0 = time.monotonic()
        try:
            eps = run_specs(backend, specs, config, on_episode=lambda ep, bar=bar: bar.update(1))
        finally:
            bar.close()
        seconds = time.monotonic() - t0
        all_episodes += [(mode, ep) for ep in eps]
        for label, _ in houses:
            none = summarize([e for e in eps if e.tag == f"{label}|none"])
            withx = summarize([e for e in eps if e.tag == f"{label}|experience"])
            rows.append(
                {
                    "env": env_name,
                    "house": label,
                    "mode": mode,
                    "episodes": none.episodes,
                    "none": none.as_dict(),
                    "experience": withx.as_dict(),
                    "meets_2x_and_10pts": bool(withx.pass_rate >= 2 * none.pass_rate and withx.pass_rate - none.pass_rate >= 0.10),
                }
            )
        click.echo(f"{env_name} {mode}: {len(specs)} episodes in {seconds:.0f} s", err=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as fh:
            for mode, ep in all_episodes:
                fh.write(json.dumps({"mode": mode, **ep.to_dict()}) + "\n")
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    source = str(experience_file) if experience_file else "hand-written (correct)"
    click.echo(f"seeds: {'eval (held-out)' if use_eval else f'train from {seed_start}'}; temperature {temperature}; experience: {source}")
    click.echo(
        "| house / env | mode | episodes | pass: none | pass: experience | valid: none | valid: experience | tokens/turn none / exp | turns none / exp |"
    )
    click.echo("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n, x = r["none"], r["experience"]
        click.echo(
            f"| {r['house']} | {r['mode']} | {r['episodes']} | {n['pass_rate']:.1%} ({n['passed']}) | {x['pass_rate']:.1%} ({x['passed']}) "
            f"| {n['valid_action_rate']:.1%} | {x['valid_action_rate']:.1%} | {n['mean_response_tokens']:.1f} / {x['mean_response_tokens']:.1f} "
            f"| {n['mean_turns']:.2f} / {x['mean_turns']:.2f} |"
        )
