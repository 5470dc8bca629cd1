"""Sokoban through TextArena, as in the OEL paper: a 6x6 room with 1 box, at most 5 turns.

Board symbols (never told to the agent): ``#`` wall, ``_`` floor, ``O`` target, ``X`` box,
``√`` box on a target, ``P`` the player. Pushing the box onto the target wins (reward 1.0 = pass);
walking into a wall, or pushing the box into a wall, is an invalid move.
TextArena generates the room from the seed by reverse play, so every room is solvable; with one box
many rooms are solvable in a few moves, which is what makes 5 turns enough.
"""

from __future__ import annotations

from typing import Any

from oel.envs._textarena import TextArenaGridEnv

REFERENCE_EXPERIENCE: tuple[str, ...] = (
    "'P' is you, '#' is a wall, '_' is floor, 'X' is the box, 'O' is the target and '√' is the box on the "
    "target. The game is won as soon as the box is pushed onto the target.",
    "Moving into the box pushes it one cell in the same direction. A box cannot be pulled, and cannot be "
    "pushed into a wall. Moving into a wall is an invalid move; two invalid moves in a row end the game.",
    "[up] moves one row up, [down] one row down, [left] and [right] one column. To push the box towards the "
    "target, first walk to the cell on the far side of the box (opposite the target), then move towards "
    "the target.",
)
"""A correct, hand-written experience for this game (what a perfect knowledge base would say)."""


class SokobanEnv(TextArenaGridEnv):
    """TextArena's ``SokobanEnv(dim_room, num_boxes)`` with the generic rules and the paper's limits."""

    name = "sokoban"

    def __init__(self, dim_room: tuple[int, int] = (6, 6), num_boxes: int = 1, max_turns: int = 5) -> None:
        super().__init__(max_turns=max_turns)
        self.dim_room = (int(dim_room[0]), int(dim_room[1]))
        self.num_boxes = int(num_boxes)

    def _make_ta_env(self) -> Any:
        from textarena.envs.Sokoban.env import SokobanEnv as TASokoban

        # max_turns is replaced after reset (see _set_ta_turn_limit); any value works here.
        return TASokoban(dim_room=self.dim_room, max_turns=self.max_turns, num_boxes=self.num_boxes)

    def _set_ta_turn_limit(self, limit: int) -> None:
        # Sokoban's step() reads self.max_turns (the state's copy is not consulted).
        self.ta_env.max_turns = limit
        self.ta_env.state.max_turns = limit

    def _is_legal(self, move: str) -> bool:
        return not self.ta_env._would_collide_with_wall(move)

    def board(self) -> str:
        return self.ta_env.create_board_str(self.ta_env.room_state).rstrip("\n")

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), "room": f"{self.dim_room[0]}x{self.dim_room[1]}", "boxes": str(self.num_boxes)}
