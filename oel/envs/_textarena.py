"""Shared adapter over TextArena's single-player grid games (FrozenLake, Sokoban).

What the adapter changes, and nothing more:

* **Rules text.** TextArena's own prompt (which explains the symbols and the goal) is dropped and
  replaced by :data:`GENERIC_RULES`, which says only how to move: the agent must learn what the
  symbols mean, what wins and what loses, from experience. TextArena's "Available Actions/Moves"
  line under each board is dropped too (the generic rules list the moves once).
* **Action extraction.** The action is the *last* bracketed move in the response (TextArena itself
  takes the first one); it is handed to TextArena as exactly ``[up]``, ``[down]``, ``[left]`` or
  ``[right]`` (``[w]``, ``[a]``, ``[s]``, ``[d]`` are accepted as aliases). A response without one is
  handed over as it is, and TextArena rejects it as an invalid format.
* **Turn limit.** At most ``max_turns`` agent turns (responses), valid or not. TextArena's own limit
  fires on the valid move that finds ``turn >= max_turns`` (it counts only valid moves, before the
  current one), so it is set to ``max_turns - 1``: with all moves valid, TextArena itself ends the
  game on move ``max_turns``, with its own reason and reward. With invalid moves in between, the
  adapter ends the game at response ``max_turns`` with TextArena's completion score as the reward.

Everything else is TextArena's: board generation from the seed, transitions, walls, holes, boxes,
rewards, and the invalid-move rule (the first invalid move gets a warning, a second consecutive one
ends the game; a valid move in between resets the count). ``passed`` is ``reward == 1.0``.

TextArena's state constructor calls ``random.seed(seed)`` on Python's global RNG; the adapter
saves and restores the global RNG around ``reset`` so running an environment does not reseed the
rest of the process.
"""

from __future__ import annotations

import random
import re
from abc import abstractmethod
from typing import Any

from oel.envs.base import Environment, StepResult

MOVES = ("up", "down", "left", "right")
ALIASES = {"w": "up", "a": "left", "s": "down", "d": "right"}
MOVE_RE = re.compile(r"\[\s*(up|down|left|right|w|a|s|d)\s*\]", re.IGNORECASE)

GENERIC_RULES = (
    "You are playing a game on a grid board, shown as text. You are 'P'.\n"
    "Each turn you make one move: [up], [down], [left] or [right].\n"
    "The game ends when you win, when you lose, or after {max_turns} turns. "
    "What the other symbols mean, and what wins or loses, you have to find out."
)

FREE_FORM_FORMAT = (
    "Think about the board, then give your move in square brackets, e.g. [up]. Only the last bracketed move in your answer counts."
)


def last_move(response: str) -> str | None:
    """The last bracketed move in ``response`` as a plain move name (aliases mapped), or None."""
    matches = MOVE_RE.findall(response or "")
    if not matches:
        return None
    raw = matches[-1].lower()
    return ALIASES.get(raw, raw)


def _drop_available_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if not ln.startswith(("Available Actions:", "Available Moves:"))]
    return "\n".join(lines).strip()


class TextArenaGridEnv(Environment):
    """Base of the TextArena adapters; subclasses build the TextArena env and say which moves are legal."""

    discrete = True

    def __init__(self, max_turns: int = 5) -> None:
        super().__init__()
        if max_turns < 1:
            raise ValueError("max_turns must be >= 1")
        self.max_turns = int(max_turns)
        self.ta_env: Any = None

    # --- subclass hooks ---------------------------------------------------------------------

    @abstractmethod
    def _make_ta_env(self) -> Any:
        """A fresh TextArena env object, configured for this environment."""

    @abstractmethod
    def _set_ta_turn_limit(self, limit: int) -> None:
        """Set TextArena's own turn limit on the current episode."""

    @abstractmethod
    def _is_legal(self, move: str) -> bool:
        """Whether TextArena would accept ``move`` now."""

    @abstractmethod
    def board(self) -> str:
        """The current board as TextArena renders it."""

    # --- interface --------------------------------------------------------------------------

    def reset(self, seed: int) -> str:
        self._begin(seed)
        saved = random.getstate()
        try:
            self.ta_env = self._make_ta_env()
            self.ta_env.reset(num_players=1, seed=int(seed))
        finally:
            random.setstate(saved)
        self._set_ta_turn_limit(self.max_turns - 1)
        observations = self._take_observations()
        return GENERIC_RULES.format(max_turns=self.max_turns) + "\n\n" + observations

    def answer_format(self) -> str:
        return FREE_FORM_FORMAT

    def legal_actions(self) -> list[str] | None:
        if self.ta_env is None:
            return None
        return [f"[{m}]" for m in MOVES if self._is_legal(m)]

    def step(self, response: str) -> StepResult:
        self._check_can_step()
        self.turns += 1
        move = last_move(response)
        state = self.ta_env.state
        valid_before = state.turn
        saved = random.getstate()
        try:
            done, _ = self.ta_env.step(f"[{move}]" if move is not None else (response or ""))
        finally:
            random.setstate(saved)
        # TextArena counts a valid move by advancing state.turn; the invalid move that ends the game
        # advances it too, but is flagged in game_info.
        valid = state.turn > valid_before and not (done and state.game_info[0].get("invalid_move"))
        parts = [self._take_observations()]
        reward: float | None = None
        reason = ""
        if done:
            reward = float(state.rewards[0]) if state.rewards else 0.0
            reason = str(state.game_info[0].get("reason") or "")
        elif self.turns >= self.max_turns:
            done = True
            reward = float(self.ta_env._get_percentage_completion())
            reason = f"The turn limit of {self.max_turns} turns was reached."
        if done:
            parts.append(f"Game over. {reason}".strip())
        feedback = "\n\n".join(p for p in parts if p)
        passed = bool(done and reward == 1.0)
        info = {"reason": reason} if reason else {}
        return self._finish(
            StepResult(
                feedback=feedback, done=done, passed=passed, valid=valid, action=f"[{move}]" if move else None, reward=reward, info=info
            )
        )

    def metadata(self) -> dict[str, str]:
        return {"env": self.name, "seed": str(self.seed), "max_turns": str(self.max_turns)}

    # --- observation text -------------------------------------------------------------------

    def _take_observations(self) -> str:
        """TextArena's new observations for the player, as text: game messages and the board, without
        the player's own action echo, TextArena's rules prompt or its list of available moves."""
        import textarena as ta

        _, observations = self.ta_env.get_observation()
        texts = []
        for _from, message, kind in observations:
            if kind in (ta.ObservationType.PROMPT, ta.ObservationType.PLAYER_ACTION):
                continue
            text = _drop_available_line(str(message))
            if text:
                texts.append(text)
        return "\n".join(texts)
