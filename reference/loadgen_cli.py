"""``oel loadgen``: the load generator as a command (registered in :mod:`oel.cli`).

Kafka is imported inside the command, so ``oel --help`` stays fast.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import click

from oel.versions import BASE_VERSION


@click.command("loadgen")
@click.option("--rate", type=float, default=200.0, show_default=True, help="Target events per second (0 = as fast as possible).")
@click.option(
    "--duration",
    "duration_s",
    type=float,
    default=None,
    help="Stop starting episodes after this many seconds [default: 10 unless --episodes].",
)
@click.option("--episodes", type=int, default=None, help="Stop after this many episodes.")
@click.option(
    "--replay",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Replay the episodes of this JSONL file of TrajectoryEvents (fresh episode ids), looping.",
)
@click.option(
    "--record",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write every event sent to this JSONL file (replayable with --replay).",
)
@click.option(
    "--namespace",
    "namespaces",
    multiple=True,
    default=("loadgen",),
    show_default=True,
    help="Namespace(s) of synthetic episodes (repeat the option for several).",
)
@click.option("--model-version", default=BASE_VERSION, show_default=True, help="model_version of synthetic episodes.")
@click.option("--concurrency", type=int, default=16, show_default=True, help="Episodes open at once (interleaved, like a fleet of agents).")
@click.option("--topic", default=None, help="Topic to send to [default: OEL_TOPICS__TRAJECTORIES].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic episodes and the interleaving.")
@click.pass_context
def loadgen(ctx: click.Context, rate, duration_s, episodes, replay, record, namespaces, model_version, concurrency, topic, seed) -> None:
    """Send realistic trajectory events at a target rate, for benchmarks and soak tests.

    Synthetic episodes look like the reference support agents' (1-5 turns, ~0.5-2 KB per event);
    --replay re-sends recorded episodes instead. Every event goes through the recorder SDK (validation,
    bounded buffer, idempotent producer). Prints progress every second and the achieved rate at the end;
    exits 1 if any event was not delivered.
    """
    from oel.cli_context import settings_of
    from producers.recorder import Recorder, UndeliveredEvents
    from reference import loadgen as lg

    if duration_s is None and episodes is None:
        duration_s = 10.0
    settings = settings_of(ctx)
    if replay is not None:
        try:
            source = lg.replay_episodes(replay)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        what = f"replaying {replay}"
    else:
        source = lg.synthetic_episodes(random.Random(seed), list(namespaces), model_version=model_version)
        what = f"synthetic episodes for {', '.join(namespaces)}"
    from oel.ops.topics import KafkaUnavailable, admin_client

    topic = topic or settings.topics.trajectories
    try:  # fail fast: a missing topic would otherwise fail every event after the delivery timeout
        found = admin_client(settings.kafka).list_topics(topic, timeout=10).topics.get(topic)
    except KafkaUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    if found is None or found.error is not None:
        raise click.ClickException(
            f"topic {topic} does not exist on {settings.kafka.bootstrap_servers}; create it with `oel topics create`"
        )
    recorder = Recorder(settings, topic=topic)
    bound = " and ".join(x for x in (f"{duration_s:g}s" if duration_s else "", f"{episodes} episodes" if episodes else "") if x)
    click.echo(
        f"loadgen: {what} to {recorder.topic} on {settings.kafka.bootstrap_servers} at "
        f"{f'{rate:g} events/s' if rate else 'full speed'}, for {bound}"
    )
    out = open(record, "w", encoding="utf-8") if record else None  # noqa: SIM115
    try:
        report = lg.run(
            recorder,
            source,
            rate=rate or None,
            duration_s=duration_s,
            episodes=episodes,
            concurrency=concurrency,
            seed=seed,
            record=out,
            progress=click.echo,
        )
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        report = None
    finally:
        if out:
            out.close()
    try:
        recorder.close()
    except UndeliveredEvents as exc:
        if report:
            click.echo(report.summary())
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    if report:
        click.echo(report.summary())
        if record:
            click.echo(f"recorded {report.events} events to {record}")
