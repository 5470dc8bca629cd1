"""The base install (`pip install oel`, no extras) is the agent SDK: it must import with the base dependencies
and what they pull in, and nothing else (no torch, Faust, textarena)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
FIRST_PARTY = {"oel", "producers"}


def _closure(names: list[str]) -> set[str]:
    """The distributions the named ones need, transitively (requirements behind an extra are left out)."""
    seen: set[str] = set()
    todo = [re.sub(r"[-_.]+", "-", n).lower() for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(re.sub(r"[-_.]+", "-", req.name).lower())
    return seen


def test_the_sdk_imports_with_the_base_dependencies_only():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = [Requirement(r).name for r in project["dependencies"]]
    dists = _closure(base)
    assert not dists & {"torch", "faust-streaming", "textarena", "transformers"}, "a heavy package became a base dependency"
    allowed = sorted(
        FIRST_PARTY
        | {m for m, owners in metadata.packages_distributions().items() if any(re.sub(r"[-_.]+", "-", o).lower() in dists for o in owners)}
    )
    script = f"""
import sys
from importlib.abc import MetaPathFinder
ALLOWED = set({json.dumps(allowed)}) | set(sys.stdlib_module_names)
class Refuse(MetaPathFinder):
    def find_spec(self, name, path, target=None):
        top = name.split(".")[0]
        if top not in ALLOWED and not top.startswith("_"):
            raise ImportError(f"{{name}} is not a base dependency of oel")
sys.meta_path.insert(0, Refuse())
from producers import Recorder, VersionFollower
from producers.adapters import AdapterLoader
from producers.recorder import Episode
import oel.cli
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_every_extra_is_pinned_and_in_all():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for name, reqs in extras.items():
        for spec in reqs:
            req = Requirement(spec)
            assert req.name == "oel" or str(req.specifier).startswith("=="), f"{name}: {spec} is not pinned"
    [all_] = extras["all"]
    assert set(Requirement(all_).extras) == set(extras) - {"all", "dev"}
