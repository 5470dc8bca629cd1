"""`ruff check` and `ruff format --check` (configured in pyproject.toml) pass on the whole repository, so CI enforces both."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_ruff_check_is_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], capture_output=True, text=True, cwd=REPO)
    assert "No module named ruff" not in proc.stderr, "ruff is a dev dependency: pip install -e '.[dev]' -c constraints.txt"
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format_is_applied():
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", str(REPO)], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, "run `.venv/bin/python -m ruff format .`:\n" + proc.stdout + proc.stderr
