"""Extraction: asking the model to turn one trajectory into short, general experience items.

Two prompt variants (DESIGN.md, "Method facts"):

* **structured** — the model writes a comparative analysis of why the episode went as it did and then
  1–2 new items, each a line starting with ``- EXPERIENCE ITEM:``, not repeating the previous
  experience; every marker in the answer is parsed (several on one line are split);
* **unstructured** — the model writes one short free-text lesson, taken whole as one item (for the
  smallest models, which rarely follow the marker format).

Trajectory text comes from users and environments, so it is *sanitised* before it is shown to the
model: anything that looks like an item marker is neutralised, and an item that merely repeats text
from the trajectory is rejected, so a user cannot write items into the knowledge base.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from enum import Enum

from oel.episodes import CompletedEpisode
from oel.schemas import ChatMessage

MARKER = "- EXPERIENCE ITEM:"
_MARKER_RE = re.compile(r"-?\s*\**\s*experience\s*item\s*\**\s*:\s*", re.IGNORECASE)
# Marker look-alikes in untrusted text: any spacing, case, dashes or markup between the two words.
_FORGED_RE = re.compile(r"e\W*x\W*p\W*e\W*r\W*i\W*e\W*n\W*c\W*e[\W_]*i\W*t\W*e\W*m", re.IGNORECASE)

MIN_ITEM_CHARS = 12
MAX_ITEM_CHARS = 400


class PromptVariant(str, Enum):
    structured = "structured"
    unstructured = "unstructured"


@dataclass(frozen=True)
class ExtractionConfig:
    """How the extraction prompt is built."""

    variant: PromptVariant = PromptVariant.structured
    include_previous: bool = True
    """Show the current knowledge base so the model adds only what is new."""
    max_turn_chars: int = 1500
    """Each turn's input and output are cut to this many characters (the middle is elided)."""


def sanitise(text: str) -> str:
    """Untrusted text with every item-marker look-alike neutralised (NFKC-normalised first)."""
    text = unicodedata.normalize("NFKC", text)
    return _FORGED_RE.sub("[experience-note]", text)


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return text[:half] + " [...] " + text[-half:]


def render_trajectory(episode: CompletedEpisode, max_turn_chars: int = 1500) -> str:
    """The episode as the extractor reads it: each turn's input and output, then a summary line."""
    lines = []
    if episode.start and episode.start.task:
        lines.append(f"Task: {sanitise(_clip(episode.start.task, max_turn_chars))}")
    for i, step in enumerate(episode.steps, 1):
        seen = step.prompt[-1].content if step.prompt else ""
        lines.append(f"Turn {i} input: {sanitise(_clip(seen, max_turn_chars))}")
        lines.append(f"Turn {i} output: {sanitise(_clip(step.response, max_turn_chars))}")
        if step.feedback:
            lines.append(f"Turn {i} feedback: {sanitise(_clip(step.feedback, max_turn_chars))}")
    lines.append(f"Final result: {sanitise(_clip(episode.end.outcome, max_turn_chars))}")
    return "\n".join(lines)


def build_prompt(episode: CompletedEpisode, previous: list[str], config: ExtractionConfig) -> list[ChatMessage]:
    """The conversation that asks the model for experience items from one episode."""
    trajectory = render_trajectory(episode, config.max_turn_chars)
    known = "\n".join(f"- {sanitise(item)}" for item in previous) if previous and config.include_previous else "(none yet)"
    if config.variant is PromptVariant.structured:
        system = (
            "You study the work of an AI agent to learn lessons that will help it next time. "
            "You are precise and write general rules, not stories."
        )
        user = (
            f"Experience learned so far:\n{known}\n\n"
            f"An episode of the agent:\n{trajectory}\n\n"
            "First analyse in depth why the agent succeeded or failed: compare what it did with what the "
            "feedback asked for. Then write 1 or 2 NEW lessons that would help in other episodes of this kind "
            "and that are not already in the experience above. Write each lesson on its own line, starting "
            f"exactly with `{MARKER}`."
        )
    else:
        system = "You help an AI agent learn from its own work."
        user = (
            f"Experience learned so far:\n{known}\n\n"
            f"An episode of the agent:\n{trajectory}\n\n"
            "In one or two sentences, state the most useful general lesson for next time."
        )
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


COPY_WORDS = 8
"""An item sharing this many consecutive words with the trajectory is treated as copied from it."""


def _shingles(text: str, n: int = COPY_WORDS) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.casefold())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@dataclass(frozen=True)
class Rejected:
    text: str
    reason: str


def validate_items(candidates: list[str], trajectory_text: str) -> tuple[list[str], list[Rejected]]:
    """Keep items of sane length that are not copies of the trajectory's (untrusted) text."""
    haystack = normalise_item(trajectory_text).casefold()
    copied = _shingles(trajectory_text)
    kept: list[str] = []
    rejected: list[Rejected] = []
    for text in candidates:
        if len(text) < MIN_ITEM_CHARS:
            rejected.append(Rejected(text, f"shorter than {MIN_ITEM_CHARS} characters"))
        elif len(text) > MAX_ITEM_CHARS:
            rejected.append(Rejected(text, f"longer than {MAX_ITEM_CHARS} characters"))
        elif text.casefold() in haystack or _shingles(text) & copied:
            rejected.append(Rejected(text, "copies trajectory text (possible injection)"))
        elif text.casefold() in (k.casefold() for k in kept):
            rejected.append(Rejected(text, "repeated in the same answer"))
        else:
            kept.append(text)
    return kept, rejected


def answer_items(output: str, variant: PromptVariant, episode: CompletedEpisode) -> tuple[list[str], list[Rejected]]:
    """The items a model's extraction answer about ``episode`` contributes: every parsed item, validated
    against the episode's own (untrusted) text. (kept, rejected)."""
    return validate_items(parse_items(output, variant), render_trajectory(episode))
