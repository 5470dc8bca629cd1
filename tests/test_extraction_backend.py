"""Which backend the processor extracts with (``OEL_PROCESSOR__BACKEND``), against the real vLLM CPU server."""

from __future__ import annotations

import pytest

from oel.model.backend import BackendError
from oel.model.factory import extraction_backend
from oel.model.hf_backend import HFBackend
from oel.model.vllm_backend import VLLMBackend
from oel.settings import Settings
from tests.test_processor import free_port
from tests.test_vllm_backend import _url

pytestmark = [pytest.mark.model, pytest.mark.tools]


def _settings(settings: Settings, backend: str, url: str | None) -> Settings:
    """The test settings with ``OEL_PROCESSOR__BACKEND=backend``, the in-process model backend, and
    ``OEL_MODEL__VLLM_URL=url`` set (None: not set)."""
    model = settings.model.model_copy(update={"backend": "transformers", **({"vllm_url": url} if url else {})})
    model.model_fields_set.discard("vllm_url")
    if url is not None:
        model.model_fields_set.add("vllm_url")
    processor = settings.processor.model_copy(update={"backend": backend})
    return settings.model_copy(update={"model": model, "processor": processor})


def test_auto_extracts_on_a_configured_server_that_answers(settings: Settings) -> None:
    backend = extraction_backend(_settings(settings, "auto", _url(settings)))
    try:
        assert isinstance(backend, VLLMBackend)
        backend.health()
    finally:
        backend.close()


def test_auto_falls_back_in_process_and_vllm_insists(settings: Settings) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BackendError, match="OEL_PROCESSOR__BACKEND=vllm"):
        extraction_backend(_settings(settings, "vllm", dead))
    for configured in (dead, None):  # a server that does not answer, or none configured
        backend = extraction_backend(_settings(settings, "auto", configured))
        try:
            assert isinstance(backend, HFBackend)
        finally:
            backend.close()
