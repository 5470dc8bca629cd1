"""``oel adapters``: the per-vLLM-pod adapter sync sidecar and a look at what a server serves (registered in
:mod:`oel.cli`). Kafka, the store and httpx are imported inside the commands, so ``oel --help`` stays fast."""

from __future__ import annotations

import os
from pathlib import Path

import click


def _namespaces(values: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for v in values:
        out += [n.strip() for n in v.split(",") if n.strip()]
    return out


@click.group()
def adapters() -> None:
    """LoRA adapters on vLLM servers: keep every replica in sync with the promoted versions."""


@adapters.command("sync")
@click.option(
    "--namespace",
    "namespaces",
    multiple=True,
    envvar="OEL_ADAPTER_SYNC_NAMESPACES",
    required=True,
    help="Namespace(s) whose promoted versions this server serves (repeat, or comma-separate; env OEL_ADAPTER_SYNC_NAMESPACES).",
)
@click.option("--vllm-url", default=None, help="This pod's vLLM server [default: OEL_MODEL__VLLM_URL].")
@click.option(
    "--dir",
    "adapter_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=lambda: os.environ.get("OEL_ADAPTER_SYNC_DIR", "/adapters"),
    show_default="/adapters",
    help="Folder shared with the vLLM container, at the same path there (env OEL_ADAPTER_SYNC_DIR).",
)
@click.option(
    "--keep",
    type=click.IntRange(1, 64),
    default=2,
    show_default=True,
    help="Versions per namespace kept loaded: the current one and the ones before it (agents finish "
    "their episode on the version they started it with).",
)
@click.option(
    "--resync",
    "resync_s",
    type=click.FloatRange(min=1),
    default=15.0,
    show_default=True,
    help="Seconds between checks of what the server serves (a restarted vLLM gets its adapters back).",
)
@click.option(
    "--model-path",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The served base model's folder, to check each adapter against it before loading [default: "
    "the folder the server reports, when this container can read it].",
)
@click.pass_context
def sync(ctx: click.Context, namespaces, vllm_url, adapter_dir: Path, keep: int, resync_s: float, model_path) -> None:
    """Follow oel.model-versions and keep this pod's vLLM server serving every promoted version's adapter.

    Runs until SIGTERM. Downloads each version's adapter from the object store into --dir and loads it
    through the server's own /v1/load_lora_adapter; unloads rolled-back versions; reloads everything after
    the server restarts. /readyz (OEL_METRICS__PORT, default 9104) is 503 until the first sync is complete;
    /livez fails when the sync loop or a follower stopped."""
    import logging
    import signal
    import threading

    from oel import metrics
    from oel.cli_context import settings_of
    from oel.model.vllm_backend import VLLMBackend
    from oel.store import S3Store
    from producers.adapter_sync import AdapterSync

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_of(ctx)
    names = _namespaces(namespaces)
    if not names:
        raise click.BadParameter("at least one namespace", param_hint="--namespace")
    adapter_dir.mkdir(parents=True, exist_ok=True)
    backend = VLLMBackend(vllm_url or settings.model.vllm_url, model_path=model_path)
    store = S3Store(settings.s3)
    syncer = AdapterSync(names, backend, store, adapter_dir, settings=settings, keep=keep, resync_s=resync_s)
    metrics.add_readiness_check("adapters", syncer.readiness_problem)
    metrics.add_readiness_check("object store", store.unreachable)
    metrics.add_liveness_check("adapter sync", syncer.liveness_problem)
    metrics.start_metrics_server(settings.metrics, "adapter-sync", default_port=9104)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    syncer.start()
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        syncer.stop()


@adapters.command("status")
@click.option("--namespace", "namespaces", multiple=True, required=True, help="Namespace(s) to compare (repeat).")
@click.option("--vllm-url", default=None, help="The vLLM server [default: OEL_MODEL__VLLM_URL].")
@click.pass_context
def status(ctx: click.Context, namespaces, vllm_url) -> None:
    """Which adapters a vLLM server serves, next to each namespace's current version; exits 1 when a
    current version is not served."""
    from oel.cli_context import settings_of
    from oel.model.vllm_backend import VLLMBackend
    from producers.versions import VersionFollower

    settings = settings_of(ctx)
    backend = VLLMBackend(vllm_url or settings.model.vllm_url)
    served = set(backend.list_adapters())
    click.echo(f"{backend.url} serves: {', '.join(sorted(served)) or '(no adapter)'}")
    missing = 0
    for ns in _namespaces(namespaces):
        with VersionFollower(ns, settings) as follower:
            current = follower.current()
        if current is None or current.adapter_uri is None:
            click.echo(f"{ns}: base model")
            continue
        ok = current.version in served
        missing += not ok
        click.echo(f"{ns}: current {current.version} {'served' if ok else 'NOT served'}")
    raise SystemExit(1 if missing else 0)
