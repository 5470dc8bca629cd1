"""The evaluation gate: a round's new version is rolled out only if it kept what the model could do.

:class:`HeldOutGate` implements :data:`learner.rounds.EvaluationGate` (``(candidate record, adapter
folder) -> GateDecision``). Two checks, both against references measured once and cached
(:class:`evaluation.evaluator.EvalCache`):

1. **held-out pass rate** (when the namespace has a reference environment, see
   :func:`evaluation.evaluator.env_for_namespace`): the candidate's pass rate on the held-out seeds,
   *without experience in context*, must not fall more than ``learner.gate_pass_rate_tolerance``
   below its parent version's (the base model's for a first version);
2. **out-of-distribution instruction following** (:mod:`evaluation.ood`, always): the candidate's score
   must not fall more than ``learner.gate_ood_tolerance`` below the **base model's** (a drift that
   accumulates over rounds is caught, not just the step from the parent).

The numbers go into the decision's ``eval`` (floats, stored in the version's manifest by the round
runner) and into the ``oel_evaluation_*`` gauges. :func:`decide` turns those numbers into the
decision, so a decision recorded in a manifest can be replayed after a crash without re-measuring.

Metric label of a rejection (``oel_rounds_rejected_total{reason}``): ``pass_rate``, ``ood`` or
``pass_rate_and_ood``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evaluation.evaluator import EvalSpec, Evaluator, adapter_files_of, env_for_namespace, version_subject
from evaluation.ood import OOD_PROMPTS, OODPrompt
from learner.checks import Checks, GateDecision, at_least, pct
from learner.versions import ModelRegistry, VersionRecord
from oel import metrics
from oel.model.backend import Backend
from oel.model.factory import make_backend
from oel.settings import FROM_SETTINGS, FromSettings, Settings
from oel.store import ObjectStore

log = logging.getLogger(__name__)

ACCEPTED = "gate_accepted"
"""Key of the decision (1.0 accepted, 0.0 rejected) in a manifest's ``eval``."""


def decide(ev: Mapping[str, float]) -> GateDecision:
    """The gate's decision from its measured numbers (``eval`` keys below; see the module docstring).

    Keys: ``pass_rate``, ``reference_pass_rate``, ``reference_is_base``, ``pass_rate_tolerance``
    (absent when there was no held-out evaluation), ``ood_score``, ``base_ood_score``,
    ``ood_tolerance``."""
    checks = Checks()
    if "pass_rate" in ev:
        ref = "base model" if ev.get("reference_is_base", 0.0) else "parent version"
        checks.check(
            "pass_rate",
            f"held-out pass rate {pct(ev['pass_rate'])} vs {pct(ev['reference_pass_rate'])} for the {ref} "
            f"(tolerance {pct(ev['pass_rate_tolerance'])})",
            at_least(ev["pass_rate"], ev["reference_pass_rate"] - ev["pass_rate_tolerance"]),
        )
    else:
        checks.note("no reference environment for this namespace: only the OOD check ran")
    checks.check(
        "ood",
        f"OOD instruction-following {pct(ev['ood_score'])} vs {pct(ev['base_ood_score'])} for the base model "
        f"(tolerance {pct(ev['ood_tolerance'])})",
        at_least(ev["ood_score"], ev["base_ood_score"] - ev["ood_tolerance"]),
    )
    reason = checks.reason("passed the evaluation gate: ", "rejected by the evaluation gate: ")
    return GateDecision(accepted=checks.kind is None, reason=reason, eval={**ev, ACCEPTED: 0.0 if checks.kind else 1.0}, kind=checks.kind)


class HeldOutGate:
    """The evaluation gate (module docstring). ``backend`` runs the evaluations (default: one made from
    the settings on first use, :func:`oel.model.factory.make_backend`); ``env`` overrides the
    environment choice (an environment name, or None = OOD check only; default ``FROM_SETTINGS``:
    :func:`env_for_namespace`); ``spec_overrides``
    go to :meth:`EvalSpec.from_settings` (e.g. ``episodes``)."""

    def __init__(
        self,
        store: ObjectStore,
        settings: Settings,
        *,
        backend: Backend | None = None,
        registry: ModelRegistry | None = None,
        env: str | None | FromSettings = FROM_SETTINGS,
        spec_overrides: Mapping[str, Any] | None = None,
        ood_prompts: Sequence[OODPrompt] = OOD_PROMPTS,
    ):
        self.settings = settings
        self.registry = registry or ModelRegistry(store)
        self.evaluator = Evaluator.from_settings(
            store, backend if backend is not None else (lambda: make_backend(settings)), settings, self.registry, ood_prompts=ood_prompts
        )
        self._env = env
        self.spec_overrides = dict(spec_overrides or {})
        self.pass_rate_tolerance = settings.learner.gate_pass_rate_tolerance
        self.ood_tolerance = settings.learner.gate_ood_tolerance

    def env_for(self, namespace: str) -> str | None:
        return env_for_namespace(namespace, self.settings) if self._env is FROM_SETTINGS else self._env

    def spec_for(self, env: str) -> EvalSpec:
        return EvalSpec.from_settings(self.settings, env, **self.spec_overrides)

    def __call__(self, record: VersionRecord, adapter_dir: Path) -> GateDecision:
        m = record.manifest
        ns = m.namespace
        ev_ = self.evaluator
        env = self.env_for(ns)
        spec = self.spec_for(env) if env is not None else None
        ev: dict[str, float] = {"pass_rate_tolerance": self.pass_rate_tolerance, "ood_tolerance": self.ood_tolerance}
        # The references first (cached after their first measurement): the base model's OOD score, and the
        # parent's (or base model's) held-out pass rate.
        base_ood = ev_.ood_of(ns, None, m.base_model_hash)
        reference = ev_.policy_of(spec, ns, m.parent_version, m.base_model_hash) if spec is not None else None
        subject = version_subject(ns, m.version, adapter_files_of(adapter_dir))
        name = "gate-" + subject.replace("/", "-")

        def measure() -> tuple[dict[str, Any] | None, dict[str, Any]]:
            cand = ev_.policy_eval(spec, subject, name) if spec is not None else None
            return cand, ev_.ood_eval(subject, name)

        cached = ev_.cached_policy(spec, subject) if spec is not None else None, ev_.cached_ood(subject)
        if cached[1] is not None and (spec is None or cached[0] is not None):
            cand, cand_ood = cached  # measured before (a replay): no need to load the adapter
        else:
            cand, cand_ood = ev_.with_adapter(name, adapter_dir, measure)
        if cand is not None and reference is not None:
            ev.update(
                pass_rate=cand["pass_rate"],
                mean_response_tokens=cand["mean_response_tokens"],
                valid_action_rate=cand["valid_action_rate"],
                eval_episodes=float(cand["n_episodes"]),
                reference_pass_rate=reference["pass_rate"],
                reference_mean_response_tokens=reference["mean_response_tokens"],
                reference_is_base=1.0 if m.parent_version is None else 0.0,
            )
        ev.update(ood_score=cand_ood["score"], ood_strict_score=cand_ood["strict_score"], base_ood_score=base_ood["score"])
        decision = decide(ev)
        metrics.observe_evaluation(
            ns, m.version, pass_rate=ev.get("pass_rate"), response_tokens=ev.get("mean_response_tokens"), ood_score=ev["ood_score"]
        )
        log.info("%s/%s (%s): %s", ns, m.version, env or "no environment", decision.reason)
        return decision

    def decision_from_eval(self, ev: Mapping[str, float]) -> GateDecision | None:
        """The decision recorded in a manifest's ``eval`` (None when the gate did not record one there)."""
        return decide(ev) if ACCEPTED in ev else None
