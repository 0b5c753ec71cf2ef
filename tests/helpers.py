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


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    """Non-zero exit and one "error:" line, the last, holding every fragment.

    (coremltools' own import chatter may precede it.)
    """
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in done.stderr, done.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
