"""OEL_MODEL__DEVICE: validated at start-up, resolved once, and honoured by the in-process backend, the gates'
backend and the OPCD trainer (student, teacher, sampling, loss). This machine has no GPU: the CUDA branches are
checked by what they resolve to (torch.cuda patched), the CPU path by running it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.tiny_model import EXPERIENCE, PREFIXES, save_tiny_model, tiny_tokenizer

from learner.opcd import OPCDConfig, OPCDTrainer
from oel.model.backend import BackendError
from oel.model.hf_backend import HFBackend, resolve_device, resolve_dtype
from oel.settings import SettingsError, load_settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch reports one CUDA device (nothing is ever placed on it in these tests)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_setting_defaults_to_auto_and_rejects_bad_values(monkeypatch) -> None:
    monkeypatch.delenv("OEL_MODEL__DEVICE", raising=False)
    assert load_settings().model.device == "auto"
    for good in ("cpu", "cuda", "cuda:1"):
        monkeypatch.setenv("OEL_MODEL__DEVICE", good)
        assert load_settings().model.device == good
    for bad in ("gpu", "CUDA", "cuda:", "mps", "cuda:0,1"):
        monkeypatch.setenv("OEL_MODEL__DEVICE", bad)
        with pytest.raises(SettingsError, match="OEL_MODEL__DEVICE"):
            load_settings()


def test_auto_is_cpu_without_a_gpu_and_a_missing_gpu_is_an_error(no_gpu) -> None:
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    for name in ("cuda", "cuda:0"):
        with pytest.raises(BackendError, match=f"OEL_MODEL__DEVICE={name}: torch sees no CUDA GPU"):
            resolve_device(name)


def test_auto_is_the_gpu_when_there_is_one_and_bf16_on_it(fake_gpu) -> None:
    assert resolve_device("auto") == "cuda:0"
    assert resolve_device("cuda") == "cuda:0"
    with pytest.raises(BackendError, match="sees 1 CUDA device"):
        resolve_device("cuda:1")
    assert resolve_dtype("auto", "cuda:0") == "bfloat16"
    assert resolve_dtype("float32", "cuda:0") == "float32"
    cfg = OPCDConfig(device="auto")
    assert cfg.effective_device == "cuda:0" and cfg.effective_dtype == "bfloat16"
    # an explicit CPU device on a GPU machine keeps the CPU's own dtype choice
    assert OPCDConfig(device="cpu").effective_dtype == resolve_dtype("auto", "cpu")


def test_settings_reach_the_trainer_config(monkeypatch) -> None:
    monkeypatch.setenv("OEL_MODEL__DEVICE", "cpu")
    cfg = OPCDConfig.from_settings(load_settings())
    assert cfg.device == "cpu" and cfg.effective_device == "cpu"


def test_settings_reach_the_in_process_and_gate_backends(monkeypatch, fake_gpu) -> None:
    """make_backend (agents, processor, both gates) builds HFBackend on the resolved device and its dtype."""
    from oel.model import factory

    seen: list[dict] = []

    def fake_init(self, model_path, dtype="bfloat16", device="cpu", max_batch_size=8, merge_adapters=None):
        seen.append(dict(dtype=dtype, device=device, merge=merge_adapters))

    monkeypatch.setattr(HFBackend, "__init__", fake_init)
    monkeypatch.setattr("oel.model.prepare.resolve_model_path", lambda settings: Path("/models/base"))
    monkeypatch.setenv("OEL_MODEL__BACKEND", "transformers")
    monkeypatch.setenv("OEL_MODEL__DTYPE", "auto")
    monkeypatch.setenv("OEL_MODEL__DEVICE", "auto")
    factory.make_backend(load_settings())
    monkeypatch.setenv("OEL_MODEL__DEVICE", "cpu")
    monkeypatch.setenv("OEL_MODEL__DTYPE", "float32")
    monkeypatch.setenv("OEL_MODEL__MERGE_ADAPTERS", "off")
    factory.make_backend(load_settings(), max_batch_size=4)
    assert seen == [dict(dtype="bfloat16", device="cuda:0", merge=None), dict(dtype="float32", device="cpu", merge=False)]


def test_learner_start_up_fails_naming_the_setting_without_a_gpu(monkeypatch, no_gpu) -> None:
    from learner import service

    monkeypatch.setenv("OEL_MODEL__DEVICE", "cuda")
    monkeypatch.setattr("oel.store.S3Store.__init__", lambda *a, **k: pytest.fail("the store was touched first"))
    with pytest.raises(BackendError, match="OEL_MODEL__DEVICE=cuda"):
        service.serve(load_settings())


def test_trainer_and_backend_run_on_the_configured_cpu_device(tmp_path: Path) -> None:
    """The CPU path end to end with an explicit device: the model the trainer loads, its teacher, its sampling
    generator and its step all live on that device; the backend generates and scores there."""
    model_dir = save_tiny_model(tmp_path / "model")
    trainer = OPCDTrainer(
        OPCDConfig(model_path=model_dir, device="cpu", batch_size=2, max_new_tokens=6, seed=1, learning_rate=1e-2, dtype="float32"),
        PREFIXES,
        EXPERIENCE,
    )
    assert trainer.device == torch.device("cpu") and trainer.generator.device == torch.device("cpu")
    assert {p.device.type for p in trainer.model.parameters()} == {"cpu"}
    m = trainer.step()
    assert m.response_tokens > 0 and m.loss == m.loss
    assert trainer.agreement() >= 0.0

    backend = HFBackend(model_dir, dtype="float32", device="cpu")
    from oel.model.backend import SamplingParams

    gen = backend.generate([[{"role": "user", "content": "Say hi."}]], SamplingParams(max_new_tokens=4, temperature=0.7, seed=3))[0]
    logps = backend.score_ids([gen.prompt_token_ids], [gen.response_token_ids])[0]
    assert len(logps) == len(gen.response_token_ids)


def test_a_given_model_keeps_its_device_unless_one_is_configured() -> None:
    from support.tiny_model import tiny_model

    tok = tiny_tokenizer()
    trainer = OPCDTrainer(OPCDConfig(batch_size=2, max_new_tokens=4), PREFIXES, EXPERIENCE, model=tiny_model(tok), tokenizer=tok)
    assert trainer.device == torch.device("cpu")
