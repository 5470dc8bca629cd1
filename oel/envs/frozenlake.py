"""FrozenLake through TextArena, as in the OEL paper: a 3x3 lake with 2 holes, at most 5 turns.

The agent starts top-left, the goal is bottom-right; stepping on a hole loses, reaching the goal
wins (reward 1.0 = pass), walking into the edge is an invalid move. The agent is told none of this
(see :data:`oel.envs._textarena.GENERIC_RULES`).

**Few layouts.** TextArena draws the 2 holes among the 7 inner cells and redraws until a path
exists: only 19 layouts are possible (21 pairs minus the 2 that wall off the start or the goal), and
every seed maps to one of them. Held-out evaluation seeds (:func:`oel.envs.base.eval_seeds`) are
therefore held-out *episodes*, not unseen maps; :meth:`FrozenLakeEnv.layout` names a seed's layout
so a user can check the overlap.
"""

from __future__ import annotations

from typing import Any

from oel.envs._textarena import TextArenaGridEnv

REFERENCE_EXPERIENCE: tuple[str, ...] = (
    "'P' is you, 'H' is a hole and 'G' is the goal. Stepping onto an 'H' cell loses the game at once; reaching the 'G' cell wins it.",
    "[down] moves one row down, [up] one row up, [right] one column right, [left] one column left. "
    "Moving off the edge of the board is an invalid move, and two invalid moves in a row end the game.",
    "You start in the top-left corner and 'G' is in the bottom-right corner, so only [down] and [right] "
    "bring you closer. Before each move, look at the cell you would step onto and never choose a move "
    "that lands on 'H'.",
)
"""A correct, hand-written experience for this game (what a perfect knowledge base would say)."""


class FrozenLakeEnv(TextArenaGridEnv):
    """TextArena's ``FrozenLakeEnv(size, num_holes)`` with the generic rules and the paper's limits."""

    name = "frozenlake"

    def __init__(self, size: int = 3, num_holes: int = 2, max_turns: int = 5) -> None:
        super().__init__(max_turns=max_turns)
        self.size = int(size)
        self.num_holes = int(num_holes)

    def _make_ta_env(self) -> Any:
        from textarena.envs.FrozenLake.env import FrozenLakeEnv as TAFrozenLake

        return TAFrozenLake(size=self.size, num_holes=self.num_holes, randomize_start_goal=False)

    def _set_ta_turn_limit(self, limit: int) -> None:
        # TextArena's FrozenLake hard-codes max_turns=100 in reset(); its check reads state.max_turns.
        self.ta_env.state.max_turns = limit

    def _is_legal(self, move: str) -> bool:
        dr, dc = self.ta_env.actions[move]
        r, c = self.ta_env.state.game_state["player_pos"]
        return 0 <= r + dr < self.size and 0 <= c + dc < self.size

    def board(self) -> str:
        return self.ta_env._render_board()

    def layout(self) -> str:
        """The map of this episode as one string ('H' holes, 'G' goal, '.' ice), row by row."""
        grid = self.ta_env.state.game_state["grid"]
        return "/".join("".join(cell if cell in ("H", "G") else "." for cell in row) for row in grid)

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), "size": str(self.size), "holes": str(self.num_holes)}
