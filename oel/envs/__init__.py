"""Reference environments: the paper's TextArena games and the house-rules assistant tasks.

``make_env(name, **options)`` builds one by name: ``frozenlake``, ``sokoban`` or ``house-rules``.
See :mod:`oel.envs.base` for the interface and the train/eval seed split, and
:mod:`oel.envs.prompts` for the agent prompt with experience in context.
"""

from __future__ import annotations

from typing import Any

from oel.envs.base import EVAL_SEED_BASE, Environment, StepResult, eval_seeds, is_eval_seed, train_seeds

ENV_NAMES = ("frozenlake", "sokoban", "house-rules")


def make_env(name: str, **options: Any) -> Environment:
    """A fresh environment by name (options go to its constructor)."""
    if name == "frozenlake":
        from oel.envs.frozenlake import FrozenLakeEnv

        return FrozenLakeEnv(**options)
    if name == "sokoban":
        from oel.envs.sokoban import SokobanEnv

        return SokobanEnv(**options)
    if name == "house-rules":
        from oel.envs.house_rules import HouseRulesEnv

        return HouseRulesEnv(**options)
    raise ValueError(f"unknown environment {name!r}; known: {', '.join(ENV_NAMES)}")


def reference_experience(name: str, **options: Any) -> list[str]:
    """A correct, hand-written experience for environment ``name`` (what a perfect KB would say)."""
    if name == "frozenlake":
        from oel.envs.frozenlake import REFERENCE_EXPERIENCE

        return list(REFERENCE_EXPERIENCE)
    if name == "sokoban":
        from oel.envs.sokoban import REFERENCE_EXPERIENCE

        return list(REFERENCE_EXPERIENCE)
    if name == "house-rules":
        from oel.envs.house_rules import DEFAULT_RULES
        from oel.envs.house_rules import reference_experience as house

        return house(options.get("rules", DEFAULT_RULES))
    raise ValueError(f"unknown environment {name!r}; known: {', '.join(ENV_NAMES)}")


__all__ = [
    "ENV_NAMES",
    "EVAL_SEED_BASE",
    "Environment",
    "StepResult",
    "eval_seeds",
    "is_eval_seed",
    "make_env",
    "reference_experience",
    "train_seeds",
]
