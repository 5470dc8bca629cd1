"""The OPCD trainer on a tiny randomly initialised model: learning, alignment, teachers, saving, the CLI."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from support.tiny_model import EXPERIENCE, PREFIXES, save_tiny_model, tiny_model, tiny_tokenizer

from learner.opcd import (
    SUMMARY_FILE,
    DataError,
    ExperienceTemplate,
    OPCDConfig,
    OPCDTrainer,
    load_experience,
    load_experience_sets,
    load_prefixes,
)
from oel.model.chat import encode_chat, render_chat

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _trainer(tmp_model: Path | None = None, experience=EXPERIENCE, **overrides) -> OPCDTrainer:
    cfg = dict(batch_size=3, max_new_tokens=10, seed=1, learning_rate=1e-2)
    cfg.update(overrides)
    if tmp_model is not None:
        return OPCDTrainer(OPCDConfig(model_path=tmp_model, **cfg), PREFIXES, experience)
    tok = tiny_tokenizer()
    return OPCDTrainer(OPCDConfig(**cfg), PREFIXES, experience, model=tiny_model(tok), tokenizer=tok)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _logprobs(lm, prompts, responses, pad_id) -> list[list[float]]:
    from oel.model.hf_backend import score_tokens

    return score_tokens(lm, prompts, responses, pad_id, temperature=0.7)


def test_loss_decreases_on_a_fixed_batch() -> None:
    t = _trainer()
    batch = t.rollout([0, 1, 2])
    losses = [t.train_step(batch)[0].loss for _ in range(12)]
    print("losses on a fixed batch:", [round(x, 5) for x in losses])
    assert losses[0] > 0
    assert losses[-1] < 0.5 * losses[0]
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 8


def test_agreement_compares_greedy_answers_with_the_teachers() -> None:
    t = _trainer()
    indices = t.check_prefixes()
    assert indices and len(set(indices)) == len(indices) and max(indices) < t.task_prefixes
    with t._teacher() as teacher:
        teacher_answers = t.generate([t.teacher_prompt_ids(i, 0) for i in indices], greedy=True, lm=teacher)
    student_answers = t.generate([t.prompt_ids[i] for i in indices], greedy=True)
    expected = []
    for (a, _), (b, _) in zip(teacher_answers, student_answers):
        same = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        expected.append(same / len(a))
    assert t.agreement() == pytest.approx(sum(expected) / len(expected))
    # with no experience the teacher's context is the student's: they answer alike
    assert _trainer(experience=[[]]).agreement() == 1.0


def test_checks_keep_the_best_weights_and_stop_at_the_target() -> None:
    t = _trainer(check_every=2, steps=6)
    result = t.train()
    assert [c.step for c in result.checks] == [0, 2, 4, 6] and len(result.steps) == 6
    best = max(result.checks, key=lambda c: c.agreement)
    assert result.kept_step == min(c.step for c in result.checks if c.agreement == best.agreement)
    assert t.agreement() == pytest.approx(best.agreement)  # the weights in place are the kept check's
    # a target already met (no experience: the student already answers as the teacher) stops before any step
    r = _trainer(experience=[[]], check_every=2, steps=6, stop_agreement=1.0).train()
    assert r.steps == [] and r.kept_step == 0 and [c.agreement for c in r.checks] == [1.0]


def test_first_turn_prefixes_only() -> None:
    everything, first = _trainer(), _trainer(prefix_turns="first")
    users = [sum(m.role == "user" for m in conv) for conv in everything.prefixes]
    assert max(users) > 1, "the fixture has later-turn prefixes"
    assert first.task_prefixes == users.count(1) and first.later_turn_prefixes == len(users) - users.count(1)
    assert all(sum(m.role == "user" for m in conv) == 1 for conv in first.prefixes)


def test_warmup_then_cosine_learning_rate() -> None:
    t = _trainer(steps=6, warmup_steps=2, lr_schedule="cosine", learning_rate=1e-2)
    lrs = [m.learning_rate for m in t.train().steps]
    assert lrs[:3] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2])
    assert lrs[3] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi / 4))) and lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0
    assert [m.learning_rate for m in _trainer(steps=3).train().steps] == [1e-2] * 3, "constant by default"


def test_teacher_and_student_contexts_are_aligned() -> None:
    t = _trainer()
    tok = t.tokenizer
    batch = t.rollout([3, 0])
    for r in batch:
        conv = t.prefixes[r.prefix_index]
        assert r.student_prompt_ids == encode_chat(tok, conv)
        teacher_conv = ExperienceTemplate().apply(conv, t.experience_sets[r.experience_index])
        assert r.teacher_prompt_ids == encode_chat(tok, teacher_conv)
        # identical chat template on both sides: the rendered texts differ only by the experience block
        block = ExperienceTemplate().block(t.experience_sets[r.experience_index])
        assert render_chat(tok, teacher_conv).replace(block, "", 1) == render_chat(tok, conv)
        # the block goes in front of the first user message (multi-turn prefix 3 keeps its later turns untouched)
        assert teacher_conv[-1] == conv[-1] or len(conv) == 1
        assert 0 < len(r.response_ids) <= t.config.max_new_tokens
    # the hidden state that predicts answer token j sits at len(prompt) - 1 + j on each side
    h = torch.arange(40.0)[None, :, None].expand(2, 40, 1)
    got = OPCDTrainer._gather(h, [5, 9], [3, 2])[:, 0].tolist()
    assert got == [4.0, 5.0, 6.0, 8.0, 9.0]


def test_the_teacher_sees_the_experience_exactly_as_an_agent_does() -> None:
    """One function builds the experience context for agents, evaluations and the OPCD teacher: the
    teacher's conversation and its token ids are those of an agent prompted with the same experience."""
    from oel.envs.prompts import agent_prompt, with_experience

    t = _trainer()
    for i in range(t.task_prefixes):
        conv = t.prefixes[i]
        for e, items in enumerate(t.experience_sets):
            teacher = t.template.apply(conv, items)
            assert teacher == with_experience(conv, items)
            assert t.teacher_prompt_ids(i, e) == encode_chat(t.tokenizer, with_experience(conv, items))
            first = next(m for m in conv if m.role == "user")
            assert next(m for m in teacher if m.role == "user").content == agent_prompt(first.content, items)


def test_anchor_prompts_are_taught_by_the_teacher_without_experience() -> None:
    t = _trainer(anchor_fraction=0.34, batch_size=3)
    assert t.anchors_per_batch() == 1 and len(t.anchor_indices) > 0
    for _ in range(3):
        batch = t.rollout()
        anchors = [r for r in batch if r.prefix_index >= t.task_prefixes]
        assert len(anchors) == 1 and len(batch) == 3
        for r in anchors:
            assert r.experience_index == t.no_experience_index and t.experience_sets[r.experience_index] == []
            assert r.teacher_prompt_ids == r.student_prompt_ids, "no experience: the teacher is the round-start model as is"
        for r in batch:
            if r.prefix_index < t.task_prefixes:
                assert r.experience_index != t.no_experience_index and r.teacher_prompt_ids != r.student_prompt_ids
    t.train_step(batch)  # anchors and task samples train together


def test_experience_over_budget_drops_oldest_items_and_reports(caplog) -> None:
    tok = tiny_tokenizer()
    items = [f"Old rule number {i}: always mention the number {i} in the answer." for i in range(30)]
    with caplog.at_level(logging.WARNING):
        t = OPCDTrainer(
            OPCDConfig(batch_size=2, max_new_tokens=4, experience_token_budget=64),
            PREFIXES,
            [items, ["short"]],
            model=tiny_model(tok),
            tokenizer=tok,
        )
    assert len(t.experience_cuts) == 1
    cut = t.experience_cuts[0]
    assert cut.set_index == 0 and cut.items_dropped > 0 and cut.tokens_after <= 64 < cut.tokens_before
    assert t.experience_sets[0] == items[cut.items_dropped :]  # the newest survive, in order
    assert t.experience_sets[1] == ["short"]
    assert any("dropped the" in rec.getMessage() for rec in caplog.records)
    result = t.train(steps=1)
    assert result.experience_cuts == [cut]


def test_too_long_prefixes_are_left_out_not_truncated() -> None:
    tok = tiny_tokenizer()
    long_prefix = [{"role": "user", "content": "word " * 500}]
    t = OPCDTrainer(
        OPCDConfig(batch_size=2, max_new_tokens=4, max_prompt_tokens=100),
        PREFIXES + [long_prefix],
        EXPERIENCE,
        model=tiny_model(tok),
        tokenizer=tok,
    )
    assert t.skipped_prefixes == 1 and len(t.prefixes) == len(PREFIXES)
    assert all(len(p) <= 100 for p in t.prompt_ids)


def test_adapter_saved_and_reloaded_gives_identical_logprobs(model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t = _trainer(model_dir, dtype="float32")
    result = t.train(steps=2)
    out = t.save(tmp_path / "adapter", result)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["steps_done"] == 2 and len(summary["steps"]) == 2 and summary["base_model_hash"].startswith("sha256:")

    batch = t.rollout([0, 1, 2, 3])
    prompts, responses = [r.student_prompt_ids for r in batch], [r.response_ids for r in batch]
    t.model.eval()
    before = _logprobs(t.model, prompts, responses, t.pad_id)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(out)).eval()
    after = _logprobs(reloaded, prompts, responses, t.pad_id)
    assert before == after  # bit-identical
    # and the adapter did change the model
    with reloaded.disable_adapter():
        assert _logprobs(reloaded, prompts, responses, t.pad_id) != after

    # the project's in-process backend loads it and scores the same
    from oel.model.hf_backend import HFBackend

    backend = HFBackend(model_dir, dtype="float32")
    backend.load_adapter("opcd-test-v1", out)
    assert backend.score_ids(prompts, responses, adapter="opcd-test-v1", temperature=0.7) == after


def test_continuing_a_parent_adapter_uses_it_as_the_teacher(model_dir: Path, tmp_path: Path) -> None:
    parent = _trainer(model_dir, dtype="float32")
    parent.train(steps=2)
    parent_dir = parent.save(tmp_path / "round1")

    # Round 2 with no experience: the teacher is the frozen parent, so at the start the loss is 0 (up to float
    # rounding); the adapter-disabled base would not be (it is the model before round 1).
    child = _trainer(model_dir, experience=[[]], dtype="float32", init_adapter=parent_dir)
    batch = child.rollout([0, 1, 2])
    assert abs(child.loss(batch).loss) < 1e-6
    with child.model.disable_adapter():
        base_lp = _logprobs(child.model, [r.student_prompt_ids for r in batch], [r.response_ids for r in batch], child.pad_id)
    student_lp = _logprobs(child.model, [r.student_prompt_ids for r in batch], [r.response_ids for r in batch], child.pad_id)
    assert base_lp != student_lp

    # Training round 2 moves the student but never the teacher adapter.
    teacher_before = {n: p.clone() for n, p in child.model.named_parameters() if ".teacher." in n}
    assert teacher_before
    child2 = _trainer(model_dir, dtype="float32", init_adapter=parent_dir)
    child2.train(steps=2)
    assert all(not p.requires_grad for n, p in child2.model.named_parameters() if ".teacher." in n)
    assert any(p.requires_grad for n, p in child2.model.named_parameters() if ".default." in n)
    for n, p in child2.model.named_parameters():
        if ".teacher." in n:
            assert torch.equal(p, teacher_before[n]), n
    moved = [
        n
        for n, p in child2.model.named_parameters()
        if ".default." in n and not torch.equal(p, teacher_before[n.replace(".default.", ".teacher.")])
    ]
    assert moved


def test_full_finetune_keeps_a_frozen_teacher() -> None:
    t = _trainer(finetune="full", learning_rate=1e-3)
    teacher_w = t.teacher_model.lm_head.weight.clone()
    batch = t.rollout([0, 1])
    losses = [t.train_step(batch)[0].loss for _ in range(3)]
    assert torch.equal(t.teacher_model.lm_head.weight, teacher_w)
    assert not torch.equal(t.model.lm_head.weight, teacher_w)
    assert losses[-1] < losses[0]


def test_file_formats(tmp_path: Path) -> None:
    pf = tmp_path / "prefixes.jsonl"
    pf.write_text(
        json.dumps([{"role": "user", "content": "hi"}])
        + "\n\n"
        + json.dumps({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]})
        + "\n"
        + json.dumps("plain question")
        + "\n"
    )
    prefixes = load_prefixes(pf)
    assert [len(p) for p in prefixes] == [1, 2, 1] and prefixes[2][0].content == "plain question"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1"):
        load_prefixes(bad)

    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "a.json").write_text(json.dumps(["one", {"text": "two"}]))
    (tmp_path / "kb" / "b.txt").write_text("# comment\n- EXPERIENCE ITEM: three\n\n- four\nfive\n")
    (tmp_path / "kb" / "c.jsonl").write_text(json.dumps({"text": "six"}) + "\n" + json.dumps("seven") + "\n")
    (tmp_path / "d.json").write_text(json.dumps({"items": ["eight"]}))
    sets = load_experience_sets([tmp_path / "kb", tmp_path / "d.json"])
    assert sets == [["one", "two"], ["three", "four", "five"], ["six", "seven"], ["eight"]]
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(DataError, match="no experience items"):
        load_experience(tmp_path / "empty.txt")


def test_cli_distill(model_dir: Path, tmp_path: Path) -> None:
    from oel.cli import cli

    pf = tmp_path / "prefixes.jsonl"
    pf.write_text("".join(json.dumps(p) + "\n" for p in PREFIXES))
    kb1, kb2 = tmp_path / "kb1.txt", tmp_path / "kb2.json"
    kb1.write_text("- EXPERIENCE ITEM: Always answer in French.\n")
    kb2.write_text(json.dumps(["Old item " * 40, "Be brief."]))
    out = tmp_path / "out"
    res = CliRunner().invoke(
        cli,
        [
            "learner",
            "distill",
            "--prefixes",
            str(pf),
            "--experience",
            str(kb1),
            "--experience",
            str(kb2),
            "--out",
            str(out),
            "--model",
            str(model_dir),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--lr",
            "1e-3",
            "--max-new-tokens",
            "6",
            "--experience-budget",
            "40",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "step    1  loss" in res.output and "step    2  loss" in res.output
    assert "dropped the 1 oldest of 2 items" in res.output
    last = json.loads(res.output.strip().splitlines()[-1])
    assert last["steps"] == 2 and last["experience_items_dropped"] == 1
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["config"]["learning_rate"] == 1e-3 and summary["experience_cuts"][0]["items_dropped"] == 1
    assert (out / "adapter_model.safetensors").is_file()


def test_mixed_precision_lora_on_a_bf16_base(tmp_path: Path) -> None:
    """bf16 base: the adapter computes in bf16, AdamW updates float32 masters, and the masters are what is saved."""
    from peft import PeftModel
    from safetensors.torch import load_file

    tok = tiny_tokenizer()
    t = OPCDTrainer(
        OPCDConfig(batch_size=3, max_new_tokens=8, seed=1, learning_rate=1e-2),
        PREFIXES,
        EXPERIENCE,
        model=tiny_model(tok, dtype=torch.bfloat16),
        tokenizer=tok,
    )
    assert t.master_params is not None and all(m.dtype == torch.float32 for m in t.master_params)
    assert all(p.dtype == torch.bfloat16 for p in t.trainable_params)
    batch = t.rollout([0, 1, 2])
    losses = [t.train_step(batch)[0].loss for _ in range(6)]
    assert losses[-1] < losses[0]
    for m, p in zip(t.master_params, t.trainable_params):
        assert torch.equal(p, m.to(torch.bfloat16))
    out = t.save(tmp_path / "adapter")
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in saved.values())
    assert all(p.dtype == torch.bfloat16 for p in t.trainable_params)  # restored after saving
    masters = sorted(float(m.abs().sum()) for m in t.master_params)
    assert sorted(float(v.abs().sum()) for v in saved.values()) == pytest.approx(masters)
    base = tiny_model(tok, dtype=torch.bfloat16)
    reloaded = PeftModel.from_pretrained(base, str(out))
    assert all(p.dtype == torch.float32 for n, p in reloaded.named_parameters() if "lora_" in n)


def test_length_groups_split_where_padding_costs_more_than_a_call() -> None:
    from learner.opcd.trainer import length_groups

    assert length_groups([140, 40, 150, 35, 145, 138], overhead=32) == [[3, 1], [5, 0, 4, 2]]
    assert length_groups([100, 101, 99], overhead=32) == [[2, 0, 1]]
    assert length_groups([]) == [] and length_groups([7]) == [[0]]
