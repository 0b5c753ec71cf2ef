"""Small helpers for tests (importable as ``helpers``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_recipe(folder: Path, name: str, text: str) -> Path:
    path = Path(folder) / f"{name}.yaml"
    path.write_text(text)
    return path


def run_cli(*args, cwd=None, timeout=900) -> subprocess.CompletedProcess:
    """Run ``sdbuild`` as a user would, in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "sdbuild.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )
