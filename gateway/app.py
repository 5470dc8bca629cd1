"""The recording gateway: an OpenAI-compatible HTTP front of the model server (vLLM by default) that
records every answered call as a step of an episode, so existing agents learn without code changes.

Routes (the OpenAI API's, forwarded to ``OEL_GATEWAY__UPSTREAM_URL``, streamed through as they come):

* ``POST /v1/chat/completions``, ``POST /v1/completions`` (streaming or not), ``GET /v1/models``;
* ``POST /v1/oel/episodes/{episode_id}/feedback`` ``{"feedback": "..."}``: text feedback on the
  episode's last answer (recorded with that step);
* ``POST /v1/oel/episodes/{episode_id}/end`` ``{"outcome": "...", "success": true|false|null}``;
* ``POST /v1/traces``: OTLP/HTTP trace exports; GenAI inference spans become steps (:mod:`gateway.otlp`);
* ``GET /healthz`` and ``GET /metrics`` (Prometheus).

Who is calling (each from a header, else from the request body):

* namespace: ``X-OEL-Namespace``, ``metadata.oel_namespace``, or the model name ``oel/<namespace>``;
* episode: ``X-OEL-Episode-Id`` or ``metadata.oel_episode_id``; none = a new episode, whose id is
  returned in the ``X-OEL-Episode-Id`` response header;
* agent: ``X-OEL-Agent-Id``, ``metadata.oel_agent_id`` or ``user``; none = ``OEL_GATEWAY__DEFAULT_AGENT_ID``.

``oel_*`` metadata keys are removed before forwarding. The model ``oel/<namespace>`` answers with the
namespace's current promoted version (its adapter loaded into the upstream when first used, and each new
one as it is published); any other model name is forwarded as is. An episode keeps the version it
started with; the version that answered is in the ``X-OEL-Model-Version`` response header and in the
recorded events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.episodes import OpenEpisodes, UnknownEpisode
from gateway.models import MODEL_PREFIX, ModelResolver
from gateway.openai_format import FormatError, StreamAccumulator, chat_answer, completion_answer, completion_prompt, prompt_messages
from gateway.otlp import decode_request, encode_response, span_records
from oel import metrics
from oel.model.backend import BackendError
from oel.schemas import NAMESPACE_PATTERN
from oel.settings import Settings
from producers.recorder import Recorder, RecorderError

log = logging.getLogger(__name__)

EPISODE_HEADER = "X-OEL-Episode-Id"
VERSION_HEADER = "X-OEL-Model-Version"
_NAMESPACE = re.compile(NAMESPACE_PATTERN)


@dataclass(frozen=True)
class Identity:
    """Who made a call: namespace, episode (None = a new one) and agent."""

    namespace: str
    episode_id: str | None
    agent_id: str


def identify(headers: Any, body: dict[str, Any], default_agent: str) -> Identity:
    """The caller's identity from the OEL headers, else the body (see the module docstring)."""
    meta = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    model = body.get("model") if isinstance(body.get("model"), str) else ""
    from_model = model[len(MODEL_PREFIX) :] if model.startswith(MODEL_PREFIX) else None
    namespace = headers.get("X-OEL-Namespace") or meta.get("oel_namespace") or from_model
    if not namespace:
        raise FormatError(f"no namespace: send the X-OEL-Namespace header, metadata.oel_namespace, or the model {MODEL_PREFIX}<namespace>")
    if from_model is not None and from_model != namespace:
        raise FormatError(f"model {model!r} names namespace {from_model!r}, but the request says {namespace!r}")
    if not _NAMESPACE.match(namespace):
        raise FormatError(f"namespace {namespace!r}: lowercase letters, digits, '.', '_' or '-', at most 63 characters")
    episode = headers.get(EPISODE_HEADER) or meta.get("oel_episode_id")
    agent = headers.get("X-OEL-Agent-Id") or meta.get("oel_agent_id") or body.get("user") or default_agent
    return Identity(namespace, episode or None, str(agent))


def upstream_body(body: dict[str, Any], model: str) -> dict[str, Any]:
    """The request as the upstream gets it: the served model's name, without OEL's metadata keys."""
    out = {**body, "model": model}
    meta = out.get("metadata")
    if isinstance(meta, dict):
        kept = {k: v for k, v in meta.items() if not str(k).startswith("oel_")}
        if kept:
            out["metadata"] = kept
        else:
            del out["metadata"]
    return out


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


class Gateway:
    """The gateway's handlers over one upstream client, one recorder and the open episodes."""

    def __init__(self, settings: Settings, recorder: Recorder, models: ModelResolver, upstream: httpx.AsyncClient):
        self.settings = settings
        self.recorder = recorder
        self.models = models
        self.upstream = upstream
        self.episodes = OpenEpisodes(recorder, settings.gateway.idle_end_s)
        self._reaper: asyncio.Task | None = None

    # --- the application ------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.gateway.max_request_bytes)
        app.add_routes(
            [
                web.post("/v1/chat/completions", lambda r: self.call(r, "chat")),
                web.post("/v1/completions", lambda r: self.call(r, "completions")),
                web.get("/v1/models", self.list_models),
                web.post("/v1/oel/episodes/{episode_id}/feedback", self.feedback),
                web.post("/v1/oel/episodes/{episode_id}/end", self.end),
                web.post("/v1/traces", self.traces),
                web.get("/healthz", self.health),
                web.get("/metrics", self.metrics),
            ]
        )
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._stop)
        return app

    async def _start(self, _: web.Application) -> None:
        self._reaper = asyncio.create_task(self._end_idle_episodes())

    async def _stop(self, _: web.Application) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await self.episodes.end_all("ended by the gateway at shutdown (no outcome was reported)")

    async def _end_idle_episodes(self) -> None:
        interval = min(5.0, self.settings.gateway.idle_end_s / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.episodes.end_idle()
            except RecorderError:
                log.exception("could not end idle episodes")

    # --- model calls ----------------------------------------------------------------------------

    async def call(self, request: web.Request, route: str) -> web.StreamResponse:
        started = time.monotonic()
        waited = 0.0  # seconds spent waiting for the upstream and the client
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise FormatError("the request body must be a JSON object")
            who = identify(request.headers, body, self.settings.gateway.default_agent_id)
            prompt = prompt_messages(body) if route == "chat" else completion_prompt(body)
        except (ValueError, FormatError) as exc:  # JSON errors are ValueErrors too
            metrics.count_gateway_request(route, "bad_request")
            return _error(400, str(exc), "invalid_request_error")
        episode_id = who.episode_id or uuid.uuid4().hex
        async with self.episodes.lock(episode_id):
            entry = self.episodes.find(episode_id)
            if entry is None:
                t = time.monotonic()
                try:
                    version, model = await self.models.resolve(who.namespace, body.get("model"))
                except BackendError as exc:  # the upstream could not say which model it serves
                    metrics.count_gateway_request(route, "upstream_unreachable")
                    return _error(502, f"upstream {self.upstream.base_url} unreachable: {exc}", "upstream_unreachable")
                waited += time.monotonic() - t
                try:
                    entry = self.episodes.new(who.namespace, who.agent_id, episode_id, version, model)
                except RecorderError as exc:  # an invalid episode or agent id
                    metrics.count_gateway_request(route, "bad_request")
                    return _error(400, str(exc), "invalid_request_error")
            headers = {EPISODE_HEADER: episode_id, VERSION_HEADER: entry.version}
            forwarded = upstream_body(body, entry.model)
            path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
            auth = {"Authorization": request.headers["Authorization"]} if "Authorization" in request.headers else {}
            t = time.monotonic()
            try:
                upstream = await self.upstream.send(self.upstream.build_request("POST", path, json=forwarded, headers=auth), stream=True)
            except httpx.HTTPError as exc:
                metrics.count_gateway_request(route, "upstream_unreachable")
                return _error(502, f"upstream {self.upstream.base_url} unreachable: {exc!r}", "upstream_unreachable")
            waited += time.monotonic() - t
            try:
                if upstream.status_code != 200:  # the upstream's own error, passed through; nothing recorded
                    content = await upstream.aread()
                    metrics.count_gateway_request(route, "upstream_error")
                    return web.Response(
                        body=content,
                        status=upstream.status_code,
                        headers=headers,
                        content_type=upstream.headers.get("content-type", "application/json").split(";")[0],
                    )
                if forwarded.get("stream"):
                    response, answer, w = await self._stream(request, upstream, headers)
                    waited += w
                else:
                    t = time.monotonic()
                    content = await upstream.aread()
                    waited += time.monotonic() - t
                    try:
                        data = json.loads(content)
                        answer = chat_answer(data) if route == "chat" else completion_answer(data)
                    except ValueError as exc:  # FormatError included
                        metrics.count_gateway_request(route, "upstream_error")
                        return _error(502, f"the upstream's answer is not an OpenAI {route} response: {exc}", "upstream_error")
                    response = web.Response(body=content, status=200, headers=headers, content_type="application/json")
            finally:
                await upstream.aclose()
            await self.episodes.answered(entry, prompt, answer)
        metrics.count_gateway_request(route, "ok")
        metrics.GATEWAY_OVERHEAD.labels(route=route).observe(max(0.0, time.monotonic() - started - waited))
        return response

    async def _stream(self, request: web.Request, upstream: httpx.Response, headers: dict[str, str]):
        """Pass the server-sent events through as they come, rebuilding the answer on the way."""
        response = web.StreamResponse(status=200, headers={**headers, "Cache-Control": "no-cache"})
        response.content_type = upstream.headers.get("content-type", "text/event-stream").split(";")[0]
        await response.prepare(request)
        acc, waited = StreamAccumulator(), 0.0
        chunks: AsyncIterator[bytes] = upstream.aiter_raw()
        while True:
            t = time.monotonic()
            chunk = await anext(chunks, None)
            if chunk is None:
                waited += time.monotonic() - t
                break
            acc.feed(chunk)
            await response.write(chunk)
            waited += time.monotonic() - t
        await response.write_eof()
        return response, acc.answer(), waited

    async def list_models(self, request: web.Request) -> web.Response:
        try:
            upstream = await self.upstream.get("/v1/models")
        except httpx.HTTPError as exc:
            metrics.count_gateway_request("models", "upstream_unreachable")
            return _error(502, f"upstream {self.upstream.base_url} unreachable: {exc!r}", "upstream_unreachable")
        metrics.count_gateway_request("models", "ok" if upstream.status_code == 200 else "upstream_error")
        return web.Response(body=upstream.content, status=upstream.status_code, content_type="application/json")

    # --- episodes -------------------------------------------------------------------------------

    async def feedback(self, request: web.Request) -> web.Response:
        return await self._episode_call(request, "feedback", lambda eid, b: self.episodes.feedback(eid, _text(b, "feedback")))

    async def end(self, request: web.Request) -> web.Response:
        def success(b: dict[str, Any]) -> bool | None:
            if b.get("success") not in (True, False, None):
                raise FormatError("success: expected true, false or null")
            return b.get("success")

        return await self._episode_call(request, "end", lambda eid, b: self.episodes.end(eid, _text(b, "outcome"), success(b)))

    async def _episode_call(self, request: web.Request, route: str, action) -> web.Response:
        episode_id = request.match_info["episode_id"]
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise FormatError("the request body must be a JSON object")
            await action(episode_id, body)
        except UnknownEpisode as exc:
            metrics.count_gateway_request(route, "unknown_episode")
            reason = exc.args[0]
            return _error(404, f"no open episode {episode_id}" if reason == episode_id else reason, "not_found")
        except (ValueError, FormatError, RecorderError) as exc:
            metrics.count_gateway_request(route, "bad_request")
            return _error(400, str(exc), "invalid_request_error")
        metrics.count_gateway_request(route, "ok")
        return web.json_response({"episode_id": episode_id, "recorded": route})

    # --- OpenTelemetry --------------------------------------------------------------------------

    async def traces(self, request: web.Request) -> web.Response:
        """An OTLP/HTTP trace export: its GenAI inference spans recorded as steps, ends as ends."""
        content_type = request.content_type
        try:
            export = decode_request(await request.read(), content_type)
        except FormatError as exc:
            metrics.count_gateway_request("traces", "bad_request")
            return _error(400, str(exc), "invalid_request_error")
        records, rejected = span_records(export, self.settings.gateway.default_agent_id)
        for r in records:
            try:
                if r.prompt is not None and r.answer is not None:
                    async with self.episodes.lock(r.episode_id):
                        entry = self.episodes.find(r.episode_id) or self.episodes.new(
                            r.namespace, r.agent_id, r.episode_id, r.version, model=r.version
                        )
                        await self.episodes.answered(entry, r.prompt, r.answer, r.feedback)
                if r.outcome is not None:
                    await self.episodes.end(r.episode_id, r.outcome, r.success)
            except (RecorderError, UnknownEpisode) as exc:
                rejected.append(f"episode {r.episode_id}: {exc}")
        metrics.count_gateway_request("traces", "bad_request" if rejected else "ok")
        if rejected:
            log.warning("OTLP export: %d spans rejected: %s", len(rejected), "; ".join(rejected[:3]))
        return web.Response(body=encode_response(len(rejected), "; ".join(rejected[:10]), content_type), content_type=content_type)

    # --- operations -----------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "open_episodes": len(self.episodes)})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise FormatError(f"{name}: expected a non-empty string")
    return value
