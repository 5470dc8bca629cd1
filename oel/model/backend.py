"""The one interface every service uses to run the model, whatever serves it.

Two implementations: the in-process transformers + peft backend (``oel.model.hf_backend``) and the
vLLM backend over its OpenAI-compatible HTTP API (``oel.model.vllm_backend``). Adapters are
addressed by immutable, versioned names: a name, once loaded, always means the same weights, so a
new model version is always a new name and never a reload.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from oel.schemas import ChatMessage

Conversation = list[ChatMessage]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Generation:
    """One sampled answer: its text, the exact token ids (prompt and response), and why it stopped."""

    text: str
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    finish_reason: str  # "stop" (end of sequence or stop string) or "length"
    adapter: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def response_tokens(self) -> int:
        return len(self.response_token_ids)


class BackendError(RuntimeError):
    """The backend could not serve a request (unreachable server, unknown adapter, mismatched adapter...)."""


class AdapterNameTaken(BackendError):
    """An adapter name was loaded again with other weights; versions must get new names."""


@dataclass
class AdapterInfo:
    """An adapter the backend holds."""

    name: str
    path: Path
    extra: dict[str, str] = field(default_factory=dict)


class Backend(ABC):
    """Batched chat generation with LoRA adapters selectable per request."""

    base_model: str
    """Identifier of the base model (its folder path or served name)."""

    @abstractmethod
    def generate(self, conversations: list[Conversation], params: SamplingParams, adapter: str | None = None) -> list[Generation]:
        """Answer every conversation (chat template applied, generation prompt added), in order."""

    @abstractmethod
    def load_adapter(self, name: str, path: Path) -> None:
        """Make the PEFT adapter in ``path`` available as ``name``. Loading the same name and path again is a no-op;
        the same name with a different path raises :class:`AdapterNameTaken`."""

    @abstractmethod
    def unload_adapter(self, name: str) -> None:
        """Drop an adapter (after requests using it have finished)."""

    @abstractmethod
    def list_adapters(self) -> list[str]:
        """Names of the adapters currently loaded."""

    def close(self) -> None:  # noqa: B027 - an optional hook: a no-op unless a backend holds resources
        """Release resources."""
