"""The out-of-distribution guard: a small built-in instruction-following test with programmatic checks.

Consolidation must teach a namespace's task without breaking the model elsewhere. The paper watches
IF-Eval for that (on-policy distillation keeps it at the base level, off-policy training drops it).
:data:`OOD_PROMPTS` is a fixed set of short IFEval-style prompts (each an everyday request plus one or
two verifiable instructions: all lowercase, no commas, include a keyword, repeat the request first...),
and every answer is checked by the **IFEval checkers of the** ``if-verifiable`` **package**
(``if_verifiable.ifeval``, the Google IFEval rules) through its own ``evaluate_instructions``.

:func:`ood_score` answers every prompt in one batched, greedy ``backend.generate`` call and returns
the fraction of prompts whose instructions are *all* followed (IFEval's prompt-level accuracy, loose
variant: a response also counts if it follows the instructions once a first/last line or markdown
``*`` is removed), plus the strict variant and each prompt's result.

Choices made for a fast CPU check:

* answers are capped at :data:`OOD_MAX_NEW_TOKENS` tokens, so every instruction in the set can be
  judged on a cut-off answer (nothing like "end with the phrase X" or "exactly 3 bullets", which a
  truncated answer fails whatever the model meant);
* no checker that needs NLTK's ``punkt`` data is used (``number_sentences``,
  ``capital_word_frequency``): that data is a run-time download, which is not possible here;
* ``langdetect`` (used by the language and case checkers) is seeded, so a score is reproducible.

Measured on the default model (SmolLM2-135M-Instruct, greedy, bf16): see the figures in the README
section on ``oel eval``; ``tests/test_evaluation.py`` checks the checkers on hand-written good and bad
answers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from oel.model.backend import Backend, SamplingParams
from oel.schemas import ChatMessage
from oel.settings import LearnerSettings, default_of

OOD_MAX_NEW_TOKENS = default_of(LearnerSettings, "ood_max_new_tokens")
"""Answer budget per prompt: enough for every instruction in the set to be visibly followed or not."""


@dataclass(frozen=True)
class OODPrompt:
    """One request with its verifiable instructions: ``(IFEval instruction id, checker kwargs)`` pairs."""

    id: str
    prompt: str
    instructions: tuple[tuple[str, dict[str, Any]], ...]


def _p(id_: str, prompt: str, *instructions: tuple[str, dict[str, Any]]) -> OODPrompt:
    return OODPrompt(id_, prompt, tuple(instructions))


_FRANCE = "What is the capital of France?"
_MOON = "Why does the moon change shape?"

OOD_PROMPTS: tuple[OODPrompt, ...] = (
    _p(
        "lowercase-beach",
        "Describe a sunny day at the beach in two sentences. Your entire response should be in English, "
        "and in all lowercase letters. No capital letters are allowed.",
        ("change_case:english_lowercase", {}),
    ),
    _p(
        "lowercase-coffee",
        "Explain how to make a cup of coffee. Write your whole answer in lowercase letters only, with no capital letters at all.",
        ("change_case:english_lowercase", {}),
    ),
    _p(
        "capital-fruits",
        "Name three fruits and say why they are healthy. Your entire response should be in English, and in all capital letters.",
        ("change_case:english_capital", {}),
    ),
    _p("no-comma-rainbow", "Explain what a rainbow is. Do not use any commas in your response.", ("punctuation:no_comma", {})),
    _p("no-comma-haiku", "Write a haiku about autumn leaves. Do not use any commas.", ("punctuation:no_comma", {})),
    _p(
        "keywords-note",
        "Write a short note to a friend about your weekend. Include the keywords garden and music in the response.",
        ("keywords:existence", {"keywords": ["garden", "music"]}),
    ),
    _p("keyword-bees", "What do bees make? Include the keyword honey in your response.", ("keywords:existence", {"keywords": ["honey"]})),
    _p(
        "keyword-train",
        "Describe a train journey through the mountains. Include the keywords tunnel and snow in your answer.",
        ("keywords:existence", {"keywords": ["tunnel", "snow"]}),
    ),
    _p(
        "forbidden-cat",
        "Describe a cat in a few sentences without using the words fur or pet.",
        ("keywords:forbidden_words", {"forbidden_words": ["fur", "pet"]}),
    ),
    _p(
        "forbidden-school",
        "Write two sentences about your first day at school. Do not use the words teacher or class.",
        ("keywords:forbidden_words", {"forbidden_words": ["teacher", "class"]}),
    ),
    _p(
        "frequency-sea",
        "Write a short poem about the sea. The word wave should appear at least 2 times.",
        ("keywords:frequency", {"keyword": "wave", "frequency": 2, "relation": "at least"}),
    ),
    _p(
        "repeat-france",
        "First repeat the request below word for word without change, then give your answer (do not say "
        f"anything before repeating the request). Request: {_FRANCE}",
        ("combination:repeat_prompt", {"prompt_to_repeat": _FRANCE}),
    ),
    _p(
        "repeat-moon",
        "First repeat the request below word for word without change, then give your answer (do not say "
        f"anything before repeating the request). Request: {_MOON}",
        ("combination:repeat_prompt", {"prompt_to_repeat": _MOON}),
    ),
    _p(
        "title-robot",
        "Write a short story about a robot. Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
        ("detectable_format:title", {}),
    ),
    _p(
        "constrained-sun",
        "Is the sun a star? Answer with one of the following options: My answer is yes., My answer is no., My answer is maybe.",
        ("detectable_format:constrained_response", {}),
    ),
    _p(
        "french-weather",
        "Write one sentence about the weather today. Your ENTIRE response should be in French language, no other language is allowed.",
        ("language:response_language", {"language": "fr"}),
    ),
    _p(
        "placeholders-letter",
        "Write a short invitation to a party. The response must contain at least 2 placeholders "
        "represented by square brackets, such as [address].",
        ("detectable_content:number_placeholders", {"num_placeholders": 2}),
    ),
    _p(
        "short-sky",
        "Explain why the sky is blue. Answer with less than 25 words.",
        ("length_constraints:number_words", {"num_words": 25, "relation": "less than"}),
    ),
    _p(
        "letter-zebra",
        "Write a sentence about zebras at the zoo. The letter z should appear at least 3 times.",
        ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "at least"}),
    ),
    _p(
        "postscript-thanks",
        "Write a short thank-you note to a neighbour. Add a postscript starting with P.S.",
        ("detectable_content:postscript", {"postscript_marker": "P.S."}),
    ),
)
"""The built-in set (20 prompts). Ids are stable: results are reported per id."""


@dataclass(frozen=True)
class OODCheck:
    """How one answer did: ``strict`` = every instruction followed as written; ``loose`` = also after
    IFEval's loose transformations; ``instructions`` = instruction id -> loose pass."""

    strict: bool
    loose: bool
    instructions: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class OODPromptResult:
    """One prompt's answer and its check."""

    id: str
    response: str
    response_tokens: int
    strict: bool
    passed: bool
    instructions: dict[str, bool]


@dataclass(frozen=True)
class OODResult:
    """The OOD check of one model (``adapter`` None = the base model).

    ``score``: fraction of prompts whose instructions were all followed (IFEval prompt-level, loose);
    ``strict_score``: the same, strict; ``results``: per prompt, in :data:`OOD_PROMPTS` order."""

    score: float
    strict_score: float
    prompts: int
    mean_response_tokens: float
    adapter: str | None
    seconds: float
    results: tuple[OODPromptResult, ...] = ()

    def summary(self) -> dict[str, Any]:
        """The numbers without the answers (what caches and manifests keep)."""
        return {
            "score": self.score,
            "strict_score": self.strict_score,
            "prompts": self.prompts,
            "mean_response_tokens": self.mean_response_tokens,
            "adapter": self.adapter,
            "seconds": round(self.seconds, 2),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "results": [asdict(r) for r in self.results]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OODResult:
        results = tuple(OODPromptResult(**r) for r in data.get("results", ()))
        return cls(
            score=data["score"],
            strict_score=data["strict_score"],
            prompts=data["prompts"],
            mean_response_tokens=data["mean_response_tokens"],
            adapter=data.get("adapter"),
            seconds=data.get("seconds", 0.0),
            results=results,
        )


def _checkers() -> tuple[Any, Any]:
    """if-verifiable's instruction registry and evaluator (imported on first use: the package pulls in
    ``datasets``, which takes a few seconds to import)."""
    import langdetect
    from if_verifiable.common import evaluate_instructions
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    langdetect.DetectorFactory.seed = 0  # langdetect samples; seeded, the same text always gets the same language
    return INSTRUCTION_DICT, evaluate_instructions


def check_response(prompt: OODPrompt, response: str) -> OODCheck:
    """Check one answer to ``prompt`` with the IFEval checkers (an empty answer follows nothing)."""
    registry, evaluate = _checkers()
    unknown = [i for i, _ in prompt.instructions if i not in registry]
    if unknown:
        raise ValueError(f"{prompt.id}: unknown IFEval instruction(s) {unknown}")
    ids = [i for i, _ in prompt.instructions]
    kwargs = [dict(k) for _, k in prompt.instructions]
    results, scores = evaluate(
        response=response, instruction_id_list=ids, kwargs_list=kwargs, prompt=prompt.prompt, instruction_registry=registry
    )
    return OODCheck(
        strict=scores.binary_strict == 1.0, loose=scores.binary_loose == 1.0, instructions={r.instruction_id: r.loose_pass for r in results}
    )


def prompts_fingerprint(
    prompts: Sequence[OODPrompt] = OOD_PROMPTS, max_new_tokens: int = OOD_MAX_NEW_TOKENS, experience: Sequence[str] | None = None
) -> str:
    """16 hex characters that change whenever the prompt set, its checks, the answer budget or the
    experience in context change (the key under which a model's OOD score is cached)."""
    payload: dict = {"prompts": [asdict(p) for p in prompts], "max_new_tokens": max_new_tokens, "decoding": "greedy"}
    if experience:
        payload["experience"] = list(experience)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def ood_score(
    backend: Backend,
    adapter: str | None = None,
    *,
    prompts: Sequence[OODPrompt] = OOD_PROMPTS,
    max_new_tokens: int = OOD_MAX_NEW_TOKENS,
    experience: Sequence[str] | None = None,
) -> OODResult:
    """Answer every prompt greedily with ``adapter`` (a name loaded in ``backend``; None = the base
    model) in one batched call, and check each answer (see the module docstring). With ``experience``,
    each prompt gets the agents' experience block in front (:func:`oel.envs.prompts.agent_prompt`): what
    a knowledge base in context does to requests outside its namespace."""
    import time

    from oel.envs.prompts import agent_prompt

    if not prompts:
        raise ValueError("no OOD prompts")
    t0 = time.monotonic()
    conversations = [[ChatMessage(role="user", content=agent_prompt(p.prompt, experience))] for p in prompts]
    gens = backend.generate(conversations, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=0), adapter=adapter)
    results = []
    for p, g in zip(prompts, gens):
        check = check_response(p, g.text)
        results.append(
            OODPromptResult(
                id=p.id,
                response=g.text,
                response_tokens=g.response_tokens,
                strict=check.strict,
                passed=check.loose,
                instructions=check.instructions,
            )
        )
    n = len(results)
    return OODResult(
        score=sum(r.passed for r in results) / n,
        strict_score=sum(r.strict for r in results) / n,
        prompts=n,
        mean_response_tokens=sum(r.response_tokens for r in results) / n,
        adapter=adapter,
        seconds=time.monotonic() - t0,
        results=tuple(results),
    )
