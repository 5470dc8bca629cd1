"""The knowledge gate on the real default model: a harmful KB is never consolidated, a good one goes on.

The harmful KB states a wrong rule (a poisoned or mistaken item: a greeting the grader rejects); in
context it keeps the held-out pass rate at the base model's, so the round is skipped. The good KB is the
hand-written correct item of the greeting rule. (Model-written noise is not a reliable "harmful" case at
135M: three platitude items measured 9/12 in context against 0/12 without, because any experience block
makes this model copy the greeting from the feedback more often; see bench/README.md.) The round runner,
the registry (a LocalStore), the evaluator and the model are real; no trainer is needed, because a skipped
round trains nothing (the trainer factory here fails the test if it is ever called).
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from evaluation.ood import OOD_PROMPTS
from learner.knowledge_gate import ACCEPTED, KnowledgeGate, decide
from learner.policy import RoundTrigger, round_id
from learner.rounds import RoundRunner
from learner.versions import ModelRegistry
from oel import metrics
from oel.envs.house_rules import REFERENCE_EXPERIENCE
from oel.schemas import ModelVersion, VersionStatus
from oel.settings import load_settings
from oel.store import LocalStore

pytestmark = [pytest.mark.model, pytest.mark.slow]

HARMFUL_KB = ['Every reply must start with "Hi there!" and never with any other greeting.']
REFERENCE_KB = [REFERENCE_EXPERIENCE["greeting"]]
OOD_SUBSET = tuple(p for p in OOD_PROMPTS if p.id in {"keyword-bees", "constrained-sun", "lowercase-beach", "title-robot"})
SETTINGS = {
    "eval_rules": "greeting",
    "eval_episodes": 12,
    "ood_max_new_tokens": 32,
    "knowledge_gate_margin": 0.1,
    "gate_ood_tolerance": 0.15,
}


def _ev(**kw) -> dict[str, float]:
    ev = {"knowledge_none_pass_rate": 0.25, "knowledge_in_context_pass_rate": 0.5, "knowledge_margin": 0.1}
    ev.update(kw)
    return ev


def _ood(**kw) -> dict[str, float]:
    ev = {"knowledge_ood_score": 0.4, "knowledge_base_ood_score": 0.45, "knowledge_ood_tolerance": 0.15}
    ev.update(kw)
    return ev


def test_decide_needs_a_gain_or_without_an_environment_no_ood_drop():
    assert decide(_ev()).accepted and decide(_ev()).eval[ACCEPTED] == 1.0
    hurt = decide(_ev(knowledge_in_context_pass_rate=0.0))
    assert not hurt.accepted and hurt.kind == "no_gain" and "FAILED held-out pass rate with the KB" in hurt.reason
    flat = decide(_ev(knowledge_in_context_pass_rate=0.3))  # +5 points: under the margin
    assert not flat.accepted and flat.kind == "no_gain"
    only = decide(_ood())
    assert only.accepted and "only the OOD check ran" in only.reason
    derails = decide(_ood(knowledge_ood_score=0.2))
    assert not derails.accepted and derails.kind == "ood" and "FAILED OOD" in derails.reason
    assert KnowledgeGate.decision_from_eval(hurt.eval) == hurt and KnowledgeGate.decision_from_eval({}) is None
    assert {hurt.kind, derails.kind} <= set(metrics.SKIP_CHECKS)


@pytest.fixture(scope="module")
def settings():
    return load_settings(learner=SETTINGS)


@pytest.fixture(scope="module")
def gate(settings, tmp_path_factory):
    from evaluation.evaluator import Evaluator
    from oel.model.hf_backend import HFBackend

    store = LocalStore(tmp_path_factory.mktemp("store"))
    backend = HFBackend.from_settings(settings, max_batch_size=12)
    return KnowledgeGate(Evaluator.from_settings(store, backend, settings, ood_prompts=OOD_SUBSET), settings)


def _seed(store, ns: str, items: list[str]) -> str:
    """One stored episode (a training prefix) and a KB snapshot holding ``items``; returns its version."""
    from oel.episodes import CompletedEpisode, EpisodeStatus
    from oel.kb import ExperienceItem, KBState, append, approx_tokens, write_append
    from oel.schemas import EndPayload, StepPayload

    now = datetime.now(UTC)
    ep = CompletedEpisode(
        namespace=ns,
        episode_id="ep0",
        agent_id="a",
        model_version="base",
        status=EpisodeStatus.completed,
        steps=[StepPayload(prompt="Where is my order #12340?", response="On its way.")],
        end=EndPayload(outcome="done"),
        started_at=now,
        ended_at=now,
    )
    store.put_json(ep.store_key, ep.model_dump(mode="json"))
    kb_items = [
        ExperienceItem(
            id=f"i{i}",
            namespace=ns,
            text=t,
            source_episode_ids=["ep0"],
            extracted_by="base",
            variant="unstructured",
            sources=["model:extraction"],
        )
        for i, t in enumerate(items)
    ]
    _, snap, new, _ = append(KBState(namespace=ns), kb_items, episode_ids=["ep0"], budget=2048, count=approx_tokens, as_of=now)
    write_append(store, snap, new)
    return snap.version


def _never_train(*args, **kwargs):
    raise AssertionError("a skipped round must not train")


def test_a_harmful_kb_is_skipped_and_the_reference_goes_through(gate, settings, unique):
    from oel.model.prepare import model_hash, resolve_model_path

    ns = f"house-rules-{unique}"
    store = gate.evaluator.store
    base_hash = model_hash(resolve_model_path(settings))
    good = gate(ns, REFERENCE_KB, base_hash)
    assert good.accepted, good.reason
    ev = good.eval
    assert ev["knowledge_in_context_pass_rate"] >= ev["knowledge_none_pass_rate"] + 0.1 and ev["knowledge_eval_episodes"] == 12
    assert "knowledge_ood_score" not in ev, "with a reference environment the held-out check decides"

    published: list[ModelVersion] = []
    registry = ModelRegistry(store, publisher=published.append)
    runner = RoundRunner(
        store, settings, registry=registry, gate=None, knowledge_gate=gate, auto_promote=True, trainer_factory=_never_train
    )
    kb = _seed(store, ns, HARMFUL_KB)
    outcome = runner.run(RoundTrigger(ns, round_id(ns, None, kb), None, kb, (kb,), len(HARMFUL_KB)))
    assert outcome.status is VersionStatus.skipped and outcome.published is None and published == []
    record = registry.get(ns, outcome.record.manifest.version)
    m = record.manifest
    assert m.adapter_uri is None and m.eval[ACCEPTED] == 0.0
    assert m.eval["knowledge_in_context_pass_rate"] < m.eval["knowledge_none_pass_rate"] + 0.1
    assert record.status is VersionStatus.skipped and "not worth consolidating" in record.reason
    assert m.knowledge["variants"] == {"unstructured": 1} and m.knowledge["items"][0]["sources"] == ["model:extraction"]
    assert metrics.sample_value("oel_rounds_skipped_total", {"namespace": ns, "check": outcome_kind(m.eval)}) == 1.0
    assert (
        metrics.sample_value("oel_knowledge_pass_rate", {"namespace": ns, "condition": "in_context"})
        == m.eval["knowledge_in_context_pass_rate"]
    )
    # A replay of the same round (a restart) trains nothing and records nothing more.
    again = runner.run(RoundTrigger(ns, round_id(ns, None, kb), None, kb, (kb,), len(HARMFUL_KB)))
    assert again.created is False and len(registry.history(ns, m.version)) == 1
    # Nothing is the namespace's current version: the agents stay on the base model, and a skipped round
    # has nothing to promote.
    assert registry.current(ns) is None
    from learner.versions import RegistryError

    with pytest.raises(RegistryError, match="trained no adapter"):
        registry.promote(ns, m.version)


def test_without_an_environment_a_derailing_kb_is_caught_by_the_ood_check(gate, settings, unique):
    """A namespace with no reference environment has only the OOD check. The greeting item, put in front of
    unrelated requests, makes the model greet instead of following their instructions (measured: 50% -> 0% on
    this subset), so such a namespace would not consolidate it."""
    from oel.model.prepare import model_hash, resolve_model_path

    ns = f"support-{unique}"
    assert gate.env_for(ns) is None
    base_hash = model_hash(resolve_model_path(settings))
    derail = gate(ns, REFERENCE_KB, base_hash)
    assert not derail.accepted and derail.kind == "ood", derail.reason
    assert derail.eval["knowledge_ood_score"] < derail.eval["knowledge_base_ood_score"]
    assert "knowledge_in_context_pass_rate" not in derail.eval


def outcome_kind(ev: dict[str, float]) -> str:
    return decide(ev).kind or "other"
