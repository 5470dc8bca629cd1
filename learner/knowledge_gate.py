"""The knowledge gate: a knowledge base is consolidated only if, in context, it makes the model better.

OPCD moves whatever the teacher's context teaches into the weights, good or bad: on the default model a
KB of the model's own noisy extractions took the held-out pass rate from 34% to 0% in context, and OPCD
then carried exactly that into the adapter. So before a round trains anything, :class:`KnowledgeGate`
measures the round's KB snapshot *in context* on the model the teacher will be (the base model: every
round trains a fresh adapter from it), without training:

1. **held-out pass rate** (when the namespace has a reference environment,
   :func:`evaluation.evaluator.env_for_namespace`): with the KB in context against without it, on the same
   held-out seeds as the evaluation gate; the KB must add at least ``learner.knowledge_gate_margin``;
2. **out-of-distribution instruction following** (only for a namespace with no reference environment,
   where it is all that can be checked): the OOD prompts (:mod:`evaluation.ood`) with the KB in context must
   not score more than ``learner.gate_ood_tolerance`` below the base model without it. It catches a KB that
   derails the model in general (an instruction to answer in another language, to refuse, to add a link),
   not one that is merely useless for the namespace's tasks. Where the held-out check runs, this one does
   not: a namespace's rules legitimately change general answers when put in front of them (a greeting rule
   takes the OOD score down while it raises the held-out pass rate: bench/README.md), and drift of the consolidated model is the evaluation gate's OOD check.

A KB that fails is not consolidated: the round is recorded as ``skipped`` with the numbers and the
reason (no adapter), and the learner waits for new knowledge. It is also the last line of defence
against poisoned knowledge. The numbers are cached with the gate's (:class:`evaluation.evaluator.EvalCache`),
so the ``oel eval`` table reuses them.

Metric label of a skipped round (``oel_rounds_skipped_total{reason}``): ``no_gain``, ``ood`` or
``no_gain_and_ood``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from evaluation.evaluator import EvalSpec, Evaluator, env_for_namespace
from learner.checks import Checks, at_least, pct
from oel.settings import Settings

log = logging.getLogger(__name__)

ACCEPTED = "knowledge_accepted"
"""Key of the decision (1.0 consolidate, 0.0 skip) in a manifest's ``eval``."""


@dataclass(frozen=True)
class KnowledgeDecision:
    """Whether to consolidate a KB: ``reason`` for people, ``eval`` the numbers (``knowledge_*`` keys),
    ``kind`` the metric label of a skip."""

    accepted: bool
    reason: str
    eval: dict[str, float] = field(default_factory=dict)
    kind: str | None = None


def decide(ev: Mapping[str, float]) -> KnowledgeDecision:
    """The decision from the measured numbers (keys ``knowledge_none_pass_rate``,
    ``knowledge_in_context_pass_rate``, ``knowledge_margin`` when there was a held-out evaluation, else
    ``knowledge_ood_score``, ``knowledge_base_ood_score``, ``knowledge_ood_tolerance``)."""
    checks = Checks()
    if "knowledge_in_context_pass_rate" in ev:
        gain = ev["knowledge_in_context_pass_rate"] - ev["knowledge_none_pass_rate"]
        checks.check(
            "no_gain",
            f"held-out pass rate with the KB in context {pct(ev['knowledge_in_context_pass_rate'])} vs "
            f"{pct(ev['knowledge_none_pass_rate'])} without (gain {100 * gain:+.1f} points, needed "
            f"{100 * ev['knowledge_margin']:+.1f})",
            at_least(gain, ev["knowledge_margin"]),
        )
    else:
        checks.note("no reference environment for this namespace: only the OOD check ran")
    if "knowledge_ood_score" in ev:
        checks.check(
            "ood",
            f"OOD instruction-following with the KB in context {pct(ev['knowledge_ood_score'])} vs "
            f"{pct(ev['knowledge_base_ood_score'])} without (tolerance {pct(ev['knowledge_ood_tolerance'])})",
            at_least(ev["knowledge_ood_score"], ev["knowledge_base_ood_score"] - ev["knowledge_ood_tolerance"]),
        )
    reason = checks.reason("knowledge gate: the KB helps in context: ", "knowledge gate: the KB is not worth consolidating: ")
    return KnowledgeDecision(
        accepted=checks.kind is None, reason=reason, eval={**ev, ACCEPTED: 0.0 if checks.kind else 1.0}, kind=checks.kind
    )


class KnowledgeGate:
    """Checks a KB snapshot in context before it is consolidated (module docstring).

    ``evaluator`` runs and caches the evaluations (the evaluation gate's, so both share one backend and
    one cache); ``env`` overrides the environment choice (a name, or None = OOD check only; default
    ``...``: :func:`env_for_namespace`); ``spec_overrides`` go to :meth:`EvalSpec.from_settings`."""

    def __init__(self, evaluator: Evaluator, settings: Settings, *, env=..., spec_overrides: Mapping | None = None):
        self.evaluator = evaluator
        self.settings = settings
        self._env = env
        self.spec_overrides = dict(spec_overrides or {})
        self.margin = settings.learner.knowledge_gate_margin
        self.ood_tolerance = settings.learner.gate_ood_tolerance

    def env_for(self, namespace: str) -> str | None:
        return env_for_namespace(namespace, self.settings) if self._env is ... else self._env

    def __call__(self, namespace: str, items: Sequence[str], base_model_hash: str) -> KnowledgeDecision:
        """Measure ``items`` (a KB snapshot's, oldest first) in context on the base model and decide."""
        ev_ = self.evaluator
        env = self.env_for(namespace)
        ev: dict[str, float] = {"knowledge_items": float(len(items))}
        if env is not None:
            spec = EvalSpec.from_settings(self.settings, env, **self.spec_overrides)
            none = ev_.policy_of(spec, namespace, None, base_model_hash)
            with_kb = ev_.policy_of(spec, namespace, None, base_model_hash, list(items))
            ev.update(
                knowledge_none_pass_rate=none["pass_rate"],
                knowledge_in_context_pass_rate=with_kb["pass_rate"],
                knowledge_margin=self.margin,
                knowledge_eval_episodes=float(with_kb["n_episodes"]),
            )
        else:
            ev.update(
                knowledge_ood_tolerance=self.ood_tolerance,
                knowledge_base_ood_score=ev_.ood_of(namespace, None, base_model_hash)["score"],
                knowledge_ood_score=ev_.ood_of(namespace, None, base_model_hash, list(items))["score"],
            )
        decision = decide(ev)
        log.info("%s (%s, %d items): %s", namespace, env or "no environment", len(items), decision.reason)
        return decision

    @staticmethod
    def decision_from_eval(ev: Mapping[str, float]) -> KnowledgeDecision | None:
        """The decision recorded in a manifest's ``eval`` (None when none was recorded)."""
        return decide(ev) if ACCEPTED in ev else None
