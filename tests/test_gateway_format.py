"""The gateway's reading of the OpenAI wire format and of who is calling (no services)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.app import identify, upstream_body
from gateway.openai_format import FormatError, StreamAccumulator, chat_answer, completion_prompt, prompt_messages
from oel.schemas import ChatMessage, ToolCall

TOOL_CALL = {"id": "call-9", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "4411"}'}}


def test_the_conversation_is_recorded_with_tool_use_and_text_parts():
    body = {
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Where is"},
                    {"type": "image_url", "image_url": {"url": "x"}},
                    {"type": "text", "text": "order 4411?"},
                ],
            },
            {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
            {"role": "tool", "content": "shipped", "tool_call_id": "call-9"},
        ]
    }
    assert prompt_messages(body) == [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Where is\n\norder 4411?"),
        ChatMessage(role="assistant", content="", tool_calls=[TOOL_CALL]),
        ChatMessage(role="tool", content="shipped", tool_call_id="call-9"),
    ]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({}, "messages: expected a non-empty list"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages\\[0\\].role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages\\[0\\]: .*tool_call_id"),
        ({"messages": [{"role": "user", "content": 3}]}, "content must be"),
    ],
)
def test_requests_outside_the_format_are_refused_naming_the_field(body, words):
    with pytest.raises(FormatError, match=words):
        prompt_messages(body)


def test_a_completion_prompt_must_be_one_string():
    assert completion_prompt({"prompt": "Once"}) == [ChatMessage(role="user", content="Once")]
    with pytest.raises(FormatError, match="single string"):
        completion_prompt({"prompt": ["a", "b"]})


def test_a_non_streamed_answer_keeps_its_tool_calls():
    answer = chat_answer({"choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}}]})
    assert answer.text == "" and answer.tool_calls == [ToolCall.model_validate(TOOL_CALL)]
    with pytest.raises(FormatError, match="choices"):
        chat_answer({"choices": []})


def _sse(events: list[dict]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


STREAM = _sse(
    [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"choices": [{"index": 1, "delta": {"content": "other choice"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo \u00e9\u00e8 \u2014 ok"}}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {"index": 0, "id": "call-9", "type": "function", "function": {"name": "lookup", "arguments": '{"q": '}}
                        ]
                    },
                }
            ]
        },
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"4411"}'}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ]
)


@given(st.lists(st.integers(min_value=1, max_value=len(STREAM)), max_size=40))
def test_a_stream_cut_anywhere_gives_the_same_answer(cuts):
    acc = StreamAccumulator()
    points = sorted(set(cuts))
    for a, b in zip([0, *points], [*points, len(STREAM)], strict=True):
        acc.feed(STREAM[a:b])
    answer = acc.answer()
    assert acc.done and answer.text == "Hello \u00e9\u00e8 \u2014 ok"
    assert answer.tool_calls == [ToolCall.model_validate(TOOL_CALL)]


def test_a_streamed_completion_is_rebuilt_too():
    acc = StreamAccumulator()
    acc.feed(_sse([{"choices": [{"index": 0, "text": "Once "}]}, {"choices": [{"index": 0, "text": "upon"}]}]))
    assert acc.answer().text == "Once upon" and acc.answer().tool_calls is None


class Headers(dict):
    pass


def test_who_is_calling_comes_from_headers_first_then_the_body():
    body = {"model": "oel/shop", "user": "u-1", "metadata": {"oel_episode_id": "e-1", "oel_agent_id": "bot-2", "trace": "t"}}
    who = identify(Headers(), body, "gw")
    assert (who.namespace, who.episode_id, who.agent_id) == ("shop", "e-1", "bot-2")
    who = identify(Headers({"X-OEL-Namespace": "shop", "X-OEL-Episode-Id": "e-9", "X-OEL-Agent-Id": "bot-9"}), body, "gw")
    assert (who.namespace, who.episode_id, who.agent_id) == ("shop", "e-9", "bot-9")
    who = identify(Headers({"X-OEL-Namespace": "shop"}), {"model": "any", "user": "u-1"}, "gw")
    assert (who.namespace, who.episode_id, who.agent_id) == ("shop", None, "u-1")
    assert identify(Headers({"X-OEL-Namespace": "shop"}), {"model": "any"}, "gw").agent_id == "gw"


@pytest.mark.parametrize(
    ("headers", "body", "words"),
    [
        ({}, {"model": "any"}, "no namespace"),
        ({"X-OEL-Namespace": "other"}, {"model": "oel/shop"}, "names namespace 'shop'"),
        ({"X-OEL-Namespace": "Shop/../x"}, {"model": "any"}, "lowercase"),
    ],
)
def test_calls_without_a_valid_namespace_are_refused(headers, body, words):
    with pytest.raises(FormatError, match=words):
        identify(Headers(headers), body, "gw")


def test_the_upstream_gets_the_served_model_and_no_oel_metadata():
    body = {"model": "oel/shop", "messages": [], "metadata": {"oel_episode_id": "e-1", "trace": "t"}}
    assert upstream_body(body, "v3") == {"model": "v3", "messages": [], "metadata": {"trace": "t"}}
    assert "metadata" not in upstream_body({"model": "x", "metadata": {"oel_namespace": "shop"}}, "x")
    assert body["model"] == "oel/shop"  # the client's request is not changed
