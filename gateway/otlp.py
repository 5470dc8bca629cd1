"""OpenTelemetry trace ingestion: GenAI inference spans, sent by OTLP/HTTP, become steps of episodes.

Supported: the GenAI semantic conventions from v1.37 on, where a span carries the conversation as
``gen_ai.input.messages``, the answer as ``gen_ai.output.messages`` and the system prompt as
``gen_ai.system_instructions`` (JSON strings or structured values; message parts ``text``,
``tool_call`` and ``tool_call_response``). Spans without both message attributes (other operations,
or an instrumentation that does not record content) are not steps and are ignored. The older indexed
attributes (``gen_ai.prompt.0.content`` ...) and log events are not read.

Which episode a span belongs to, from the span's attributes, else its resource's:

* namespace: ``oel.namespace`` (required: a span without one is rejected and counted);
* episode: ``oel.episode_id``, else ``gen_ai.conversation.id``, else the trace id;
* agent: ``oel.agent_id``, else ``gen_ai.agent.id``, else the resource's ``service.name``;
* model version: ``oel.model_version``, else ``base``;
* feedback on the span's answer: ``oel.feedback``; the end of the episode: ``oel.outcome`` (and
  ``oel.success``), on an inference span or any other span of the episode (e.g. ``invoke_agent``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from gateway.openai_format import Answer, FormatError
from oel.schemas import ChatMessage, ToolCall
from oel.versions import BASE_VERSION

SEMCONV_VERSION = "1.37"
"""The oldest GenAI semantic-conventions version whose message attributes this module reads."""


def decode_request(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    """An OTLP/HTTP trace export, protobuf (``application/x-protobuf``) or JSON (``application/json``)."""
    request = ExportTraceServiceRequest()
    try:
        if content_type == "application/json":
            json_format.Parse(body, request, ignore_unknown_fields=True)
        elif content_type == "application/x-protobuf":
            request.ParseFromString(body)
        else:
            raise FormatError(f"content type {content_type!r}: OTLP/HTTP is application/x-protobuf or application/json")
    except (DecodeError, json_format.ParseError) as exc:
        raise FormatError(f"not an OTLP trace export: {exc}") from None
    return request


def encode_response(rejected: int, message: str, content_type: str) -> bytes:
    response = ExportTraceServiceResponse()
    if rejected:
        response.partial_success.rejected_spans = rejected
        response.partial_success.error_message = message
    if content_type == "application/json":
        return json_format.MessageToJson(response).encode()
    return response.SerializeToString()


def plain(value: AnyValue) -> Any:
    """An OTLP attribute value as plain Python."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [plain(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: plain(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return value.bytes_value.decode("utf-8", "replace")
    return getattr(value, kind) if kind else None


def _messages(value: Any, name: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise FormatError(f"{name}: not JSON") from None
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise FormatError(f"{name}: expected a list of messages")
    return value


def _arguments(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _chat_messages(message: dict[str, Any]) -> list[ChatMessage]:
    """One semantic-conventions message as chat messages (each tool result a ``tool`` message of its own)."""
    role, parts = message.get("role"), message.get("parts") or []
    texts = [str(p.get("content", "")) for p in parts if p.get("type") == "text"]
    calls = [
        ToolCall(
            id=str(p.get("id") or f"call-{i}"), function={"name": str(p.get("name", "")), "arguments": _arguments(p.get("arguments", ""))}
        )
        for i, p in enumerate(parts)
        if p.get("type") == "tool_call"
    ]
    results = [
        ChatMessage(
            role="tool",
            content=_arguments(p.get("response", p.get("result", ""))),
            tool_call_id=str(p.get("id") or "").strip() or "unknown",
        )
        for p in parts
        if p.get("type") == "tool_call_response"
    ]
    out = []
    if texts or calls or role in ("system", "user", "assistant") and not results:
        if role not in ("system", "user", "assistant"):
            raise FormatError(f"message role {role!r} with text or tool calls is not recorded")
        out.append(ChatMessage(role=role, content="\n\n".join(texts), tool_calls=calls or None))
    return out + results


@dataclass
class SpanStep:
    """What one span says: a step (``prompt`` and ``answer``), and/or the end of its episode."""

    namespace: str
    episode_id: str
    agent_id: str
    version: str
    end_ns: int
    prompt: list[ChatMessage] | None = None
    answer: Answer | None = None
    feedback: str | None = None
    outcome: str | None = None
    success: bool | None = None


def span_records(request: ExportTraceServiceRequest, default_agent: str) -> tuple[list[SpanStep], list[str]]:
    """The steps and ends the export carries, in the order the spans ended, and why others were rejected."""
    out, rejected = [], []
    for resource_spans in request.resource_spans:
        resource = {kv.key: plain(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                attrs = {**resource, **{kv.key: plain(kv.value) for kv in span.attributes}}
                has_messages = "gen_ai.input.messages" in attrs and "gen_ai.output.messages" in attrs
                if not has_messages and "oel.outcome" not in attrs:
                    continue  # not ours: neither a step nor an end
                try:
                    out.append(_record(span, attrs, has_messages, default_agent))
                except FormatError as exc:
                    rejected.append(f"span {span.span_id.hex()}: {exc}")
    out.sort(key=lambda r: r.end_ns)
    return out, rejected


def _record(span: Any, attrs: dict[str, Any], has_messages: bool, default_agent: str) -> SpanStep:
    namespace = attrs.get("oel.namespace")
    if not isinstance(namespace, str) or not namespace:
        raise FormatError("no oel.namespace attribute (on the span or its resource)")
    record = SpanStep(
        namespace=namespace,
        episode_id=str(attrs.get("oel.episode_id") or attrs.get("gen_ai.conversation.id") or span.trace_id.hex()),
        agent_id=str(attrs.get("oel.agent_id") or attrs.get("gen_ai.agent.id") or attrs.get("service.name") or default_agent),
        version=str(attrs.get("oel.model_version") or BASE_VERSION),
        end_ns=span.end_time_unix_nano,
        feedback=attrs.get("oel.feedback") if isinstance(attrs.get("oel.feedback"), str) else None,
        outcome=attrs.get("oel.outcome") if isinstance(attrs.get("oel.outcome"), str) else None,
        success=attrs.get("oel.success") if isinstance(attrs.get("oel.success"), bool) else None,
    )
    if has_messages:
        try:
            prompt = [ChatMessage(role="system", content=p.get("content", "")) for p in _system(attrs)]
            for m in _messages(attrs["gen_ai.input.messages"], "gen_ai.input.messages"):
                prompt += _chat_messages(m)
            output = _messages(attrs["gen_ai.output.messages"], "gen_ai.output.messages")
            first = _chat_messages(output[0]) if output else []
        except ValueError as exc:  # FormatError, and pydantic's errors on a message
            raise FormatError(str(exc).splitlines()[0]) from None
        if not prompt or not first or first[0].role != "assistant":
            raise FormatError("the input messages are empty or the output has no assistant message")
        record.prompt, record.answer = prompt, Answer(first[0].content, first[0].tool_calls)
    return record


def _system(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    value = attrs.get("gen_ai.system_instructions")
    if value is None:
        return []
    parts = _messages(value, "gen_ai.system_instructions")
    return [p for p in parts if p.get("type") == "text"]
