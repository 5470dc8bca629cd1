"""The in-process transformers + peft backend, on the real default model (short outputs, small batches)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from oel.model.backend import AdapterNameTaken, BackendError, SamplingParams
from oel.model.chat import encode_chat, render_chat
from oel.model.hf_backend import HFBackend, score_tokens
from oel.model.prepare import resolve_model_path
from oel.schemas import ChatMessage

pytestmark = [pytest.mark.model]

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)


def conv(text: str, system: str | None = None) -> list[ChatMessage]:
    msgs = [ChatMessage(role="system", content=system)] if system else []
    return msgs + [ChatMessage(role="user", content=text)]


# prompts of clearly different lengths, so a batch needs real left padding
PROMPTS = [
    conv("2+2=?"),
    conv("What is the capital of France?"),
    conv("Write one short sentence about the sea in winter, with a calm and quiet tone.", system="You are terse."),
    conv("Name three colors."),
]


@pytest.fixture(scope="module")
def model_path(settings) -> Path:
    return resolve_model_path(settings)


@pytest.fixture(scope="module")
def backend(model_path: Path) -> HFBackend:
    b = HFBackend(model_path, max_batch_size=4)
    yield b
    b.close()


@pytest.fixture(scope="module")
def adapters(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two tiny random LoRA adapters (init_lora_weights=False, so they change the model), saved to disk,
    and the log-probs adapter A gave in memory before it was saved."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("adapters")
    tok = AutoTokenizer.from_pretrained(str(model_path))
    base = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.bfloat16).eval()
    torch.manual_seed(1)
    peft_a = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_a.eval()
    prompt_ids = [encode_chat(tok, c) for c in PROMPTS[:3]]
    response_ids = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in ("Four.", "Paris is.", "Cold waves.")]
    in_memory = score_tokens(peft_a, prompt_ids, response_ids, pad_id=tok.pad_token_id)
    peft_a.save_pretrained(str(root / "a"))
    base = peft_a.unload()  # back to the plain base model, no LoRA layers
    torch.manual_seed(2)
    peft_b = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["o_proj", "down_proj"], init_lora_weights=False))
    peft_b.save_pretrained(str(root / "b"))
    return {"a": root / "a", "b": root / "b", "prompt_ids": prompt_ids, "response_ids": response_ids, "a_in_memory": in_memory}


def _ids(gens) -> list[list[int]]:
    return [g.response_token_ids for g in gens]


def test_batched_greedy_equals_one_by_one(model_path: Path) -> None:
    """Left padding is exact: in float32 a padded batch decodes token for token like each prompt alone.

    (In bfloat16 the CPU kernels round differently for different batch shapes, so near-ties can flip;
    the next test bounds that difference instead.)"""
    fp32 = HFBackend(model_path, dtype="float32", max_batch_size=4)
    try:
        batched = fp32.generate(PROMPTS, GREEDY)
        single = [fp32.generate([c], GREEDY)[0] for c in PROMPTS]
    finally:
        fp32.close()
    assert _ids(batched) == _ids(single), "left padding changed greedy outputs"
    assert [g.text for g in batched] == [g.text for g in single]
    assert len({len(g.prompt_token_ids) for g in batched}) == len(PROMPTS), "prompts should differ in length"


def test_batched_bf16_log_probs_match_one_by_one(backend: HFBackend) -> None:
    """In bfloat16, a padded batch scores the same tokens like each row alone, up to bf16 rounding
    (logits near 20 are spaced 0.125 apart); a padding or position bug would be off by whole nats."""
    gens = backend.generate(PROMPTS, GREEDY)
    batched = backend.score(PROMPTS, _ids(gens))
    single = [backend.score([c], [g.response_token_ids])[0] for c, g in zip(PROMPTS, gens)]
    diffs = [abs(a - b) for row_b, row_s in zip(batched, single) for a, b in zip(row_b, row_s)]
    assert len(diffs) == sum(g.response_tokens for g in gens)
    assert max(diffs) < 0.5 and sum(diffs) / len(diffs) < 0.1, f"max {max(diffs):.3f}, mean {sum(diffs) / len(diffs):.3f}"


def test_tokens_are_exact_and_decode_to_the_text(backend: HFBackend) -> None:
    gens = backend.generate(PROMPTS[:2], SamplingParams(max_new_tokens=16, temperature=0.0))
    for c, g in zip(PROMPTS, gens):
        assert g.prompt_token_ids == encode_chat(backend.tokenizer, c)
        assert backend.tokenizer.decode(g.prompt_token_ids) == render_chat(backend.tokenizer, c)
        assert g.text == backend.tokenizer.decode(g.response_token_ids, skip_special_tokens=True)
        assert g.text.strip(), "the model should answer something"
        assert g.prompt_tokens == len(g.prompt_token_ids) and g.response_tokens == len(g.response_token_ids)
        if g.finish_reason == "stop":
            assert g.response_token_ids[-1] == backend.tokenizer.eos_token_id
            assert backend.tokenizer.eos_token_id not in g.response_token_ids[:-1]
        else:
            assert g.finish_reason == "length" and g.response_tokens == 16
    # the capital question is answered in full and ends with <|im_end|>
    assert "Paris" in gens[1].text and gens[1].finish_reason == "stop"


def test_stop_strings_and_length(backend: HFBackend) -> None:
    full = backend.generate([PROMPTS[1]], SamplingParams(max_new_tokens=16, temperature=0.0))[0]
    assert "Paris" in full.text
    cut = backend.generate([PROMPTS[1]], SamplingParams(max_new_tokens=16, temperature=0.0, stop=("Paris",)))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index("Paris")]
    assert "Paris" in backend.tokenizer.decode(cut.response_token_ids), "the ids include the tokens that completed the stop string"
    assert cut.response_token_ids == full.response_token_ids[: len(cut.response_token_ids)]
    short = backend.generate([PROMPTS[2]], SamplingParams(max_new_tokens=3, temperature=0.0))[0]
    assert short.finish_reason == "length" and short.response_tokens == 3


def test_seeded_sampling_is_reproducible(backend: HFBackend) -> None:
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7)
    first = backend.generate(PROMPTS[:2], params)
    again = backend.generate(PROMPTS[:2], params)
    other = backend.generate(PROMPTS[:2], SamplingParams(max_new_tokens=8, temperature=1.0, seed=8))
    assert _ids(first) == _ids(again)
    assert _ids(first) != _ids(other)
    # row i uses seed + i whatever the batch: the second row alone, with seed 8, repeats the batched row 1
    alone = backend.generate([PROMPTS[1]], SamplingParams(max_new_tokens=8, temperature=1.0, seed=8))[0]
    assert alone.response_token_ids[:2] == first[1].response_token_ids[:2]


def test_two_adapters_differ_and_the_base_is_untouched(backend: HFBackend, adapters: dict) -> None:
    prompts = PROMPTS[:2]
    base_before = backend.generate(prompts, GREEDY)
    backend.load_adapter("t/a@1", adapters["a"])
    backend.load_adapter("t/b@1", adapters["b"])
    assert backend.list_adapters() == ["t/a@1", "t/b@1"]
    out_a = backend.generate(prompts, GREEDY, adapter="t/a@1")
    out_b = backend.generate(prompts, GREEDY, adapter="t/b@1")
    base_after = backend.generate(prompts, GREEDY)
    assert _ids(base_after) == _ids(base_before), "loading adapters changed the base model"
    assert _ids(out_a) != _ids(base_before) and _ids(out_b) != _ids(base_before) and _ids(out_a) != _ids(out_b)
    assert all(g.adapter == "t/a@1" for g in out_a) and all(g.adapter is None for g in base_after)
    # per batch selection: switching back and forth gives the same answers
    assert _ids(backend.generate(prompts, GREEDY, adapter="t/a@1")) == _ids(out_a)
    # log-probs differ too, and the base's log-probs are the same as with no adapter resident
    ids = _ids(base_before)
    lp_base = backend.score(prompts, ids)
    lp_a = backend.score(prompts, ids, adapter="t/a@1")
    assert lp_base != lp_a
    backend.unload_adapter("t/b@1")
    assert backend.list_adapters() == ["t/a@1"]
    with pytest.raises(BackendError, match="unknown adapter"):
        backend.generate(prompts, GREEDY, adapter="t/b@1")
    assert _ids(backend.generate(prompts, GREEDY, adapter="t/a@1")) == _ids(out_a), "unloading b changed a"
    backend.unload_adapter("t/a@1")
    assert backend.list_adapters() == []
    assert _ids(backend.generate(prompts, GREEDY)) == _ids(base_before)


def test_adapter_names_are_immutable(backend: HFBackend, adapters: dict, tmp_path: Path) -> None:
    backend.load_adapter("imm@1", adapters["a"])
    try:
        backend.load_adapter("imm@1", adapters["a"])  # same name, same folder: no-op
        with pytest.raises(AdapterNameTaken, match="imm@1"):
            backend.load_adapter("imm@1", adapters["b"])
        copy = tmp_path / "a-copy"
        shutil.copytree(adapters["a"], copy)
        with pytest.raises(AdapterNameTaken):
            backend.load_adapter("imm@1", copy)  # even identical bytes: a name means one folder
        assert backend.list_adapters() == ["imm@1"]
        assert backend.adapter_info("imm@1").path == Path(adapters["a"]).resolve()
    finally:
        backend.unload_adapter("imm@1")


def _tiny_adapter(root: Path, config, target_modules: list[str]) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=target_modules, init_lora_weights=False))
    peft_model.save_pretrained(str(root))
    return root


def test_mismatched_adapters_are_refused_clearly(backend: HFBackend, tmp_path: Path) -> None:
    from transformers import GPT2Config, LlamaConfig

    before = backend.generate(PROMPTS[:1], GREEDY)
    narrow = _tiny_adapter(
        tmp_path / "narrow",
        LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, vocab_size=256
        ),
        ["q_proj", "v_proj"],
    )
    with pytest.raises(BackendError, match=r"does not match the base model.*in_features is 576 in the base model but 64"):
        backend.load_adapter("narrow@1", narrow)
    gpt2 = _tiny_adapter(tmp_path / "gpt2", GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=256), ["c_attn"])
    with pytest.raises(BackendError, match=r"targets transformer\.h\.0\.attn\.c_attn, which the base model does not have"):
        backend.load_adapter("gpt2@1", gpt2)
    with pytest.raises(BackendError, match="not a PEFT adapter folder"):
        backend.load_adapter("empty@1", tmp_path)
    assert backend.list_adapters() == []
    assert _ids(backend.generate(PROMPTS[:1], GREEDY)) == _ids(before)


def test_saved_adapter_reloads_with_identical_logprobs(backend: HFBackend, adapters: dict, tmp_path: Path) -> None:
    backend.load_adapter("lp/a@1", adapters["a"])
    copy = tmp_path / "a-again"
    shutil.copytree(adapters["a"], copy)
    backend.load_adapter("lp/a@2", copy)
    try:
        served = backend.score_ids(adapters["prompt_ids"], adapters["response_ids"], adapter="lp/a@1")
        assert served == adapters["a_in_memory"], "the saved adapter scores differently from the one in memory"
        assert backend.score_ids(adapters["prompt_ids"], adapters["response_ids"], adapter="lp/a@2") == served
        base = backend.score_ids(adapters["prompt_ids"], adapters["response_ids"])
        assert base != served
        assert all(len(s) == len(r) for s, r in zip(served, adapters["response_ids"]))
        assert all(v <= 0.0 for row in served for v in row)
    finally:
        backend.unload_adapter("lp/a@1")
        backend.unload_adapter("lp/a@2")


def test_score_is_aligned_with_generation(backend: HFBackend) -> None:
    """score() equals an independent full-sequence log-softmax at the response positions, and every
    greedily generated token is that distribution's argmax, up to bf16 rounding (a one-position
    misalignment would be off by whole nats)."""
    gens = backend.generate(PROMPTS[:2], GREEDY)
    logps = backend.score(PROMPTS[:2], _ids(gens))
    for g, lp in zip(gens, logps):
        assert len(lp) == g.response_tokens
        with torch.inference_mode():
            logits = backend.model(input_ids=torch.tensor([g.prompt_token_ids + g.response_token_ids])).logits[0].float()
        ref = torch.log_softmax(logits, -1)[len(g.prompt_token_ids) - 1 : -1]
        chosen = ref[torch.arange(g.response_tokens), torch.tensor(g.response_token_ids)]
        assert torch.allclose(torch.tensor(lp), chosen, atol=0.3), (lp, chosen.tolist())
        gap = (ref.max(-1).values - chosen).max().item()
        assert gap <= 0.3, f"a greedy token was {gap:.3f} nats below the best token"


def test_the_tokenizer_only_counter_counts_as_the_model_does(backend: HFBackend, settings) -> None:
    """The grounded processor counts KB tokens without loading the model: the same counts, so KB budgets match."""
    from oel.model.factory import model_token_counter, token_counter

    texts = ["Greet the customer with 'Hello from Acme!'.", "Quote the order number (#4411) — always.", "  ", "日本語とemoji 🙂"]
    fast, full = model_token_counter(settings), token_counter(backend)
    assert [fast(t) for t in texts] == [full(t) for t in texts]


def test_merged_adapters_answer_as_peft_does_and_leave_the_base_alone(model_path: Path, adapters: dict) -> None:
    """With merging on (float32's default) an adapter generates merged into a copy of the weights: the same greedy
    answers as peft's unmerged LoRA; the base model and the other adapter are untouched, and unloading drops the
    merged copy."""
    fp32 = HFBackend(model_path, dtype="float32", max_batch_size=4)
    try:
        assert fp32.merge_adapters, "float32 weights merge by default"
        base_before = fp32.generate(PROMPTS, GREEDY)
        fp32.load_adapter("m/a@1", adapters["a"])
        fp32.load_adapter("m/b@1", adapters["b"])
        answers = {}
        for merge in (False, True):
            fp32.merge_adapters = merge
            for name in ("m/a@1", "m/b@1", "m/a@1"):  # switching back and forth rebuilds the copy
                answers[merge, name] = _ids(fp32.generate(PROMPTS, GREEDY, adapter=name))
        assert fp32._merged is not None and fp32._merged[0] == "m/a@1"
        for name in ("m/a@1", "m/b@1"):
            assert answers[True, name] == answers[False, name], f"{name}: merged and unmerged greedy answers differ"
        assert answers[True, "m/a@1"] != answers[True, "m/b@1"] != _ids(base_before)
        assert _ids(fp32.generate(PROMPTS, GREEDY)) == _ids(base_before), "merging changed the base model"
        fp32.unload_adapter("m/a@1")
        assert fp32._merged is None, "the unloaded adapter's merged copy is still held"
        assert answers[True, "m/b@1"] == _ids(fp32.generate(PROMPTS, GREEDY, adapter="m/b@1"))
    finally:
        fp32.close()
