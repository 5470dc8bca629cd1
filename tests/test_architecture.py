"""The import rules of docs/architecture.md, checked on every import statement of the project's packages."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "architecture.md"


@cache
def rules() -> dict[str, tuple[str, ...]]:
    """package -> what it may import, from the table between the ``imports`` markers of the document."""
    text = DOC.read_text()
    table = text[text.index("<!-- imports:begin -->") : text.index("<!-- imports:end -->")]
    out: dict[str, tuple[str, ...]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            out[cells[0].strip("`")] = tuple(re.findall(r"`([\w.]+)`", cells[2]))
    return out


def modules(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported name) of every absolute import in ``path``, at module level or inside a function
    (``from a.b import c`` gives ``a.b.c``)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.extend((node.lineno, f"{node.module}.{a.name}") for a in node.names)
    return sorted(found)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_table_names_every_package():
    assert set(rules()) == {"oel", "producers", "processors", "evaluation", "learner", "gateway", "reference", "recipes"}
    for package in rules():
        assert (REPO / package / "__init__.py").exists(), package


def test_each_package_imports_only_what_its_row_allows():
    packages = set(rules())
    broken = []
    for package, allowed in rules().items():
        for path in modules(package):
            for line, name in imports(path):
                top = name.split(".")[0]
                if top not in packages or top == package:
                    continue
                if not any(name == a or name.startswith(a + ".") for a in allowed):
                    broken.append(
                        f"{path.relative_to(REPO)}:{line} imports {name} ({package} may import: {', '.join(allowed) or 'nothing'})"
                    )
    assert not broken, "\n".join(broken)


def test_the_core_imports_no_faust_and_kafka_only_in_its_adapters():
    broken = []
    for path in modules("oel"):
        rel = path.relative_to(REPO).as_posix()
        for line, name in imports(path):
            top = name.split(".")[0]
            kafka_ok = rel.startswith("oel/ops/") or rel == "oel/cli.py"
            if top in ("faust", "aiokafka", "mode") or (top == "confluent_kafka" and not kafka_ok):
                broken.append(f"{rel}:{line} imports {name}")
    assert not broken, "\n".join(broken)


def test_the_sdk_imports_no_torch_faust_or_textarena():
    heavy = ("torch", "transformers", "peft", "faust", "aiokafka", "textarena")
    direct = [
        f"{p.relative_to(REPO)}:{line} imports {name}"
        for p in modules("producers")
        for line, name in imports(p)
        if name.split(".")[0] in heavy
    ]
    assert not direct, "\n".join(direct)
    sdk = ", ".join(module_name(p) for p in modules("producers"))
    code = f"import sys, {sdk}\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & {set(heavy)!r}))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"importing the SDK loads {proc.stdout.strip()}"


def test_no_import_cycle():
    """No modules import each other, not even inside a function (as learner.gate and learner.rounds did)."""
    paths = {module_name(p): p for package in rules() for p in modules(package)}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        targets = set()
        for _, imported in imports(path):
            parts = imported.split(".")
            for n in range(len(parts), 0, -1):  # `from a.b import c`: module a.b.c, else a.b
                candidate = ".".join(parts[:n])
                if candidate in paths:
                    if candidate != name:
                        targets.add(candidate)
                    break
        graph[name] = targets
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)
