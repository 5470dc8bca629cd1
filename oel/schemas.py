"""The messages that cross service boundaries, as JSON on the wire.

Every message carries ``schema_version``; a consumer rejects versions it does not know rather
than guessing. :func:`decode` turns raw bytes into a message or raises :class:`InvalidMessage`
whose ``reason`` says which field failed and why (it becomes the DLQ header).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import Enum
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEMA_VERSION = 1

NAMESPACE_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
"""A namespace is one unit of learning (an app, task or environment): lowercase, <= 63 characters."""


ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@+=-]*$"
"""Episode, agent and event ids: ASCII letters and digits, then also ``. _ : @ + = -``; no ``/``, no spaces.
They become parts of object keys and metric labels, so a client cannot reach outside its own key."""
ID_MAX_CHARS = 128

VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@+=/-]*$"
"""A model version's name (an adapter name, or an upstream model name such as ``org/model``): the id
characters and ``/``."""


def _now() -> datetime:
    return datetime.now(UTC)


class Message(BaseModel):
    """Common base: strict (unknown fields are errors), immutable, versioned."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    schema_version: Literal[1] = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class EventKind(str, Enum):
    start = "start"
    step = "step"
    end = "end"


def _absent(value: object) -> bool:
    return value is None


class ToolFunction(BaseModel):
    """The function a tool call names, with its arguments as the model wrote them (JSON text, unparsed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    arguments: str = ""


class ToolCall(BaseModel):
    """One tool call of an assistant message, as in the OpenAI chat API."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=200)
    type: Literal["function"] = "function"
    function: ToolFunction

    @property
    def text(self) -> str:
        """The call as one line of text, ``name(arguments)``."""
        return f"{self.function.name}({self.function.arguments})"


class ChatMessage(BaseModel):
    """One message of a chat conversation, in the role/content form every chat template accepts.

    Tool use as in the OpenAI chat API: an assistant message may carry ``tool_calls``; a ``tool`` message
    answers one of them by ``tool_call_id``. Both fields are left out of the JSON when absent, so a
    plain message is written exactly as before they existed (events of schema version 1 stay valid)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: list[ToolCall] | None = Field(None, min_length=1, exclude_if=_absent, description="Assistant messages only.")
    tool_call_id: str | None = Field(
        None, min_length=1, max_length=200, exclude_if=_absent, description="Tool messages only: the call answered."
    )

    @model_validator(mode="after")
    def _tool_fields_match_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message can carry tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message needs a tool_call_id, and only a tool message has one")
        return self


class StartPayload(BaseModel):
    """What the agent was asked to do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str | None = Field(None, description="The task or instruction given to the agent, if any.")
    metadata: dict[str, str] = Field(default_factory=dict, description="Free-form tags (environment, seed, ...).")


class StepPayload(BaseModel):
    """One turn: what the model saw, what it said, what it did, what it was told."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: list[ChatMessage] = Field(min_length=1, description="The conversation the model saw (a training prefix).")
    response: str = Field(description="The model's raw response text.")
    tool_calls: list[ToolCall] | None = Field(
        None, min_length=1, exclude_if=_absent, description="The tool calls of the model's response, if it made any (left out when absent)."
    )
    action: str | None = Field(None, description="The action parsed from the response, if any.")
    feedback: str | None = Field(None, description="The environment's or user's text feedback to this turn.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _plain_prompt(cls, value: object) -> object:
        """A plain string prompt is one user message."""
        return [{"role": "user", "content": value}] if isinstance(value, str) else value


class EndPayload(BaseModel):
    """How the episode ended."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    outcome: str = Field(description="The final result and feedback as text (what the extractor reads).")
    success: bool | None = Field(None, description="Only for metrics and evaluation; never used for learning.")


class TrajectoryEvent(Message):
    """One event of an agent's episode, keyed by ``episode_id`` on ``oel.trajectories``."""

    event_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=ID_MAX_CHARS, pattern=ID_PATTERN)
    namespace: str = Field(pattern=NAMESPACE_PATTERN)
    episode_id: str = Field(min_length=1, max_length=ID_MAX_CHARS, pattern=ID_PATTERN)
    agent_id: str = Field(min_length=1, max_length=ID_MAX_CHARS, pattern=ID_PATTERN)
    model_version: str = Field(min_length=1, max_length=200, pattern=VERSION_PATTERN, description="The model version that acted.")
    seq: int = Field(ge=0, description="0 for start, then 1, 2, ... in the order the agent produced them.")
    ts: datetime = Field(default_factory=_now)
    kind: EventKind
    start: StartPayload | None = None
    step: StepPayload | None = None
    end: EndPayload | None = None

    @field_validator("ts")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("timestamp must include a timezone (use UTC)")
        return value

    @model_validator(mode="after")
    def _payload_matches_kind(self) -> TrajectoryEvent:
        payloads = {"start": self.start, "step": self.step, "end": self.end}
        if self.kind is EventKind.step and self.step is None:
            raise ValueError("kind 'step' needs a 'step' payload")
        if self.kind is EventKind.end and self.end is None:
            raise ValueError("kind 'end' needs an 'end' payload")
        extra = [name for name, p in payloads.items() if p is not None and name != self.kind.value]
        if extra:
            raise ValueError(f"kind '{self.kind.value}' must not carry a '{extra[0]}' payload")
        return self


class ExperienceUpdate(Message):
    """Published on ``oel.experience`` after items were appended to a namespace's knowledge base."""

    namespace: str = Field(pattern=NAMESPACE_PATTERN)
    kb_version: str = Field(min_length=1, description="Deterministic id of the KB snapshot after the append.")
    new_item_ids: list[str] = Field(description="Items this append added (deduplicated ones excluded).")
    total_items: int = Field(ge=0, description="Items in the KB after the append.")
    source_episode_ids: list[str] = Field(default_factory=list)
    ts: datetime = Field(default_factory=_now)


class VersionStatus(str, Enum):
    candidate = "candidate"
    promoted = "promoted"
    rejected = "rejected"
    rolled_back = "rolled_back"
    skipped = "skipped"
    """The knowledge gate found the KB not worth consolidating: no adapter was trained (never published)."""


class ModelVersion(Message):
    """The current model of a namespace, on the compacted ``oel.model-versions`` topic (key = namespace)."""

    namespace: str = Field(pattern=NAMESPACE_PATTERN)
    version: str = Field(min_length=1, max_length=200, description="Immutable adapter name, never reused.")
    adapter_uri: str | None = Field(None, description="Object-store key of the adapter; None = the base model.")
    base_model: str
    base_model_hash: str
    parent_version: str | None = None
    kb_version: str | None = None
    round_id: str | None = None
    status: VersionStatus
    reason: str | None = Field(None, description="Why it was rejected or rolled back.")
    eval: dict[str, float] = Field(default_factory=dict)
    ts: datetime = Field(default_factory=_now)


class InvalidMessage(ValueError):
    """Raw bytes that are not a valid message; ``reason`` is short and names the field."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


M = TypeVar("M", bound=Message)


def describe_validation_error(exc: ValidationError) -> str:
    """One line per failing field: ``field.path: message``."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(message)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def decode(raw: bytes | str | None, model: type[M], *, max_bytes: int | None = None) -> M:
    """Parse and validate one message, or raise :class:`InvalidMessage` saying why."""
    if raw is None:
        raise InvalidMessage("empty message (null value)")
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if max_bytes is not None and size > max_bytes:
        raise InvalidMessage(f"message is {size} bytes, over the limit of {max_bytes}")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        if any(err["type"] == "json_invalid" for err in exc.errors()):
            raise InvalidMessage(f"not valid JSON: {exc.errors()[0]['msg']}") from None
        raise InvalidMessage(describe_validation_error(exc)) from None


PUBLISHED_SCHEMAS: dict[str, type[Message]] = {"trajectory-event": TrajectoryEvent}
"""The messages outside clients write, by the name of their JSON Schema under ``docs/schemas/``."""


def json_schema(name: str) -> str:
    """The published JSON Schema of a message (``oel schema``; ``docs/schemas/<name>.json`` holds it)."""
    import json

    schema = PUBLISHED_SCHEMAS[name].model_json_schema()
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": f"oel:{name}:v{SCHEMA_VERSION}", **schema}
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
