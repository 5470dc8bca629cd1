"""The small interface every reference environment implements, and the train/eval seed split.

An :class:`Environment` is one episode at a time, text in and text out:

* ``reset(seed) -> str`` starts an episode and returns the task/situation the agent sees first;
* ``step(response) -> StepResult`` takes the agent's *whole* response text (the environment extracts
  its action: the last bracketed move for the games, the reply itself for house rules) and returns the
  text feedback, whether the episode is over (``done``) and whether it was won (``passed``).

``passed`` is the only success signal the product uses (pass = the game's reward is exactly 1.0, or
the reply was accepted). Nothing else about the environment is visible to the learner: what it learns,
it learns from the feedback text.

Seeds: every environment draws its episodes from integer seeds. :data:`EVAL_SEEDS` is a fixed,
held-out list (``1_000_000 ..``); :func:`train_seeds` never reaches it, so evaluation seeds are never
trained on. A seed is not a layout, though: FrozenLake 3x3 with 2 holes has only 19 solvable layouts,
so held-out seeds there mean held-out episodes, not unseen maps (see :mod:`oel.envs.frozenlake`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

EVAL_SEED_BASE = 1_000_000
"""Evaluation seeds start here; training seeds stay below it."""
EVAL_EPISODES = 128
"""Size of the held-out evaluation list (the paper evaluates on 128 fixed maps, one rollout each)."""


def eval_seeds(n: int = EVAL_EPISODES) -> list[int]:
    """The first ``n`` held-out evaluation seeds (always the same list)."""
    if n < 0:
        raise ValueError("n must be >= 0")
    return list(range(EVAL_SEED_BASE, EVAL_SEED_BASE + n))


def train_seeds(n: int, start: int = 0) -> list[int]:
    """``n`` training seeds from ``start``; raises if they would reach the evaluation seeds."""
    if n < 0 or start < 0:
        raise ValueError("n and start must be >= 0")
    if start + n > EVAL_SEED_BASE:
        raise ValueError(f"training seeds must stay below {EVAL_SEED_BASE} (the evaluation seeds)")
    return list(range(start, start + n))


def is_eval_seed(seed: int) -> bool:
    return seed >= EVAL_SEED_BASE


@dataclass(frozen=True)
class StepResult:
    """What one agent turn produced.

    ``feedback``: the environment's text answer (what the agent sees next, and what extraction reads).
    ``done`` / ``passed``: the episode is over / was won. ``valid``: the response held a well-formed,
    legal action (for the games: a bracketed move that the game accepted; for house rules: a non-empty
    reply). ``action``: the action extracted from the response (None if there was none).
    ``reward``: the environment's own score when it has one (TextArena's reward), else None.
    """

    feedback: str
    done: bool
    passed: bool
    valid: bool = True
    action: str | None = None
    reward: float | None = None
    info: dict[str, str] = field(default_factory=dict)


class EpisodeStateError(RuntimeError):
    """Misuse of an environment (step before reset, step after the episode ended)."""


class Environment(ABC):
    """One episode at a time; see the module docstring. Subclasses set ``name`` and ``max_turns``."""

    name: str = "env"
    max_turns: int = 5
    discrete: bool = False
    """True for environments whose actions are a few moves (the games): they support every action mode
    and :meth:`legal_actions`; False for free-text replies."""

    def __init__(self) -> None:
        self.seed: int | None = None
        self.turns = 0
        self.done = False
        self.passed = False
        self.reward: float | None = None

    # --- the interface ----------------------------------------------------------------------

    @abstractmethod
    def reset(self, seed: int) -> str:
        """Start a new episode from ``seed``; returns the first observation (task and situation text)."""

    @abstractmethod
    def step(self, response: str) -> StepResult:
        """Apply the agent's response; returns the feedback and whether the episode ended / was won."""

    def legal_actions(self) -> list[str] | None:
        """The moves that are legal now, as the exact bracketed strings (e.g. ``"[up]"``), for action
        modes that choose among them; None for environments without a discrete action set."""
        return None

    def answer_format(self) -> str:
        """One line telling the agent how its answer is read (shown by the agent prompt)."""
        return ""

    def metadata(self) -> dict[str, str]:
        """Tags for recording an episode (environment name, seed, rule...)."""
        return {"env": self.name, "seed": str(self.seed)}

    # --- helpers for subclasses -------------------------------------------------------------

    def _begin(self, seed: int) -> None:
        self.seed = int(seed)
        self.turns = 0
        self.done = False
        self.passed = False
        self.reward = None

    def _check_can_step(self) -> None:
        if self.seed is None:
            raise EpisodeStateError(f"{self.name}: step() before reset()")
        if self.done:
            raise EpisodeStateError(f"{self.name}: step() after the episode ended (seed {self.seed})")

    def _finish(self, result: StepResult) -> StepResult:
        self.done = result.done
        self.passed = result.passed
        if result.reward is not None:
            self.reward = result.reward
        return result
