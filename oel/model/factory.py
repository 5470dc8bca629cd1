"""The backend the settings ask for: the one place services turn ``settings.model`` into a Backend."""

from __future__ import annotations

from oel.model.backend import Backend
from oel.settings import Settings


def make_backend(settings: Settings, *, max_batch_size: int | None = None) -> Backend:
    """In-process transformers + peft, or a client of the vLLM server, per ``OEL_MODEL__BACKEND``.

    ``max_batch_size`` caps the rows the in-process backend decodes together (None = its default);
    callers that batch many episodes per call (the reference agents) raise it. The vLLM server
    batches on its own, so it ignores the cap."""
    if settings.model.backend == "vllm":
        from oel.model.vllm_backend import VLLMBackend

        return VLLMBackend.from_settings(settings)
    from oel.model.hf_backend import HFBackend

    if max_batch_size is None:
        return HFBackend.from_settings(settings)
    return HFBackend.from_settings(settings, max_batch_size=max_batch_size)


def model_token_counter(settings: Settings):
    """Count tokens with the configured model's tokenizer without loading the model (or transformers): the
    ``tokenizers`` library reads its ``tokenizer.json``, the same counts as the model's fast tokenizer gives."""
    from oel.model.prepare import resolve_model_path

    path = resolve_model_path(settings) / "tokenizer.json"
    if not path.is_file():  # a slow-tokenizer model: only transformers can read it
        from transformers import AutoTokenizer

        slow = AutoTokenizer.from_pretrained(str(path.parent))
        return lambda text: len(slow.encode(text, add_special_tokens=False))
    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(str(path))
    return lambda text: len(fast.encode(text, add_special_tokens=False).ids)


def token_counter(backend: Backend):
    """Count tokens with the backend's tokenizer when it has one, else estimate."""
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is None:
        from oel.kb import approx_tokens

        return approx_tokens
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))
