"""``oel eval``: the paper's table for a namespace (see :mod:`evaluation.table`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from oel.cli_context import settings_of


@click.command("eval")
@click.option("--namespace", "-n", required=True, help="The namespace whose model versions are evaluated.")
@click.option(
    "--env",
    "env_name",
    type=click.Choice(["frozenlake", "sokoban", "house-rules"]),
    default=None,
    help="Reference environment [default: OEL_LEARNER__EVAL_ENV, else the namespace's own name if it names one].",
)
@click.option(
    "--episodes",
    type=click.IntRange(1),
    default=None,
    help="Held-out episodes per cell [default: OEL_LEARNER__EVAL_EPISODES, 16; the paper uses 128].",
)
@click.option(
    "--mode",
    type=click.Choice(["free", "short", "choice"]),
    default=None,
    help="Agents' action mode [default: OEL_LEARNER__EVAL_MODE; auto = choice for the games, free for house rules].",
)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Where eval-<namespace>.md, .png and .json are written.",
)
@click.option(
    "--store-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Use a local directory as the object store (as `oel demo` does) instead of the S3 server in the settings.",
)
@click.option("--ood", is_flag=True, help="Add each version's OOD instruction-following score (and the base model's).")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON instead of markdown.")
@click.pass_context
def eval_command(
    ctx: click.Context,
    namespace: str,
    env_name: str | None,
    episodes: int | None,
    mode: str | None,
    out_dir: Path,
    store_dir: Path | None,
    ood: bool,
    as_json: bool,
) -> None:
    """Pass rate and response length per round: no experience, experience in context, consolidated.

    For every model version of the namespace (one per round, oldest first) it plays the held-out seeds
    of the reference environment three times: with the round-start weights (parent version or base
    model) and no experience; with the same weights and the round's KB snapshot in the prompt; and
    with the version's adapter and no experience. Results are cached in the object store (evals/), so
    numbers the evaluation gate measured already are not measured again. --ood adds each version's
    out-of-distribution instruction-following score (the gate's check), next to the base model's. Prints the table and writes
    it as markdown, JSON and a PNG plot.
    """
    from evaluation.evaluator import EvalSpec, Evaluator, env_for_namespace
    from evaluation.table import eval_table
    from oel.model.factory import make_backend
    from oel.rollout import ActionMode
    from oel.store import LocalStore, S3Store, StoreError

    settings = settings_of(ctx)
    env = env_name or env_for_namespace(namespace, settings)
    if env is None:
        raise click.UsageError(f"namespace {namespace!r} names no reference environment: pass --env")
    overrides: dict = {}
    if episodes is not None:
        overrides["episodes"] = episodes
    if mode is not None:
        overrides["mode"] = ActionMode(mode)
    spec = EvalSpec.from_settings(settings, env, **overrides)
    try:
        store = LocalStore(store_dir) if store_dir is not None else S3Store(settings.s3)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    backend = lambda: make_backend(settings)  # noqa: E731 - made only if something is not cached yet
    evaluator = Evaluator.from_settings(store, backend, settings)
    try:
        table = eval_table(store, backend, namespace, spec, evaluator=evaluator, progress=lambda line: click.echo(line, err=True), ood=ood)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    paths = table.save(out_dir)
    click.echo(json.dumps(table.to_dict(), indent=2) if as_json else table.to_markdown())
    click.echo(f"written: {paths['markdown']}, {paths['png']}, {paths['json']}", err=True)
