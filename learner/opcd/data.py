"""Training data for OPCD: prefixes, experience sets, and the teacher's context.

File formats (what ``oel learner distill`` reads):

**Prefixes** (``--prefixes FILE.jsonl``): JSON lines, one training prefix per line: the conversation
the model saw before one of its turns, ending with a ``user`` message (the model answers next).
Each line is one of

- a list of messages: ``[{"role": "system"|"user"|"assistant", "content": "..."}, ...]``;
- an object with the list under ``"prompt"`` or ``"messages"`` (so a recorded step payload works);
- a plain JSON string: one user message.

Blank lines are skipped; an invalid line stops loading with its line number.

**Experience** (``--experience FILE``, repeatable; each file is one experience set, i.e. one of the
K independent extraction runs; a directory means every file in it): the items, **oldest first**.

- ``.json``: a list of strings, a list of objects with a ``"text"`` field, or an object with such a
  list under ``"items"``;
- ``.jsonl``: one item per line, a JSON string or an object with ``"text"``;
- anything else (``.txt``, ``.md``): one item per non-blank line; a leading ``- EXPERIENCE ITEM:``,
  ``- `` or ``* `` marker is stripped, lines starting with ``#`` are comments.

The teacher's context: the conversation with the agents' **experience block**
(:func:`oel.envs.prompts.experience_block`) put in front of one user message (the first by default: the
task statement an agent sees at the start of its episode). Everything else, including the chat template,
is identical to the student's context, and the teacher's first message is byte for byte what an agent
with the same experience sees.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from oel.envs.prompts import experience_block, format_experience
from oel.schemas import ChatMessage

log = logging.getLogger(__name__)

Conversation = list[ChatMessage]

_ITEM_MARKERS = ("- EXPERIENCE ITEM:", "EXPERIENCE ITEM:", "- ", "* ")


class DataError(ValueError):
    """A prefix or experience file is malformed; the message names the file and line."""


# --- prefixes --------------------------------------------------------------------------------


def parse_conversation(obj: Any) -> Conversation:
    """One training prefix from its JSON form (see the module docstring)."""
    if isinstance(obj, str):
        obj = [{"role": "user", "content": obj}]
    elif isinstance(obj, dict):
        for key in ("prompt", "messages"):
            if key in obj:
                return parse_conversation(obj[key])
        raise DataError('expected a list of messages, or an object with "prompt" or "messages"')
    if not isinstance(obj, list) or not obj:
        raise DataError("expected a non-empty list of messages")
    conv = [m if isinstance(m, ChatMessage) else ChatMessage.model_validate(m) for m in obj]
    if conv[-1].role not in ("user", "tool"):
        raise DataError(f"a training prefix must end with a user or tool message (the model answers next), got {conv[-1].role!r}")
    return conv


def load_prefixes(path: str | Path) -> list[Conversation]:
    """Read a prefixes JSONL file."""
    path = Path(path)
    out: list[Conversation] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append(parse_conversation(json.loads(line)))
            except (ValueError, TypeError) as exc:  # JSONDecodeError and pydantic errors are ValueErrors
                raise DataError(f"{path}:{lineno}: {exc}") from None
    if not out:
        raise DataError(f"{path}: no prefixes")
    return out


# --- experience ------------------------------------------------------------------------------


def _clean_item(text: str) -> str:
    text = text.strip()
    for marker in _ITEM_MARKERS:
        if text.upper().startswith(marker.upper()):
            text = text[len(marker) :].strip()
            break
    return text


def _item_text(obj: Any, where: str) -> str:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        return obj["text"]
    raise DataError(f'{where}: expected a string or an object with a "text" field')


def load_experience(path: str | Path) -> list[str]:
    """Read one experience set (items oldest first) from a file; see the module docstring."""
    path = Path(path)
    raw = path.read_text(encoding="utf-8")
    items: list[str] = []
    if path.suffix == ".json":
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise DataError(f"{path}: not valid JSON: {exc}") from None
        if isinstance(data, dict) and "items" in data:
            data = data["items"]
        if not isinstance(data, list):
            raise DataError(f'{path}: expected a JSON list of items or {{"items": [...]}}')
        items = [_item_text(x, f"{path}[{i}]") for i, x in enumerate(data)]
    elif path.suffix == ".jsonl":
        for lineno, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    items.append(_item_text(json.loads(line), f"{path}:{lineno}"))
                except ValueError as exc:
                    raise DataError(f"{path}:{lineno}: {exc}") from None
    else:
        items = [line for line in raw.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    items = [c for c in (_clean_item(x) for x in items) if c]
    if not items:
        raise DataError(f"{path}: no experience items")
    return items


def load_experience_sets(paths: Iterable[str | Path]) -> list[list[str]]:
    """One experience set per file; a directory contributes each of its files (sorted by name)."""
    sets: list[list[str]] = []
    for p in paths:
        p = Path(p)
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")) if p.is_dir() else [p]
        sets.extend(load_experience(f) for f in files)
    if not sets:
        raise DataError("no experience sets given")
    return sets


def render_experience(items: Sequence[str]) -> str:
    """The experience as it appears in the block: one ``- item`` per line (:func:`oel.envs.prompts.format_experience`)."""
    return format_experience(list(items))


@dataclass
class ExperienceCut:
    """What fitting one experience set into the token budget dropped (oldest items first)."""

    set_index: int
    items_before: int
    items_kept: int
    tokens_before: int
    tokens_after: int
    budget: int

    @property
    def items_dropped(self) -> int:
        return self.items_before - self.items_kept

    def describe(self) -> str:
        return (
            f"experience set {self.set_index}: {self.tokens_before} tokens is over the budget of {self.budget}; "
            f"dropped the {self.items_dropped} oldest of {self.items_before} items, kept {self.items_kept} "
            f"({self.tokens_after} tokens)"
        )


def fit_experience(
    items: Sequence[str], count_tokens: Callable[[str], int], budget: int, set_index: int = 0
) -> tuple[list[str], ExperienceCut | None]:
    """Drop the oldest items until the rendered experience fits ``budget`` tokens.

    Returns the kept items (still oldest first) and an :class:`ExperienceCut` if anything was
    dropped (``None`` otherwise). If even the newest item alone is over the budget, nothing is
    kept and the cut says so; the caller decides whether that is an error.
    """
    items = list(items)
    before = count_tokens(render_experience(items))
    if before <= budget:
        return items, None
    # Binary search for the smallest start index whose suffix fits (token count is monotone in practice).
    lo, hi = 1, len(items)
    while lo < hi:
        mid = (lo + hi) // 2
        if count_tokens(render_experience(items[mid:])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    kept = items[lo:]
    while kept and count_tokens(render_experience(kept)) > budget:  # guard against non-monotone tokenisation
        kept = kept[1:]
    after = count_tokens(render_experience(kept)) if kept else 0
    return kept, ExperienceCut(set_index, len(items), len(kept), before, after, budget)


@dataclass(frozen=True)
class ExperienceTemplate:
    """Where the experience block goes in the teacher's context. The block itself is
    :func:`oel.envs.prompts.experience_block`, the one the agents and the evaluations use, so the teacher
    sees the experience exactly as an agent does."""

    position: Literal["first_user", "last_user"] = "first_user"
    """Which user message gets the block: the first (task statement) or the last (latest turn)."""

    def block(self, items: Sequence[str]) -> str:
        return experience_block(list(items))

    def apply(self, conversation: Sequence[ChatMessage | dict[str, str]], items: Sequence[str] | None) -> Conversation:
        """The conversation with the experience block in front of the chosen user message.
        ``items`` None or empty returns the conversation unchanged (the student's context)."""
        conversation = [m if isinstance(m, ChatMessage) else ChatMessage.model_validate(m) for m in conversation]
        if not items:
            return conversation
        users = [i for i, m in enumerate(conversation) if m.role == "user"]
        if not users:
            raise DataError("a conversation without a user message has nowhere to put the experience")
        target = users[0] if self.position == "first_user" else users[-1]
        out = list(conversation)
        out[target] = ChatMessage(role="user", content=self.block(items) + conversation[target].content)
        return out


@dataclass
class PreparedData:
    """Prefixes and experience sets after validation against the token limits."""

    prefixes: list[Conversation]
    experience_sets: list[list[str]]
    cuts: list[ExperienceCut] = field(default_factory=list)
    skipped_prefixes: int = 0
    """Prefixes whose student prompt is longer than ``max_prompt_tokens`` (left out, never truncated)."""
