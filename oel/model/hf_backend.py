"""The in-process backend: transformers + peft, on CPU (bfloat16) or whatever device torch offers.

How it works:

* **Prompts** are tokenised by :func:`oel.model.chat.encode_chat`, the project's single rule.
* **Generation** is a plain decoding loop over a KV cache (``DynamicCache``): a batch is left-padded
  (so every row's last prompt token sits in the same column), position ids count only real tokens,
  and rows that finish are dropped from the batch and its cache. Conversations are sorted by prompt
  length and cut into batches of at most ``max_batch_size`` to limit padding; results come back in
  the caller's order.
* **Sampling**: ``temperature == 0`` is greedy (argmax, ties going to the lowest token id);
  otherwise logits / temperature, then top-p. With ``seed`` set, row *i* of a call draws from its own ``torch.Generator`` seeded with
  ``seed + i``, so a call is reproducible and a row's random stream does not depend on the batch
  size. Without a seed, torch's global RNG is used.
* **What a Generation holds**: ``response_token_ids`` are exactly the sampled ids, including the end
  token (EOS) when the model emitted one and the tokens that completed a stop string, so
  ``prompt_token_ids + response_token_ids`` is what the model actually saw and scored. ``text`` is
  those ids decoded without special tokens, cut before the first stop string (as vLLM does).
* **Adapters** (LoRA, peft): every loaded adapter stays resident in one ``PeftModel``; a batch picks
  one with ``set_adapter``, and ``adapter=None`` runs the base model with every LoRA layer switched
  off. A public
  name is immutable: loading it again with the same folder is a no-op, with another folder raises
  :class:`AdapterNameTaken`. Before peft touches the model, the adapter's tensor shapes are checked
  against the base model, so a mismatched adapter gives a clear :class:`BackendError` and leaves the
  backend unchanged.
* **Merged adapters**: with ``merge_adapters`` on, a batch under an adapter runs on a copy of the model
  with that adapter's LoRA product added into its weights (peft's ``merge_and_unload``), built on first
  use; the copy of the adapter used last is kept, so a run of calls with one adapter (an evaluation, agents
  serving a version) decodes at the base model's speed instead of paying peft's separate LoRA matmuls on
  every layer. Scoring stays unmerged, so log-probs are bit-identical to the trained peft model's. It
  costs one more copy of the weights. ``auto`` turns it on for float32 weights, where the
  merged weights equal base + LoRA to float32 rounding; in bfloat16 a LoRA delta below a weight's
  rounding step would be lost, so there the adapter stays unmerged unless merging is asked for. An adapter
  peft cannot merge (a LoRA bias on a layer without one) runs unmerged, with a warning.
* **Scoring**: :meth:`HFBackend.score` returns per-token log-probs of given response tokens under a
  conversation, from the same tokenisation and padding rules (used to compare with vLLM and to check
  that a saved adapter reloads exactly). :func:`score_tokens` does the same for any causal LM
  (for example a peft model being trained).

Calls are serialised by a lock: one batch runs at a time, whatever thread calls.

Numerics: padding is exact in float32 (a padded batch decodes token for token like each prompt
alone). In bfloat16 it is not bit-exact: padding shifts the alignment of the attention reductions,
and logits near 20 are only 0.125 apart, so batched and one-by-one log-probs differ by up to ~0.4
and a greedy near-tie can flip. Compare bf16 runs with a tolerance, or use ``dtype="float32"``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# libgomp (torch's OpenMP) busy-waits by default; on CPU cores shared with other processes that makes
# every parallel region stall (bench/README.md). Passive waiting fixes it. This only takes effect if torch was not imported before: set
# OMP_WAIT_POLICY=PASSIVE in the environment to be sure; an explicit setting is never overridden.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from oel.model.backend import (
    AdapterInfo,
    AdapterNameTaken,
    Backend,
    BackendError,
    Conversation,
    Generation,
    SamplingParams,
)
from oel.model.chat import encode_chat
from oel.settings import Settings

log = logging.getLogger(__name__)

_ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class _Adapter:
    info: AdapterInfo
    internal: str  # the name inside peft: a hash, since peft names must be valid module keys (no '.')


def native_bf16() -> bool:
    """Whether this machine computes in bfloat16 natively: a CUDA GPU, or a CPU with AVX512-BF16 or AMX
    (Linux ``/proc/cpuinfo`` flags). Elsewhere torch emulates bf16 matmuls, which made batched generation
    several times slower than float32 (bench/README.md)."""
    if torch.cuda.is_available():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: str | torch.device | None = None) -> str:
    """A dtype setting as a torch dtype name: ``auto`` = bfloat16 where it is native (on a CUDA ``device``;
    without one, :func:`native_bf16`), else float32; any other name is returned as given."""
    if name != "auto":
        return name
    if device is not None:
        if torch.device(device).type == "cuda":
            return "bfloat16"
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "float32"
        return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"
    return "bfloat16" if native_bf16() else "float32"


def resolve_device(name: str = "auto") -> str:
    """The ``OEL_MODEL__DEVICE`` setting as a torch device: ``auto`` = ``cuda:0`` when torch sees a GPU, else
    ``cpu``; ``cuda`` = ``cuda:0``. A GPU that is not there is an error naming the setting (raised at start-up,
    not at the first generation)."""
    if name == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if not name.startswith("cuda"):
        raise BackendError(f"OEL_MODEL__DEVICE: expected auto, cpu, cuda or cuda:N, got {name!r}")
    index = int(name.split(":", 1)[1]) if ":" in name else 0
    if not torch.cuda.is_available():
        raise BackendError(
            f"OEL_MODEL__DEVICE={name}: torch sees no CUDA GPU (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}); use cpu or auto"
        )
    if index >= torch.cuda.device_count():
        raise BackendError(f"OEL_MODEL__DEVICE={name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return f"cuda:{index}"


def model_device(model: Any) -> torch.device:
    """The device of a model's (first) parameters."""
    return next(model.parameters()).device


def pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id rows into (ids, attention_mask), both (batch, max_len) int64."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def decode_batch(
    lm: Any,
    cache: Any,
    logits: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    choose: Callable[[torch.Tensor, list[int], int], list[int]],
    finished: Callable[[int, list[int]], str | None],
) -> tuple[list[list[int]], list[str]]:
    """The batched decoding loop of generation (:class:`HFBackend`) and of OPCD sampling.

    Starts from ``logits`` (float, one row per prompt) after the left-padded prompts (attention ``mask``)
    have been run through ``lm`` into ``cache`` (a transformers ``DynamicCache``). Each step,
    ``choose(logits, active rows, step)`` picks one token per active row and ``finished(row, response)``
    returns a finish reason (or None to go on); finished rows are pruned from the KV cache so later steps
    compute only the live ones. Returns the response ids and finish reasons (``length`` when
    ``max_new_tokens`` ran out) in input order.
    """
    device = mask.device
    n = logits.shape[0]
    responses: list[list[int]] = [[] for _ in range(n)]
    reasons = ["length"] * n
    active = list(range(n))  # original row indices still decoding, in cache order
    for step in range(max_new_tokens):
        nxt = choose(logits, active, step)
        keep: list[int] = []
        for pos, row in enumerate(active):
            responses[row].append(int(nxt[pos]))
            reason = finished(row, responses[row])
            if reason is None:
                keep.append(pos)
            else:
                reasons[row] = reason
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            sel = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(sel)
            mask = mask[sel]
            nxt = [nxt[p] for p in keep]
            active = [active[p] for p in keep]
        mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=device)], dim=1)
        step_ids = torch.tensor(nxt, dtype=torch.long, device=device)[:, None]
        position = mask.sum(-1, keepdim=True) - 1
        logits = (
            lm(input_ids=step_ids, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True)
            .logits[:, -1, :]
            .float()
        )
    return responses, reasons


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens (pads get 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def score_tokens(
    model: Any,
    prompt_token_ids: Sequence[Sequence[int]],
    response_token_ids: Sequence[Sequence[int]],
    pad_id: int,
    temperature: float = 1.0,
    batch_size: int = 8,
) -> list[list[float]]:
    """Log-probability of each response token given the prompt and the response tokens before it.

    ``model`` is any causal LM (plain or peft, with whatever adapter is active). Rows are left-padded
    together so every response ends in the last column; log-probs are normalised over the full
    vocabulary, from logits divided by ``temperature``, computed in float32.
    """
    if len(prompt_token_ids) != len(response_token_ids):
        raise ValueError("one response per prompt expected")
    out: list[list[float]] = []
    for start in range(0, len(prompt_token_ids), batch_size):
        prompts = prompt_token_ids[start : start + batch_size]
        responses = response_token_ids[start : start + batch_size]
        rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
        ids, mask = pad_left(rows, pad_id)
        device = model_device(model)
        ids, mask = ids.to(device), mask.to(device)
        keep = max(len(r) for r in responses) + 1
        logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False, logits_to_keep=keep).logits
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (b, keep, vocab), last column = after the row's end
        for i, r in enumerate(responses):
            if not r:
                out.append([])
                continue
            n = len(r)
            # the logits at column keep-1-n .. keep-2 predict the response tokens 0 .. n-1
            sl = logp[i, keep - 1 - n : keep - 1]
            out.append(sl.gather(-1, torch.tensor(list(r), dtype=torch.long, device=device)[:, None])[:, 0].tolist())
    return out


class HFBackend(Backend):
    """Batched chat generation in this process, with LoRA adapters resident and selectable per batch.

    ``model_path`` is any local Hugging Face causal-LM folder (for the default model, use
    :meth:`from_settings` or :func:`oel.model.prepare.resolve_model_path`). ``dtype`` is the weight
    dtype ("bfloat16" is the default on CPU). ``max_batch_size`` caps the rows decoded together.
    ``merge_adapters``: run adapters merged into a copy of the weights (module docstring); None = on for
    float32 weights only.
    """

    def __init__(
        self,
        model_path: str | Path,
        dtype: str = "bfloat16",
        device: str = "cpu",
        max_batch_size: int = 8,
        merge_adapters: bool | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_path = Path(model_path)
        if not (self.model_path / "config.json").is_file():
            raise BackendError(f"not a Hugging Face model folder (no config.json): {self.model_path}")
        self.base_model = str(self.model_path)
        self.device = torch.device(device)
        self.max_batch_size = max(1, int(max_batch_size))
        t0 = time.monotonic()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_path))
        self.model = AutoModelForCausalLM.from_pretrained(str(self.model_path), dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.eos_ids = self._eos_ids()
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])
        self._peft: Any = None  # the PeftModel wrapping self.model, once an adapter is loaded
        self._adapters: dict[str, _Adapter] = {}
        self.merge_adapters = dtype == "float32" if merge_adapters is None else bool(merge_adapters)
        self._merged: tuple[str, Any] | None = None  # (adapter name, the model with it merged in)
        self._unmergeable: set[str] = set()  # adapters peft cannot merge (they run unmerged)
        self._lock = threading.RLock()
        log.info("loaded %s (%s, %s) in %.1f s", self.model_path, dtype, self.device, time.monotonic() - t0)

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> HFBackend:
        """The backend for ``settings.model`` (the default model is prepared on first use)."""
        from oel.model.prepare import resolve_model_path

        device = kwargs.pop("device", None) or resolve_device(settings.model.device)
        merge = {"auto": None, "on": True, "off": False}[settings.model.merge_adapters]
        kwargs.setdefault("merge_adapters", merge)
        return cls(resolve_model_path(settings), dtype=resolve_dtype(settings.model.dtype, device), device=device, **kwargs)

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        for source in (getattr(self.model.generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if source is None:
                continue
            for i in source if isinstance(source, (list, tuple)) else [source]:
                if int(i) not in ids:
                    ids.append(int(i))
        if not ids:
            raise BackendError(f"{self.model_path}: no end-of-sequence token in the tokenizer or generation config")
        return ids

    # --- tokenisation -----------------------------------------------------------------------

    def encode(self, conversation: Conversation, add_generation_prompt: bool = True) -> list[int]:
        """Prompt token ids of a conversation (:func:`oel.model.chat.encode_chat`)."""
        return encode_chat(self.tokenizer, conversation, add_generation_prompt=add_generation_prompt)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of token ids, special tokens (EOS, chat markers) left out."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    # --- adapters ---------------------------------------------------------------------------

    def _select(self, adapter: str | None) -> None:
        """Make the next forward passes of ``self.model`` use ``adapter``, or the bare base model for ``None``.

        The base model is served by switching every LoRA layer off (peft's per-layer
        ``enable_adapters(False)``), which works whatever adapters remain loaded, none included."""
        if adapter is not None and adapter not in self._adapters:
            raise BackendError(f"unknown adapter {adapter!r}; loaded: {sorted(self._adapters) or 'none'}")
        if self._peft is None:
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(adapter is not None)
        if adapter is not None:
            self._peft.set_adapter(self._adapters[adapter].internal)

    def _runner(self, adapter: str | None) -> Any:
        """The module that runs the next batch under ``adapter`` (None = the base model): with merging on
        (class docstring), the copy of the model with ``adapter`` merged in, made now unless it is the one
        kept; else ``self.model`` with the adapter selected."""
        self._select(adapter)
        if adapter is None or not self.merge_adapters or adapter in self._unmergeable:
            return self.model
        if self._merged is not None and self._merged[0] == adapter:
            return self._merged[1]
        self._merged = None  # free the previous copy before making the next
        t0 = time.monotonic()
        try:
            merged = copy.deepcopy(self._peft).merge_and_unload(adapter_names=[self._adapters[adapter].internal])
        except (RuntimeError, ValueError) as exc:  # e.g. peft cannot merge a LoRA bias into a layer without one
            log.warning("adapter %s cannot be merged into the weights (%s): it runs unmerged", adapter, exc)
            self._unmergeable.add(adapter)
            return self.model
        merged.eval().requires_grad_(False)
        self._merged = (adapter, merged)
        log.info("adapter %s merged into a copy of the weights in %.2f s", adapter, time.monotonic() - t0)
        return merged

    def _check_adapter(self, name: str, path: Path) -> dict[str, Any]:
        """Read the adapter's config and compare its tensor shapes with the base model, before peft touches anything."""
        config_file = path / "adapter_config.json"
        if not config_file.is_file():
            raise BackendError(f"adapter {name!r}: {path} is not a PEFT adapter folder (no adapter_config.json)")
        try:
            config = json.loads(config_file.read_text())
        except ValueError as exc:
            raise BackendError(f"adapter {name!r}: unreadable adapter_config.json in {path}: {exc}") from None
        if config.get("peft_type") != "LORA":
            raise BackendError(f"adapter {name!r}: only LoRA adapters are supported, {path} holds {config.get('peft_type')!r}")
        weights = next((path / f for f in _ADAPTER_WEIGHT_FILES if (path / f).is_file()), None)
        if weights is None:
            raise BackendError(f"adapter {name!r}: no adapter_model.safetensors or adapter_model.bin in {path}")
        shapes: dict[str, tuple[int, ...]] = {}
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as fh:
                for key in fh.keys():
                    shapes[key] = tuple(fh.get_slice(key).get_shape())
        else:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
            shapes = {k: tuple(v.shape) for k, v in state.items()}
        problems: list[str] = []
        for key, shape in shapes.items():
            for marker, dim_index, attr in ((".lora_A.", 1, "in_features"), (".lora_B.", 0, "out_features")):
                if marker not in key:
                    continue
                module_path = key.split(marker)[0].removeprefix("base_model.model.")
                try:
                    module = self.model.get_submodule(module_path)
                except AttributeError:
                    problems.append(f"targets {module_path}, which the base model does not have")
                    break
                module = getattr(module, "base_layer", module)
                expected = getattr(module, attr, None)
                if expected is None and isinstance(module, torch.nn.Embedding):
                    expected = module.num_embeddings if marker == ".lora_A." else module.embedding_dim
                    dim_index = 1 if marker == ".lora_A." else 0
                if expected is not None and len(shape) == 2 and shape[dim_index] != expected:
                    problems.append(f"{module_path}.{attr} is {expected} in the base model but {shape[dim_index]} in the adapter")
                break
        if not shapes:
            problems.append("the weight file holds no tensors")
        if problems:
            shown = "; ".join(problems[:3]) + (f"; ... ({len(problems)} problems)" if len(problems) > 3 else "")
            raise BackendError(f"adapter {name!r} at {path} does not match the base model {self.base_model}: {shown}")
        return config

    def load_adapter(self, name: str, path: Path) -> None:
        """Make the LoRA adapter in ``path`` available as ``name`` (see :class:`Backend`).

        Raises :class:`AdapterNameTaken` if ``name`` already means another folder, and
        :class:`BackendError` if the folder is not a LoRA adapter for this base model.
        """
        path = Path(path).resolve()
        with self._lock:
            existing = self._adapters.get(name)
            if existing is not None:
                if existing.info.path == path:
                    return
                raise AdapterNameTaken(
                    f"adapter name {name!r} already holds {existing.info.path}; give the new version ({path}) a new name"
                )
            config = self._check_adapter(name, path)
            internal = "a" + hashlib.sha256(name.encode()).hexdigest()[:16]
            t0 = time.monotonic()
            try:
                if self._peft is None:
                    from peft import PeftModel

                    self._peft = PeftModel.from_pretrained(self.model, str(path), adapter_name=internal, is_trainable=False)
                    self._peft.eval()
                else:
                    self._peft.load_adapter(str(path), adapter_name=internal, is_trainable=False)
            except Exception as exc:
                self._discard_internal(internal)
                raise BackendError(f"adapter {name!r} at {path} could not be loaded onto {self.base_model}: {exc}") from exc
            self._adapters[name] = _Adapter(
                AdapterInfo(name=name, path=path, extra={"rank": str(config.get("r")), "base": str(config.get("base_model_name_or_path"))}),
                internal,
            )
            log.info("adapter %s loaded from %s in %.2f s", name, path, time.monotonic() - t0)

    def _discard_internal(self, internal: str) -> None:
        if self._peft is not None and internal in getattr(self._peft, "peft_config", {}):
            try:
                self._peft.delete_adapter(internal)
            except Exception:  # pragma: no cover - best effort clean-up after a failed load
                log.exception("could not remove the half-loaded adapter %s", internal)

    def unload_adapter(self, name: str) -> None:
        """Drop adapter ``name`` (waits for the running batch). Unknown names raise :class:`BackendError`."""
        with self._lock:
            entry = self._adapters.pop(name, None)
            if entry is None:
                raise BackendError(f"unknown adapter {name!r}")
            if self._merged is not None and self._merged[0] == name:
                self._merged = None
            self._unmergeable.discard(name)
            self._peft.delete_adapter(entry.internal)

    def list_adapters(self) -> list[str]:
        """Names of the resident adapters, in load order."""
        return list(self._adapters)

    def adapter_info(self, name: str) -> AdapterInfo:
        """Where adapter ``name`` was loaded from, and its rank."""
        entry = self._adapters.get(name)
        if entry is None:
            raise BackendError(f"unknown adapter {name!r}")
        return entry.info

    # --- generation -------------------------------------------------------------------------

    def generate(self, conversations: list[Conversation], params: SamplingParams, adapter: str | None = None) -> list[Generation]:
        """Answer every conversation with ``adapter`` (None = the base model); results in input order."""
        with self._lock:  # the tokenizer too is used by one caller at a time
            prompts = [self.encode(c) for c in conversations]
            return self.generate_from_ids(prompts, params, adapter)

    def generate_from_ids(self, prompt_token_ids: list[list[int]], params: SamplingParams, adapter: str | None = None) -> list[Generation]:
        """Like :meth:`generate`, from already tokenised prompts."""
        if params.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if params.temperature < 0 or not 0 < params.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError("empty prompt")
        order = sorted(range(len(prompt_token_ids)), key=lambda i: len(prompt_token_ids[i]))
        results: list[Generation | None] = [None] * len(prompt_token_ids)
        with self._lock:
            runner = self._runner(adapter)
            for start in range(0, len(order), self.max_batch_size):
                chunk = order[start : start + self.max_batch_size]
                outs = self._decode_batch(runner, [prompt_token_ids[i] for i in chunk], params, chunk)
                for i, (ids, text, reason) in zip(chunk, outs):
                    results[i] = Generation(
                        text=text,
                        prompt_token_ids=list(prompt_token_ids[i]),
                        response_token_ids=ids,
                        finish_reason=reason,
                        adapter=adapter,
                    )
        return results  # type: ignore[return-value]

    def _generators(self, params: SamplingParams, rows: list[int]) -> list[torch.Generator | None]:
        if params.seed is None:
            return [None] * len(rows)
        return [torch.Generator(device=self.device).manual_seed(int(params.seed) + r) for r in rows]

    def _sample(self, logits: torch.Tensor, params: SamplingParams, gens: list[torch.Generator | None]) -> torch.Tensor:
        """One next token per row from float32 logits (rows, vocab)."""
        if params.temperature == 0:
            # bf16 logits tie often (their spacing is 0.125 around 16); break ties by the lowest token id,
            # so the choice never depends on the batch shape the argmax kernel happens to see
            best = logits.max(-1, keepdim=True).values
            ids = torch.arange(logits.shape[-1], device=logits.device).expand_as(logits)
            return torch.where(logits == best, ids, logits.shape[-1]).min(-1).values
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_p, idx = probs.sort(-1, descending=True)
            cum = sorted_p.cumsum(-1)
            sorted_p[(cum - sorted_p) >= params.top_p] = 0.0  # keep the smallest prefix reaching top_p
            probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
        return torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(gens)])

    def _stop_at(self, text: str, stops: tuple[str, ...]) -> int:
        cut = [text.find(s) for s in stops if s]
        cut = [c for c in cut if c >= 0]
        return min(cut) if cut else -1

    @torch.inference_mode()
    def _decode_batch(
        self, runner: Any, prompts: list[list[int]], params: SamplingParams, rows: list[int]
    ) -> list[tuple[list[int], str, str]]:
        """Decode one left-padded batch; returns (response ids, text, finish reason) per prompt."""
        from transformers import DynamicCache

        n = len(prompts)
        gens = self._generators(params, rows)
        ids, mask = pad_left(prompts, self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache(config=self.model.config)
        logits = (
            runner(
                input_ids=ids,
                attention_mask=mask,
                position_ids=_positions(mask),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            .logits[:, -1, :]
            .float()
        )
        eos = set(self.eos_ids)
        texts: list[str | None] = [None] * n

        def finished(row: int, response: list[int]) -> str | None:
            if response[-1] in eos:
                return "stop"
            if params.stop:
                text = self.decode(response)
                cut = self._stop_at(text, params.stop)
                if cut >= 0:
                    texts[row] = text[:cut]
                    return "stop"
            return None

        responses, reasons = decode_batch(
            runner,
            cache,
            logits,
            mask,
            params.max_new_tokens,
            lambda logits, active, step: self._sample(logits, params, [gens[i] for i in active]).tolist(),
            finished,
        )
        return [(responses[i], texts[i] if texts[i] is not None else self.decode(responses[i]), reasons[i]) for i in range(n)]

    # --- scoring ----------------------------------------------------------------------------

    def score(
        self,
        conversations: list[Conversation],
        response_token_ids: list[list[int]],
        adapter: str | None = None,
        temperature: float = 1.0,
    ) -> list[list[float]]:
        """Per-token log-probs of each response (token ids following the conversation's generation prompt)
        under ``adapter`` (None = base model), normalised over the full vocabulary, logits / ``temperature``."""
        with self._lock:  # the tokenizer too is used by one caller at a time
            prompts = [self.encode(c) for c in conversations]
            return self.score_ids(prompts, response_token_ids, adapter, temperature)

    def score_ids(
        self,
        prompt_token_ids: list[list[int]],
        response_token_ids: list[list[int]],
        adapter: str | None = None,
        temperature: float = 1.0,
    ) -> list[list[float]]:
        """Like :meth:`score`, from already tokenised prompts."""
        with self._lock:
            self._select(adapter)  # unmerged even with merging on: scores are the exact reference (class docstring)
            return score_tokens(self.model, prompt_token_ids, response_token_ids, self.pad_id, temperature, self.max_batch_size)

    def close(self) -> None:
        """Drop the model and adapters."""
        with self._lock:
            self._adapters.clear()
            self._merged = None
            self._peft = None
            self.model = None  # type: ignore[assignment]
