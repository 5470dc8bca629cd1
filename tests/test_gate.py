"""The evaluation gate on the real default model: it rejects a damaged adapter and accepts a sound one.

The round runner, the registry (a LocalStore in tmp), the gate and the model are real. The one stand-in
is the trainer: :class:`PremadeAdapterTrainer` takes the place of OPCD (tested in ``test_opcd_*``) and
"trains" by handing over an adapter made beforehand, so that the round produces exactly the adapter
under test. The damaged adapter silences the model (:func:`support.adapters.silencing_adapter`);
the sound one is a fresh LoRA, i.e. the base model's behaviour.

Kept small for a CPU: a subset of the OOD prompts, short answers, 4 held-out episodes.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from evaluation.ood import OOD_PROMPTS
from learner.gate import ACCEPTED, HeldOutGate, decide
from learner.policy import RoundTrigger, round_id
from learner.rounds import STAGES, RoundRunner
from learner.versions import ModelRegistry, VersionManifest, VersionRecord
from oel import metrics
from oel.schemas import ModelVersion, VersionStatus
from oel.settings import load_settings
from oel.store import LocalStore

# Loading the damaged adapter, peft notes that a LoRA bias on a bias-free layer cannot be merged (it is not merged).
pytestmark = pytest.mark.filterwarnings("ignore:.*lora_bias=True.*")

OOD_SUBSET = tuple(
    p
    for p in OOD_PROMPTS
    if p.id
    in {
        "keyword-bees",
        "keywords-train",
        "constrained-sun",
        "french-weather",
        "forbidden-cat",
        "repeat-france",
        "lowercase-beach",
        "title-robot",
    }
)
SETTINGS = {
    "ood_max_new_tokens": 32,
    "eval_max_new_tokens": 24,
    "eval_episodes": 4,
    "gate_pass_rate_tolerance": 0.1,
    "gate_ood_tolerance": 0.1,
}


# --- the decision rule (no model) -----------------------------------------------------------------


def _ev(**kw) -> dict[str, float]:
    ev = {
        "pass_rate": 0.5,
        "reference_pass_rate": 0.5,
        "reference_is_base": 0.0,
        "pass_rate_tolerance": 0.1,
        "ood_score": 0.4,
        "base_ood_score": 0.4,
        "ood_tolerance": 0.1,
    }
    ev.update(kw)
    return ev


def test_decide_accepts_within_tolerance_and_names_each_failure():
    ok = decide(_ev(pass_rate=0.4, ood_score=0.3))  # both exactly at the tolerance: still accepted
    assert ok.accepted and ok.kind is None and ok.eval[ACCEPTED] == 1.0 and "FAILED" not in ok.reason
    pr = decide(_ev(pass_rate=0.375))
    assert not pr.accepted and pr.kind == "pass_rate" and "FAILED held-out pass rate 37.5% vs 50.0% for the parent" in pr.reason
    ood = decide(_ev(ood_score=0.25))
    assert not ood.accepted and ood.kind == "ood" and "FAILED OOD" in ood.reason and ood.eval[ACCEPTED] == 0.0
    both = decide(_ev(pass_rate=0.0, reference_is_base=1.0, ood_score=0.0))
    assert both.kind == "pass_rate_and_ood" and "for the base model" in both.reason
    assert both.kind in metrics.REJECT_REASONS and pr.kind in metrics.REJECT_REASONS
    # Without a reference environment only the OOD check runs, and the reason says so.
    only = decide({k: v for k, v in _ev().items() if k in ("ood_score", "base_ood_score", "ood_tolerance")})
    assert only.accepted and "only the OOD check ran" in only.reason


def test_a_recorded_decision_is_replayed_without_measuring(tmp_path):
    gate = HeldOutGate(LocalStore(tmp_path), load_settings(), backend=None)  # no backend is ever made here
    recorded = decide(_ev(ood_score=0.0))
    again = gate.decision_from_eval(recorded.eval)
    assert again == recorded
    assert gate.decision_from_eval({"pass_rate": 0.5}) is None  # nothing recorded: the gate must run


# --- the real model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gate_settings():
    return load_settings(learner=SETTINGS)


@pytest.fixture(scope="module")
def backend(gate_settings):
    from oel.model.hf_backend import HFBackend

    return HFBackend.from_settings(gate_settings, max_batch_size=8)


@pytest.fixture(scope="module")
def adapters(gate_settings, tmp_path_factory):
    from support.adapters import fresh_adapter, silencing_adapter

    from oel.model.prepare import resolve_model_path

    root = tmp_path_factory.mktemp("adapters")
    path = resolve_model_path(gate_settings)
    return {"sound": fresh_adapter(path, root / "sound"), "damaged": silencing_adapter(path, root / "damaged")}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the module, so the base model's scores are measured once (as in production)."""
    return LocalStore(tmp_path_factory.mktemp("store"))


class PremadeAdapterTrainer:
    """Stands in for the OPCD trainer (see the module docstring): the round's adapter is ``adapter_dir``."""

    def __init__(self, adapter_dir: Path):
        self.adapter_dir = adapter_dir

    def __call__(self, config, prefixes, experience):  # the RoundRunner's trainer_factory signature
        assert prefixes and experience  # the runner did load the namespace's prefixes and KB snapshots
        return self

    def train(self, callback=None):
        from learner.opcd import OPCDResult

        return OPCDResult(steps=[], experience_cuts=[], skipped_prefixes=0, seconds=0.0)

    def save(self, out_dir, result=None, extra=None) -> Path:
        shutil.copytree(self.adapter_dir, out_dir)
        return Path(out_dir)


def _seed_namespace(store, ns: str) -> list[str]:
    """Two stored episodes (the training prefixes) and two KB snapshots; returns the snapshot versions."""
    from oel.episodes import CompletedEpisode, EpisodeStatus
    from oel.kb import ExperienceItem, KBState, append, approx_tokens, write_append
    from oel.schemas import EndPayload, StepPayload

    now = datetime.now(UTC)
    for e in range(2):
        ep = CompletedEpisode(
            namespace=ns,
            episode_id=f"ep{e}",
            agent_id="a",
            model_version="base",
            status=EpisodeStatus.completed,
            steps=[StepPayload(prompt=f"Where is my order #1234{e}?", response="On its way.")],
            end=EndPayload(outcome="done"),
            started_at=now,
            ended_at=now,
        )
        store.put_json(ep.store_key, ep.model_dump(mode="json"))
    state, versions = KBState(namespace=ns), []
    for batch in (range(0, 2), range(2, 4)):
        items = [
            ExperienceItem(
                id=f"i{i}",
                namespace=ns,
                text=f"Start every reply with the greeting ({i}).",
                source_episode_ids=["ep0"],
                extracted_by="base",
                variant="structured",
            )
            for i in batch
        ]
        state, snap, new, _ = append(state, items, episode_ids=["ep0"], budget=512, count=approx_tokens, as_of=now)
        write_append(store, snap, new)
        versions.append(snap.version)
    return versions


def _trigger(ns: str, kb_version: str) -> RoundTrigger:
    return RoundTrigger(ns, round_id(ns, None, kb_version), None, kb_version, (kb_version,), 2)


@pytest.mark.model
@pytest.mark.slow
def test_the_gate_rejects_a_damaged_round_and_accepts_a_sound_one(store, backend, adapters, gate_settings, unique):
    ns = f"house-rules-{unique}"  # names a reference environment: held-out pass rate and OOD are both checked
    kb1, kb2 = _seed_namespace(store, ns)
    published: list[ModelVersion] = []
    registry = ModelRegistry(store, publisher=published.append)
    gate = HeldOutGate(store, gate_settings, backend=backend, registry=registry, ood_prompts=OOD_SUBSET)
    assert gate.env_for(ns) == "house-rules"

    def runner(adapter: Path) -> RoundRunner:
        return RoundRunner(
            store,
            gate_settings,
            registry=registry,
            gate=gate,
            knowledge_gate=None,
            auto_promote=True,
            trainer_factory=PremadeAdapterTrainer(adapter),
        )

    bad = runner(adapters["damaged"]).run(_trigger(ns, kb1))
    assert bad.created and bad.status is VersionStatus.rejected and bad.published is None
    rec = registry.get(ns, bad.record.manifest.version)
    assert rec.status is VersionStatus.rejected and "FAILED OOD instruction-following" in rec.reason
    ev = rec.manifest.eval
    # silenced answers fail nearly every check (an empty answer still "avoids" a forbidden word)
    assert ev[ACCEPTED] == 0.0 and ev["ood_score"] <= 0.15 and ev["base_ood_score"] >= ev["ood_score"] + 0.25
    assert ev["pass_rate"] == 0.0 and ev["reference_is_base"] == 1.0 and ev["eval_episodes"] == 4.0
    assert published == []  # a rejected version is never rolled out
    kind = "pass_rate_and_ood" if ev["reference_pass_rate"] > 0.1 else "ood"
    assert metrics.sample_value("oel_rounds_rejected_total", {"namespace": ns, "reason": kind}) == 1.0
    assert metrics.sample_value("oel_evaluation_ood_score", {"namespace": ns, "model_version": rec.manifest.version}) == ev["ood_score"]
    # A crash right after the manifest is replayed from the decision recorded in it: rejecting again is a no-op.
    replay = runner(adapters["damaged"]).run(_trigger(ns, kb1))
    assert replay.created is False and replay.stages == {}
    assert len(registry.history(ns, rec.manifest.version)) == 1

    good = runner(adapters["sound"]).run(_trigger(ns, kb2))
    assert good.status is VersionStatus.promoted, good.record.reason
    gev = good.record.manifest.eval
    assert gev[ACCEPTED] == 1.0
    # A fresh LoRA computes exactly what the base model does: the same scores as the references.
    assert gev["ood_score"] == gev["base_ood_score"] and gev["pass_rate"] == gev["reference_pass_rate"]
    assert [e.version for e in published] == [good.record.manifest.version]
    assert published[0].eval == gev and "passed the evaluation gate" in good.record.reason
    # Where each round's time went: every stage timed, the gate's evaluations measured, a replay timing nothing.
    assert set(good.stages) == set(STAGES) and good.stages["gate"] > 0 and sum(good.stages.values()) <= good.seconds
    assert metrics.sample_value("oel_round_stage_seconds_count", {"namespace": ns, "stage": "gate"}) == 2.0
    # The base model's scores were measured once and cached, not once per round.
    assert len([k for k in store.list("evals/ood/") if "/base-" in k]) == 1
    assert len([k for k in store.list("evals/policy/") if "/base-" in k]) == 1


@pytest.mark.model
@pytest.mark.slow
def test_without_a_reference_environment_only_the_ood_check_runs(store, backend, adapters, gate_settings, unique):
    from oel.model.prepare import model_hash, resolve_model_path

    ns = f"support-{unique}"
    gate = HeldOutGate(store, gate_settings, backend=backend, ood_prompts=OOD_SUBSET)
    assert gate.env_for(ns) is None
    manifest = VersionManifest(
        namespace=ns,
        version="g0001-x",
        generation=1,
        round_id="x",
        base_model="m",
        base_model_hash=model_hash(resolve_model_path(gate_settings)),
        kb_version="k",
    )
    decision = gate(VersionRecord(manifest=manifest, history=[]), adapters["damaged"])
    assert not decision.accepted and decision.kind == "ood"
    assert "only the OOD check ran" in decision.reason and "pass_rate" not in decision.eval
    assert backend.list_adapters() == []  # the gate unloads what it loaded
