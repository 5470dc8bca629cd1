"""The vLLM backend: a client of vLLM's OpenAI-compatible HTTP API (``infra/local/vllm.sh`` serves one locally).

* Generation goes through ``/v1/chat/completions`` (the server applies the model folder's chat template
  with the generation prompt, exactly as ``tokenizer.apply_chat_template`` does) with the adapter name
  as the ``model``; ``return_token_ids`` gives the exact prompt and response token ids back. A batch is
  sent as concurrent requests, which vLLM's scheduler batches continuously.
* Adapters are loaded and unloaded at run time through ``/v1/load_lora_adapter`` and
  ``/v1/unload_lora_adapter`` (the server needs ``--enable-lora`` and
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``). Names are immutable versions: a name is never loaded
  again with other weights (:class:`AdapterNameTaken`), and an adapter is unloaded only after the
  requests this client sent to it have drained.
* :meth:`VLLMBackend.score` / :meth:`VLLMBackend.score_ids` (same signatures as the in-process
  backend's) return the log-probability of each given response token, through ``/v1/completions`` with
  the full token sequence as the prompt and ``prompt_logprobs=0``, so served adapters can be compared
  with the in-process backend. :meth:`VLLMBackend.encode` tokenises a conversation on the server.
* ``response_token_ids`` are exactly the sampled ids, including the end token (EOS) when the model
  emitted one and the tokens that completed a stop string; ``text`` is cut before the stop string.
  With ``seed`` set, conversation *i* of a call is sampled with ``seed + i`` (as in-process; the random
  streams differ between the backends, so only greedy decoding can match token for token).

The adapter path is read by the *server*: with a remote server it must be a path the server can see.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from oel.model.backend import (
    AdapterNameTaken,
    Backend,
    BackendError,
    Conversation,
    Generation,
    SamplingParams,
)
from oel.settings import Settings

log = logging.getLogger(__name__)

START_HINT = "start it with `bash infra/local/vllm.sh up` (or point OEL_MODEL__VLLM_URL at a running server)"


class AdapterLoadError(BackendError):
    """vLLM refused an adapter (missing files, a different base model's shapes, a rank over ``--max-lora-rank``...)."""


class VLLMBackend(Backend):
    """:class:`~oel.model.backend.Backend` over a vLLM server's OpenAI-compatible API.

    ``url`` is the server's base URL (``ModelSettings.vllm_url``); ``model`` the served base model's name
    (default: discovered from ``/v1/models``); ``model_path`` a local copy of the served model's folder,
    used to check adapters before loading them (default: the folder the server reports, when this
    machine can read it). ``timeout_s`` bounds one request (CPU generation is slow);
    connection failures and 502/503/504 answers are retried ``retries`` times with exponential backoff
    from ``backoff_s``. ``drain_timeout_s`` bounds how long :meth:`unload_adapter` waits for in-flight
    requests. ``max_concurrency`` bounds the requests one :meth:`generate` call has open at once.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        model: str | None = None,
        model_path: Path | None = None,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        drain_timeout_s: float = 120.0,
        max_concurrency: int = 32,
    ) -> None:
        self.url = url.rstrip("/")
        self._model = model
        self._model_root: str | None = str(model_path) if model_path is not None else None
        self.retries = retries
        self.backoff_s = backoff_s
        self.drain_timeout_s = drain_timeout_s
        self.max_concurrency = max_concurrency
        self._http = httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
        )
        self._lock = threading.Condition()
        self._in_flight: dict[str | None, int] = defaultdict(int)
        self._draining: set[str] = set()

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> VLLMBackend:
        """The backend for ``settings.model.vllm_url``."""
        return cls(settings.model.vllm_url, **kwargs)

    # -- HTTP -------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, json: dict[str, Any] | None = None) -> httpx.Response:
        """One request, retried on connection failures and 502/503/504; :class:`BackendError` if it never gets through."""
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self._http.request(method, path, json=json)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
                # The request never reached a live server (or the connection was dropped before an
                # answer): safe to send again.
                last = exc
                continue
            except httpx.TimeoutException as exc:
                # A read timeout: the server may still be working on it; do not send it twice.
                raise BackendError(f"vLLM server at {self.url}: {method} {path} timed out ({exc!r})") from exc
            except httpx.HTTPError as exc:
                raise BackendError(f"vLLM server at {self.url}: {method} {path} failed ({exc!r})") from exc
            if response.status_code in (502, 503, 504):
                last = BackendError(f"HTTP {response.status_code}: {_error_text(response)}")
                continue
            return response
        raise BackendError(
            f"vLLM server at {self.url} is unreachable ({method} {path} failed {self.retries + 1} times, last: {last!r}); {START_HINT}"
        ) from last

    def _json(self, method: str, path: str, json: dict[str, Any] | None = None, what: str = "") -> Any:
        response = self._request(method, path, json)
        if response.status_code != 200:
            raise BackendError(f"vLLM server at {self.url} refused {what or path} (HTTP {response.status_code}): {_error_text(response)}")
        return response.json()

    def health(self) -> None:
        """Raise :class:`BackendError` unless the server answers ``/health``."""
        response = self._request("GET", "/health")
        if response.status_code != 200:
            raise BackendError(f"vLLM server at {self.url} is not healthy (HTTP {response.status_code}): {_error_text(response)}")

    # -- models and adapters ----------------------------------------------------------------------

    def _models(self) -> list[dict[str, Any]]:
        return list(self._json("GET", "/v1/models", what="listing models")["data"])

    @property
    def base_model(self) -> str:  # type: ignore[override]
        """The served base model's name (its folder path unless the server was started with ``--served-model-name``)."""
        if self._model is None:
            bases = [m["id"] for m in self._models() if not m.get("parent")]
            if not bases:
                raise BackendError(f"vLLM server at {self.url} serves no base model")
            self._model = bases[0]
        return self._model

    def _base_model_root(self) -> Path | None:
        """The served base model's folder, if this machine can read it (a local server), else ``None``."""
        if self._model_root is None:
            roots = [m.get("root") or m["id"] for m in self._models() if m["id"] == self.base_model]
            self._model_root = roots[0] if roots else ""
        root = Path(self._model_root) if self._model_root else None
        return root if root is not None and (root / "config.json").is_file() else None

    def _served_adapters(self) -> dict[str, str]:
        """Adapter name -> the path the server loaded it from."""
        return {m["id"]: m.get("root") or "" for m in self._models() if m.get("parent")}

    def list_adapters(self) -> list[str]:
        return sorted(self._served_adapters())

    def load_adapter(self, name: str, path: Path) -> None:
        path = Path(path)
        # The server resolves the path itself: send an absolute one.
        path_str = str(path.resolve()) if path.exists() else str(path)
        if name == self.base_model:
            raise AdapterNameTaken(f"adapter name {name!r} is the served base model's name")
        root = self._base_model_root()
        if root is not None and path.is_dir():
            problems = adapter_mismatches(path, root)
            if problems:
                raise AdapterLoadError(
                    f"adapter {name!r} at {path_str!r} does not fit the base model served by {self.url} ({root}): " + "; ".join(problems)
                )
        for attempt in range(2):
            served = self._served_adapters()
            if name in served:
                if served[name] == path_str:
                    return  # same name, same weights: a no-op
                raise AdapterNameTaken(
                    f"adapter {name!r} is already loaded on {self.url} from {served[name]!r}; "
                    f"a new version needs a new name (not loading {path_str!r})"
                )
            response = self._request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path_str})
            if response.status_code == 200:
                log.info("vLLM at %s: loaded adapter %s from %s", self.url, name, path_str)
                return
            text = _error_text(response)
            if response.status_code == 400 and "already been loaded" in text and attempt == 0:
                continue  # someone else loaded it meanwhile: compare paths again
            raise AdapterLoadError(
                f"vLLM server at {self.url} could not load adapter {name!r} from {path_str!r} "
                f"onto base model {self.base_model!r} (HTTP {response.status_code}): {text}"
            )

    def unload_adapter(self, name: str) -> None:
        """Refuse new requests for ``name``, wait until this client's requests to it have finished
        (at most ``drain_timeout_s``), then unload it on the server."""
        deadline = time.monotonic() + self.drain_timeout_s
        with self._lock:
            self._draining.add(name)
            try:
                while self._in_flight.get(name, 0) > 0:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise BackendError(
                            f"adapter {name!r} still has {self._in_flight[name]} request(s) in flight after "
                            f"{self.drain_timeout_s:.0f}s; not unloaded"
                        )
                    self._lock.wait(left)
            except BaseException:
                self._draining.discard(name)
                raise
        try:
            response = self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
            if response.status_code == 404:
                log.info("vLLM at %s: adapter %s was not loaded", self.url, name)
            elif response.status_code != 200:
                raise BackendError(
                    f"vLLM server at {self.url} could not unload adapter {name!r} (HTTP {response.status_code}): {_error_text(response)}"
                )
            else:
                log.info("vLLM at %s: unloaded adapter %s", self.url, name)
        finally:
            with self._lock:
                self._draining.discard(name)

    def in_flight(self, adapter: str | None = None) -> int:
        """Requests this client has open against ``adapter`` (``None``: the base model)."""
        with self._lock:
            return self._in_flight.get(adapter, 0)

    @contextmanager
    def _using(self, adapter: str | None, count: int) -> Iterator[None]:
        with self._lock:
            if adapter is not None and adapter in self._draining:
                raise BackendError(f"adapter {adapter!r} is being unloaded; use its successor")
            self._in_flight[adapter] += count
        try:
            yield
        finally:
            with self._lock:
                self._in_flight[adapter] -= count
                if self._in_flight[adapter] <= 0:
                    del self._in_flight[adapter]
                self._lock.notify_all()

    # -- generation and scoring -------------------------------------------------------------------

    def generate(self, conversations: list[Conversation], params: SamplingParams, adapter: str | None = None) -> list[Generation]:
        """Answer every conversation, in order. With a seed, conversation ``i`` is sampled with ``seed + i``."""
        if not conversations:
            return []
        model = adapter or self.base_model
        with self._using(adapter, len(conversations)):
            bodies = [self._chat_body(conv, params, model, i) for i, conv in enumerate(conversations)]
            answers = self._map(lambda body: self._json("POST", "/v1/chat/completions", body, f"generation with {model!r}"), bodies)
        out = []
        for answer in answers:
            choice = answer["choices"][0]
            if choice.get("token_ids") is None or answer.get("prompt_token_ids") is None:
                raise BackendError(f"vLLM server at {self.url} returned no token ids (needs vLLM >= 0.10 for return_token_ids)")
            reason = choice.get("finish_reason") or "stop"
            out.append(
                Generation(
                    text=choice["message"].get("content") or "",
                    prompt_token_ids=list(answer["prompt_token_ids"]),
                    response_token_ids=list(choice["token_ids"]),
                    finish_reason="length" if reason == "length" else "stop",
                    adapter=adapter,
                )
            )
        return out

    @staticmethod
    def _sampling_body(params: SamplingParams, model: str, index: int) -> dict[str, Any]:
        if params.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if params.temperature < 0 or not 0 < params.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "return_token_ids": True,
        }
        if params.seed is not None:
            body["seed"] = params.seed + index
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    def _chat_body(self, conv: Conversation, params: SamplingParams, model: str, index: int) -> dict[str, Any]:
        body = self._sampling_body(params, model, index)
        body["messages"] = [{"role": m.role, "content": m.content} for m in conv]
        body["add_generation_prompt"] = True
        return body

    def generate_from_ids(self, prompt_token_ids: list[list[int]], params: SamplingParams, adapter: str | None = None) -> list[Generation]:
        """Like :meth:`generate`, from already tokenised prompts (``/v1/completions`` with token ids)."""
        if not prompt_token_ids:
            return []
        if any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError("empty prompt")
        model = adapter or self.base_model
        bodies = []
        for i, ids in enumerate(prompt_token_ids):
            body = self._sampling_body(params, model, i)
            body["prompt"] = [int(t) for t in ids]
            bodies.append(body)
        with self._using(adapter, len(bodies)):
            answers = self._map(lambda body: self._json("POST", "/v1/completions", body, f"generation with {model!r}"), bodies)
        out = []
        for ids, answer in zip(prompt_token_ids, answers):
            choice = answer["choices"][0]
            out.append(
                Generation(
                    text=choice.get("text") or "",
                    prompt_token_ids=list(ids),
                    response_token_ids=list(choice.get("token_ids") or []),
                    finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
                    adapter=adapter,
                )
            )
        return out

    def encode(self, conversation: Conversation, add_generation_prompt: bool = True) -> list[int]:
        """Prompt token ids of a conversation, by the server's tokenizer and chat template (``/tokenize``),
        the same rule as :func:`oel.model.chat.encode_chat`."""
        body = {
            "model": self.base_model,
            "messages": [{"role": m.role, "content": m.content} for m in conversation],
            "add_generation_prompt": add_generation_prompt,
            "add_special_tokens": False,
        }
        return list(self._json("POST", "/tokenize", body, "tokenizing a conversation")["tokens"])

    def score(
        self,
        conversations: list[Conversation],
        response_token_ids: list[list[int]],
        adapter: str | None = None,
        temperature: float = 1.0,
    ) -> list[list[float]]:
        """Per-token log-probs of each response (token ids following the conversation's generation prompt)
        under ``adapter`` (None = the base model); as :meth:`oel.model.hf_backend.HFBackend.score`."""
        prompts = [self.encode(c) for c in conversations]
        return self.score_ids(prompts, response_token_ids, adapter, temperature)

    def score_ids(
        self,
        prompt_token_ids: list[list[int]],
        response_token_ids: list[list[int]],
        adapter: str | None = None,
        temperature: float = 1.0,
    ) -> list[list[float]]:
        """Log-probability (natural log, normalised over the full vocabulary) of each response token given
        the prompt and the response tokens before it: ``/v1/completions`` with the whole sequence as the
        prompt and ``prompt_logprobs=0``. vLLM reports prompt log-probs of the raw logits, so only
        ``temperature == 1`` is available."""
        if temperature != 1.0:
            raise ValueError("vLLM returns prompt log-probs of the raw logits only: score with temperature=1.0")
        if len(prompt_token_ids) != len(response_token_ids):
            raise ValueError("one response per prompt expected")
        if not prompt_token_ids:
            return []
        model = adapter or self.base_model
        bodies = []
        for prompt_ids, response_ids in zip(prompt_token_ids, response_token_ids):
            if not prompt_ids:
                raise ValueError("empty prompt")
            bodies.append(
                {
                    "model": model,
                    "prompt": [int(t) for t in (*prompt_ids, *response_ids)],
                    "max_tokens": 1,
                    "temperature": 0.0,
                    "prompt_logprobs": 0,
                }
            )
        with self._using(adapter, len(bodies)):
            answers = self._map(lambda body: self._json("POST", "/v1/completions", body, f"scoring with {model!r}"), bodies)
        out = []
        for prompt_ids, response_ids, answer in zip(prompt_token_ids, response_token_ids, answers):
            per_position = answer["choices"][0]["prompt_logprobs"]
            tail = per_position[len(prompt_ids) :]
            values = []
            for token, entry in zip(response_ids, tail):
                logprob = (entry or {}).get(str(int(token)))
                if logprob is None:
                    raise BackendError(f"vLLM server at {self.url} returned no log-prob for token {token}")
                values.append(float(logprob["logprob"]))
            out.append(values)
        return out

    def _map(self, fn: Any, items: list[Any]) -> list[Any]:
        if len(items) == 1:
            return [fn(items[0])]
        with ThreadPoolExecutor(max_workers=min(len(items), self.max_concurrency)) as pool:
            return list(pool.map(fn, items))

    def close(self) -> None:
        self._http.close()


_LAYER = re.compile(r"\.layers\.(\d+)\.")
_MODULE = re.compile(r"\.([A-Za-z0-9_]+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def adapter_mismatches(adapter_dir: Path, model_dir: Path, limit: int = 5) -> list[str]:
    """Why a PEFT LoRA adapter does not fit a model folder (empty if it fits, or if it cannot be checked).

    vLLM 0.32 does not check this itself: it copies a smaller LoRA matrix into the corner of its
    preallocated buffers, so an adapter trained on another base model loads and "works", silently
    wrong. This reads only ``config.json``, ``adapter_config.json`` and the safetensors header (no
    weights) and checks each LoRA matrix's input/output size against the model's projection sizes
    (Llama/Qwen/Mistral-style names) and each layer index against the number of layers.
    """
    weights = adapter_dir / "adapter_model.safetensors"
    try:
        config = json.loads((model_dir / "config.json").read_text())
        with weights.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return []
    config = config.get("text_config") or config
    hidden = config.get("hidden_size")
    layers = config.get("num_hidden_layers")
    if not isinstance(hidden, int):
        return []
    heads = config.get("num_attention_heads") or 1
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    inter = config.get("intermediate_size")
    # module -> (in_features, out_features)
    sizes: dict[str, tuple[int | None, int | None]] = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    problems: list[str] = []
    for key, meta in header.items():
        if key == "__metadata__" or not isinstance(meta, dict):
            continue
        layer = _LAYER.search(key)
        if layer and isinstance(layers, int) and int(layer.group(1)) >= layers:
            problems.append(f"{key} is for layer {layer.group(1)}, the model has {layers} layers")
        module = _MODULE.search(key)
        shape = meta.get("shape") or []
        if not module or module.group(1) not in sizes or len(shape) != 2:
            continue
        want_in, want_out = sizes[module.group(1)]
        if module.group(2) == "A" and want_in is not None and shape[1] != want_in:
            problems.append(f"{key} has {shape[1]} input features, the model's {module.group(1)} has {want_in}")
        if module.group(2) == "B" and want_out is not None and shape[0] != want_out:
            problems.append(f"{key} has {shape[0]} output features, the model's {module.group(1)} has {want_out}")
        if len(problems) >= limit:
            break
    return problems


def _error_text(response: httpx.Response) -> str:
    """vLLM's error message (``{"error": {"message": ...}}``), else the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:2000]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(body.get("message"), str):
            return body["message"]
        if body.get("detail"):
            return str(body["detail"])
    return str(body)[:2000]
