"""Grounded extraction: experience items lifted from *trusted* feedback, for models too small to abstract.

The paper's extraction (:mod:`oel.extraction`) asks the model to write lessons in its own words. A 135M
model cannot: its lessons are platitudes, hallucinations or echoes of the prompt, and such a knowledge
base makes the agents worse. What it can be given instead is what a trusted environment (a grader, a
reviewer, a game) already said in words. The grounded variant

1. splits every episode into :class:`TextPiece` s with a :class:`Source` (who wrote the text:
   ``user``, ``agent`` or ``environment``) and the field it came from (``step.feedback``, ...);
2. reads only the pieces whose source the namespace trusts (:func:`trusted_sources`), splits them
   into sentences and keeps the *rule-like* ones (a normative word such as *must*, *never*,
   *always*, *at most*), minus a short leading label (``Some label: every reply must ...`` becomes
   ``Every reply must ...``);
3. drops a statement that repeats untrusted text the environment had seen before it said it (an
   environment that quotes a user must not launder the user's words into knowledge);
4. keeps statements that recur in at least ``min_episodes`` episodes of the batch (a one-off remark
   is not a rule), most frequent first, at most ``max_items`` per batch.

Nothing here knows any environment or rule: it works from whatever the trusted feedback says. The model
is not called: on the default model ranking by recurrence was as good as anything it could add, so the
variant is deterministic (the same batch gives the same items, also on a replay).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from oel.episodes import CompletedEpisode
from oel.extraction import MAX_ITEM_CHARS, MIN_ITEM_CHARS, PromptVariant, Rejected, normalise_item, parse_items, sanitise, validate_items
from oel.forgery import COPY_WORDS, forged_reason
from oel.settings import TRUSTED_FEEDBACK, ProcessorSettings, default_of


class Source(str, Enum):
    """Who wrote a piece of trajectory text."""

    user = "user"
    """Prompts and customer text (what the agent was shown, other than restated feedback)."""
    agent = "agent"
    """The agent's own responses."""
    environment = "environment"
    """Feedback and outcomes from a grader, reviewer or game."""


@dataclass(frozen=True)
class TextPiece:
    """One piece of an episode's text with its provenance. ``turn``: 0 for the task, the step number
    (from 1) for a step's prompt, response and feedback, ``len(steps) + 1`` for the outcome."""

    source: Source
    field: str
    turn: int
    text: str


def episode_pieces(episode: CompletedEpisode) -> list[TextPiece]:
    """The episode's text in the order it was written, each piece with its source and field.

    A prompt message that repeats an earlier piece word for word (the conversation so far, an earlier
    step's feedback shown to the model by the agent harness) is that piece again, not new user text: it
    keeps the earlier piece's source."""
    pieces: list[TextPiece] = []
    if episode.start is not None and episode.start.task:
        pieces.append(TextPiece(Source.user, "start.task", 0, episode.start.task))
    seen: set[str] = {p.text.strip() for p in pieces}
    for n, step in enumerate(episode.steps, 1):
        for message in step.prompt:
            text = message.content.strip()
            if message.role == "assistant" or not text or text in seen:
                continue  # earlier responses are pieces of their own; a repeated piece keeps its first source
            pieces.append(TextPiece(Source.user, f"step.prompt.{message.role}", n, message.content))
            seen.add(text)
        pieces.append(TextPiece(Source.agent, "step.response", n, step.response))
        seen.add(step.response.strip())
        if step.tool_calls:
            calls = "\n".join(c.text for c in step.tool_calls)
            pieces.append(TextPiece(Source.agent, "step.tool_calls", n, calls))
            seen.add(calls.strip())
        if step.feedback:
            pieces.append(TextPiece(Source.environment, "step.feedback", n, step.feedback))
            seen.add(step.feedback.strip())
    pieces.append(TextPiece(Source.environment, "end.outcome", len(episode.steps) + 1, episode.end.outcome))
    return pieces


def untrusted_text(episode: CompletedEpisode, trusted: Iterable[Source] = ()) -> str:
    """Everything in the episode written by a source that is not trusted (what the copy filter compares
    items with)."""
    ok = set(trusted)
    return "\n".join(p.text for p in episode_pieces(episode) if p.source not in ok)


def answer_items(
    output: str, variant: PromptVariant, episode: CompletedEpisode, trusted: Iterable[Source] = ()
) -> tuple[list[str], list[Rejected]]:
    """The items a model's extraction answer about ``episode`` contributes: every parsed item, validated
    against the episode's untrusted text (every source not in ``trusted``). (kept, rejected)."""
    return validate_items(parse_items(output, variant), untrusted_text(episode, trusted))


# --- trust ------------------------------------------------------------------------------------

DEFAULT_TRUSTED_FEEDBACK = TRUSTED_FEEDBACK
"""Namespaces whose environment feedback is trusted by default (:data:`oel.settings.TRUSTED_FEEDBACK`)."""


def trusted_sources(namespace: str, trusted_feedback: str | Sequence[str]) -> frozenset[Source]:
    """The sources a namespace trusts: ``environment`` when the namespace matches one of the
    ``trusted_feedback`` glob patterns (comma-separated string or list), nothing otherwise. User and
    agent text are never trusted."""
    patterns = trusted_feedback.split(",") if isinstance(trusted_feedback, str) else list(trusted_feedback)
    if any(p.strip() and fnmatch.fnmatchcase(namespace, p.strip()) for p in patterns):
        return frozenset({Source.environment})
    return frozenset()


# --- rule-like statements ---------------------------------------------------------------------

_NORMATIVE = re.compile(
    r"\b(must|never|always|should|shall|required|requires|forbidden|not allowed|at most|at least|"
    r"may not|must not|cannot|only)\b",
    re.IGNORECASE,
)
_QUOTES = {'"': '"', "\u201c": "\u201d"}
LABEL_WORDS = 5
"""A leading ``label:`` of at most this many words (without a normative word) is dropped from a statement."""


def sentences(text: str) -> list[str]:
    """``text`` split into sentences at ``.``, ``!`` or ``?`` followed by white space, and at line
    breaks; never inside double quotes (a quoted ``"Hello!"`` stays in its sentence)."""
    out: list[str] = []
    buf: list[str] = []
    closing: str | None = None
    for i, ch in enumerate(text):
        if ch == "\n" and closing is None:
            out.append("".join(buf))
            buf = []
            continue
        buf.append(ch)
        if closing is not None:
            if ch == closing:
                closing = None
        elif ch in _QUOTES:
            closing = _QUOTES[ch]
        elif ch in ".!?" and (i + 1 == len(text) or text[i + 1].isspace()):
            out.append("".join(buf))
            buf = []
    out.append("".join(buf))
    return [s for s in (" ".join(x.split()) for x in out) if s]


def rule_statement(sentence: str) -> str | None:
    """The rule a sentence states, or None if it states none: a sentence with a normative word, without
    a short leading label; first letter upper-cased."""
    text = sentence.strip()
    head, sep, rest = text.partition(": ")
    if sep and len(head.split()) <= LABEL_WORDS and not _NORMATIVE.search(head) and _NORMATIVE.search(rest):
        text = rest.strip()
    if not _NORMATIVE.search(text):
        return None
    text = normalise_item(text)
    if not text:
        return None
    return text[0].upper() + text[1:]


_PAREN = re.compile(r"\s*\([^()]*\)")


def _key(statement: str) -> str:
    """What two occurrences of one rule share: the statement without parenthetical remarks that hold a
    number (``(yours had 41)`` varies per episode), case-folded."""
    return _PAREN.sub(lambda m: "" if re.search(r"\d", m.group()) else m.group(), statement).casefold()


@dataclass
class GroundedItem:
    """A rule stated by trusted feedback in ``len(episode_ids)`` episodes of a batch."""

    text: str
    episode_ids: list[str]
    fields: list[str] = field(default_factory=list)
    """The trajectory fields it was read from (``environment:step.feedback`` ...)."""


@dataclass(frozen=True)
class GroundedConfig:
    """How the grounded variant picks items."""

    min_episodes: int = default_of(ProcessorSettings, "grounded_min_episodes")
    """A statement must come from the trusted feedback of at least this many episodes of the batch."""
    max_items: int = 2
    """Most items per batch (the paper's extraction asks for 1-2 per episode), the most frequent first."""


def grounded_items(
    episodes: Sequence[CompletedEpisode],
    trusted: Iterable[Source],
    config: GroundedConfig = GroundedConfig(),
    known: Iterable[str] = (),
) -> list[GroundedItem]:
    """The batch's items (module docstring); empty when nothing is trusted. Statements already in
    ``known`` (the KB's item texts) are left out before the ``max_items`` most frequent are taken, so a
    rule the KB holds does not crowd out one it lacks."""
    ok = frozenset(trusted)
    have = {_key(normalise_item(t)) for t in known}
    if not ok:
        return []
    found: dict[str, GroundedItem] = {}
    order: list[str] = []
    for ep in episodes:
        pieces = episode_pieces(ep)
        for i, piece in enumerate(pieces):
            if piece.source not in ok:
                continue
            before = "\n".join(p.text for p in pieces[:i] if p.source not in ok)
            for sentence in sentences(sanitise(piece.text)):
                statement = rule_statement(sentence)
                if statement is None or not MIN_ITEM_CHARS <= len(statement) <= MAX_ITEM_CHARS:
                    continue
                if forged_reason(statement, before) is not None:  # laundered untrusted text, or a payload
                    continue
                key = _key(statement)
                item = found.get(key)
                if item is None:
                    item = found[key] = GroundedItem(statement, [])
                    order.append(key)
                if ep.episode_id not in item.episode_ids:
                    item.episode_ids.append(ep.episode_id)
                where = f"{piece.source.value}:{piece.field}"
                if where not in item.fields:
                    item.fields.append(where)
                if item.text != statement:  # keep only the parenthetical remarks every occurrence has
                    item.text = " ".join(_common_form(item.text, statement).split())
    kept = [found[k] for k in order if len(found[k].episode_ids) >= config.min_episodes and k not in have]
    kept.sort(key=lambda it: -len(it.episode_ids))  # stable: ties keep their first appearance
    return kept[: config.max_items]


def _common_form(a: str, b: str) -> str:
    """``a`` without the parenthetical remarks that ``b`` lacks."""
    return _PAREN.sub(lambda m: m.group() if m.group().strip() in b else "", a)


__all__ = [
    "COPY_WORDS",
    "DEFAULT_TRUSTED_FEEDBACK",
    "GroundedConfig",
    "GroundedItem",
    "answer_items",
    "Source",
    "TextPiece",
    "episode_pieces",
    "grounded_items",
    "rule_statement",
    "sentences",
    "trusted_sources",
    "untrusted_text",
]
