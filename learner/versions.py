"""The model-version registry: every version of every namespace, as immutable objects in the object store.

Layout under the bucket::

    models/<ns>/<version>/manifest.json               the VersionManifest, written once
    models/<ns>/<version>/adapter/<digest>/<file>     the adapter (peft folder), content-addressed
    models/<ns>/<version>/status/<seq>.json           one StatusChange per status change (000000, 000001, ...)

Nothing is ever overwritten. A version's status is the last of its status objects; the manifest's own
status is the one it was created with (``candidate``). The manifest is the commit point of a round:
the adapter files are written first, the manifest last, so a manifest never names missing files.

**One version per round.** A version's name is derived from its round id and its generation (the
parent's generation + 1): ``g0003-<round id>``. A round replayed after a crash computes the same round
id (``learner.policy.round_id``) and so the same name; :meth:`ModelRegistry.save_version` returns the
manifest already there instead of writing a second one. The adapter of a crashed attempt that never got
its manifest may differ from the retrained one (sampling is not bit-reproducible across runs), which is
why adapter files live under a digest of their content: a retry writes a new folder next to the orphan
and never conflicts with it.

**Publishing.** A :class:`~oel.schemas.ModelVersion` event goes to the compacted ``oel.model-versions``
topic (the protocol: :mod:`oel.versions`; the publisher: :func:`oel.ops.versions.publish_version`). Candidates are *not* published:
on a compacted topic the last message per namespace is what a late follower sees, and a candidate
would hide the promoted version from it. :meth:`ModelRegistry.promote` records ``promoted`` and
publishes it; :meth:`ModelRegistry.rollback` records ``rolled_back`` for the current version and
``promoted`` again for the version rolled back to, then publishes both via
the messages of :func:`oel.versions.rollback_events`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from oel.schemas import NAMESPACE_PATTERN, ModelVersion, VersionStatus
from oel.settings import Settings
from oel.store import ImmutableObjectConflict, ObjectNotFound, ObjectStore
from oel.versions import rollback_events

log = logging.getLogger(__name__)

MODELS_PREFIX = "models"
GOOD = {VersionStatus.promoted}


def _now() -> datetime:
    return datetime.now(UTC)


class RegistryError(RuntimeError):
    """A version that does not exist, or a status change that makes no sense."""


class VersionManifest(BaseModel):
    """What a model version is: where its adapter is and how it was made."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str = Field(pattern=NAMESPACE_PATTERN)
    version: str = Field(description="Immutable name: g<generation>-<round id>.")
    generation: int = Field(ge=1, description="1 for the first version trained on the base model, parent's + 1 after.")
    round_id: str = Field(description="The round that produced it (learner.policy.round_id).")
    base_model: str = Field(description="Name or path of the base model.")
    base_model_hash: str = Field(description="oel.model.prepare.model_hash of the base model folder.")
    parent_version: str | None = Field(None, description="The version this one continues from; None = the base model.")
    kb_version: str = Field(description="The KB version consolidated into the weights.")
    kb_versions: list[str] = Field(default_factory=list, description="Every KB snapshot the teacher drew experience from.")
    adapter_uri: str | None = Field(None, description="Object-store prefix of the adapter folder (ends with '/').")
    adapter_files: dict[str, str] = Field(default_factory=dict, description="Adapter file name -> sha256.")
    knowledge: dict[str, Any] = Field(
        default_factory=dict,
        description="Provenance of the consolidated KB snapshot: per item its variant, sources and source episodes (learner.rounds.kb_provenance).",
    )
    round_config: dict[str, Any] = Field(default_factory=dict, description="The OPCD configuration of the round.")
    training: dict[str, Any] = Field(default_factory=dict, description="What training measured (losses, tokens, time).")
    eval: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "The gates' numbers and decisions: the knowledge gate's (knowledge_*: the KB in context vs none, "
            "learner.knowledge_gate) and the evaluation gate's (learner.gate: held-out pass rate and response length "
            "against the reference, OOD score against the base model); empty for a version made without gates."
        ),
    )
    status: VersionStatus = Field(VersionStatus.candidate, description="The status it was created with.")
    created_at: datetime = Field(default_factory=_now)


class StatusChange(BaseModel):
    """One status change of a version, stored as its own immutable object."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str
    version: str
    seq: int = Field(ge=0)
    status: VersionStatus
    reason: str | None = None
    ts: datetime = Field(default_factory=_now)


class VersionRecord(BaseModel):
    """A manifest with its status history: what ``oel models show`` prints."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest: VersionManifest
    history: list[StatusChange]

    @property
    def status(self) -> VersionStatus:
        return self.history[-1].status if self.history else self.manifest.status

    @property
    def reason(self) -> str | None:
        return self.history[-1].reason if self.history else None

    @property
    def last_promoted_at(self) -> datetime | None:
        times = [c.ts for c in self.history if c.status is VersionStatus.promoted]
        return max(times) if times else None

    def to_event(self, status: VersionStatus | None = None, reason: str | None = None) -> ModelVersion:
        """The ModelVersion event for this version (its current status unless told otherwise)."""
        m = self.manifest
        return ModelVersion(
            namespace=m.namespace,
            version=m.version,
            adapter_uri=m.adapter_uri,
            base_model=m.base_model,
            base_model_hash=m.base_model_hash,
            parent_version=m.parent_version,
            kb_version=m.kb_version,
            round_id=m.round_id,
            status=status or self.status,
            reason=reason if reason is not None else (self.reason if status is None else None),
            eval=m.eval,
        )


# --- keys -------------------------------------------------------------------------------------


def version_name(round_id: str, generation: int) -> str:
    """The immutable name of the version a round produces: ``g<generation:04d>-<round id>``."""
    return f"g{generation:04d}-{round_id}"


def manifest_key(namespace: str, version: str) -> str:
    return f"{MODELS_PREFIX}/{namespace}/{version}/manifest.json"


def status_key(namespace: str, version: str, seq: int) -> str:
    return f"{MODELS_PREFIX}/{namespace}/{version}/status/{seq:06d}.json"


def adapter_prefix(namespace: str, version: str, digest: str) -> str:
    return f"{MODELS_PREFIX}/{namespace}/{version}/adapter/{digest}/"


def adapter_digest(files: dict[str, bytes]) -> str:
    """16 hex characters of sha256 over the adapter's file names and contents, in name order."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()[:16]


# --- the registry -----------------------------------------------------------------------------


VersionPublisher = Callable[[ModelVersion], None]
"""Puts one :class:`ModelVersion` on the model-versions topic (key = namespace) and returns once it is there."""


class ModelRegistry:
    """Model versions of every namespace in one object store (see the module docstring).

    ``publisher`` replaces the Kafka publisher (:func:`oel.ops.versions.publish_version` with the
    settings and topic given to :meth:`promote`/:meth:`rollback`), e.g. with the in-process bus of
    ``oel demo``."""

    def __init__(self, store: ObjectStore, publisher: VersionPublisher | None = None):
        self.store = store
        self.publisher = publisher

    def _publish(self, event: ModelVersion, settings: Settings | None, topic: str | None) -> None:
        if self.publisher is not None:
            self.publisher(event)
        else:
            from oel.ops.versions import publish_version

            publish_version(event, settings, topic=topic)

    # --- reading ------------------------------------------------------------------------------

    def namespaces(self) -> list[str]:
        return sorted({k.split("/")[1] for k in self._manifest_keys("")})

    def manifest(self, namespace: str, version: str) -> VersionManifest:
        try:
            return VersionManifest.model_validate(self.store.get_json(manifest_key(namespace, version)))
        except ObjectNotFound:
            raise RegistryError(f"no model version {version!r} in namespace {namespace!r}") from None

    def exists(self, namespace: str, version: str) -> bool:
        return self.store.exists(manifest_key(namespace, version))

    def history(self, namespace: str, version: str) -> list[StatusChange]:
        keys = self.store.list(f"{MODELS_PREFIX}/{namespace}/{version}/status/")
        return [StatusChange.model_validate(self.store.get_json(k)) for k in keys]

    def get(self, namespace: str, version: str) -> VersionRecord:
        return VersionRecord(manifest=self.manifest(namespace, version), history=self.history(namespace, version))

    def find(self, version: str, namespace: str | None = None) -> VersionRecord:
        """A version by name, searching every namespace when none is given."""
        if namespace is not None:
            return self.get(namespace, version)
        hits = [ns for ns in self.namespaces() if self.exists(ns, version)]
        if not hits:
            raise RegistryError(f"no model version {version!r} in any namespace")
        if len(hits) > 1:
            raise RegistryError(f"version {version!r} exists in several namespaces ({', '.join(hits)}): name one with --namespace")
        return self.get(hits[0], version)

    def list(self, namespace: str | None = None) -> list[VersionRecord]:
        """Every version (of one namespace, or of all), by namespace then generation."""
        prefix = f"{namespace}/" if namespace else ""
        out = []
        for key in self._manifest_keys(prefix):
            _, ns, version, _ = key.split("/")
            out.append(self.get(ns, version))
        return sorted(out, key=lambda r: (r.manifest.namespace, r.manifest.generation, r.manifest.version))

    def current(self, namespace: str) -> VersionRecord | None:
        """The version being served: the most recently promoted one whose status is still promoted."""
        good = [r for r in self.list(namespace) if r.status is VersionStatus.promoted]
        return max(good, key=lambda r: r.last_promoted_at) if good else None  # type: ignore[arg-type, return-value]

    def latest(self, namespace: str) -> VersionRecord | None:
        """The newest version of the namespace whatever its status (the parent of its next round)."""
        records = self.list(namespace)
        return max(records, key=lambda r: (r.manifest.generation, r.manifest.created_at)) if records else None

    def find_round(self, namespace: str, round_id: str) -> VersionRecord | None:
        """The version a round already produced, if any (a replayed round reuses it)."""
        for key in self._manifest_keys(f"{namespace}/"):
            version = key.split("/")[2]
            if version.endswith(f"-{round_id}"):
                record = self.get(namespace, version)
                if record.manifest.round_id == round_id:
                    return record
        return None

    def next_version_name(self, namespace: str, round_id: str, parent_version: str | None) -> tuple[str, int]:
        """(name, generation) of the version a round on top of ``parent_version`` produces."""
        generation = 1 if parent_version is None else self.manifest(namespace, parent_version).generation + 1
        return version_name(round_id, generation), generation

    def _manifest_keys(self, prefix: str) -> list[str]:
        keys = self.store.list(f"{MODELS_PREFIX}/{prefix}")
        return [k for k in keys if k.endswith("/manifest.json") and len(k.split("/")) == 4]

    # --- writing ------------------------------------------------------------------------------

    def save_version(
        self,
        manifest: VersionManifest,
        adapter_dir: str | Path | None = None,
    ) -> tuple[VersionRecord, bool]:
        """Store a new version (adapter files first, the manifest last). Returns (record, created).

        If the round already has a version, nothing is written and that version is returned with
        ``created=False``: a replayed round never makes a second version."""
        existing = self.find_round(manifest.namespace, manifest.round_id)
        if existing is not None:
            log.info("%s: round %s already produced %s; reusing it", manifest.namespace, manifest.round_id, existing.manifest.version)
            return existing, False
        if adapter_dir is not None:
            files = {p.relative_to(adapter_dir).as_posix(): p.read_bytes() for p in sorted(Path(adapter_dir).rglob("*")) if p.is_file()}
            if not files:
                raise RegistryError(f"adapter folder {adapter_dir} is empty")
            prefix = adapter_prefix(manifest.namespace, manifest.version, adapter_digest(files))
            for name, data in files.items():
                self.store.put_bytes(prefix + name, data)
            manifest = manifest.model_copy(
                update={"adapter_uri": prefix, "adapter_files": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}}
            )
        self.store.put_json(manifest_key(manifest.namespace, manifest.version), manifest.model_dump(mode="json"))
        return VersionRecord(manifest=manifest, history=[]), True

    def download_adapter(self, record: VersionRecord, out_dir: str | Path) -> Path:
        """Copy a version's adapter folder out of the store (checking every file's sha256)."""
        m = record.manifest
        if m.adapter_uri is None:
            raise RegistryError(f"{m.namespace}/{m.version} has no adapter")
        out = Path(out_dir)
        for name, digest in m.adapter_files.items():
            data = self.store.get_bytes(m.adapter_uri + name)
            if hashlib.sha256(data).hexdigest() != digest:
                raise RegistryError(f"{m.adapter_uri}{name}: content does not match the manifest's sha256")
            path = out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return out

    def record_status(self, namespace: str, version: str, status: VersionStatus, reason: str | None = None) -> StatusChange:
        """Append a status change as a new immutable object (the next free sequence number)."""
        if not self.exists(namespace, version):
            raise RegistryError(f"no model version {version!r} in namespace {namespace!r}")
        for _ in range(10):
            seq = len(self.history(namespace, version))
            change = StatusChange(namespace=namespace, version=version, seq=seq, status=status, reason=reason)
            try:
                self.store.put_json(status_key(namespace, version, seq), change.model_dump(mode="json"))
                return change
            except ImmutableObjectConflict:  # someone else took this sequence number: take the next
                continue
        raise RegistryError(f"could not record status {status.value} of {namespace}/{version}: too many concurrent writers")

    # --- publishing (oel.versions holds the topic's protocol) --------------------------------

    def promote(
        self,
        namespace: str,
        version: str,
        settings: Settings | None = None,
        *,
        topic: str | None = None,
        reason: str | None = None,
        published: ModelVersion | None = None,
    ) -> ModelVersion:
        """Record ``promoted`` and publish the version as the namespace's current one. ``published`` is what the
        topic says is current now, when known: if it is already this version, promoted (a crash between
        publishing and recording), only the record is written, so a version is never published twice."""
        record = self.get(namespace, version)
        if record.status is VersionStatus.rejected:
            raise RegistryError(f"{namespace}/{version} was rejected ({record.reason}); it cannot be promoted")
        if record.status is VersionStatus.skipped:
            raise RegistryError(f"{namespace}/{version} trained no adapter (skipped: {record.reason}); there is nothing to promote")
        # Publish first, record second: if recording fails, running the command again publishes the
        # same thing again (harmless) and records it, so the topic and the registry converge.
        if published is not None and published.version == version and published.status is VersionStatus.promoted:
            log.info("%s/%s is published already; recording its promotion", namespace, version)
            self.record_status(namespace, version, VersionStatus.promoted, reason)
            return published
        event = record.to_event(VersionStatus.promoted, reason)
        self._publish(event, settings, topic)
        self.record_status(namespace, version, VersionStatus.promoted, reason)
        return event

    def reject(self, namespace: str, version: str, reason: str) -> StatusChange:
        """Record ``rejected`` (not published: a rejected candidate never served)."""
        return self.record_status(namespace, version, VersionStatus.rejected, reason)

    def rollback(
        self,
        namespace: str,
        to: str | None = None,
        reason: str = "manual rollback",
        settings: Settings | None = None,
        *,
        topic: str | None = None,
    ) -> tuple[ModelVersion, ModelVersion | None]:
        """Roll the namespace's current version back: to ``to`` if given, else to its parent if that was a
        good (promoted) version, else to the newest other good version; with none, to the base model.
        Returns (the rolled-back event, the republished event or None for the base model)."""

        bad = self.current(namespace)
        if bad is None:
            raise RegistryError(f"namespace {namespace!r} has no promoted version to roll back")
        target = self._rollback_target(namespace, bad, to)
        # Publish first, record second (as in promote): a failed run repeated converges.
        bad_event = bad.to_event(VersionStatus.rolled_back, reason)
        if target is None:
            self._publish(bad_event, settings, topic)  # followers fall back to the base model
            again = None
        else:
            rolled, again = rollback_events(bad.to_event(VersionStatus.promoted), target.to_event(VersionStatus.promoted), reason)
            self._publish(rolled, settings, topic)
            self._publish(again, settings, topic)
        self.record_status(namespace, bad.manifest.version, VersionStatus.rolled_back, reason)
        if target is not None:
            self.record_status(namespace, target.manifest.version, VersionStatus.promoted, f"rollback of {bad.manifest.version}: {reason}")
        return bad_event, again

    def _rollback_target(self, namespace: str, bad: VersionRecord, to: str | None) -> VersionRecord | None:
        if to is not None:
            target = self.get(namespace, to)
            if target.manifest.version == bad.manifest.version:
                raise RegistryError(f"{to} is the current version; roll back to an earlier one")
            if target.last_promoted_at is None or target.status in (VersionStatus.rejected, VersionStatus.rolled_back):
                raise RegistryError(
                    f"{to} is not a good version (status {target.status.value}, "
                    f"{'promoted before' if target.last_promoted_at else 'never promoted'}); roll back only to a good "
                    f"version, or promote it with `oel models promote` if it is good after all"
                )
            return target
        records = {r.manifest.version: r for r in self.list(namespace)}
        good = [
            r
            for r in records.values()
            if r.last_promoted_at is not None
            and r.status is not VersionStatus.rejected
            and r.status is not VersionStatus.rolled_back
            and r.manifest.version != bad.manifest.version
        ]
        parent = records.get(bad.manifest.parent_version or "")
        if parent is not None and parent in good:
            return parent
        return max(good, key=lambda r: r.last_promoted_at) if good else None  # type: ignore[arg-type, return-value]
