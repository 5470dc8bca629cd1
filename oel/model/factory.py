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


def extraction_backend(settings: Settings) -> Backend:
    """The backend the processor extracts with, per ``OEL_PROCESSOR__BACKEND``.

    ``auto`` takes the faster one where there is a choice: with ``OEL_MODEL__BACKEND=vllm`` the server (as
    every service); with only ``OEL_MODEL__VLLM_URL`` set, the server there if it answers its health check at
    start-up (continuous batching extracts a batch faster than the in-process backend: bench/README.md),
    else the in-process backend, saying why in the log. ``vllm`` insists on the server (an unreachable one
    stops start-up); ``transformers`` always extracts in-process."""
    import logging

    from oel.model.backend import BackendError

    log = logging.getLogger(__name__)
    choice = settings.processor.backend
    if choice == "auto" and settings.model.backend == "vllm":
        return make_backend(settings)
    if choice == "vllm" or (choice == "auto" and "vllm_url" in settings.model.model_fields_set):
        from oel.model.vllm_backend import VLLMBackend

        server = VLLMBackend.from_settings(settings)
        try:
            server.health()
        except BackendError as exc:
            if choice == "vllm":
                raise BackendError(f"OEL_PROCESSOR__BACKEND=vllm: {exc}") from exc
            log.warning("extracting in-process: the vLLM server of OEL_MODEL__VLLM_URL does not answer (%s)", exc)
        else:
            log.info("extracting on the vLLM server at %s", server.url)
            return server
    from oel.model.hf_backend import HFBackend

    log.info("extracting in-process (%s)", "OEL_PROCESSOR__BACKEND=transformers" if choice == "transformers" else "no vLLM server")
    return HFBackend.from_settings(settings, max_batch_size=settings.processor.batch_size)


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
