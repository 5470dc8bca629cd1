"""The agent prompt, with or without experience in context.

:func:`experience_block` is the one place where experience meets a situation, as in the OEL paper: a
block saying that decisions are based on learned experience that may be incomplete or wrong, then
the experience, then the current situation. Agents use it for their first user message; the learner
builds its teacher prompts with :func:`with_experience`, which applies the same function to the
first user message of a recorded conversation, so student and teacher prompts differ by exactly the
experience block and nothing else.

Without experience (None, empty string or empty list) the prompt is the situation text unchanged,
so a recorded conversation is exactly what a no-experience agent saw.
"""

from __future__ import annotations

from collections.abc import Sequence

from oel.model.backend import Conversation
from oel.schemas import ChatMessage

EXPERIENCE_INTRO = "Base your answer on this experience from earlier episodes (it may be incomplete or wrong):"
"""Kept short on purpose: measured on the 135M default model, this one line made a correct experience
work about twice as often as a longer two-sentence version (greeting rule, first turn: 11/16 vs 5/16)."""
SITUATION_HEADING = "Current situation:"

Experience = str | Sequence[str] | None
"""Experience as one text block, or as items (one per line in the prompt, each prefixed ``- ``)."""


def format_experience(experience: Experience) -> str:
    """The experience as prompt text: items as ``- item`` lines; a single string is used as given."""
    if experience is None:
        return ""
    if isinstance(experience, str):
        return experience.strip()
    lines = []
    for item in experience:
        text = " ".join(str(item).split())
        if text:
            lines.append(text if text.startswith("- ") else f"- {text}")
    return "\n".join(lines)


def experience_block(experience: Experience) -> str:
    """The text put in front of a situation: the intro line, the experience, then the situation heading
    (ends with a newline; empty without experience). Every prompt with experience starts with it: the
    agents', the evaluations' and the OPCD teacher's, so all of them see the same bytes."""
    block = format_experience(experience)
    if not block:
        return ""
    return f"{EXPERIENCE_INTRO}\n{block}\n\n{SITUATION_HEADING}\n"


def agent_prompt(situation: str, experience: Experience = None) -> str:
    """The agent's prompt for ``situation`` (task, observation and answer format), with the experience
    block in front when there is any experience."""
    return experience_block(experience) + situation


def with_experience(conversation: Conversation, experience: Experience) -> Conversation:
    """``conversation`` with :func:`agent_prompt` applied to its first user message (the teacher's view
    of a recorded student conversation). Other messages are unchanged; raises if there is no user message."""
    out = list(conversation)
    for i, message in enumerate(out):
        if message.role == "user":
            out[i] = ChatMessage(role="user", content=agent_prompt(message.content, experience))
            return out
    raise ValueError("the conversation has no user message to put the experience in")
