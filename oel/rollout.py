"""Reference agents: many environment episodes driven by one model, batched across episodes.

:func:`run_episodes` keeps up to ``batch_size`` environments in flight. Each round it gathers the
conversation of every live episode, makes **one** ``backend.generate`` call for all of them, steps
each environment with its response, and refills finished slots with the next seeds. So a turn of 16
episodes costs one batched generation instead of 16; results do not depend on the batch size under
greedy decoding (checked in ``tests/test_agents.py``; the speed-up is measured by
``bench/bench_agents.py``).

The conversation is multi-turn chat: the first user message is
:func:`oel.envs.prompts.agent_prompt` (the experience block, when there is experience, then the
environment's observation and the answer format); each later user message is the environment's
feedback on the previous response.

Action modes (:class:`ActionMode`), for the grid games:

``free``    the paper's mode: the model reasons freely and ends with a bracketed move; the action is
            the last bracketed move in its answer.
``short``   a format small models can follow: the prompt asks for the move alone (``[up]``), and the
            answer is capped at a few tokens; the action is again the last bracketed move.
``choice``  the model writes a short line of reasoning, then the move is *chosen by the model's own
            log-probs*: each legal move is scored as the continuation ``\\nMy move: [<move>]`` of its
            answer (``backend.score``) and the most probable one is played. Every action is then
            well-formed and legal, so the valid-action rate is 1 by construction; what is measured is
            whether the model's preference among legal moves is right.

House rules (free text replies) use ``free`` only.

On the 135M default model only ``choice`` yields legal moves on the games (figures: ``bench/README.md``,
"Reference agents"). ``choice`` costs one ``score`` row per legal move, each a full prompt (no KV cache is shared between
rows or calls), so it is several times slower per turn than ``short``.

:class:`Episode` records everything an episode produced (each turn's prompt, raw response, parsed
action and feedback), in the shape the recorder SDK sends as trajectory events; ``on_turn`` and
``on_episode`` callbacks let a recorder stream them as they happen.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from oel.envs.base import Environment
from oel.envs.prompts import Experience, agent_prompt
from oel.model.backend import Backend, Conversation, Generation, SamplingParams
from oel.schemas import ChatMessage


class ActionMode(str, Enum):
    free = "free"
    short = "short"
    choice = "choice"


SHORT_FORMAT = "Answer with your move only, in square brackets. Do not explain."
CHOICE_FORMAT = "In one sentence, say which move is best and why."
CHOICE_JOIN = "\nMy move: ["
"""Text put after the model's reasoning in ``choice`` mode; each legal move is scored as what follows it."""

DEFAULT_MAX_NEW_TOKENS = {ActionMode.free: 128, ActionMode.short: 8, ActionMode.choice: 32}
TEXT_MAX_NEW_TOKENS = 48
"""Default reply budget for free-text environments (house rules): about 35 words."""


@dataclass(frozen=True)
class AgentConfig:
    """How the agents act. ``max_new_tokens`` None = the mode's default (:data:`DEFAULT_MAX_NEW_TOKENS`;
    house-rules replies: :data:`TEXT_MAX_NEW_TOKENS`). ``seed`` seeds sampling (call *k* uses ``seed + 1000 * k``); with
    ``temperature == 0`` decoding is greedy and the seed is irrelevant."""

    mode: ActionMode = ActionMode.free
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int | None = None
    batch_size: int = 16
    """Environment instances per generation call (1 = one episode at a time)."""
    seed: int | None = 0
    adapter: str | None = None
    """Adapter (model version) to act with; None = the base model."""

    def tokens_for(self, env: Environment) -> int:
        if self.max_new_tokens is not None:
            return int(self.max_new_tokens)
        if not env.discrete:
            return TEXT_MAX_NEW_TOKENS
        return DEFAULT_MAX_NEW_TOKENS[ActionMode(self.mode)]


@dataclass
class Turn:
    """One agent turn: the conversation the model saw, what it answered, and what the environment said."""

    prompt: list[ChatMessage]
    response: str
    response_tokens: int
    action: str | None
    valid: bool
    feedback: str
    done: bool
    passed: bool
    finish_reason: str = "stop"
    choice_logprobs: dict[str, float] | None = None
    """``choice`` mode: the summed log-prob of each legal move."""


@dataclass
class Episode:
    """One finished (or running) episode."""

    env: str
    seed: int
    metadata: dict[str, str]
    observation: str
    first_prompt: str
    turns: list[Turn] = field(default_factory=list)
    passed: bool = False
    reward: float | None = None
    done: bool = False
    adapter: str | None = None
    seconds: float = 0.0
    tag: str = ""

    @property
    def conversation(self) -> list[ChatMessage]:
        """The full chat: first prompt, then response / feedback pairs."""
        if not self.turns:
            return [ChatMessage(role="user", content=self.first_prompt)]
        last = self.turns[-1]
        return [
            *last.prompt,
            ChatMessage(role="assistant", content=last.response),
            *([ChatMessage(role="user", content=last.feedback)] if last.feedback else []),
        ]

    @property
    def outcome(self) -> str:
        """One line with the final result and the last feedback (the extraction prompt's summary line)."""
        result = "passed" if self.passed else "failed"
        last = self.turns[-1].feedback if self.turns else ""
        return f"Result: {result} after {len(self.turns)} turn(s). Final feedback: {last}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "env": self.env,
            "seed": self.seed,
            "tag": self.tag,
            "metadata": self.metadata,
            "passed": self.passed,
            "reward": self.reward,
            "adapter": self.adapter,
            "seconds": round(self.seconds, 3),
            "first_prompt": self.first_prompt,
            "turns": [
                {
                    "response": t.response,
                    "response_tokens": t.response_tokens,
                    "action": t.action,
                    "valid": t.valid,
                    "feedback": t.feedback,
                    "done": t.done,
                    "passed": t.passed,
                    "finish_reason": t.finish_reason,
                    **({"choice_logprobs": t.choice_logprobs} if t.choice_logprobs is not None else {}),
                }
                for t in self.turns
            ],
        }


@dataclass(frozen=True)
class RunStats:
    """Aggregates over episodes. ``valid_action_rate`` is over turns; the others over episodes."""

    episodes: int
    passed: int
    turns: int
    valid_turns: int
    response_tokens: int
    seconds: float

    @property
    def pass_rate(self) -> float:
        return self.passed / self.episodes if self.episodes else math.nan

    @property
    def valid_action_rate(self) -> float:
        return self.valid_turns / self.turns if self.turns else math.nan

    @property
    def mean_response_tokens(self) -> float:
        """Mean response tokens per turn."""
        return self.response_tokens / self.turns if self.turns else math.nan

    @property
    def mean_turns(self) -> float:
        return self.turns / self.episodes if self.episodes else math.nan

    @property
    def episodes_per_minute(self) -> float:
        return 60.0 * self.episodes / self.seconds if self.seconds > 0 else math.nan

    def as_dict(self) -> dict[str, float | int]:
        return {
            "episodes": self.episodes,
            "passed": self.passed,
            "pass_rate": self.pass_rate,
            "valid_action_rate": self.valid_action_rate,
            "mean_response_tokens": self.mean_response_tokens,
            "mean_turns": self.mean_turns,
            "seconds": round(self.seconds, 2),
            "episodes_per_minute": self.episodes_per_minute,
        }


def summarize(episodes: Sequence[Episode], seconds: float = 0.0) -> RunStats:
    turns = [t for e in episodes for t in e.turns]
    return RunStats(
        episodes=len(episodes),
        passed=sum(e.passed for e in episodes),
        turns=len(turns),
        valid_turns=sum(t.valid for t in turns),
        response_tokens=sum(t.response_tokens for t in turns),
        seconds=seconds,
    )


def situation_text(env: Environment, observation: str, mode: ActionMode) -> str:
    """The observation plus the answer-format line of ``mode`` (the games' modes differ only in it)."""
    if not env.discrete:
        fmt = env.answer_format()
    elif mode is ActionMode.short:
        fmt = SHORT_FORMAT
    elif mode is ActionMode.choice:
        fmt = CHOICE_FORMAT
    else:
        fmt = env.answer_format()
    return f"{observation}\n\n{fmt}" if fmt else observation


@dataclass
class _Slot:
    env: Environment
    episode: Episode
    messages: list[ChatMessage]
    started: float


def _tokenizer_of(backend: Backend) -> Any:
    tok = getattr(backend, "tokenizer", None)
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(backend.base_model)
        backend.tokenizer = tok  # type: ignore[attr-defined]
    return tok


def choose_by_logprob(
    backend: Backend,
    conversations: Sequence[Conversation],
    generations: Sequence[Generation],
    candidates: Sequence[Sequence[str]],
    adapter: str | None = None,
) -> list[tuple[str, dict[str, float]]]:
    """For each conversation, the candidate move (``"[up]"`` ...) the model finds most probable after its
    own reasoning (``generations``), and every candidate's summed log-prob.

    Each candidate is scored as the response ``reasoning + CHOICE_JOIN + move + "]"`` (reasoning =
    the generated token ids, without a final end token), summing the log-probs of the move's tokens.
    Needs a backend with ``score(conversations, response_token_ids, adapter)``.
    """
    score = getattr(backend, "score", None)
    if score is None:
        raise TypeError(f"{type(backend).__name__} has no score(); the choice action mode needs one")
    tok = _tokenizer_of(backend)
    eos = {tok.eos_token_id} | set(getattr(backend, "eos_ids", []) or [])
    join_ids = tok.encode(CHOICE_JOIN, add_special_tokens=False)
    convs: list[Conversation] = []
    responses: list[list[int]] = []
    spans: list[tuple[int, int, str, int]] = []  # (row index, n move tokens, move, conversation index)
    for ci, (conv, gen, cands) in enumerate(zip(conversations, generations, candidates)):
        reasoning = list(gen.response_token_ids)
        while reasoning and reasoning[-1] in eos:
            reasoning.pop()
        for move in cands:
            move_ids = tok.encode(move.strip("[]") + "]", add_special_tokens=False)
            convs.append(conv)
            responses.append(reasoning + join_ids + move_ids)
            spans.append((len(responses) - 1, len(move_ids), move, ci))
    scores = score(convs, responses, adapter=adapter) if convs else []
    out: list[dict[str, float]] = [dict() for _ in conversations]
    for row, n, move, ci in spans:
        out[ci][move] = float(sum(scores[row][-n:]))
    return [(max(d, key=d.get) if d else "", d) for d in out]


def _act(
    backend: Backend, slots: list[_Slot], config: AgentConfig, call_index: int
) -> list[tuple[str, Generation, dict[str, float] | None]]:
    """One batched model call for every live slot: (response text, generation, choice log-probs)."""
    mode = ActionMode(config.mode)
    convs = [list(s.messages) for s in slots]
    max_tokens = max(config.tokens_for(s.env) for s in slots)
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        seed=None if config.seed is None else int(config.seed) + 1000 * call_index,
    )
    gens = backend.generate(convs, params, adapter=config.adapter)
    if mode is not ActionMode.choice:
        return [(g.text, g, None) for g in gens]
    picks = choose_by_logprob(backend, convs, gens, [s.env.legal_actions() or [] for s in slots], config.adapter)
    out = []
    for g, (move, logps) in zip(gens, picks):
        text = g.text.rstrip() + CHOICE_JOIN + move.strip("[]") + "]"
        out.append((text, g, logps))
    return out


@dataclass(frozen=True)
class EpisodeSpec:
    """One episode to run: how to build its environment, its seed, its experience, and a free label
    (``tag``, copied to :attr:`Episode.tag`) to tell conditions apart when several share a batch."""

    make_env: Callable[[], Environment]
    seed: int
    experience: Experience = None
    tag: str = ""


def run_episodes(
    backend: Backend,
    make_env: Callable[[], Environment],
    seeds: Iterable[int],
    config: AgentConfig = AgentConfig(),
    experience: Experience = None,
    on_turn: Callable[[Episode, Turn], None] | None = None,
    on_episode: Callable[[Episode], None] | None = None,
) -> list[Episode]:
    """Run one episode per seed, ``config.batch_size`` at a time, and return them in seed order.

    ``make_env`` builds a fresh environment (one per live slot); ``experience`` goes into every
    first prompt (:func:`oel.envs.prompts.agent_prompt`). ``on_turn`` is called after each turn and
    ``on_episode`` when an episode ends (for recording and progress bars).
    """
    specs = [EpisodeSpec(make_env, int(seed), experience) for seed in seeds]
    return run_specs(backend, specs, config, on_turn=on_turn, on_episode=on_episode)


def run_specs(
    backend: Backend,
    specs: Sequence[EpisodeSpec],
    config: AgentConfig = AgentConfig(),
    on_turn: Callable[[Episode, Turn], None] | None = None,
    on_episode: Callable[[Episode], None] | None = None,
) -> list[Episode]:
    """Like :func:`run_episodes` for a list of episode specs, which may mix environments, experiences
    and conditions in the same batches (e.g. with and without experience, every rule at once); the
    episodes come back in the order of ``specs``."""
    mode = ActionMode(config.mode)
    if config.batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    queue = deque(enumerate(specs))
    results: dict[int, Episode] = {}
    slots: list[tuple[int, _Slot]] = []
    call_index = 0
    while queue or slots:
        while queue and len(slots) < config.batch_size:
            order, spec = queue.popleft()
            env = spec.make_env()
            if mode is not ActionMode.free and not env.discrete:
                raise ValueError(f"action mode {mode.value!r} needs discrete moves; {env.name} takes free text (use 'free')")
            observation = env.reset(spec.seed)
            prompt = agent_prompt(situation_text(env, observation, mode), spec.experience)
            episode = Episode(
                env=env.name,
                seed=int(spec.seed),
                metadata=env.metadata(),
                observation=observation,
                first_prompt=prompt,
                adapter=config.adapter,
                tag=spec.tag,
            )
            slots.append((order, _Slot(env, episode, [ChatMessage(role="user", content=prompt)], time.monotonic())))
        acted = _act(backend, [s for _, s in slots], config, call_index)
        call_index += 1
        still: list[tuple[int, _Slot]] = []
        for (order, slot), (text, gen, logps) in zip(slots, acted):
            result = slot.env.step(text)
            turn = Turn(
                prompt=list(slot.messages),
                response=text,
                response_tokens=gen.response_tokens,
                action=result.action,
                valid=result.valid,
                feedback=result.feedback,
                done=result.done,
                passed=result.passed,
                finish_reason=gen.finish_reason,
                choice_logprobs=logps,
            )
            ep = slot.episode
            ep.turns.append(turn)
            if on_turn is not None:
                on_turn(ep, turn)
            if result.done:
                ep.done, ep.passed, ep.reward = True, result.passed, result.reward
                ep.seconds = time.monotonic() - slot.started
                results[order] = ep
                if on_episode is not None:
                    on_episode(ep)
            else:
                slot.messages += [ChatMessage(role="assistant", content=text), ChatMessage(role="user", content=result.feedback)]
                still.append((order, slot))
        slots = still
    return [results[i] for i in sorted(results)]
