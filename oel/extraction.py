"""Extraction: asking the model to turn one trajectory into short, general experience items.

Two prompt variants (DESIGN.md, "Method facts"):

* **structured** — the model writes a comparative analysis of why the episode went as it did and then
  1–2 new items, each a line starting with ``- EXPERIENCE ITEM:``, not repeating the previous
  experience; every marker in the answer is parsed (several on one line are split);
* **unstructured** — the model writes one short free-text lesson, taken whole as one item (for the
  smallest models, which rarely follow the marker format).

A third variant, **grounded** (:mod:`oel.grounded`), asks no model at all: it lifts rule statements from
the feedback of a source the namespace trusts. It is the default for the default 135M model, which
cannot abstract a lesson (its own extractions measured as noise that made the agents worse).

Trajectory text comes from users, agents and environments, so it is *sanitised* before it is shown to
the model: anything that looks like an item marker is neutralised, and an item that repeats untrusted
text from the trajectory (or the extraction prompt's own instruction) is rejected, so a user cannot
write items into the knowledge base.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from enum import Enum

from oel.episodes import CompletedEpisode
from oel.forgery import FORGED_MARKER, forged_reason, shingles, visible
from oel.schemas import ChatMessage

MARKER = "- EXPERIENCE ITEM:"
_MARKER_RE = re.compile(r"-?\s*\**\s*experience\s*item\s*\**\s*:\s*", re.IGNORECASE)

MIN_ITEM_CHARS = 12
MAX_ITEM_CHARS = 400


class PromptVariant(str, Enum):
    structured = "structured"
    unstructured = "unstructured"
    grounded = "grounded"
    """No prompt: items are rule statements lifted from trusted feedback (:mod:`oel.grounded`)."""


@dataclass(frozen=True)
class ExtractionConfig:
    """How the extraction prompt is built."""

    variant: PromptVariant = PromptVariant.structured
    include_previous: bool = True
    """Show the current knowledge base so the model adds only what is new."""
    max_turn_chars: int = 1500
    """Each turn's input and output are cut to this many characters (the middle is elided)."""


def sanitise(text: str) -> str:
    """Untrusted text with every item-marker look-alike neutralised (NFKC-normalised and invisible characters
    removed first)."""
    return FORGED_MARKER.sub("[experience-note]", visible(text))


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return text[:half] + " [...] " + text[-half:]


_INSTRUCTIONS: dict[PromptVariant, tuple[str, str]] = {
    PromptVariant.structured: (
        "You study the work of an AI agent to learn lessons that will help it next time. "
        "You are precise and write general rules, not stories.",
        "First analyse in depth why the agent succeeded or failed: compare what it did with what the "
        "feedback asked for. Then write 1 or 2 NEW lessons that would help in other episodes of this kind "
        "and that are not already in the experience above. Write each lesson on its own line, starting "
        f"exactly with `{MARKER}`.",
    ),
    PromptVariant.unstructured: (
        "You help an AI agent learn from its own work.",
        "In one or two sentences, state the most useful general lesson for next time.",
    ),
}
"""(system message, request) of each prompt variant: what the model is told, never knowledge itself."""
PROMPT_TEXT = "\n".join(["Experience learned so far:", "An episode of the agent:", *(t for pair in _INSTRUCTIONS.values() for t in pair)])
"""The extraction prompts' own words: an item that repeats them is an echo of the instruction, not a lesson."""


def render_trajectory(episode: CompletedEpisode, max_turn_chars: int = 1500) -> str:
    """The episode as the extractor reads it: each turn's input and output, then a summary line."""
    lines = []
    if episode.start and episode.start.task:
        lines.append(f"Task: {sanitise(_clip(episode.start.task, max_turn_chars))}")
    for i, step in enumerate(episode.steps, 1):
        last = step.prompt[-1]
        source = "" if last.role == "user" else f" ({last.role})"  # a tool's result, or a system message
        lines.append(f"Turn {i} input{source}: {sanitise(_clip(last.content, max_turn_chars))}")
        lines.append(f"Turn {i} output: {sanitise(_clip(step.response, max_turn_chars))}")
        for call in step.tool_calls or ():
            lines.append(f"Turn {i} tool call: {sanitise(_clip(call.text, max_turn_chars))}")
        if step.feedback:
            lines.append(f"Turn {i} feedback: {sanitise(_clip(step.feedback, max_turn_chars))}")
    lines.append(f"Final result: {sanitise(_clip(episode.end.outcome, max_turn_chars))}")
    return "\n".join(lines)


def build_prompt(episode: CompletedEpisode, previous: list[str], config: ExtractionConfig) -> list[ChatMessage]:
    """The conversation that asks the model for experience items from one episode."""
    trajectory = render_trajectory(episode, config.max_turn_chars)
    known = "\n".join(f"- {sanitise(item)}" for item in previous) if previous and config.include_previous else "(none yet)"
    if config.variant is PromptVariant.grounded:
        raise ValueError("the grounded variant has no prompt (oel.grounded lifts items from trusted feedback)")
    system, ask = _INSTRUCTIONS[config.variant]
    user = f"Experience learned so far:\n{known}\n\nAn episode of the agent:\n{trajectory}\n\n{ask}"
    return [ChatMessage(role="system", content=system), ChatMessage(role="user", content=user)]


def normalise_item(text: str) -> str:
    """Canonical item text: NFKC, single spaces, no surrounding quotes, bullets or markup."""
    text = unicodedata.normalize("NFKC", text)
    text = re.sub(r"\s+", " ", text).strip()
    text = text.strip(" \"'`*-•")
    return text.strip()


def item_id(namespace: str, text: str) -> str:
    """Deterministic id of an item: the same lesson in the same namespace always has the same id."""
    key = namespace + "\n" + normalise_item(text).casefold()
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def parse_items(output: str, variant: PromptVariant) -> list[str]:
    """Candidate item texts in the order the model wrote them (not yet validated)."""
    if variant is PromptVariant.unstructured:
        paragraph = next((p for p in re.split(r"\n\s*\n", output.strip()) if p.strip()), "")
        text = _first_sentences(normalise_item(_MARKER_RE.sub(" ", paragraph)), MAX_ITEM_CHARS)
        return [text] if text else []
    items = []
    for line in output.splitlines():
        parts = _MARKER_RE.split(line)
        if len(parts) < 2:
            continue
        items.extend(p for p in (normalise_item(x) for x in parts[1:]) if p)
    return items


def _first_sentences(text: str, limit: int) -> str:
    """Whole sentences from the start of ``text`` that fit ``limit`` characters (a hard cut if none does)."""
    if len(text) <= limit:
        return text
    cut = max(text.rfind(end, 0, limit) for end in (". ", "! ", "? "))
    return text[: cut + 1] if cut > 0 else text[:limit].rstrip()


@dataclass(frozen=True)
class Rejected:
    text: str
    reason: str


_PROMPT_FOLDED = normalise_item(PROMPT_TEXT).casefold()
_PROMPT_SHINGLES = shingles(PROMPT_TEXT, 6)


def validate_items(candidates: list[str], untrusted_text: str) -> tuple[list[str], list[Rejected]]:
    """Keep items of sane length that carry nothing of the episode's untrusted text (user and agent
    text, and feedback the namespace does not trust: copied, restated, or a link, credential or marker;
    :func:`oel.forgery.forged_reason`) and do not repeat the extraction prompt's own instructions."""
    kept: list[str] = []
    rejected: list[Rejected] = []
    for text in candidates:
        if len(text) < MIN_ITEM_CHARS:
            rejected.append(Rejected(text, f"shorter than {MIN_ITEM_CHARS} characters"))
        elif len(text) > MAX_ITEM_CHARS:
            rejected.append(Rejected(text, f"longer than {MAX_ITEM_CHARS} characters"))
        elif (forged := forged_reason(text, untrusted_text)) is not None:
            rejected.append(Rejected(text, forged))
        elif text.casefold() in _PROMPT_FOLDED or shingles(text, 6) & _PROMPT_SHINGLES:
            rejected.append(Rejected(text, "repeats the extraction prompt's instruction"))
        elif text.casefold() in (k.casefold() for k in kept):
            rejected.append(Rejected(text, "repeated in the same answer"))
        else:
            kept.append(text)
    return kept, rejected
