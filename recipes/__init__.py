"""Recipes: programs that drive the whole system or measure it, built on the packages below them —
``oel demo`` (:mod:`recipes.demo` in one process, :mod:`recipes.demo_stack` on the real services) and
``oel agents compare`` (:mod:`recipes.compare`). Nothing imports them but the CLI."""
