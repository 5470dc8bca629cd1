"""The one configuration object of the OPCD trainer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from oel.settings import KB_TOKEN_BUDGET, Settings


@dataclass
class OPCDConfig:
    """On-policy context distillation (OPCD) of an experience into the weights.

    Each step: the student (current weights) samples one answer per training prefix, **without**
    experience in context, at ``temperature``; the frozen teacher (the round-start weights) scores
    the same answer tokens **with** an experience block in context (one experience set drawn at
    random per sample); the student takes one AdamW step on the mean, over answer tokens, of the
    reverse KL restricted to its own ``top_k`` tokens, with a ``forward_kl_weight`` share of forward KL
    (see :mod:`learner.opcd.loss`). The class defaults are the paper's recipe; the learner's settings
    (``OEL_LEARNER__*``) carry the one measured on the default model.
    """

    # --- model -------------------------------------------------------------------------------
    model_path: str | Path | None = None
    """A local Hugging Face model folder. ``None``: the project's default model (SmolLM2-135M-Instruct),
    converted on first use (``oel.model.prepare.resolve_model_path``)."""
    dtype: Literal["bfloat16", "float32", "float16"] | None = None
    """Weights dtype. ``None``: for LoRA, bfloat16 where the machine computes it natively
    (:func:`oel.model.hf_backend.resolve_dtype`), else float32; float32 for a full fine-tune (AdamW updates
    of ~1e-6 vanish in bfloat16 weights)."""
    device: str | None = None
    """Where the student, the teacher, sampling and the loss run: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``
    (``OEL_MODEL__DEVICE``; :func:`oel.model.hf_backend.resolve_device`). ``None``: the device of a model passed
    to the trainer, else ``auto`` (a GPU when torch sees one)."""
    finetune: Literal["lora", "full"] = "lora"
    """Train a LoRA adapter (default) or every weight."""
    init_adapter: str | Path | None = None
    """The parent adapter (the previous round's output) that this round continues from. It is both the
    student's starting point and, frozen, the teacher (base + parent = the round-start weights).
    ``None``: a fresh adapter; the teacher is then the base model with the adapter disabled, which is
    exactly the round-start model because a fresh LoRA's B matrices are zero."""
    lora_rank: int = 16
    lora_alpha: float | None = None
    """LoRA scaling numerator; ``None`` = 2 x rank."""
    lora_dropout: float = 0.0
    lora_target_modules: str | list[str] = "all-linear"
    """Which linear layers get adapters (peft's ``target_modules``; ``"all-linear"`` = every linear but the head)."""
    adapter_mixed_precision: bool = True
    """With a bfloat16/float16 base: the LoRA weights compute in that dtype and AdamW updates float32 master
    copies (saved as the adapter). Saves the float32 copies of every layer input that peft's float32 adapters
    make, and their time. False: peft's float32 adapters."""

    # --- optimisation ------------------------------------------------------------------------
    steps: int = 40
    """Optimizer steps (the paper uses 20-100 per round)."""
    batch_size: int = 4
    """Prefixes per step; one on-policy sample each."""
    learning_rate: float | None = None
    """Constant AdamW learning rate. ``None``: 1e-4 for LoRA, 1e-6 for a full fine-tune (the paper's)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """``constant`` (the paper's) or ``cosine``: from ``learning_rate`` down to 0 at ``steps``."""
    warmup_steps: int = 0
    """Steps over which the learning rate rises linearly to ``learning_rate`` first (Adam's first updates are
    close to the gradient's sign times the learning rate, for every weight at once)."""
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    """Gradient clipping (global L2 norm); 0 disables it."""

    # --- sampling ----------------------------------------------------------------------------
    temperature: float = 0.7
    """Sampling temperature; the loss divides both models' logits by it too."""
    top_p: float = 1.0
    prefix_turns: Literal["all", "first"] = "all"
    """Which training prefixes the student answers: ``all`` turn-prefixes (the paper's) or only each
    conversation's ``first`` turn (one user message). See bench/README.md for when the first turn alone is
    the better signal (a teacher whose experience block helps the opening answer but disturbs later turns)."""
    max_prompt_tokens: int = 2048
    """Longest student prompt (chat template applied). Longer prefixes are left out and counted, never truncated."""
    max_new_tokens: int = 64
    """Longest sampled answer."""
    min_new_tokens: int = 0
    """Suppress end-of-sequence before this many tokens (benchmarks use it to fix the answer length)."""

    # --- loss --------------------------------------------------------------------------------
    prompt_gradient: bool = True
    """Backpropagate through the whole prompt (exact). False: the prompt's keys and values (all but its last
    token) are computed without gradient and only the last prompt token and the answer are in the graph, so
    the adapter's effect on the prompt's keys and values gets no gradient. Several times cheaper per step
    for short answers after long prompts; see bench/README.md for what it did to learning."""
    top_k: int | None = 256
    """Size of the student's top-k support of the KL; ``None`` = exact full-vocabulary reverse KL."""
    forward_kl_weight: float = 0.0
    """Share of forward KL mixed into the loss at the student's sampled positions (:mod:`learner.opcd.loss`):
    0 = the paper's reverse KL; raise it when the teacher's preferred continuation is one the student finds
    unlikely (reverse KL barely raises such tokens)."""
    loss_chunk_tokens: int = 64
    """Answer positions projected to the vocabulary at once (bounds the memory of the logits)."""
    backward_chunk_tokens: int = 64
    """Student positions whose activations are held for the backward pass at once: the rows of a batch run the
    student's forward, loss and backward in micro-batches of at most this many positions (a row's answer and last
    prompt token; its whole prompt too when the prompt runs again), a row is never split. Bounds the memory of the
    graph; the loss and its gradient are those of the whole batch (the micro-batches' gradients add up, those
    through the prompts' keys and values from sampling are backpropagated once at the end)."""
    teacher_cache_tokens: int = 32768
    """The teacher is frozen for the round, so the keys/values of the part of its prompt that every prefix
    shares (chat-template opening + experience block) are computed once per experience set, and those of
    each whole teacher prompt once per prefix, and reused; this bounds the cached tokens (least recently
    used dropped first). 0 disables the cache."""
    teacher_cache_min_tokens: int = 32
    """Shared parts shorter than this are not worth caching and are recomputed with the rest."""

    # --- experience --------------------------------------------------------------------------
    experience_token_budget: int = KB_TOKEN_BUDGET
    """Most tokens of experience in the teacher prompt; a larger set loses its oldest items (reported)."""
    experience_position: Literal["first_user", "last_user"] = "first_user"
    """Which user message of a prefix gets the experience block."""

    anchor_fraction: float = 0.0
    """Share of each batch drawn from general prompts (:mod:`learner.opcd.anchors`) whose teacher sees no
    experience, so the student keeps the round-start model's behaviour outside the namespace's tasks.
    0 = task prefixes only (the paper's recipe)."""

    # --- checks ------------------------------------------------------------------------------
    check_every: int = 0
    """Every this many steps (and before the first), measure how closely the student without experience
    answers as the teacher with it does (:meth:`OPCDTrainer.agreement`), and keep the weights of the best
    check (the earliest of equals) as the run's result. 0: no checks; the last step's weights are the result."""
    stop_agreement: float | None = None
    """With checks: stop as soon as a check reaches this agreement (``steps`` is then the most). None: run
    every step."""
    check_prefixes: int = 16
    """Task prefixes on which the checks compare the student's greedy answers with the teacher's."""

    # --- run ---------------------------------------------------------------------------------
    seed: int = 0
    """Seeds prefix order, experience draws, sampling and a fresh adapter's initialisation."""
    num_threads: int | None = None
    """torch intra-op threads; ``None`` leaves torch's default."""

    def __post_init__(self) -> None:
        if self.finetune not in ("lora", "full"):
            raise ValueError(f"finetune must be 'lora' or 'full', got {self.finetune!r}")
        if self.finetune == "full" and self.init_adapter is not None:
            raise ValueError("init_adapter is for LoRA; for a full fine-tune point model_path at the round-start weights")
        for name in (
            "steps",
            "batch_size",
            "max_new_tokens",
            "max_prompt_tokens",
            "experience_token_budget",
            "loss_chunk_tokens",
            "backward_chunk_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if not 0 < self.temperature:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.anchor_fraction < 1.0:
            raise ValueError(f"anchor_fraction must be in [0, 1), got {self.anchor_fraction}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not 0.0 <= self.forward_kl_weight <= 1.0:
            raise ValueError(f"forward_kl_weight must be in [0, 1], got {self.forward_kl_weight}")
        if self.prefix_turns not in ("all", "first"):
            raise ValueError(f"prefix_turns must be 'all' or 'first', got {self.prefix_turns!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.check_every < 0 or self.check_prefixes < 1:
            raise ValueError("check_every must be >= 0 and check_prefixes >= 1")
        if self.stop_agreement is not None and not 0.0 < self.stop_agreement <= 1.0:
            raise ValueError(f"stop_agreement must be in (0, 1], got {self.stop_agreement}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError("min_new_tokens must be between 0 and max_new_tokens")

    @property
    def effective_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if self.finetune == "lora" else 1e-6

    @property
    def effective_dtype(self) -> str:
        if self.dtype is not None:
            return self.dtype
        if self.finetune == "full":
            return "float32"
        from oel.model.hf_backend import resolve_dtype

        return resolve_dtype("auto", self.effective_device)

    @property
    def effective_device(self) -> str:
        """``device`` resolved (``None`` and ``auto``: ``cuda:0`` when torch sees a GPU, else ``cpu``)."""
        from oel.model.hf_backend import resolve_device

        return resolve_device(self.device or "auto")

    @property
    def effective_lora_alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
        return d

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> OPCDConfig:
        """The trainer's configuration from the service settings (``Settings.learner`` and ``Settings.model``),
        with keyword overrides on top."""
        learner = settings.learner
        values: dict[str, Any] = dict(
            model_path=settings.model.path,
            dtype=None if settings.model.dtype == "auto" else settings.model.dtype,
            device=getattr(settings.model, "device", "auto"),
            steps=learner.steps,
            batch_size=learner.batch_size,
            learning_rate=learner.learning_rate,
            temperature=learner.temperature,
            top_k=learner.top_k,
            max_new_tokens=learner.max_new_tokens,
            experience_token_budget=learner.experience_token_budget,
            lora_rank=learner.lora_rank,
            anchor_fraction=learner.anchor_fraction,
            prompt_gradient=learner.prompt_gradient,
            forward_kl_weight=learner.forward_kl_weight,
            prefix_turns=learner.prefix_turns,
            lr_schedule=learner.lr_schedule,
            warmup_steps=learner.warmup_steps,
            check_every=learner.check_every,
            stop_agreement=learner.stop_agreement,
        )
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown OPCDConfig fields: {sorted(unknown)}")
        values.update(overrides)
        return cls(**values)
