"""The one way the project turns a conversation into prompt tokens.

Every part (agents, extraction, the OPCD student and teacher, the in-process and vLLM backends)
must tokenise a conversation identically, or the student's sampled tokens would not line up with
the teacher's scores. The rule, which is also what vLLM's chat endpoint does:

1. render the conversation with the tokenizer's own chat template to text (``add_generation_prompt``
   appends the assistant header, so the next token is the start of the answer);
2. encode that text with ``add_special_tokens=False`` (the template already writes any BOS token,
   so none is added twice).

A response is then simply the token ids that follow the prompt ids: ``prompt_ids + response_ids``
is the exact sequence the model scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from oel.schemas import ChatMessage

Message = ChatMessage | Mapping[str, str]


def to_messages(conversation: Sequence[Message]) -> list[dict[str, str]]:
    """The conversation as the ``[{"role": ..., "content": ...}]`` list chat templates expect."""
    out = []
    for m in conversation:
        if isinstance(m, ChatMessage):
            out.append({"role": m.role, "content": m.content})
        else:
            out.append({"role": str(m["role"]), "content": str(m["content"])})
    return out


def render_chat(tokenizer: Any, conversation: Sequence[Message], add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
    """The conversation rendered by the tokenizer's chat template, as text.

    ``template_kwargs`` go to the template (for example ``enable_thinking=False`` for Qwen3).
    Raises ``ValueError`` if the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template")
    return tokenizer.apply_chat_template(
        to_messages(conversation), tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
    )


def encode_chat(tokenizer: Any, conversation: Sequence[Message], add_generation_prompt: bool = True, **template_kwargs: Any) -> list[int]:
    """Prompt token ids of a conversation: :func:`render_chat`, then encoded without adding special tokens."""
    text = render_chat(tokenizer, conversation, add_generation_prompt=add_generation_prompt, **template_kwargs)
    return list(tokenizer.encode(text, add_special_tokens=False))
