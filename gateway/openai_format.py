"""The OpenAI chat and completions wire format, turned into what a trajectory step records (no I/O).

Only the first choice of a response is recorded (``n`` > 1 answers the client in full, but a step has
one response). Content given as a list of parts keeps its text parts, joined by blank lines; other
parts (images, audio) are not recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from oel.schemas import ChatMessage, ToolCall, describe_validation_error


class FormatError(ValueError):
    """A request or response that is not in the OpenAI format; the message says which field."""


def content_text(content: Any) -> str:
    """A message's ``content`` as text: a string as is, the text parts of a list joined, null as ''."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n\n".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
    raise FormatError(f"content must be a string, a list of parts or null, not {type(content).__name__}")


def prompt_messages(body: dict[str, Any]) -> list[ChatMessage]:
    """The conversation of a ``/v1/chat/completions`` request, tool calls and results included. A
    ``developer`` message counts as a system message; ``function`` messages (the API's old form) are refused."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise FormatError("messages: expected a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise FormatError(f"messages[{i}]: expected an object")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise FormatError(f"messages[{i}].role: {m.get('role')!r} is not recorded (system, developer, user, assistant, tool)")
        try:
            out.append(
                ChatMessage(
                    role=role,
                    content=content_text(m.get("content")),
                    tool_calls=m.get("tool_calls") or None,
                    tool_call_id=m.get("tool_call_id"),
                )
            )
        except ValidationError as exc:
            raise FormatError(f"messages[{i}]: {describe_validation_error(exc)}") from None
    return out


def completion_prompt(body: dict[str, Any]) -> list[ChatMessage]:
    """The prompt of a ``/v1/completions`` request as one user message (a single string prompt only)."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise FormatError("prompt: only a single string prompt is recorded")
    return [ChatMessage(role="user", content=prompt)]


@dataclass
class Answer:
    """What the model answered: its text and tool calls (first choice)."""

    text: str = ""
    tool_calls: list[ToolCall] | None = None


def chat_answer(response: dict[str, Any]) -> Answer:
    """The first choice of a non-streamed chat completion."""
    try:
        message = response["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        raise FormatError("choices[0].message: missing in the upstream's response") from None
    calls = message.get("tool_calls") or None
    return Answer(content_text(message.get("content")), [ToolCall.model_validate(c) for c in calls] if calls else None)


def completion_answer(response: dict[str, Any]) -> Answer:
    """The first choice of a non-streamed completion."""
    try:
        return Answer(str(response["choices"][0]["text"]))
    except (KeyError, IndexError, TypeError):
        raise FormatError("choices[0].text: missing in the upstream's response") from None


@dataclass
class _CallParts:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class StreamAccumulator:
    """Rebuilds the answer of a streamed (server-sent events) chat completion or completion from the raw
    bytes as they pass through, in chunks of any size."""

    def __init__(self) -> None:
        self._buffer = b""
        self._text: list[str] = []
        self._calls: dict[int, _CallParts] = {}
        self.done = False

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._line(line.strip())

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return  # blank separators, comments, event names
        data = line[5:].strip()
        if data == b"[DONE]":
            self.done = True
            return
        try:
            event = json.loads(data)
        except ValueError:
            return  # not ours to judge: the client gets the bytes as they came
        for choice in event.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            if "text" in choice:  # a completion
                self._text.append(choice["text"] or "")
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self._text.append(delta["content"])
            for call in delta.get("tool_calls") or ():
                parts = self._calls.setdefault(call.get("index", 0), _CallParts())
                parts.id = call.get("id") or parts.id
                fn = call.get("function") or {}
                parts.name = fn.get("name") or parts.name
                if fn.get("arguments"):
                    parts.arguments.append(fn["arguments"])

    def answer(self) -> Answer:
        calls = [ToolCall(id=p.id, function={"name": p.name, "arguments": "".join(p.arguments)}) for _, p in sorted(self._calls.items())]
        return Answer("".join(self._text), calls or None)
