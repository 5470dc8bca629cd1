"""The OPCD trainer: one consolidation round of experience into the weights.

How a step runs (``OPCDTrainer.step``):

1. **Sample** (student, no experience): ``batch_size`` training prefixes, each tokenised with the
   project's chat rule (:func:`oel.model.chat.encode_chat`), are answered once by the student at
   ``temperature`` (full-vocabulary sampling, top-p 1 by default) with a KV-cache decoding loop;
   each answer's exact token ids are kept, end-of-sequence token included.
2. **Score** (teacher, experience in context): each sample draws one experience set; the teacher's
   prompt is the same conversation with the experience block in front of one user message, encoded
   by the same rule. The *same* answer ids are appended to both prompts; the final hidden state at
   position ``len(prompt) - 1 + j`` predicts answer token ``j`` on each side.
3. **Update**: the loss of :mod:`learner.opcd.loss` (mean over answer tokens of the top-k reverse
   KL, optionally mixed with forward KL), its analytic gradient, global-norm clipping, one AdamW step
   (constant learning rate, or warm-up and cosine decay).

With ``check_every``, :meth:`OPCDTrainer.agreement` measures every few steps how closely the student's
greedy answers (no experience) reproduce the teacher's (experience in context); the run keeps the best
check's weights and may stop early (:meth:`OPCDTrainer.train`).

Who the teacher is (the frozen round-start weights, without keeping a second copy of the base):

* LoRA, fresh adapter (round 1, or any round that starts a new adapter on the base): the teacher
  is the base with the adapter **disabled**. That equals the round-start student exactly, because a
  fresh LoRA's B matrices are zero.
* LoRA continuing a parent adapter (``init_adapter``): the parent is loaded twice, as the trainable
  ``default`` adapter and as a frozen ``teacher`` adapter; the teacher forward switches to the
  latter. Disabling the adapter here would be wrong: it would give the base model, i.e. the weights
  from before *every* earlier round, not the round-start weights. An adapter costs megabytes, a
  second base model would cost its full size.
* Full fine-tune: a frozen deep copy of the round-start model (twice the weights in memory).

These make a step cheaper than the straightforward implementation, without changing the loss:

* **Teacher prefix cache.** The teacher is frozen for the round, and every teacher prompt with the same
  system message and experience set starts with the same tokens (template opening + experience block,
  up to ``experience_token_budget`` tokens, usually most of the prompt). Their keys and values are
  computed once and reused; each sample runs the teacher only on its own question and answer.
* **Mixed-precision LoRA** on a bf16 base: the adapters compute in bf16 (peft's default float32
  adapters copy every layer input to float32 and keep those copies for the backward pass); AdamW
  updates float32 master weights, which are what ``save`` writes.
  The loss projects hidden states to the vocabulary in chunks, so no ``[tokens, vocab]`` logits
  tensor for the whole batch exists.
* **Backward micro-batches.** The student's answer forward, loss and backward run a few rows at a time
  (``backward_chunk_tokens``), so only their activations are held for the backward pass; the
  gradients add up to the batch's (:meth:`OPCDTrainer._student_micro_batches`).
* **Plain LoRA decoding.** While sampling, the LoRA layers compute ``base(x) + B(A(x)) * scaling``
  directly (:func:`plain_lora_forwards`): the same numbers as peft's forward, without its per-call
  bookkeeping, which costs more than a one-token layer's arithmetic.

The prompts are never truncated: prefixes whose student prompt is longer than
``max_prompt_tokens`` are left out (counted in ``skipped_prefixes``); an experience set over
``experience_token_budget`` loses its oldest items, which is logged and returned
(``OPCDTrainer.experience_cuts``, ``OPCDResult.experience_cuts``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from learner.opcd.config import OPCDConfig
from learner.opcd.data import (
    Conversation,
    DataError,
    ExperienceCut,
    ExperienceTemplate,
    fit_experience,
    parse_conversation,
)
from learner.opcd.loss import LossStats, chunked_opcd_loss
from oel.model.hf_backend import decode_batch, pad_left

log = logging.getLogger(__name__)

SUMMARY_FILE = "opcd-summary.json"
TEACHER_ADAPTER = "teacher"
STUDENT_ADAPTER = "default"


@dataclass
class Rollout:
    """One on-policy sample and the two contexts it is scored in."""

    prefix_index: int
    experience_index: int
    student_prompt_ids: list[int]
    teacher_prompt_ids: list[int]
    response_ids: list[int]
    """The sampled token ids, exactly; the end-of-sequence token included when the student emitted one."""
    finish_reason: str
    """"stop" (end-of-sequence) or "length" (``max_new_tokens`` reached)."""


def length_groups(lengths: Sequence[int], overhead: int = 32) -> list[list[int]]:
    """Row indices split into micro-batches of similar length, shortest first, so that padding every row to
    its micro-batch's longest costs least: minimises the sum over micro-batches of rows x longest + ``overhead``
    (a call's fixed cost, in token positions). A batch of 6 task prompts (~140 tokens) and 2 anchor prompts
    (~40) runs as two micro-batches instead of padding the anchors to 140."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lengths[order[j - 1]] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


@dataclass
class _PromptKV:
    """The student's keys and values of a sampled micro-batch's prompts (all but their last token), left-padded,
    at the weights of optimizer step ``step``; ``rows``: the micro-batch's positions in the step's batch.
    ``with_grad``: computed with gradient (``prompt_gradient``), so the loss can backpropagate through them once."""

    prompts: list[list[int]]
    step: int
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor
    with_grad: bool
    rows: list[int] = field(default_factory=list)


@dataclass
class StepMetrics:
    """What one optimizer step measured."""

    step: int
    loss: float
    """Mean OPCD loss per answer token (top-k reverse KL; full KL when ``top_k`` is None)."""
    kl: float
    """Mean full-vocabulary reverse KL(student || teacher) per answer token, before the update."""
    response_tokens: int
    tokens_per_s: float
    """Answer tokens of this step / wall time of the whole step (sampling + scoring + update)."""
    seconds: float
    sample_seconds: float
    train_seconds: float
    grad_norm: float
    """Global gradient norm before clipping."""
    learning_rate: float
    mean_response_tokens: float
    stopped_fraction: float
    """Share of answers that ended with end-of-sequence rather than the length limit."""


@dataclass
class Check:
    """One agreement check (:meth:`OPCDTrainer.agreement`) after ``step`` optimizer steps."""

    step: int
    agreement: float
    seconds: float


@dataclass
class OPCDResult:
    """A finished run."""

    steps: list[StepMetrics]
    experience_cuts: list[ExperienceCut]
    skipped_prefixes: int
    seconds: float
    checks: list[Check] = field(default_factory=list)
    kept_step: int | None = None
    """With checks: the step whose weights the run kept (the best check); None: the last step's."""

    @property
    def response_tokens(self) -> int:
        return sum(s.response_tokens for s in self.steps)

    @property
    def tokens_per_s(self) -> float:
        busy = sum(s.seconds for s in self.steps)
        return self.response_tokens / busy if busy > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": [asdict(s) for s in self.steps],
            "experience_cuts": [asdict(c) | {"items_dropped": c.items_dropped} for c in self.experience_cuts],
            "skipped_prefixes": self.skipped_prefixes,
            "seconds": self.seconds,
            "response_tokens": self.response_tokens,
            "tokens_per_s": self.tokens_per_s,
            "first_loss": self.steps[0].loss if self.steps else None,
            "last_loss": self.steps[-1].loss if self.steps else None,
            "checks": [asdict(c) for c in self.checks],
            "kept_step": self.kept_step,
        }


def _release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and the process's RSS only grows)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


@contextmanager
def plain_lora_forwards(model: Any) -> Iterator[int]:
    """For the duration, every LoRA linear layer of ``model`` (peft's ``lora.Linear``) that runs plain LoRA with one
    active adapter computes ``base(x) + B(A(x)) * scaling`` (what peft computes, with the same operations in the same
    order, so the same numbers) directly from its weights, on ``x`` flattened to rows: for decoding, where a step
    runs every layer on one token per row and peft's per-call bookkeeping (argument checks, adapter lookups, four
    module calls) costs more than the layer's arithmetic. Layers that are merged, disabled, training (dropout) or
    run a LoRA variant keep peft's forward. Yields the number of layers switched; for evaluation only (no dropout)."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency of the trainer
        yield 0
        return
    switched: list[Any] = []
    for mod in model.modules():
        if not isinstance(mod, LoraLinear) or mod.training or mod.merged or mod.disable_adapters:
            continue
        names = list(mod.active_adapters)
        if len(names) != 1 or names[0] not in mod.lora_A or names[0] in getattr(mod, "lora_variant", {}):
            continue
        base = mod.base_layer
        if not isinstance(base, torch.nn.Linear) or getattr(mod, "fan_in_fan_out", False):
            continue
        name = names[0]
        a, b = mod.lora_A[name], mod.lora_B[name]
        if not isinstance(a, torch.nn.Linear) or not isinstance(b, torch.nn.Linear) or a.bias is not None or b.bias is not None:
            continue

        def forward(
            x: torch.Tensor,
            *args: Any,
            _w: torch.Tensor = base.weight,
            _bias: torch.Tensor | None = base.bias,
            _a: torch.Tensor = a.weight,
            _b: torch.Tensor = b.weight,
            _s: float = mod.scaling[name],
            **kwargs: Any,
        ) -> torch.Tensor:
            shape = x.shape
            x = x.reshape(-1, shape[-1])
            result = torch.nn.functional.linear(x, _w, _bias)
            xa = x if x.dtype == _a.dtype else x.to(_a.dtype)
            out = result + torch.nn.functional.linear(torch.nn.functional.linear(xa, _a), _b) * _s
            if out.dtype != result.dtype:
                out = out.to(result.dtype)
            return out.view(*shape[:-1], out.shape[-1])

        mod.forward = forward
        switched.append(mod)
    try:
        yield len(switched)
    finally:
        for mod in switched:
            del mod.forward


def _dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[name]


def _resolve_model_path(config: OPCDConfig) -> Path:
    if config.model_path is not None:
        return Path(config.model_path)
    from oel.model.prepare import resolve_model_path
    from oel.settings import load_settings

    return resolve_model_path(load_settings())


def _encode(tokenizer: Any, conversation: Conversation) -> list[int]:
    from oel.model.chat import encode_chat

    return encode_chat(tokenizer, conversation, add_generation_prompt=True)


class OPCDTrainer:
    """On-policy context distillation of experience sets into a student model.

    ``prefixes``: training prefixes (conversations ending with a user message; dicts or
    :class:`~oel.schemas.ChatMessage` lists). ``experience_sets``: one or more lists of experience
    items, oldest first (the K independent extraction runs; one is drawn per sample; an empty set
    means "no experience", which makes the teacher's context equal to the student's).
    ``model`` / ``tokenizer``: an already loaded causal LM and its tokenizer (tests, embedding
    code); otherwise both are loaded from ``config.model_path``.
    """

    def __init__(
        self,
        config: OPCDConfig,
        prefixes: Sequence[Conversation | Sequence[dict[str, str]]],
        experience_sets: Sequence[Sequence[str]],
        *,
        model: Any = None,
        tokenizer: Any = None,
        anchor_prompts: Sequence[Conversation | Sequence[dict[str, str]] | str] | None = None,
    ) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.rng = random.Random(config.seed)
        self.template = ExperienceTemplate(config.experience_position)
        t0 = time.monotonic()
        if model is None or tokenizer is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.model_path: Path | None = _resolve_model_path(config)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(self.model_path))
            model = model or AutoModelForCausalLM.from_pretrained(str(self.model_path), dtype=_dtype(config.effective_dtype))
        else:
            self.model_path = Path(config.model_path) if config.model_path is not None else None
        # Student, teacher (the same module or its copy), sampling and loss all run on one device (OEL_MODEL__DEVICE).
        self.device = torch.device(
            config.effective_device if config.device is not None or model is None else next(model.parameters()).device
        )
        model.to(self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.tokenizer = tokenizer
        self.eos_ids = self._eos_ids(model)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])

        self._setup_models(model)
        self._setup_data(prefixes, experience_sets)
        self._setup_anchors(anchor_prompts)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable_params = params
        # Mixed precision for LoRA on a bf16/fp16 base: the adapters compute in the base's dtype (no float32
        # copies of every activation, as peft's float32 adapters make), the optimizer updates float32 masters.
        self.master_params: list[torch.Tensor] | None = None
        base_dtype = self._causal_lm("student").get_input_embeddings().weight.dtype
        if config.finetune == "lora" and config.adapter_mixed_precision and base_dtype != torch.float32:
            self.master_params = [p.detach().clone().float() for p in params]
            for name, p in self.model.named_parameters():
                if ".lora_" in name:
                    p.data = p.data.to(base_dtype)
        self.optimizer = torch.optim.AdamW(
            self.master_params if self.master_params is not None else params,
            lr=config.effective_learning_rate,
            betas=config.adam_betas,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
        self.scheduler = None
        if config.lr_schedule != "constant" or config.warmup_steps > 0:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.step_count = 0
        self._sampled_prompts: _PromptKV | None = None
        self._sampled_groups: list[_PromptKV] | None = None
        self.history: list[StepMetrics] = []
        self._order: list[int] = []
        log.info(
            "OPCD trainer ready in %.1f s: %s, %d trainable parameters, %d prefixes (%d skipped), %d anchor prompts, %d experience sets",
            time.monotonic() - t0,
            config.finetune,
            sum(p.numel() for p in params),
            self.task_prefixes,
            self.skipped_prefixes,
            len(self.anchor_indices),
            self.task_experience_sets,
        )

    def lr_factor(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based) as a share of ``learning_rate``."""
        cfg = self.config
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_schedule == "cosine":
            span = max(1, cfg.steps - cfg.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(step - cfg.warmup_steps, span) / span))
        return 1.0

    # --- set-up -------------------------------------------------------------------------------

    @staticmethod
    def _eos_ids(model: Any) -> list[int]:
        ids: list[int] = []
        gen = getattr(model, "generation_config", None)
        for source in (getattr(gen, "eos_token_id", None), getattr(model.config, "eos_token_id", None)):
            if source is None:
                continue
            for i in source if isinstance(source, (list, tuple)) else [source]:
                if int(i) not in ids:
                    ids.append(int(i))
        return ids

    def _setup_models(self, model: Any) -> None:
        cfg = self.config
        model.config.use_cache = False
        self.teacher_model: Any = None
        if cfg.finetune == "full":
            model.requires_grad_(True)
            self.teacher_model = copy.deepcopy(model).eval().requires_grad_(False)
            self.model = model
        else:
            from peft import LoraConfig, PeftModel, get_peft_model

            model.requires_grad_(False)
            if cfg.init_adapter is not None:
                self.model = PeftModel.from_pretrained(model, str(cfg.init_adapter), adapter_name=STUDENT_ADAPTER, is_trainable=True)
                self.model.load_adapter(str(cfg.init_adapter), adapter_name=TEACHER_ADAPTER, is_trainable=False)
                self.model.set_adapter(STUDENT_ADAPTER)
            else:
                torch.manual_seed(cfg.seed)  # a fresh adapter's A matrices are random
                lora = LoraConfig(
                    r=cfg.lora_rank,
                    lora_alpha=cfg.effective_lora_alpha,
                    lora_dropout=cfg.lora_dropout,
                    target_modules=cfg.lora_target_modules,
                    task_type="CAUSAL_LM",
                )
                self.model = get_peft_model(model, lora, adapter_name=STUDENT_ADAPTER)
        self.model.train()

    def _causal_lm(self, which: str) -> Any:
        """The underlying transformers CausalLM of the student or teacher."""
        m = self.teacher_model if (which == "teacher" and self.teacher_model is not None) else self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def _setup_data(self, prefixes: Sequence[Any], experience_sets: Sequence[Sequence[str]]) -> None:
        cfg = self.config
        if not experience_sets:
            raise DataError("at least one experience set is needed (an empty list means: no experience)")
        self.prefixes: list[Conversation] = []
        self.prompt_ids: list[list[int]] = []
        self.skipped_prefixes = 0
        self.later_turn_prefixes = 0
        for raw in prefixes:
            conv = parse_conversation(raw)
            if cfg.prefix_turns == "first" and sum(m.role == "user" for m in conv) > 1:
                self.later_turn_prefixes += 1
                continue
            ids = _encode(self.tokenizer, conv)
            if len(ids) > cfg.max_prompt_tokens:
                self.skipped_prefixes += 1
                continue
            self.prefixes.append(conv)
            self.prompt_ids.append(ids)
        if self.skipped_prefixes:
            log.warning(
                "left out %d prefixes longer than max_prompt_tokens=%d (prompts are never truncated)",
                self.skipped_prefixes,
                cfg.max_prompt_tokens,
            )
        if not self.prefixes:
            raise DataError(f"no prefix fits max_prompt_tokens={cfg.max_prompt_tokens}")

        def count(text: str) -> int:
            return len(self.tokenizer.encode(text, add_special_tokens=False))

        self.experience_sets: list[list[str]] = []
        self.experience_cuts: list[ExperienceCut] = []
        for i, items in enumerate(experience_sets):
            kept, cut = fit_experience(list(items), count, cfg.experience_token_budget, set_index=i)
            if cut is not None:
                self.experience_cuts.append(cut)
                log.warning(cut.describe())
                if not kept:
                    raise DataError(f"experience set {i}: even its newest item is over the budget of {cfg.experience_token_budget} tokens")
            self.experience_sets.append(kept)
        self._teacher_cache: dict[tuple[int, int], list[int]] = {}
        self._shared_len: dict[tuple[int, int], int] = {}
        self._kv_cache: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._teacher_answers: dict[int, list[int]] = {}

    def _setup_anchors(self, anchor_prompts: Sequence[Any] | None) -> None:
        """General prompts (after the task prefixes in :attr:`prefixes`) with an empty experience set of their own."""
        self.task_prefixes = len(self.prefixes)
        self.anchor_indices: list[int] = []
        self.no_experience_index: int | None = None
        self._anchor_order: list[int] = []
        if self.config.anchor_fraction <= 0:
            return
        if anchor_prompts is None:
            from learner.opcd.anchors import GENERAL_PROMPTS

            anchor_prompts = GENERAL_PROMPTS
        for raw in anchor_prompts:
            conv = parse_conversation(raw)
            ids = _encode(self.tokenizer, conv)
            if len(ids) <= self.config.max_prompt_tokens:
                self.anchor_indices.append(len(self.prefixes))
                self.prefixes.append(conv)
                self.prompt_ids.append(ids)
        if not self.anchor_indices:
            raise DataError("anchor_fraction > 0 but no anchor prompt fits max_prompt_tokens")
        self.no_experience_index = len(self.experience_sets)
        self.experience_sets.append([])

    @property
    def task_experience_sets(self) -> int:
        """The experience sets task samples draw from (the anchors' empty set, when there is one, is last)."""
        return len(self.experience_sets) - (self.no_experience_index is not None)

    def anchors_per_batch(self) -> int:
        """How many samples of a batch are anchor prompts (at least one when anchors are on)."""
        if not self.anchor_indices:
            return 0
        return min(self.config.batch_size - 1, max(1, round(self.config.batch_size * self.config.anchor_fraction)))

    def teacher_prompt_ids(self, prefix_index: int, experience_index: int) -> list[int]:
        """The teacher's prompt: the prefix with experience set ``experience_index`` in its block."""
        key = (prefix_index, experience_index)
        ids = self._teacher_cache.get(key)
        if ids is None:
            conv = self.template.apply(self.prefixes[prefix_index], self.experience_sets[experience_index])
            ids = _encode(self.tokenizer, conv)
            self._teacher_cache[key] = ids
        return ids

    # --- models in their roles ----------------------------------------------------------------

    @contextmanager
    def _teacher(self) -> Iterator[Any]:
        """The causal LM with the round-start weights active (see the module docstring)."""
        if self.teacher_model is not None:
            yield self.teacher_model
            return
        if self.config.init_adapter is None:
            with self.model.disable_adapter():
                yield self._causal_lm("student")
            return
        self.model.set_adapter(TEACHER_ADAPTER)  # also freezes the student adapter while active ...
        try:
            yield self._causal_lm("student")
        finally:
            self.model.set_adapter(STUDENT_ADAPTER)  # ... and this makes it trainable again

    def _hidden(self, causal_lm: Any, rows: list[list[int]], past: Any = None, past_len: int = 0) -> torch.Tensor:
        """Final hidden states (after the last norm) of right-padded rows: [batch, width, hidden].
        With ``past`` (a cache holding ``past_len`` shared leading tokens of every row), ``rows`` are the rest."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), past_len + width), dtype=torch.long)
        mask[:, :past_len] = 1
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, past_len : past_len + len(r)] = 1
        device = next(causal_lm.parameters()).device
        kwargs: dict[str, Any] = {"use_cache": past is not None}
        if past is not None:
            kwargs["past_key_values"] = past
            kwargs["position_ids"] = torch.arange(past_len, past_len + width, device=device)[None].expand(len(rows), -1)
        out = causal_lm.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        return out.last_hidden_state

    def _answer_hidden(self, causal_lm: Any, prompts: list[list[int]], responses: list[list[int]]) -> list[torch.Tensor]:
        """Per row, the final hidden states that predict its answer tokens ([len(answer), hidden]), the rows run in
        micro-batches of similar length (:func:`length_groups`): the student's rows and the teacher's rows without
        a cached prompt are computed alike, so equal contexts give equal numbers."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
        for group in length_groups([len(p) + len(r) for p, r in zip(prompts, responses)]):
            hidden = self._hidden(causal_lm, [prompts[i] + responses[i] for i in group])
            sizes = [len(responses[i]) for i in group]
            flat = self._gather(hidden, [len(prompts[i]) for i in group], sizes)
            for i, h in zip(group, torch.split(flat, sizes)):
                out[i] = h
        return out

    @staticmethod
    def _gather(hidden: torch.Tensor, prompt_lens: list[int], response_lens: list[int]) -> torch.Tensor:
        """Hidden states that predict the answer tokens: row i, positions len(prompt_i)-1 .. len(prompt_i)+n_i-2."""
        parts = [hidden[i, p - 1 : p - 1 + n] for i, (p, n) in enumerate(zip(prompt_lens, response_lens)) if n > 0]
        return torch.cat(parts, dim=0) if parts else hidden.new_zeros((0, hidden.shape[-1]))

    def _head(self, causal_lm: Any, role: str = "student") -> Callable[[torch.Tensor], torch.Tensor]:
        """The output projection (hidden -> logits). A head that carries a LoRA adapter itself is run, for the
        teacher, inside the teacher's context (the chunked loss calls it outside)."""
        head = causal_lm.get_output_embeddings()
        cap = getattr(causal_lm.config, "final_logit_softcapping", None)

        def project(h: torch.Tensor) -> torch.Tensor:
            if role == "teacher" and self.teacher_model is None and hasattr(head, "base_layer"):
                with self._teacher():
                    logits = head(h)
            else:
                logits = head(h)
            return torch.tanh(logits / cap) * cap if cap else logits

        return project

    # --- sampling -----------------------------------------------------------------------------

    @torch.no_grad()  # not inference_mode: the prompts' keys and values may be reused in the loss's graph
    def generate(self, prompts: list[list[int]], *, greedy: bool = False, lm: Any = None) -> list[tuple[list[int], str]]:
        """One answer per prompt: (token ids, finish reason). By default sampled from the student (current
        weights) at ``temperature``; ``greedy`` takes the most likely token; ``lm`` decodes with another model
        (the teacher inside :meth:`_teacher`).

        When sampling from the student, the keys and values of the prompts but their last token are kept
        (:attr:`_sampled_prompts`), computed with gradient under ``prompt_gradient``: the loss of the same batch
        at the same weights reuses them instead of running the prompts again (:meth:`_student_micro_batches`)."""
        from transformers import DynamicCache

        cfg = self.config
        keep_prompts = lm is None and not greedy
        lm = self.model if lm is None else lm
        was_training = lm.training
        lm.eval()
        try:
            ids, mask = pad_left(prompts, self.pad_id)
            ids, mask = ids.to(self.device), mask.to(self.device)
            width = ids.shape[1]
            cache = DynamicCache(config=self._causal_lm("student").config)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            if keep_prompts:
                self._sampled_prompts = None
            # Dropout would make the training forward differ from sampling's: then the loss runs the prompts again.
            if keep_prompts and cfg.lora_dropout == 0 and width > 1 and all(len(p) > 1 for p in prompts):
                with torch.set_grad_enabled(cfg.prompt_gradient):
                    lm(
                        input_ids=ids[:, :-1],
                        attention_mask=mask[:, :-1],
                        position_ids=pos[:, :-1],
                        past_key_values=cache,
                        use_cache=True,
                        logits_to_keep=1,
                    )
                # Decoding appends to the cache by concatenation (new tensors, no gradient): these stay as computed.
                self._sampled_prompts = _PromptKV(
                    [list(p) for p in prompts], self.step_count, [(k, v) for k, v, *_ in cache], mask[:, :-1].clone(), cfg.prompt_gradient
                )
                ids, pos = ids[:, -1:], pos[:, -1:]
            eos = torch.tensor(self.eos_ids, dtype=torch.long, device=self.device)

            def choose(logits: torch.Tensor, active: list[int], step: int) -> list[int]:
                if step < cfg.min_new_tokens and len(eos):
                    logits[:, eos] = float("-inf")
                return (logits.argmax(-1) if greedy else self._sample(logits)).tolist()

            with plain_lora_forwards(lm):
                logits = (
                    lm(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    .logits[:, -1, :]
                    .float()
                )
                responses, reasons = decode_batch(
                    lm,
                    cache,
                    logits,
                    mask,
                    cfg.max_new_tokens,
                    choose,
                    lambda row, response: "stop" if response[-1] in self.eos_ids else None,
                )
            return list(zip(responses, reasons))
        finally:
            lm.train(was_training)

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits / self.config.temperature, dim=-1)
        if self.config.top_p < 1.0:
            sorted_p, idx = probs.sort(-1, descending=True)
            cum = sorted_p.cumsum(-1)
            sorted_p[(cum - sorted_p) >= self.config.top_p] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]

    def next_prefixes(self, n: int) -> list[int]:
        """The next ``n`` task prefix indices: epochs over the task prefixes, each in a fresh random order."""
        return self._draw(self._order, range(self.task_prefixes), n)

    def _draw(self, order: list[int], population: Sequence[int], n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if not order:
                order.extend(population)
                self.rng.shuffle(order)
            out.append(order.pop())
        return out

    def rollout(self, prefix_indices: Sequence[int] | None = None) -> list[Rollout]:
        """Sample answers (student, no experience) and attach the teacher prompts: one experience set drawn
        per task sample; an anchor prompt's teacher sees no experience."""
        if prefix_indices is None:
            anchors = self.anchors_per_batch()
            prefix_indices = self.next_prefixes(self.config.batch_size - anchors)
            prefix_indices += self._draw(self._anchor_order, self.anchor_indices, anchors)
        prompts = [self.prompt_ids[i] for i in prefix_indices]
        answers: list[tuple[list[int], str]] = [([], "")] * len(prompts)
        kept: list[_PromptKV] | None = []
        for group in length_groups([len(p) for p in prompts]):
            for k, answer in zip(group, self.generate([prompts[k] for k in group])):
                answers[k] = answer
            if kept is not None and self._sampled_prompts is not None:
                self._sampled_prompts.rows = list(group)
                kept.append(self._sampled_prompts)
            else:
                kept = None
        self._sampled_prompts = None
        self._sampled_groups = kept
        out = []
        for i, (resp, reason) in zip(prefix_indices, answers):
            e = self.no_experience_index if i >= self.task_prefixes else self.rng.randrange(self.task_experience_sets)
            out.append(Rollout(i, e, self.prompt_ids[i], self.teacher_prompt_ids(i, e), resp, reason))
        return out

    # --- how far the student is from the teacher ------------------------------------------------

    def check_prefixes(self) -> list[int]:
        """The task prefixes :meth:`agreement` compares on: up to ``check_prefixes`` of them, evenly spread."""
        n = min(self.config.check_prefixes, self.task_prefixes)
        return sorted({round(i * self.task_prefixes / n) for i in range(n)}) if n else []

    def agreement(self, prefix_indices: Sequence[int] | None = None) -> float:
        """How closely the student without experience answers as the teacher with experience does, greedily:
        the mean, over prefixes, of the share of the teacher's first ``max_new_tokens`` answer tokens that the
        student's greedy answer reproduces from the start. 1.0: the student starts every answer exactly as the
        teacher would with the knowledge in context; that, not the loss, is what a consolidated model is for.
        The teacher's answers (newest experience set) are computed once per round."""
        indices = list(self.check_prefixes() if prefix_indices is None else prefix_indices)
        if not indices:
            return 0.0
        missing = [i for i in indices if i not in self._teacher_answers]
        if missing:
            with self._teacher() as teacher:
                answers = self.generate([self.teacher_prompt_ids(i, 0) for i in missing], greedy=True, lm=teacher)
            self._teacher_answers.update((i, a) for i, (a, _) in zip(missing, answers))
        student = self.generate([self.prompt_ids[i] for i in indices], greedy=True)
        shares = []
        for i, (answer, _) in zip(indices, student):
            target = self._teacher_answers[i]
            same = 0
            while same < min(len(target), len(answer)) and target[same] == answer[same]:
                same += 1
            shares.append(same / max(1, len(target)))
        return sum(shares) / len(shares)

    # --- loss and update ----------------------------------------------------------------------

    def loss(self, batch: Sequence[Rollout], backward: bool = False) -> LossStats:
        """The OPCD loss of a batch; with ``backward`` the student's gradients are accumulated too.

        With ``backward``, the student's rows run forward, loss and backward in micro-batches of at most
        ``backward_chunk_tokens`` positions (:meth:`_student_micro_batches`): each part's gradient is its share of
        the batch's mean, so the parts add up to the batch's gradient."""
        cfg = self.config
        with torch.no_grad(), self._teacher() as teacher:
            t_hidden = self._teacher_hidden(teacher, batch)
            teacher_head = self._head(teacher, role="teacher")
        student = self._causal_lm("student")
        student_head = self._head(student)
        starts = [0]
        for r in batch:
            starts.append(starts[-1] + len(r.response_ids))
        n = starts[-1]
        parts: list[LossStats] = []
        for rows, s_graph in self._student_micro_batches(student, batch, backward):
            t_rows = t_hidden if rows == list(range(len(batch))) else torch.cat([t_hidden[starts[i] : starts[i + 1]] for i in rows])
            stats, grad = chunked_opcd_loss(
                s_graph,
                t_rows,
                student_head,
                teacher_head,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                chunk_tokens=cfg.loss_chunk_tokens,
                backward=backward,
                forward_weight=cfg.forward_kl_weight,
                mean_over=n,
            )
            if backward and grad is not None and s_graph.requires_grad:
                s_graph.backward(grad.to(s_graph.dtype))
            del s_graph, grad
            parts.append(stats)
            if backward:
                _release_free_memory()  # the next micro-batch's activations reuse this one's pages, not new ones
        if len(parts) == 1:
            return parts[0]
        if n == 0:
            return LossStats(0.0, 0.0, 0)
        return LossStats(sum(p.loss * p.tokens for p in parts) / n, sum(p.kl * p.tokens for p in parts) / n, n)

    @staticmethod
    def _micro_batches(sizes: Sequence[int], budget: int | None) -> list[list[int]]:
        """Consecutive positions 0..len(sizes)-1 split into runs whose sizes add up to at most ``budget`` (a run
        holds at least one position); ``None``: one run."""
        if budget is None:
            return [list(range(len(sizes)))] if sizes else []
        out: list[list[int]] = []
        total = 0
        for i, size in enumerate(sizes):
            if out and total + size <= budget:
                out[-1].append(i)
                total += size
            else:
                out.append([i])
                total = size
        return out

    def _student_micro_batches(self, student: Any, batch: Sequence[Rollout], backward: bool) -> Iterator[tuple[list[int], torch.Tensor]]:
        """The student's final hidden states at the answer positions, by micro-batch: ``(rows, [their answer tokens,
        hidden])``, each row's tokens in order. Without ``backward``, one micro-batch per group of rows.

        The keys and values of each prompt but its last token come from sampling when the batch was sampled at
        these very weights (:attr:`_sampled_groups`), and only the last prompt token and the answer run here on top
        of them: with ``prompt_gradient`` (the default) those keys and values carry their graph, so the gradient is
        the full one and the prompts' forward pass is not run twice. When a sampled group runs as several
        micro-batches, each reads those keys and values through a detached copy that collects their gradient, and
        once the group's last micro-batch has been backpropagated (the caller's backward comes before it asks for
        the next one) the sum goes through the prompts' graph, once. Otherwise, with ``prompt_gradient`` the whole
        of every prompt runs again in the graph; without it the prompts' keys and values are computed without
        gradient, so the adapter's effect on them gets none (cheaper, approximate)."""
        budget = self.config.backward_chunk_tokens if backward else None
        groups = self._kept_prompt_groups(batch, backward)
        if groups is None:
            if self.config.prompt_gradient or not all(len(r.student_prompt_ids) > 1 for r in batch):
                sizes = [len(r.student_prompt_ids) + len(r.response_ids) for r in batch]
                for rows in self._micro_batches(sizes, budget):
                    with torch.set_grad_enabled(backward):
                        answers = self._answer_hidden(
                            student, [batch[i].student_prompt_ids for i in rows], [batch[i].response_ids for i in rows]
                        )
                        hidden = torch.cat(answers, dim=0)
                    del answers
                    yield rows, hidden
                return
            groups = [self._prompt_kv(student, batch)]
        for group in groups:
            parts = self._micro_batches([1 + len(batch[i].response_ids) for i in group.rows], budget)
            if len(parts) == 1:
                hidden = torch.cat(self._tail_hidden(student, [batch[i] for i in group.rows], group, backward), dim=0)
                yield group.rows, hidden
                continue
            through = backward and group.with_grad
            leaves = [(k.detach().requires_grad_(through), v.detach().requires_grad_(through)) for k, v in group.kv]
            for part in parts:
                idx = torch.tensor(part, dtype=torch.long, device=group.mask.device)
                rows = [group.rows[j] for j in part]
                sub = _PromptKV(
                    [group.prompts[j] for j in part],
                    group.step,
                    [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in leaves],
                    group.mask.index_select(0, idx),
                    group.with_grad,
                    rows,
                )
                hidden = torch.cat(self._tail_hidden(student, [batch[i] for i in rows], sub, backward), dim=0)
                del sub
                yield rows, hidden
            if through:
                outputs, grads = [], []
                for pair, leaf_pair in zip(group.kv, leaves):
                    for t, leaf in zip(pair, leaf_pair):
                        if leaf.grad is not None and t.requires_grad:
                            outputs.append(t)
                            grads.append(leaf.grad)
                if outputs:
                    torch.autograd.backward(outputs, grads)

    def _kept_prompt_groups(self, batch: Sequence[Rollout], backward: bool) -> list[_PromptKV] | None:
        """Sampling's prompt keys and values, if they are those of this batch at the current weights (and carry
        the gradient this loss needs); a graph is backpropagated once, so a backward pass uses them up."""
        kept = self._sampled_groups
        if not kept or sorted(i for g in kept for i in g.rows) != list(range(len(batch))):
            return None
        for g in kept:
            if g.step != self.step_count or g.prompts != [batch[i].student_prompt_ids for i in g.rows]:
                return None
            if backward and self.config.prompt_gradient and not g.with_grad:
                return None
        if backward:
            self._sampled_groups = None
        return kept

    def _prompt_kv(self, student: Any, batch: Sequence[Rollout]) -> _PromptKV:
        """The prompts' keys and values (all but each last token), left-padded, without gradient."""
        from transformers import DynamicCache

        device = next(student.parameters()).device
        prompts = [r.student_prompt_ids[:-1] for r in batch]
        ids, mask = pad_left(prompts, self.pad_id)
        cache = DynamicCache(config=student.config)
        with torch.no_grad():
            student.get_decoder()(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device),
                past_key_values=cache,
                use_cache=True,
            )
        return _PromptKV(prompts, self.step_count, [(k, v) for k, v, *_ in cache], mask, False, list(range(len(batch))))

    def _tail_hidden(self, student: Any, batch: Sequence[Rollout], prompts: _PromptKV, backward: bool) -> list[torch.Tensor]:
        """Per row, the hidden states that predict its answer: the last prompt token and the answer run on top of
        the prompt's keys and values ``prompts`` (whose rows are ``batch``, in order)."""
        from transformers import DynamicCache

        device = next(student.parameters()).device
        n = len(batch)
        tails = [[r.student_prompt_ids[-1], *r.response_ids] for r in batch]
        tail_width = max(len(t) for t in tails)
        tail_ids = torch.full((n, tail_width), self.pad_id, dtype=torch.long)
        tail_mask = torch.zeros((n, tail_width), dtype=torch.long)
        for i, t in enumerate(tails):
            tail_ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
            tail_mask[i, : len(t)] = 1
        starts = torch.tensor([len(r.student_prompt_ids) - 1 for r in batch], dtype=torch.long)[:, None]
        cache = DynamicCache(ddp_cache_data=list(prompts.kv))
        with torch.set_grad_enabled(backward):
            hidden = student.get_decoder()(
                input_ids=tail_ids.to(device),
                attention_mask=torch.cat([prompts.mask.to(device), tail_mask.to(device)], dim=1),
                position_ids=(starts + torch.arange(tail_width)[None]).to(device),
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
        return [hidden[i, : len(r.response_ids)] for i, r in enumerate(batch)]

    # --- the teacher's shared-prefix cache ----------------------------------------------------

    def _prefix_cache_supported(self, causal_lm: Any) -> bool:
        cfg = causal_lm.config.get_text_config(decoder=True) if hasattr(causal_lm.config, "get_text_config") else causal_lm.config
        types = getattr(cfg, "layer_types", None) or []
        if any(t != "full_attention" for t in types):
            return False
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            return False
        return True

    def shared_teacher_prefix(self, prefix_index: int, experience_index: int) -> int:
        """How many leading tokens of the teacher's prompt are shared by every prefix with the same system
        message and experience set: the chat template's opening and the experience block. The teacher is frozen
        for the whole round, so their keys and values are computed once and reused (``teacher_cache_tokens``)."""
        key = (prefix_index, experience_index)
        n = self._shared_len.get(key)
        if n is None:
            from oel.model.chat import render_chat

            n = 0
            items = self.experience_sets[experience_index]
            if items:
                conv = self.template.apply(self.prefixes[prefix_index], items)
                text = render_chat(self.tokenizer, conv, add_generation_prompt=True)
                block = self.template.block(items)
                at = text.find(block)
                if at >= 0:
                    head = self.tokenizer.encode(text[: at + len(block)], add_special_tokens=False)
                    full = self.teacher_prompt_ids(prefix_index, experience_index)
                    while n < min(len(head), len(full)) and head[n] == full[n]:
                        n += 1
                    n = min(n, len(full) - 1)  # the last prompt token must be fed: it predicts the first answer token
                    if n < self.config.teacher_cache_min_tokens:
                        n = 0
            self._shared_len[key] = n
        return n

    def _prefix_kv(self, teacher: Any, ids: tuple[int, ...], base_len: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The teacher's keys and values of ``ids`` (one row), from the round's cache or computed and cached
        (least recently used dropped beyond ``teacher_cache_tokens``). With ``base_len``, the keys and values
        of ``ids[:base_len]`` (a shared experience block) are taken from the cache first and extended."""
        from transformers import DynamicCache

        kv = self._kv_cache.get(ids)
        if kv is not None:
            self._kv_cache.move_to_end(ids)
            return kv
        device = next(teacher.parameters()).device
        if 0 < base_len < len(ids):
            base = self._prefix_kv(teacher, ids[:base_len])
            cache = DynamicCache(ddp_cache_data=list(base))
            rest = ids[base_len:]
        else:
            cache, rest = DynamicCache(), ids
        teacher.get_decoder()(input_ids=torch.tensor([list(rest)], device=device), past_key_values=cache, use_cache=True)
        kv = [(k, v) for k, v, *_ in cache]
        self._kv_cache[ids] = kv
        total = sum(len(key) for key in self._kv_cache)
        while len(self._kv_cache) > 1 and total > self.config.teacher_cache_tokens:
            old, _ = self._kv_cache.popitem(last=False)
            total -= len(old)
        return kv

    def _teacher_hidden(self, teacher: Any, batch: Sequence[Rollout]) -> torch.Tensor:
        """The teacher's final hidden states at the answer positions, [answer tokens, hidden], in batch order.

        The teacher is frozen for the round, so the keys and values of each teacher prompt (all but its last
        token, which predicts the first answer token) are computed once, on top of the cached experience block
        it shares with other prefixes (:meth:`shared_teacher_prefix`), and reused whenever the prefix is drawn
        again: a row then runs only its last prompt token and its answer."""
        use_cache = self.config.teacher_cache_tokens > 0 and self._prefix_cache_supported(teacher)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, r in enumerate(batch):
            # A row without experience (teacher prompt = student prompt) runs its whole prompt, not a cached one: at
            # the start of a round its loss is 0 up to float rounding (the student's prompt keys and values come
            # from sampling's left-padded micro-batch).
            cacheable = (
                use_cache
                and len(r.teacher_prompt_ids) > self.config.teacher_cache_min_tokens
                and r.teacher_prompt_ids != r.student_prompt_ids
                and r.teacher_prompt_ids == self.teacher_prompt_ids(r.prefix_index, r.experience_index)
            )
            groups.setdefault((r.prefix_index, r.experience_index) if cacheable else (-1, -1), []).append(i)
        parts: list[torch.Tensor | None] = [None] * len(batch)
        for (prefix_index, experience_index), rows in groups.items():
            sub = [batch[i] for i in rows]
            if prefix_index < 0:  # micro-batched by length as the student's rows are (same padding, same numbers)
                answers = self._answer_hidden(teacher, [r.teacher_prompt_ids for r in sub], [r.response_ids for r in sub])
                for i, h in zip(rows, answers):
                    parts[i] = h
                continue
            else:
                from transformers import DynamicCache

                prompt = tuple(sub[0].teacher_prompt_ids)
                p = len(prompt) - 1
                kv = self._prefix_kv(teacher, prompt[:p], self.shared_teacher_prefix(prefix_index, experience_index))
                b = len(sub)
                cache = DynamicCache(ddp_cache_data=[(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in kv])
                hidden = self._hidden(teacher, [r.teacher_prompt_ids[p:] + r.response_ids for r in sub], past=cache, past_len=p)
            for j, (i, r) in enumerate(zip(rows, sub)):
                start = len(r.teacher_prompt_ids) - 1 - p
                parts[i] = hidden[j, start : start + len(r.response_ids)]
        return torch.cat([x for x in parts if x is not None], dim=0)

    def train_step(self, batch: Sequence[Rollout]) -> tuple[LossStats, float]:
        """One optimizer step on a given batch: (loss stats before the update, gradient norm before clipping)."""
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.trainable_params:
            p.grad = None
        stats = self.loss(batch, backward=True)
        params = self.trainable_params
        if self.master_params is not None:
            for m, p in zip(self.master_params, self.trainable_params):
                m.grad = p.grad.float() if p.grad is not None else None
                p.grad = None
            params = self.master_params
        if self.config.max_grad_norm and self.config.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        else:
            grads = [p.grad.norm() for p in params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.tensor(0.0)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.master_params is not None:
            with torch.no_grad():
                for m, p in zip(self.master_params, self.trainable_params):
                    p.copy_(m)
        self.step_count += 1
        return stats, float(norm)

    def step(self) -> StepMetrics:
        """Sample a batch on-policy and take one optimizer step on it."""
        t0 = time.perf_counter()
        batch = self.rollout()
        _release_free_memory()
        t1 = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        stats, norm = self.train_step(batch)
        _release_free_memory()
        t2 = time.perf_counter()
        n_tok = sum(len(r.response_ids) for r in batch)
        m = StepMetrics(
            step=self.step_count,
            loss=stats.loss,
            kl=stats.kl,
            response_tokens=n_tok,
            tokens_per_s=n_tok / (t2 - t0) if t2 > t0 else 0.0,
            seconds=t2 - t0,
            sample_seconds=t1 - t0,
            train_seconds=t2 - t1,
            grad_norm=norm,
            learning_rate=lr,
            mean_response_tokens=n_tok / max(1, len(batch)),
            stopped_fraction=sum(r.finish_reason == "stop" for r in batch) / max(1, len(batch)),
        )
        self.history.append(m)
        log.info(
            "step %d: loss %.4f kl %.4f tokens %d (%.1f tok/s; sampling %.1f s, update %.1f s)",
            m.step,
            m.loss,
            m.kl,
            n_tok,
            m.tokens_per_s,
            m.sample_seconds,
            m.train_seconds,
        )
        return m

    def train(self, steps: int | None = None, callback: Callable[[StepMetrics], None] | None = None) -> OPCDResult:
        """Run ``steps`` (default ``config.steps``) steps; ``callback`` sees each step's metrics.

        With ``check_every``, the student's agreement with the teacher is measured before the first step and
        every ``check_every`` steps; the run stops early at ``stop_agreement`` and ends with the weights of
        the best check (the earliest of equals), which is what the round's gates then evaluate."""
        cfg = self.config
        t0 = time.monotonic()
        first = len(self.history)
        total = steps if steps is not None else cfg.steps
        checks: list[Check] = []
        best: tuple[float, int, list[torch.Tensor]] | None = None

        def check() -> bool:
            nonlocal best
            t = time.perf_counter()
            c = Check(self.step_count, self.agreement(), time.perf_counter() - t)
            checks.append(c)
            log.info("check after step %d: agreement %.3f (%.1f s)", c.step, c.agreement, c.seconds)
            if best is None or c.agreement > best[0]:
                best = (c.agreement, c.step, [p.detach().clone() for p in self._weights()])
            return cfg.stop_agreement is not None and c.agreement >= cfg.stop_agreement

        stop = cfg.check_every > 0 and check()
        done = 0
        while done < total and not stop:
            m = self.step()
            done += 1
            if callback is not None:
                callback(m)
            if cfg.check_every > 0 and (done % cfg.check_every == 0 or done == total):
                stop = check()
        kept = None
        if best is not None:
            kept = best[1]
            if kept != self.step_count:
                self._restore(best[2])
                log.info("kept the weights of step %d (agreement %.3f), not the last step's (%d)", kept, best[0], self.step_count)
        return OPCDResult(self.history[first:], list(self.experience_cuts), self.skipped_prefixes, time.monotonic() - t0, checks, kept)

    def _weights(self) -> list[torch.Tensor]:
        """The trained weights in full precision (the float32 masters under mixed precision)."""
        return self.master_params if self.master_params is not None else self.trainable_params

    @torch.no_grad()
    def _restore(self, saved: Sequence[torch.Tensor]) -> None:
        for w, v in zip(self._weights(), saved):
            w.copy_(v)
        if self.master_params is not None:
            for m, p in zip(self.master_params, self.trainable_params):
                p.copy_(m)

    # --- saving -------------------------------------------------------------------------------

    @contextmanager
    def _float32_adapter(self) -> Iterator[None]:
        """With mixed precision, put the float32 master weights into the adapter for the duration (to save them)."""
        if self.master_params is None:
            yield
            return
        low = [p.data for p in self.trainable_params]
        for m, p in zip(self.master_params, self.trainable_params):
            p.data = m.detach()
        try:
            yield
        finally:
            for d, p in zip(low, self.trainable_params):
                p.data = d

    def save(self, out_dir: str | Path, result: OPCDResult | None = None, extra: dict[str, Any] | None = None) -> Path:
        """Write the adapter (peft ``save_pretrained``; the whole model for a full fine-tune) and
        ``opcd-summary.json`` (configuration, per-step metrics, experience cuts) into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.config.finetune == "lora":
            with self._float32_adapter():
                self.model.save_pretrained(str(out), selected_adapters=[STUDENT_ADAPTER])
        else:
            self.model.save_pretrained(str(out))
            self.tokenizer.save_pretrained(str(out))
        summary: dict[str, Any] = {
            "config": self.config.to_dict(),
            "model_path": str(self.model_path) if self.model_path else None,
            "finetune": self.config.finetune,
            "learning_rate": self.config.effective_learning_rate,
            "dtype": self.config.effective_dtype,
            "prefixes": self.task_prefixes,
            "anchor_prompts": len(self.anchor_indices),
            "experience_sets": [len(s) for s in self.experience_sets],
            "steps_done": self.step_count,
        }
        if self.model_path is not None and (self.model_path / "config.json").is_file():
            try:
                from oel.model.prepare import model_hash

                summary["base_model_hash"] = model_hash(self.model_path)
            except Exception:  # a model folder without weight files in the expected form
                log.debug("no model hash for %s", self.model_path, exc_info=True)
        summary.update((result or OPCDResult(self.history, list(self.experience_cuts), self.skipped_prefixes, 0.0)).to_dict())
        if extra:
            summary.update(extra)
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        return out
