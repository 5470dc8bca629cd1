"""The ``oel`` command: one entry point for every service and operator task (the composition root).

The core's own commands (config, stack, topics, smoke, schema) are defined here. Every other command
lives with its service and is named in :data:`COMMANDS` as ``module:attribute``; its module is imported
only when that command is resolved, so importing this module (and the core) never imports a service
package, and a missing optional dependency only affects the command that needs it.
"""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
import sys
import time
import uuid
from pathlib import Path

import click

from oel.cli_context import settings_of
from oel.settings import SettingsError, settings_reference

REPO_ROOT = Path(__file__).resolve().parent.parent
STACK_SCRIPT = REPO_ROOT / "infra" / "local" / "stack.sh"


COMMANDS: dict[str, str] = {
    "model": "oel.model.cli:model",
    "agents": "reference.agents_cli:agents",
    "processor": "processors.cli:processor",
    "loadgen": "reference.loadgen_cli:loadgen",
    "learner": "learner.cli:learner",
    "models": "learner.models_cli:models",
    "eval": "evaluation.cli:eval_command",
    "demo": "recipes.demo_cli:demo",
    "gateway": "gateway.cli:gateway",
    "adapters": "producers.adapters_cli:adapters",
}
"""The commands of the service packages: name -> ``module:attribute`` of their click command."""

SUBCOMMANDS: dict[str, tuple[str, ...]] = {"agents": ("recipes.compare:compare",)}
"""Commands added to a group of :data:`COMMANDS` that live in another package (the experiments of ``recipes``)."""


def _load(spec: str) -> click.Command:
    module, attribute = spec.split(":")
    return getattr(importlib.import_module(module), attribute)


class LazyGroup(click.Group):
    """A click group that imports the commands of :data:`COMMANDS` when they are first resolved."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in COMMANDS:
            command = _load(COMMANDS[name])
            for spec in SUBCOMMANDS.get(name, ()):
                sub = _load(spec)
                command.add_command(sub, sub.name)
            self.add_command(command, name)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
@click.version_option(package_name="oel")
def cli(verbose: bool) -> None:
    """OEL: deployed LLM agents that keep learning from their own production traffic.

    Settings come from OEL_* environment variables (see `oel config docs`), an optional TOML file
    named by OEL_CONFIG_FILE, and the local stack's stack.env written by `oel stack up`.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# --- config ---------------------------------------------------------------------------------


@cli.group()
def config() -> None:
    """Inspect the configuration."""


@config.command("show")
@click.pass_context
def config_show(ctx: click.Context) -> None:
    """Print the effective settings as JSON (secrets masked)."""
    click.echo(settings_of(ctx).model_dump_json(indent=2))


@config.command("docs")
def config_docs() -> None:
    """Print every setting as a Markdown table: variable, default, meaning."""
    click.echo(render_settings_table())


def render_settings_table() -> str:
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, default, desc in settings_reference():
        lines.append(f"| `{name}` | `{default}` | {desc} |")
    return "\n".join(lines)


# --- stack ----------------------------------------------------------------------------------


@cli.group()
def stack() -> None:
    """The local stack on 127.0.0.1: Apache Kafka (KRaft), MinIO, Prometheus.

    State (data, logs, pid files, stack.env) lives under OEL_PATHS__STATE_DIR
    (default ~/.local/state/oel); jars and binaries are cached under OEL_PATHS__CACHE_DIR.
    """


def _run_stack(action: str) -> None:
    rc = subprocess.call(["bash", str(STACK_SCRIPT), action])
    if rc:
        raise click.ClickException(f"stack {action} failed (exit {rc})")


@stack.command("up")
def stack_up() -> None:
    """Install what is missing, start every service that is not running, wait until healthy."""
    _run_stack("up")


@stack.command("down")
def stack_down() -> None:
    """Stop exactly the services `oel stack up` started."""
    _run_stack("down")


@stack.command("status")
def stack_status() -> None:
    """Show which services run, with pid and address; exit 1 if any is stopped."""
    _run_stack("status")


@stack.command("install")
def stack_install() -> None:
    """Only install: Kafka jars (Maven), the MinIO binary (go install), Prometheus (apt)."""
    _run_stack("install")


# --- topics ---------------------------------------------------------------------------------


@cli.group()
def topics() -> None:
    """Kafka topics: every input topic, its dead-letter topic, and the compacted model-versions topic."""


@topics.command("create")
@click.pass_context
def topics_create(ctx: click.Context) -> None:
    """Create the topics or bring them in line with the settings (idempotent)."""
    from oel.ops.topics import KafkaUnavailable, admin_client, ensure_topics
    from oel.topics import topic_specs

    s = settings_of(ctx)
    try:
        changes = ensure_topics(admin_client(s.kafka), topic_specs(s))
    except KafkaUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    for change in changes:
        click.echo(f"{change.action:9s} {change.name}" + (f"  ({change.detail})" if change.detail else ""))


@topics.command("describe")
@click.pass_context
def topics_describe(ctx: click.Context) -> None:
    """Show partitions, replication, cleanup policy and retention of each topic."""
    from oel.ops.topics import KafkaUnavailable, admin_client, describe_topics
    from oel.topics import topic_specs

    s = settings_of(ctx)
    specs = topic_specs(s)
    try:
        states = describe_topics(admin_client(s.kafka), [t.name for t in specs])
    except KafkaUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{'topic':28s} {'partitions':>10s} {'rf':>3s} {'cleanup':>8s} {'retention.ms':>13s}  purpose")
    for spec in specs:
        st = states.get(spec.name)
        if st is None:
            click.echo(f"{spec.name:28s} {'missing':>10s}")
            continue
        click.echo(
            f"{st.name:28s} {st.partitions:>10d} {st.replication_factor:>3d} {st.config.get('cleanup.policy', '?'):>8s} "
            f"{st.config.get('retention.ms', '?'):>13s}  {spec.purpose}"
        )


# --- smoke ----------------------------------------------------------------------------------


@cli.command()
@click.pass_context
def smoke(ctx: click.Context) -> None:
    """Check the whole stack end to end: topics, one trajectory event through Kafka, one KB object through S3."""
    from confluent_kafka import Consumer, Producer

    from oel.ops.topics import admin_client, ensure_topics
    from oel.schemas import EventKind, TrajectoryEvent, decode
    from oel.store import S3Store
    from oel.topics import topic_specs
    from oel.versions import BASE_VERSION

    s = settings_of(ctx)
    t0 = time.monotonic()
    ensure_topics(admin_client(s.kafka), topic_specs(s))
    click.echo(f"topics ready on {s.kafka.bootstrap_servers}")

    episode = f"smoke-{uuid.uuid4().hex[:8]}"
    event = TrajectoryEvent(
        namespace="smoke", episode_id=episode, agent_id="oel-smoke", model_version=BASE_VERSION, seq=0, kind=EventKind.start
    )
    producer = Producer({**s.kafka.client_config(), "enable.idempotence": True, "acks": "all"})
    delivered: list = []
    producer.produce(s.topics.trajectories, key=episode, value=event.to_bytes(), on_delivery=lambda e, m: delivered.append((e, m)))
    producer.flush(15)
    err, msg = delivered[0] if delivered else ("no delivery report within 15s", None)
    if err is not None:
        raise click.ClickException(f"produce failed: {err}")
    click.echo(f"sent event {event.event_id} to {msg.topic()}[{msg.partition()}]@{msg.offset()}")

    consumer = Consumer({**s.kafka.client_config(), "group.id": f"oel-smoke-{episode}", "enable.auto.commit": False})
    from confluent_kafka import TopicPartition

    consumer.assign([TopicPartition(msg.topic(), msg.partition(), msg.offset())])
    got = consumer.poll(15)
    consumer.close()
    if got is None or got.error():
        raise click.ClickException(f"could not read the event back: {got.error() if got else 'timeout'}")
    back = decode(got.value(), TrajectoryEvent)
    if back != event:
        raise click.ClickException("the event read back differs from the one sent")
    click.echo(f"read it back from offset {got.offset()}: identical")

    store = S3Store(s.s3)
    store.ensure_bucket()
    key = f"smoke/{episode}.json"
    doc = {"episode_id": episode, "event": json.loads(event.to_bytes())}
    store.put_json(key, doc)
    if store.put_json(key, doc):
        raise click.ClickException("second put of identical content was not a no-op")
    if store.get_json(key) != doc:
        raise click.ClickException("object read back differs")
    click.echo(f"wrote, re-wrote (no-op) and read s3://{s.s3.bucket}/{key} on {store.endpoint}")
    click.echo(f"smoke test passed in {time.monotonic() - t0:.1f}s")


@cli.command("schema")
@click.argument("name", type=click.Choice(["trajectory-event"]), default="trajectory-event")
def schema_command(name: str) -> None:
    """Print the JSON Schema of a message outside clients write (docs/events.md describes the wire format)."""
    from oel.schemas import json_schema

    click.echo(json_schema(name), nl=False)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except SettingsError as exc:  # raised while building sources, before a command runs
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:
        # a service that is down or unreachable: one line naming it and its endpoint, not a traceback
        from oel.model.backend import BackendError
        from oel.ops.topics import KafkaUnavailable
        from oel.store import StoreUnavailable

        if isinstance(exc, (StoreUnavailable, KafkaUnavailable, BackendError)):
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
