"""``oel agents run`` / ``serve``: run the reference agents on an environment and print what they achieved,
or serve them against the stack. (``oel agents compare``, an experiment, is :mod:`recipes.compare`.)

    oel agents run --env frozenlake --episodes 32 --eval --mode choice --in-context

prints the pass rate, the valid-action rate (share of turns whose action was well-formed and legal),
the mean response tokens per turn and the mean turns per episode. ``--in-context`` puts experience
in the agent prompt: the items of ``--experience-file`` (one per line), or else the environment's
hand-written correct experience. ``--eval`` uses the fixed held-out seeds; otherwise training seeds
from ``--seed-start``. ``--out`` writes every episode as a JSON line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from oel.cli_context import settings_of
from oel.envs import ENV_NAMES
from oel.envs.house_rules import DEFAULT_RULES, RULE_NAMES

ENV_HELP = "frozenlake / sokoban: the paper's TextArena games; house-rules: support replies under hidden house rules."


def read_experience(path: Path) -> list[str]:
    """Experience items from a file: one per non-empty line (a leading ``- `` or ``- EXPERIENCE ITEM:`` is dropped)."""
    items = []
    for line in path.read_text().splitlines():
        text = line.strip()
        for prefix in ("- EXPERIENCE ITEM:", "-"):
            if text.startswith(prefix):
                text = text[len(prefix) :].strip()
                break
        if text:
            items.append(text)
    return items


@click.group("agents")
def agents() -> None:
    """Reference agents on the paper's TextArena games and the house-rules tasks."""


@agents.command("run")
@click.option("--env", "env_name", type=click.Choice(ENV_NAMES), required=True, help=ENV_HELP)
@click.option("--episodes", "-n", type=click.IntRange(1), default=32, show_default=True, help="Episodes to run (one per seed).")
@click.option(
    "--mode",
    type=click.Choice(["free", "short", "choice"]),
    default="free",
    show_default=True,
    help="free: reason, then the last bracketed move (the paper's); short: the move only; "
    "choice: short reasoning, then the legal move the model's log-probs prefer. House rules: free.",
)
@click.option("--in-context", is_flag=True, help="Put experience in the prompt (see --experience-file).")
@click.option(
    "--experience-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Experience items, one per line (default with --in-context: the hand-written correct experience).",
)
@click.option("--eval", "use_eval", is_flag=True, help="Use the fixed held-out evaluation seeds.")
@click.option("--seed-start", type=click.IntRange(0), default=0, show_default=True, help="First training seed (without --eval).")
@click.option(
    "--rule",
    "rules",
    multiple=True,
    type=click.Choice(RULE_NAMES),
    help=f"House rules to apply (repeatable; default: {', '.join(DEFAULT_RULES)}).",
)
@click.option("--max-turns", type=click.IntRange(1), default=None, help="Turns per episode (default: 5 for the games, 2 for house rules).")
@click.option("--temperature", type=click.FloatRange(0), default=0.7, show_default=True, help="0 = greedy.")
@click.option(
    "--max-new-tokens", type=click.IntRange(1), default=None, help="Per response (default: free 128, short 8, choice 32; house rules 48)."
)
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True, help="Episodes per generation call.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--adapter", default=None, help="Name of a LoRA adapter (model version) to act with.")
@click.option(
    "--adapter-path",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Load the adapter from this folder first (with --adapter).",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write episodes as JSON lines here.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def run(
    ctx: click.Context,
    env_name: str,
    episodes: int,
    mode: str,
    in_context: bool,
    experience_file: Path | None,
    use_eval: bool,
    seed_start: int,
    rules: tuple[str, ...],
    max_turns: int | None,
    temperature: float,
    max_new_tokens: int | None,
    batch_size: int,
    seed: int,
    adapter: str | None,
    adapter_path: Path | None,
    out: Path | None,
    as_json: bool,
) -> None:
    """Run N episodes and print pass rate, valid-action rate, mean response tokens per turn and mean turns."""
    from tqdm import tqdm

    from oel.envs import eval_seeds, make_env, reference_experience, train_seeds
    from oel.model.factory import make_backend
    from oel.rollout import AgentConfig, run_episodes, summarize

    options: dict = {}
    if max_turns is not None:
        options["max_turns"] = max_turns
    if rules:
        if env_name != "house-rules":
            raise click.UsageError("--rule applies to --env house-rules only")
        options["rules"] = rules
    if env_name == "house-rules" and mode != "free":
        raise click.UsageError("house rules take free-text replies: use --mode free")
    try:
        make_env(env_name, **options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if experience_file is not None and not in_context:
        raise click.UsageError("--experience-file needs --in-context")
    experience = None
    source = "none"
    if in_context:
        if experience_file is not None:
            experience, source = read_experience(experience_file), str(experience_file)
        else:
            experience, source = reference_experience(env_name, **options), "hand-written (correct)"
    seeds = eval_seeds(episodes) if use_eval else train_seeds(episodes, start=seed_start)

    backend = make_backend(settings_of(ctx), max_batch_size=batch_size)
    if adapter_path is not None:
        if adapter is None:
            raise click.UsageError("--adapter-path needs --adapter NAME")
        backend.load_adapter(adapter, adapter_path)
    config = AgentConfig(
        mode=mode, temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, adapter=adapter
    )
    click.echo(
        f"env={env_name} mode={mode} episodes={episodes} seeds={'eval (held-out)' if use_eval else f'train from {seed_start}'} "
        f"experience={source} model={backend.base_model}" + (f" adapter={adapter}" if adapter else ""),
        err=True,
    )

    passed = 0
    bar = tqdm(total=episodes, unit="ep", desc=env_name, dynamic_ncols=True)

    def on_episode(ep) -> None:
        nonlocal passed
        passed += ep.passed
        bar.update(1)
        bar.set_postfix(passed=f"{passed}/{bar.n}")

    t0 = time.monotonic()
    try:
        results = run_episodes(backend, lambda: make_env(env_name, **options), seeds, config, experience=experience, on_episode=on_episode)
    finally:
        bar.close()
    stats = summarize(results, time.monotonic() - t0)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as fh:
            for ep in results:
                fh.write(json.dumps(ep.to_dict()) + "\n")
    if as_json:
        click.echo(
            json.dumps(
                {
                    "env": env_name,
                    "mode": mode,
                    "experience": source,
                    "eval": use_eval,
                    "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
                    **stats.as_dict(),
                },
                indent=2,
            )
        )
        return
    click.echo(f"pass rate                      {stats.pass_rate:6.1%}  ({stats.passed}/{stats.episodes} episodes)")
    click.echo(f"valid-action rate              {stats.valid_action_rate:6.1%}  ({stats.valid_turns}/{stats.turns} turns)")
    click.echo(f"mean response tokens per turn  {stats.mean_response_tokens:6.1f}")
    click.echo(f"mean turns                     {stats.mean_turns:6.2f}")
    click.echo(f"time                           {stats.seconds:6.1f} s  ({stats.episodes_per_minute:.1f} episodes/min)")
    if out is not None:
        click.echo(f"episodes written to {out}")


@agents.command("serve")
@click.option("--env", "env_name", type=click.Choice(ENV_NAMES), required=True, help=ENV_HELP)
@click.option("--namespace", default=None, help="Namespace the agent learns in (default: the environment's name).")
@click.option(
    "--mode",
    type=click.Choice(["free", "short", "choice"]),
    default=None,
    help="Action mode (default: choice for the games, free for house rules).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=8,
    show_default=True,
    help="Episodes played side by side; the model version is pinned per batch.",
)
@click.option(
    "--max-batches", type=click.IntRange(1), default=None, help="Stop after this many batches (default: run until SIGTERM/Ctrl-C)."
)
@click.option(
    "--seed-start", type=click.IntRange(0), default=0, show_default=True, help="First training seed; later batches continue from there."
)
@click.option("--agent-id", default=None, help="Agent id in the recorded events (default: a random one).")
@click.pass_context
def serve(
    ctx: click.Context,
    env_name: str,
    namespace: str | None,
    mode: str | None,
    batch_size: int,
    max_batches: int | None,
    seed_start: int,
    agent_id: str | None,
) -> None:
    """Play episodes like an agent in production, until stopped: each batch with the namespace's current
    model version (followed on the model-versions topic; new adapters are fetched from the object store),
    every episode recorded to the trajectories topic. Metrics on OEL_METRICS__PORT (default 9103).
    SIGTERM finishes the current batch, flushes the recorder and exits."""
    import signal
    import threading

    from oel.envs import make_env, train_seeds
    from oel.envs.base import EVAL_SEED_BASE
    from oel.metrics import start_metrics_server
    from oel.model.factory import make_backend
    from oel.rollout import AgentConfig, summarize
    from oel.store import S3Store, StoreError
    from reference.live_agent import LiveAgent

    settings = settings_of(ctx)
    ns = namespace or env_name
    mode = mode or ("free" if env_name == "house-rules" else "choice")
    try:
        store = S3Store(settings.s3)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    start_metrics_server(settings.metrics.for_service(9103), "agents")
    from oel.metrics import Heartbeat, add_liveness_check, add_readiness_check

    beat = Heartbeat("the agent's play loop (one batch)", max_age_s=900.0)  # /livez: a batch that never ends
    add_liveness_check("agent", beat.problem)
    add_readiness_check("object store", store.unreachable)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    backend = make_backend(settings, max_batch_size=batch_size)
    agent = LiveAgent(
        settings, ns, lambda: make_env(env_name), backend, store, agent=AgentConfig(mode=mode, batch_size=batch_size), agent_id=agent_id
    )
    click.echo(f"agent {agent.agent_id}: {env_name} in namespace {ns}, mode {mode}, {batch_size} episodes per batch", err=True)
    batch, start = 0, seed_start
    try:
        while not stop.is_set() and (max_batches is None or batch < max_batches):
            if start + batch_size > EVAL_SEED_BASE:
                start = 0  # training seeds wrap around; evaluation seeds are never played
            t0 = time.monotonic()
            beat.beat()
            episodes = agent.play(train_seeds(batch_size, start=start))
            stats = summarize(episodes, time.monotonic() - t0)
            click.echo(
                f"batch {batch}: {agent.serving}: pass rate {stats.pass_rate:.0%}, "
                f"{stats.mean_response_tokens:.0f} tokens/turn, {stats.episodes_per_minute:.1f} episodes/min",
                err=True,
            )
            batch, start = batch + 1, start + batch_size
    except KeyboardInterrupt:
        pass
    finally:
        agent.close()
