"""``oel demo``: the whole learning loop on one machine (see :mod:`recipes.demo`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from oel.cli_context import settings_of
from oel.envs.house_rules import RULE_NAMES


@click.command("demo")
@click.option(
    "--env",
    "env",
    type=click.Choice(["house-rules", "frozenlake", "sokoban"]),
    default="house-rules",
    show_default=True,
    help="Reference environment the agents play.",
)
@click.option(
    "--rule",
    "rules",
    multiple=True,
    type=click.Choice(RULE_NAMES),
    help="House rule of the house-rules tasks (repeatable) [default: greeting, the one the default model "
    "measurably follows once it knows it].",
)
@click.option(
    "--rounds",
    type=click.IntRange(1, 100),
    default=2,
    show_default=True,
    help="Learning rounds: play -> extract -> consolidate -> gate -> roll out.",
)
@click.option(
    "--episodes", type=click.IntRange(1, 10_000), default=16, show_default=True, help="Training episodes the agents play per round."
)
@click.option(
    "--eval-episodes",
    type=click.IntRange(1, 10_000),
    default=32,
    show_default=True,
    help="Held-out episodes per cell of the final table and per gate evaluation.",
)
@click.option("--steps", type=click.IntRange(1, 10_000), default=None, help="OPCD steps per round [default: OEL_LEARNER__STEPS].")
@click.option(
    "--mode",
    type=click.Choice(["free", "short", "choice"]),
    default=None,
    help="Action mode for the games (default: choice for FrozenLake/Sokoban, free for house rules).",
)
@click.option(
    "--variant",
    type=click.Choice(["auto", "grounded", "structured", "unstructured"]),
    default=None,
    help="Extraction variant [default: OEL_PROCESSOR__EXTRACTION_VARIANT, auto: grounded (rules lifted from trusted "
    "feedback) for the default model, the paper's structured prompt for a model given by OEL_MODEL__PATH].",
)
@click.option("--in-context", is_flag=True, help="Agents also put the current KB in their prompt while playing.")
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("oel-demo"),
    show_default=True,
    help="Where the run writes its object store, table (markdown, PNG) and demo.json. Use a fresh "
    "directory for a fresh run: an existing one continues from the model versions it holds.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds training episodes and sampling.")
@click.option(
    "--stack",
    is_flag=True,
    help="Run on the real services instead: the recorder to Kafka, the Faust processor and the learner "
    "service (started by the demo, logs under --out-dir), the KB and versions in the S3 store. "
    "Needs the local stack (`oel stack up`) or the configured Kafka and S3.",
)
@click.pass_context
def demo(
    ctx: click.Context,
    env: str,
    rules: tuple[str, ...],
    rounds: int,
    episodes: int,
    eval_episodes: int,
    steps: int | None,
    mode: str | None,
    variant: str | None,
    in_context: bool,
    out_dir: Path,
    seed: int,
    stack: bool,
) -> None:
    """Run the whole loop in one process: agents play -> episodes -> extraction -> KB -> OPCD -> gate ->
    new version -> agents reload, for N rounds, then print the `oel eval` table and save it as markdown
    and PNG under --out-dir.

    By default everything runs in this process on the default model, with an in-process bus and a
    local directory as the object store: no service needs to be running. With --stack the same loop
    runs on Kafka, S3, the Faust processor and the learner service. Model and learner settings
    (OEL_MODEL__*, OEL_LEARNER__*, e.g. the gate's tolerances) apply as for the services.
    """
    from recipes.demo import DemoConfig, DemoLoop

    settings = settings_of(ctx)
    if rules and env != "house-rules":
        raise click.UsageError("--rule applies to --env house-rules only")
    config = DemoConfig(
        env=env,
        rules=rules or DemoConfig.rules,
        rounds=rounds,
        episodes=episodes,
        eval_episodes=eval_episodes,
        steps=steps or settings.learner.steps,
        mode=mode,
        variant=variant or settings.processor.extraction_variant,
        in_context=in_context,
        out_dir=out_dir,
        seed=seed,
    )
    t0 = time.monotonic()
    click.echo(
        f"oel demo: {rounds} round(s) on {env} ({', '.join(config.rules)}), {episodes} episodes and {config.steps} OPCD "
        f"steps per round, extraction variant {config.variant}; writing to {out_dir}"
    )
    if stack:
        from recipes.demo_stack import StackLoop

        with StackLoop(settings, config, progress=click.echo) as loop:
            loop.run()
            table = loop.final_table()
    else:
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:  # the progress bar and the round's summary say it
            logging.getLogger("learner.opcd.trainer").setLevel(logging.WARNING)
        loop = DemoLoop(settings, config, progress=click.echo)
        loop.run()
        table = loop.final_table()
    if table is not None:
        click.echo("")
        click.echo(table.to_markdown())
        click.echo("")
        click.echo(f"saved {loop.table_paths[0]} and {loop.table_paths[1]}")
    click.echo(f"every round's record: {out_dir / 'demo.json'}")
    click.echo(f"oel demo finished in {time.monotonic() - t0:.0f} s")
