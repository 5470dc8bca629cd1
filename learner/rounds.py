"""One consolidation round: stored trajectories + KB snapshots -> OPCD -> a new model version in the registry.

A round, given a :class:`~learner.policy.RoundTrigger`:

1. asks the registry whether the round id already produced a version; if so, nothing is trained again
   (a round replayed after a crash finishes the remaining steps only: see below);
2. runs the **knowledge gate** (:class:`learner.knowledge_gate.KnowledgeGate`, unless
   ``learner.knowledge_gate_enabled`` is off): the trigger's KB snapshot in context must make the base
   model better on held-out episodes (and not worse on the OOD prompts). If it does not, the round is
   recorded as a version with status ``skipped``, no adapter and the gate's numbers, and nothing is trained;
3. loads every training prefix of the namespace (``trajectories/<ns>/*.json``, each turn's prompt) and
   the newest ``learner.experience_sets`` KB snapshots up to the trigger's KB version (default 1: the
   whole current KB; with more, one is drawn per sample, as the paper's K extraction runs);
4. runs :class:`learner.opcd.OPCDTrainer` (seeded from the round id) on a **fresh adapter from the base
   model**, whose frozen copy with the KB in context is the teacher, and saves the adapter. The parent
   version is the lineage (and the evaluation gate's reference), not the starting point: the KB only
   grows, so the whole KB distilled into the base model holds what the parent learned, and a teacher
   chained on the parent's adapter measured worse (bench/README.md);
5. runs the **evaluation gate** (:class:`learner.gate.HeldOutGate` unless ``learner.gate_enabled`` is
   off or another gate is passed) on the saved adapter: held-out pass rate without experience against
   the parent's, OOD instruction following against the base model's. Its numbers and its decision go
   into the manifest's ``eval``;
6. stores adapter + manifest under the version name derived from the round id (the manifest last: it is
   the commit point);
7. applies the decision: a rejected version is recorded ``rejected`` with the gate's reason and never
   published; an accepted one stays ``candidate`` (promote it with ``oel models promote``) unless
   ``learner.auto_promote`` is set, which promotes it at once and publishes it. Without a gate, every
   version is treated as accepted.

Crash safety: everything before the manifest is repeatable (immutable keys; the adapter folder is
content-addressed; gate results are cached by model and adapter digest); after the manifest, step 1
finds the version and step 7 is idempotent: it replays the decision recorded in the manifest (a gate
that recorded none, e.g. for a version made without a gate, is run again on the stored adapter), and
promoting a version already promoted publishes the same version again, harmless on a compacted topic.

Where a round's time goes (:data:`STAGES`) is in :attr:`RoundOutcome.stages` and the
``oel_round_stage_seconds{stage}`` histogram.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from learner.checks import GateDecision
from learner.knowledge_gate import KnowledgeGate
from learner.policy import RoundTrigger
from learner.versions import ModelRegistry, VersionManifest, VersionRecord
from oel import metrics
from oel.episodes import CompletedEpisode
from oel.kb import ExperienceItem, item_key, load_snapshot
from oel.schemas import ModelVersion, VersionStatus
from oel.settings import FROM_SETTINGS, FromSettings, Settings
from oel.store import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)


class RoundError(RuntimeError):
    """A round that cannot run (no training prefixes, a KB snapshot missing, ...); it is retried later."""


EvaluationGate = Callable[[VersionRecord, Path], GateDecision]
"""``(candidate record, local adapter folder) -> decision``; :class:`learner.gate.HeldOutGate` is the
project's. A gate may also have ``decision_from_eval(manifest eval) -> GateDecision | None`` to replay a
decision it recorded in a manifest (then :meth:`RoundRunner.finish` does not evaluate again)."""

GATE_FROM_SETTINGS = FROM_SETTINGS
"""Default of :class:`RoundRunner`'s ``gate``: :class:`learner.gate.HeldOutGate` when
``learner.gate_enabled`` (the default), else none."""


STAGES = metrics.ROUND_STAGES
"""The stages of a round's wall time: the knowledge gate's evaluations; OPCD's model loading, data
preparation and adapter saving (``setup``), its on-policy sampling, its scoring and updates, its agreement
checks; the evaluation gate; storing the version and applying the decision (``publish``)."""


@contextmanager
def _timed(stages: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall time of the block to ``stages[stage]``."""
    t0 = time.monotonic()
    try:
        yield
    finally:
        stages[stage] = stages.get(stage, 0.0) + time.monotonic() - t0


@dataclass
class RoundOutcome:
    """What a round left behind."""

    trigger: RoundTrigger
    record: VersionRecord
    created: bool
    """False when the round id already had a version (a replay): nothing was trained."""
    status: VersionStatus
    published: ModelVersion | None
    seconds: float
    training: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)
    """Seconds per stage (:data:`STAGES`) of a round run here; empty for a replay."""


def load_training_prefixes(store: ObjectStore, namespace: str, limit: int | None = None) -> list[list[dict[str, str]]]:
    """Every turn-prefix of the namespace's stored episodes, in key order (the newest ``limit`` when given)."""
    prefixes: list[list[dict[str, str]]] = []
    for key in store.list(f"trajectories/{namespace}/"):
        if not key.endswith(".json"):
            continue
        episode = CompletedEpisode.model_validate(store.get_json(key))
        prefixes.extend([m.model_dump() for m in prefix] for prefix in episode.training_prefixes)
    return prefixes[-limit:] if limit else prefixes


def load_experience_sets(store: ObjectStore, namespace: str, kb_version: str, k: int) -> tuple[list[list[str]], list[str]]:
    """The KB snapshot ``kb_version`` and up to ``k - 1`` of its ancestors, newest first: (item lists, versions)."""
    sets: list[list[str]] = []
    versions: list[str] = []
    version: str | None = kb_version
    while version is not None and len(sets) < k:
        try:
            snap = load_snapshot(store, namespace, version)
        except ObjectNotFound:
            if not sets:
                raise RoundError(f"{namespace}: KB snapshot {version} is not in the object store") from None
            break
        if snap.items:
            sets.append(list(snap.items))
            versions.append(snap.version)
        version = snap.parent_version
    if not sets:
        raise RoundError(f"{namespace}: KB snapshot {kb_version} has no items")
    return sets, versions


def kb_provenance(store: ObjectStore, namespace: str, kb_version: str) -> dict[str, Any]:
    """Where a KB snapshot's items come from, for the manifest: per item its id, variant, sources and
    source episodes, and counts per variant (items stored before provenance was recorded count as ``unknown``)."""
    snap = load_snapshot(store, namespace, kb_version)
    items: list[dict[str, Any]] = []
    variants: dict[str, int] = {}
    for item_id in snap.item_ids:
        try:
            item = ExperienceItem.model_validate(store.get_json(item_key(namespace, item_id)))
        except ObjectNotFound:
            variants["unknown"] = variants.get("unknown", 0) + 1
            continue
        variants[item.variant] = variants.get(item.variant, 0) + 1
        items.append(
            {
                "id": item.id,
                "variant": item.variant,
                "sources": list(item.sources),
                "source_episode_ids": list(item.source_episode_ids),
                "extracted_by": item.extracted_by,
            }
        )
    return {"items": items, "variants": variants}


class RoundRunner:
    """Runs rounds for the learner service (and for ``oel demo``); see the module docstring.

    ``trainer_factory(config, prefixes, experience_sets)`` builds the trainer (default
    :class:`learner.opcd.OPCDTrainer`); ``gate`` is the evaluation gate (default: from the settings,
    :data:`GATE_FROM_SETTINGS`; None = no gate); ``knowledge_gate`` the check before training (default:
    from the settings, sharing the evaluation gate's evaluator; None = none); ``backend`` is the model
    backend the default gates evaluate with (default: one made from the settings when first needed);
    ``auto_promote`` overrides ``settings.learner.auto_promote``; ``topic`` the model-versions topic;
    ``on_step`` sees each OPCD step's metrics.
    """

    def __init__(
        self,
        store: ObjectStore,
        settings: Settings,
        *,
        registry: ModelRegistry | None = None,
        trainer_factory: Callable[..., Any] | None = None,
        gate: EvaluationGate | None | FromSettings = GATE_FROM_SETTINGS,
        knowledge_gate: KnowledgeGate | None | FromSettings = GATE_FROM_SETTINGS,
        backend: Any = None,
        auto_promote: bool | None = None,
        topic: str | None = None,
        config_overrides: dict[str, Any] | None = None,
        on_step: Callable[[Any], None] | None = None,
    ):
        self.store = store
        self.settings = settings
        self.registry = registry or ModelRegistry(store)
        self.trainer_factory = trainer_factory
        if gate is GATE_FROM_SETTINGS:
            gate = None
            if settings.learner.gate_enabled:
                from learner.gate import HeldOutGate

                gate = HeldOutGate(store, settings, backend=backend, registry=self.registry)
        self.gate: EvaluationGate | None = gate  # type: ignore[assignment]
        if knowledge_gate is GATE_FROM_SETTINGS:
            knowledge_gate = None
            if settings.learner.knowledge_gate_enabled:
                from evaluation.evaluator import Evaluator
                from oel.model.factory import make_backend

                evaluator = getattr(self.gate, "evaluator", None) or Evaluator.from_settings(
                    store, backend if backend is not None else (lambda: make_backend(settings)), settings, self.registry
                )
                knowledge_gate = KnowledgeGate(evaluator, settings)
        self.knowledge_gate: KnowledgeGate | None = knowledge_gate  # type: ignore[assignment]
        self.auto_promote = settings.learner.auto_promote if auto_promote is None else auto_promote
        self.topic = topic
        self.config_overrides = dict(config_overrides or {})
        self.on_step = on_step
        """Called with each OPCD step's metrics (``learner.opcd.StepMetrics``), e.g. to show progress."""

    def run(self, trigger: RoundTrigger) -> RoundOutcome:
        ns = trigger.namespace
        t0 = time.monotonic()
        existing = self.registry.find_round(ns, trigger.round_id)
        if existing is not None:
            log.info(
                "%s: round %s already produced %s (%s); finishing it",
                ns,
                trigger.round_id,
                existing.manifest.version,
                existing.status.value,
            )
            published = self.finish(existing)
            record = self.registry.get(ns, existing.manifest.version)
            return RoundOutcome(trigger, record, False, record.status, published, time.monotonic() - t0)

        metrics.ROUNDS_STARTED.labels(namespace=ns).inc()
        metrics.ROUND_IN_PROGRESS.labels(namespace=ns).set(1)
        stages: dict[str, float] = {}
        try:
            with _timed(stages, "knowledge_gate"):
                skipped, knowledge_eval = self._check_knowledge(trigger)
            if skipped is not None:
                metrics.observe_round_stages(ns, stages)
                return RoundOutcome(trigger, skipped, True, skipped.status, None, time.monotonic() - t0, stages=stages)
            record, training = self._train(trigger, knowledge_eval, stages)
        except Exception:
            metrics.ROUNDS_FAILED.labels(namespace=ns).inc()
            raise
        finally:
            metrics.ROUND_IN_PROGRESS.labels(namespace=ns).set(0)
        with _timed(stages, "publish"):
            published = self.finish(record)
        record = self.registry.get(ns, record.manifest.version)
        seconds = time.monotonic() - t0
        metrics.ROUND_DURATION.labels(namespace=ns).observe(seconds)
        metrics.observe_round_stages(ns, stages)
        metrics.LAST_ROUND_TIMESTAMP.labels(namespace=ns).set(time.time())
        log.info(
            "%s: round %s -> %s (%s) in %.1f s (%s)",
            ns,
            trigger.round_id,
            record.manifest.version,
            record.status.value,
            seconds,
            ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()),
        )
        return RoundOutcome(trigger, record, True, record.status, published, seconds, training, stages)

    # --- the steps ----------------------------------------------------------------------------

    def _check_knowledge(self, trigger: RoundTrigger) -> tuple[VersionRecord | None, dict[str, float]]:
        """The knowledge gate (module docstring, step 2): (None, its numbers) to go on and train, else
        (the recorded ``skipped`` version, its numbers)."""
        if self.knowledge_gate is None:
            return None, {}
        from oel.model.prepare import model_hash, resolve_model_path

        ns = trigger.namespace
        items = load_snapshot(self.store, ns, trigger.kb_version).items
        model_path = resolve_model_path(self.settings)
        base_hash = model_hash(Path(model_path))
        decision = self.knowledge_gate(ns, list(items), base_hash)
        metrics.observe_knowledge(ns, decision.eval.get("knowledge_none_pass_rate"), decision.eval.get("knowledge_in_context_pass_rate"))
        if decision.accepted:
            return None, dict(decision.eval)
        name, generation = self.registry.next_version_name(ns, trigger.round_id, trigger.parent_version)
        manifest = VersionManifest(
            namespace=ns,
            version=name,
            generation=generation,
            round_id=trigger.round_id,
            base_model=Path(model_path).name,
            base_model_hash=base_hash,
            parent_version=trigger.parent_version,
            kb_version=trigger.kb_version,
            kb_versions=[trigger.kb_version],
            knowledge=kb_provenance(self.store, ns, trigger.kb_version),
            eval=dict(decision.eval),
        )
        record, _ = self.registry.save_version(manifest)
        self.finish(record)  # records the skip (also what a restart after a crash here does)
        return self.registry.get(ns, name), dict(decision.eval)

    def _train(
        self, trigger: RoundTrigger, knowledge_eval: dict[str, float], stages: dict[str, float]
    ) -> tuple[VersionRecord, dict[str, Any]]:
        from learner.opcd import OPCDConfig
        from oel.model.prepare import model_hash, resolve_model_path

        t_train = time.monotonic()
        ns = trigger.namespace
        prefixes = load_training_prefixes(self.store, ns)
        if not prefixes:
            raise RoundError(f"{ns}: no stored training prefixes under trajectories/{ns}/")
        experience, kb_versions = load_experience_sets(self.store, ns, trigger.kb_version, self.settings.learner.experience_sets)
        model_path = resolve_model_path(self.settings)
        name, generation = self.registry.next_version_name(ns, trigger.round_id, trigger.parent_version)
        with tempfile.TemporaryDirectory(prefix=f"oel-round-{trigger.round_id}-") as tmp:
            # A fresh adapter from the base model, whatever the parent (module docstring, step 4).
            overrides = {"model_path": model_path, "init_adapter": None, "seed": int(trigger.round_id[:8], 16)}
            overrides.update(self.config_overrides)
            config = OPCDConfig.from_settings(self.settings, **overrides)
            factory = self.trainer_factory
            if factory is None:
                from learner.opcd import OPCDTrainer as factory  # noqa: N813
            trainer = factory(config, prefixes, experience)

            def on_step(m) -> None:
                metrics.observe_opcd_step(ns, m.loss, m.kl, m.response_tokens, m.seconds)
                if self.on_step is not None:
                    self.on_step(m)

            result = trainer.train(callback=on_step)
            adapter_dir = trainer.save(Path(tmp) / "adapter", result, extra={"round_id": trigger.round_id, "namespace": ns})
            del trainer  # free the training models before the gate loads its own
            sample = sum(m.sample_seconds for m in result.steps)
            update = sum(m.train_seconds for m in result.steps)
            checks = sum(c.seconds for c in result.checks)
            stages.update(opcd_sample=sample, opcd_update=update, opcd_checks=checks)
            stages["opcd_setup"] = time.monotonic() - t_train - sample - update - checks
            summary = result.to_dict()
            training = {
                k: summary[k] for k in ("first_loss", "last_loss", "response_tokens", "tokens_per_s", "seconds", "skipped_prefixes")
            }
            training.update(
                steps=len(result.steps),
                prefixes=len(prefixes),
                new_items=trigger.new_items,
                checks=summary["checks"],
                kept_step=summary["kept_step"],
            )
            round_config = config.to_dict()
            manifest = VersionManifest(
                namespace=ns,
                version=name,
                generation=generation,
                round_id=trigger.round_id,
                base_model=Path(model_path).name,
                base_model_hash=model_hash(Path(model_path)),
                parent_version=trigger.parent_version,
                kb_version=trigger.kb_version,
                kb_versions=kb_versions,
                knowledge=kb_provenance(self.store, ns, trigger.kb_version),
                round_config=round_config,
                training=training,
                eval=dict(knowledge_eval),
            )
            if self.gate is not None:
                with _timed(stages, "gate"):
                    decision = self.gate(VersionRecord(manifest=manifest, history=[]), adapter_dir)
                manifest = manifest.model_copy(update={"eval": {**manifest.eval, **decision.eval}})
            with _timed(stages, "publish"):
                record, _ = self.registry.save_version(manifest, adapter_dir)
            return record, training

    def finish(self, record: VersionRecord, published: ModelVersion | None = None) -> ModelVersion | None:
        """The steps after the manifest: the gate's decision (recorded in the manifest, else taken now),
        then promotion if configured. Idempotent; the service also calls it at start-up for a candidate
        left by a crash right after its manifest, with ``published``, the namespace's current version on the
        topic (see :meth:`ModelRegistry.promote`)."""
        m = record.manifest
        if record.status is not VersionStatus.candidate:
            return None  # decided already (promoted, rejected, skipped or rolled back by hand): leave it
        skip = KnowledgeGate.decision_from_eval(m.eval)
        if skip is not None and not skip.accepted:
            self.registry.record_status(m.namespace, m.version, VersionStatus.skipped, skip.reason)
            metrics.count_skipped_round(m.namespace, skip.kind or "other")
            log.info("%s: round %s skipped: %s", m.namespace, m.round_id, skip.reason)
            return None
        decision: GateDecision | None = None
        if self.gate is not None:
            replay = getattr(self.gate, "decision_from_eval", None)
            decision = replay(m.eval) if replay is not None else None
            if decision is None:
                with tempfile.TemporaryDirectory(prefix="oel-gate-") as tmp:
                    decision = self.gate(record, self.registry.download_adapter(record, tmp))
            if not decision.accepted:
                self.registry.reject(m.namespace, m.version, decision.reason or "rejected by the evaluation gate")
                metrics.count_rejected_round(m.namespace, decision.kind or "other")
                return None
        if not self.auto_promote:
            return None
        event = self.registry.promote(
            m.namespace,
            m.version,
            self.settings,
            topic=self.topic,
            published=published,
            reason="auto-promoted (no evaluation gate)" if decision is None else (decision.reason or "passed the evaluation gate"),
        )
        metrics.ROUNDS_FINISHED.labels(namespace=m.namespace).inc()
        metrics.set_current_version(m.namespace, m.version)
        return event
