"""OpenTelemetry GenAI spans -> steps: spans made by the real OpenTelemetry SDK, encoded by its OTLP encoder,
read by gateway.otlp; and end to end, the SDK's OTLP/HTTP exporter -> `oel gateway` -> broker -> processor."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.openai_format import FormatError
from gateway.otlp import decode_request, span_records
from oel.schemas import ChatMessage, ToolCall

SYSTEM = [{"type": "text", "content": "You are a support assistant."}]
TURN1_IN = [{"role": "user", "parts": [{"type": "text", "content": "Where is order 4411?"}]}]
TURN1_OUT = [
    {
        "role": "assistant",
        "parts": [{"type": "tool_call", "id": "call-1", "name": "order_status", "arguments": {"order": "4411"}}],
        "finish_reason": "tool_call",
    }
]
TURN2_IN = [
    *TURN1_IN,
    *TURN1_OUT,
    {"role": "tool", "parts": [{"type": "tool_call_response", "id": "call-1", "result": "shipped yesterday"}]},
]
TURN2_OUT = [{"role": "assistant", "parts": [{"type": "text", "content": "It shipped yesterday."}], "finish_reason": "stop"}]
CALL = ToolCall(id="call-1", function={"name": "order_status", "arguments": '{"order": "4411"}'})


def agent_run(provider: TracerProvider, conversation: str) -> None:
    """What an instrumented agent emits: an invoke_agent span around two chat spans (semconv >= 1.37; the
    Python SDK takes the message lists as JSON strings)."""
    tracer = provider.get_tracer("support-bot")
    encode = json.dumps
    with tracer.start_as_current_span("invoke_agent support-bot") as run:
        run.set_attribute("gen_ai.operation.name", "invoke_agent")
        for inputs, outputs, feedback in ((TURN1_IN, TURN1_OUT, None), (TURN2_IN, TURN2_OUT, "Accepted.")):
            with tracer.start_as_current_span("chat smollm2") as span:
                span.set_attributes(
                    {
                        "gen_ai.operation.name": "chat",
                        "gen_ai.conversation.id": conversation,
                        "gen_ai.system_instructions": encode(SYSTEM),
                        "gen_ai.input.messages": encode(inputs),
                        "gen_ai.output.messages": encode(outputs),
                    }
                )
                if feedback:
                    span.set_attribute("oel.feedback", feedback)
        run.set_attributes({"gen_ai.conversation.id": conversation, "oel.outcome": "resolved on turn 2", "oel.success": True})


def exported(namespace: str | None = "otel-shop", conversation: str = "conv-1"):
    memory = InMemorySpanExporter()
    attrs = {"service.name": "support-bot", **({"oel.namespace": namespace} if namespace else {})}
    provider = TracerProvider(resource=Resource.create(attrs))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    agent_run(provider, conversation)
    return encode_spans(memory.get_finished_spans())


EXPECTED_PROMPT2 = [
    ChatMessage(role="system", content="You are a support assistant."),
    ChatMessage(role="user", content="Where is order 4411?"),
    ChatMessage(role="assistant", content="", tool_calls=[CALL]),
    ChatMessage(role="tool", content="shipped yesterday", tool_call_id="call-1"),
]


def test_genai_spans_become_steps_and_the_agent_span_ends_the_episode():
    records, rejected = span_records(exported(), "gw")
    assert rejected == []
    step1, step2, end = records  # in the order the spans ended
    assert (step1.namespace, step1.episode_id, step1.agent_id, step1.version) == ("otel-shop", "conv-1", "support-bot", "base")
    assert step1.prompt == EXPECTED_PROMPT2[:2] and step1.answer.text == "" and step1.answer.tool_calls == [CALL]
    assert step2.prompt == EXPECTED_PROMPT2 and step2.answer.text == "It shipped yesterday." and step2.feedback == "Accepted."
    assert end.prompt is None and (end.outcome, end.success) == ("resolved on turn 2", True)


def test_the_json_encoding_of_otlp_reads_the_same():
    request = exported()
    as_json = json_format.MessageToJson(request).encode()
    assert decode_request(as_json, "application/json") == decode_request(request.SerializeToString(), "application/x-protobuf")
    with pytest.raises(FormatError, match="content type"):
        decode_request(b"", "text/plain")
    with pytest.raises(FormatError, match="not an OTLP trace export"):
        decode_request(b"\xff\xff\xff", "application/x-protobuf")


def test_a_span_without_a_namespace_is_rejected_with_the_reason():
    records, rejected = span_records(exported(namespace=None), "gw")
    assert records == [] and len(rejected) == 3 and all("no oel.namespace" in r for r in rejected)


@pytest.mark.stack
def test_the_sdk_exporter_reaches_the_store_through_the_gateway_and_processor(kafka, s3_store, unique, tmp_path):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from test_gateway import running_gateway
    from test_processor import Env, free_port, wait_for

    env = Env(unique, BATCH_SIZE="1", EXTRACTION_VARIANT="grounded", TRUSTED_FEEDBACK="")
    conversation = f"conv-{unique}"
    with running_gateway(env, tmp_path / "gateway.log", f"http://127.0.0.1:{free_port()}") as url:
        provider = TracerProvider(resource=Resource.create({"service.name": "support-bot", "oel.namespace": "otel-shop"}))
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=url + "/v1/traces", timeout=30)))
        agent_run(provider, conversation)
        provider.shutdown()
        metrics = __import__("httpx").get(url + "/metrics").text
        assert 'oel_gateway_steps_recorded_total{namespace="otel-shop"}' in metrics
    key = f"trajectories/otel-shop/{conversation}.json"
    with env.worker(tmp_path / "worker.log"):
        wait_for(lambda: env.store.exists(key), 240, "the traced episode stored by the processor")
    stored = env.store.get_json(key)
    assert stored["status"] == "completed" and stored["agent_id"] == "support-bot"
    assert [ChatMessage.model_validate(m) for m in stored["steps"][1]["prompt"]] == EXPECTED_PROMPT2
    assert [s["response"] for s in stored["steps"]] == ["", "It shipped yesterday."]
    assert stored["steps"][0]["tool_calls"] == [CALL.model_dump(mode="json")]
    assert [s["feedback"] for s in stored["steps"]] == [None, "Accepted."]
    assert stored["end"] == {"outcome": "resolved on turn 2", "success": True}
