"""``oel models``: list, inspect, promote and roll back model versions (the registry in ``learner.versions``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from oel.schemas import VersionStatus

_store_dir = click.option(
    "--store-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Use a local directory as the object store (as `oel demo` does) instead of the S3 server in the settings.",
)


def _context(store_dir: Path | None):
    from learner.versions import ModelRegistry
    from oel.settings import SettingsError, load_settings
    from oel.store import LocalStore, S3Store, StoreError

    try:
        settings = load_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        store = LocalStore(store_dir) if store_dir is not None else S3Store(settings.s3)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    return settings, ModelRegistry(store)


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


@click.group()
def models() -> None:
    """Model versions: list, show, promote, roll back.

    Every version is an adapter plus a manifest stored under an immutable name in the object store
    (models/<namespace>/<version>/); status changes are appended, never overwritten. Promote and
    rollback publish on the compacted model-versions topic, which running agents follow.
    """


@models.command("list")
@click.option("--namespace", "-n", default=None, help="Only this namespace [default: all].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of a table.")
@_store_dir
def list_versions(namespace: str | None, as_json: bool, store_dir: Path | None) -> None:
    """List model versions, oldest generation first, with their current status."""
    from learner.versions import RegistryError

    _, registry = _context(store_dir)
    try:
        records = registry.list(namespace)
        current = {ns: registry.current(ns) for ns in {r.manifest.namespace for r in records}}
    except RegistryError as exc:
        raise _fail(exc) from None
    if as_json:
        for r in records:
            click.echo(
                json.dumps(
                    {
                        "namespace": r.manifest.namespace,
                        "version": r.manifest.version,
                        "status": r.status.value,
                        "parent_version": r.manifest.parent_version,
                        "kb_version": r.manifest.kb_version,
                        "round_id": r.manifest.round_id,
                        "created_at": r.manifest.created_at.isoformat(),
                    }
                )
            )
        return
    if not records:
        click.echo("no model versions" + (f" in namespace {namespace}" if namespace else ""))
        return
    rows = [("", "NAMESPACE", "VERSION", "STATUS", "PARENT", "KB VERSION", "CREATED")]
    for r in records:
        m = r.manifest
        cur = current.get(m.namespace)
        mark = "*" if cur is not None and cur.manifest.version == m.version else ""
        rows.append(
            (
                mark,
                m.namespace,
                m.version,
                r.status.value,
                m.parent_version or "(base)",
                m.kb_version,
                m.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    click.echo("(* = current, served to agents)")


@models.command("show")
@click.argument("version")
@click.option("--namespace", "-n", default=None, help="The version's namespace [default: searched in all].")
@_store_dir
def show(version: str, namespace: str | None, store_dir: Path | None) -> None:
    """Print a version's manifest and status history as JSON."""
    from learner.versions import RegistryError

    _, registry = _context(store_dir)
    try:
        record = registry.find(version, namespace)
    except RegistryError as exc:
        raise _fail(exc) from None
    doc = {
        "manifest": record.manifest.model_dump(mode="json"),
        "status": record.status.value,
        "history": [c.model_dump(mode="json") for c in record.history],
    }
    click.echo(json.dumps(doc, indent=2))


@models.command("promote")
@click.argument("version")
@click.option("--namespace", "-n", default=None, help="The version's namespace [default: searched in all].")
@click.option("--reason", default="promoted by hand", show_default=True, help="Recorded with the status change.")
@_store_dir
def promote(version: str, namespace: str | None, reason: str, store_dir: Path | None) -> None:
    """Promote VERSION: record it as promoted and publish it, so running agents switch to it at their next episode."""
    from learner.versions import RegistryError
    from oel.versions import VersionTopicError

    settings, registry = _context(store_dir)
    try:
        record = registry.find(version, namespace)
        event = registry.promote(record.manifest.namespace, version, settings, reason=reason)
    except (RegistryError, VersionTopicError) as exc:
        raise _fail(exc) from None
    click.echo(f"{event.namespace}: promoted {event.version} (published on {settings.topics.model_versions})")


@models.command("rollback")
@click.option("--namespace", "-n", required=True, help="The namespace to roll back.")
@click.option(
    "--to",
    "to",
    default=None,
    help="The earlier good version to serve [default: the current version's parent if it was good, else the newest other good one, else the base model].",
)
@click.option("--reason", default="rolled back by hand", show_default=True, help="Recorded and published with the rollback.")
@_store_dir
def rollback(namespace: str, to: str | None, reason: str, store_dir: Path | None) -> None:
    """Roll the namespace's current version back: it is recorded and published as rolled_back, and the previous
    good version is republished as promoted (running agents follow it at their next episode)."""
    from learner.versions import RegistryError
    from oel.versions import VersionTopicError

    settings, registry = _context(store_dir)
    try:
        bad, again = registry.rollback(namespace, to, reason, settings)
    except (RegistryError, VersionTopicError, ValueError) as exc:
        raise _fail(exc) from None
    target = again.version if again is not None else "the base model"
    click.echo(f"{namespace}: rolled back {bad.version} -> {target} (published on {settings.topics.model_versions})")


__all__ = ["models", "VersionStatus"]
