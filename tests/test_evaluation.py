"""Held-out evaluation, the OOD instruction-following checks and `oel eval` (real default model, LocalStore)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from click.testing import CliRunner

from evaluation.evaluator import EvalCache, EvalSpec, Evaluator, env_for_namespace, evaluate_policy
from evaluation.ood import OOD_MAX_NEW_TOKENS, OOD_PROMPTS, check_response, prompts_fingerprint
from oel.rollout import ActionMode
from oel.settings import load_settings
from oel.store import LocalStore

PROMPTS = {p.id: p for p in OOD_PROMPTS}


# --- the OOD checks on hand-written answers ----------------------------------------------------------

GOOD_AND_BAD = {
    "lowercase-beach": ("the sun is warm and the sea is calm. children build castles in the sand.", "The sun is warm and the sea is calm."),
    # (the IFEval case checkers also ask langdetect for English, which misreads short all-caps lists)
    "capital-fruits": (
        "THE THREE FRUITS ARE APPLES, BANANAS AND ORANGES. THEY ARE HEALTHY BECAUSE THEY ARE RICH IN THE VITAMINS THAT YOUR BODY NEEDS.",
        "The three fruits are apples, bananas and oranges.",
    ),
    "no-comma-rainbow": ("A rainbow is light split into its colours by drops of rain.", "A rainbow is light, split into colours, by rain."),
    "keywords-note": ("I worked in the garden and listened to music all Sunday.", "I worked in the garden all Sunday."),
    "forbidden-cat": ("A cat is a quiet hunter with soft paws and green eyes.", "A cat is a pet with soft fur."),
    "frequency-sea": ("Wave after wave the sea sings; each wave a song.", "The sea is blue and deep."),
    "repeat-france": ("What is the capital of France? The capital of France is Paris.", "The capital of France is Paris."),
    "title-robot": ("<<The Kind Robot>>\nOnce upon a time a robot learned to paint.", "Once upon a time a robot learned to paint."),
    "constrained-sun": ("My answer is yes.", "Yes, the sun is a star."),
    "french-weather": (
        "Aujourd'hui il fait beau et le soleil brille sur toute la ville.",
        "Today the weather is sunny and warm in the whole city.",
    ),
    "placeholders-letter": ("Join us at [address] on [date] for cake!", "Join us at the park on Sunday for cake!"),
    "short-sky": (
        "Sunlight scatters off air molecules, and blue light scatters most.",
        " ".join(["Blue light is scattered by the air much more than red light is."] * 3),
    ),
    "letter-zebra": ("Zebras zigzag past the zoo gate.", "Striped horses walk past the gate."),
    "postscript-thanks": ("Thank you for the flowers!\nP.S. The cake was lovely.", "Thank you for the flowers!"),
}


@pytest.mark.parametrize("prompt_id", sorted(GOOD_AND_BAD))
def test_ood_checks_pass_good_answers_and_fail_bad_ones(prompt_id):
    good, bad = GOOD_AND_BAD[prompt_id]
    assert check_response(PROMPTS[prompt_id], good).loose, good
    assert check_response(PROMPTS[prompt_id], good).strict, good
    assert not check_response(PROMPTS[prompt_id], bad).loose, bad


def test_the_ood_prompt_set_is_well_formed():
    assert 16 <= len(OOD_PROMPTS) <= 24 and len(PROMPTS) == len(OOD_PROMPTS)
    for p in OOD_PROMPTS:
        # every instruction is one of if-verifiable's IFEval checkers, and an empty answer follows none of them
        check = check_response(p, "")
        assert not check.loose and not check.strict
    assert set(GOOD_AND_BAD) >= {p.id for p in OOD_PROMPTS} - {
        "lowercase-coffee",
        "no-comma-haiku",
        "keyword-bees",
        "keyword-train",
        "forbidden-school",
        "repeat-moon",
    }
    fp = prompts_fingerprint()
    assert fp == prompts_fingerprint(OOD_PROMPTS, OOD_MAX_NEW_TOKENS)
    assert fp != prompts_fingerprint(OOD_PROMPTS, OOD_MAX_NEW_TOKENS + 1) != prompts_fingerprint(OOD_PROMPTS[:-1])


# --- specs and the environment of a namespace ---------------------------------------------------------


def test_eval_spec_modes_fingerprints_and_settings():
    assert EvalSpec("house-rules").resolved_mode() is ActionMode.free
    assert EvalSpec("frozenlake").resolved_mode() is ActionMode.choice
    assert EvalSpec("frozenlake", mode=ActionMode.short).resolved_mode() is ActionMode.short
    with pytest.raises(ValueError, match="unknown environment"):
        EvalSpec("chess")
    spec = EvalSpec("house-rules", episodes=4)
    assert spec.fingerprint() == EvalSpec("house-rules", episodes=4, batch_size=2).fingerprint()  # batching changes nothing
    assert spec.fingerprint() != spec.fingerprint(["Greet first."]) != EvalSpec("house-rules", episodes=5).fingerprint()
    s = load_settings(learner={"eval_episodes": 7, "eval_mode": "short", "eval_max_new_tokens": 9})
    from_s = EvalSpec.from_settings(s, "sokoban")
    assert (from_s.episodes, from_s.mode, from_s.max_new_tokens) == (7, ActionMode.short, 9)


def test_which_environment_a_namespace_is_evaluated_on():
    assert env_for_namespace("house-rules") == "house-rules"
    assert env_for_namespace("frozenlake-qwen3") == "frozenlake"
    assert env_for_namespace("sokobanish") is None and env_for_namespace("support") is None
    assert env_for_namespace("support", load_settings(learner={"eval_env": "sokoban"})) == "sokoban"
    assert env_for_namespace("house-rules", load_settings(learner={"eval_env": "none"})) is None


# --- the real model -----------------------------------------------------------------------------------------

FAST = {"eval_max_new_tokens": 12, "eval_episodes": 2, "ood_max_new_tokens": 8}


@pytest.fixture(scope="module")
def backend():
    from oel.model.hf_backend import HFBackend

    return HFBackend.from_settings(load_settings(), max_batch_size=8)


@pytest.mark.model
def test_evaluate_policy_plays_the_held_out_seeds_and_the_cache_keeps_the_result(backend, tmp_path):
    spec = EvalSpec("house-rules", episodes=2, max_new_tokens=16)
    store = LocalStore(tmp_path)
    first = Evaluator(store, backend).policy_of(spec, "house-rules", None, "sha256:abc")  # base model, measured
    assert first["n_episodes"] == 2 and first["adapter"] is None and not first["with_experience"]
    assert 0 < first["mean_response_tokens"] <= 16 and 0.0 <= first["pass_rate"] <= 1.0
    assert first["valid_action_rate"] == 1.0 and first["mean_turns"] >= 1
    assert EvalCache(store).get("policy", spec.fingerprint(), "base-abc") == first
    calls = []  # asked again, the result comes from the cache: the backend factory is never called
    assert Evaluator(store, lambda: calls.append(1)).policy_of(spec, "house-rules", None, "sha256:abc") == first
    assert calls == []

    exp = ['Every reply must start with "Hello from Acme!".']
    result = evaluate_policy(backend, spec, experience=exp)
    assert result.with_experience and [e.seed for e in result.episodes] == [1_000_000, 1_000_001]  # held-out seeds
    assert exp[0] in result.episodes[0].first_prompt
    assert result.summary()["n_episodes"] == 2 and spec.fingerprint(exp) != spec.fingerprint()


def _kb_snapshot(store, ns: str, items: list[str], state=None):
    from oel.kb import ExperienceItem, KBState, append, approx_tokens, write_append

    now = datetime.now(UTC)
    state = state or KBState(namespace=ns)
    new = [
        ExperienceItem(
            id=f"i{len(state.all_ids) + k}", namespace=ns, text=t, source_episode_ids=["ep"], extracted_by="base", variant="structured"
        )
        for k, t in enumerate(items)
    ]
    state, snap, added, _ = append(state, new, episode_ids=["ep"], budget=512, count=approx_tokens, as_of=now)
    write_append(store, snap, added)
    return state, snap.version


@pytest.mark.model
def test_oel_eval_writes_the_table_as_markdown_and_png(tmp_path, monkeypatch):
    from support.adapters import fresh_adapter

    from learner.policy import round_id
    from learner.versions import ModelRegistry, VersionManifest
    from oel.cli import cli
    from oel.model.prepare import model_hash, resolve_model_path

    store_dir, out_dir, ns = tmp_path / "store", tmp_path / "out", "house-rules"
    store = LocalStore(store_dir)
    model = resolve_model_path(load_settings())
    adapter = fresh_adapter(model, tmp_path / "adapter")
    registry = ModelRegistry(store)
    state, kb1 = _kb_snapshot(store, ns, ['Every reply must start with "Hello from Acme!".'])
    _, kb2 = _kb_snapshot(store, ns, ["Thank the customer first."], state)
    parent = None
    for gen, kb in ((1, kb1), (2, kb2)):
        rid = round_id(ns, parent, kb)
        m = VersionManifest(
            namespace=ns,
            version=f"g{gen:04d}-{rid}",
            generation=gen,
            round_id=rid,
            base_model=model.name,
            base_model_hash=model_hash(model),
            parent_version=parent,
            kb_version=kb,
            kb_versions=[kb],
        )
        registry.save_version(m, adapter)
        parent = m.version
    for key, value in FAST.items():
        monkeypatch.setenv(f"OEL_LEARNER__{key.upper()}", str(value))
    res = CliRunner().invoke(cli, ["eval", "--namespace", ns, "--store-dir", str(store_dir), "--out-dir", str(out_dir), "--ood"])
    assert res.exit_code == 0, res.output
    md = (out_dir / f"eval-{ns}.md").read_text()
    assert md in res.output
    rows = [line for line in md.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2 and "g0001-" in rows[0] and f"{kb1} (1)" in rows[0] and f"{kb2} (2)" in rows[1]
    assert all(line.count("/2)") == 3 for line in rows)  # three conditions, 2 episodes each
    assert (out_dir / f"eval-{ns}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Round 2 starts from round 1's weights: its "none" cell is round 1's "consolidated" (one cached result).
    import json

    table = json.loads((out_dir / f"eval-{ns}.json").read_text())
    r1, r2 = table["rows"]
    assert r2["none"] == r1["consolidated"] and r2["parent"] == r1["version"]
    # --ood: each version's instruction-following score; a fresh LoRA scores what the base model does.
    assert "| OOD |" in md and table["base_ood"] is not None and r1["ood"] == r2["ood"] == table["base_ood"]
    # A namespace that names no environment needs --env.
    bad = CliRunner().invoke(cli, ["eval", "--namespace", "support", "--store-dir", str(store_dir)])
    assert bad.exit_code != 0 and "--env" in bad.output
