"""Small helpers for tests (importable as ``helpers``)."""

from __future__ import annotations

import json
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


def run_cli_here(*args) -> subprocess.CompletedProcess:
    """``run_cli`` in this process: the same exit status, stdout and stderr, from ``sdbuild.cli.main``.

    For commands whose test is not about the process itself (its imports, signals, environment,
    a kill): a build here forks its stages from the stage server this test process already runs,
    where each ``run_cli`` build starts an interpreter and a stage server of its own (~10 s of
    imports). An exception the command line does not handle is a traceback on stderr and exit 1,
    as it is in a child process.
    """
    import contextlib
    import io
    import traceback

    from sdbuild.cli import main

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(["sdbuild", *argv], code, out.getvalue(), err.getvalue())


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


HEAVY = ("torch", "coremltools", "diffusers", "transformers", "sklearn", "matplotlib")


def run_cli_watching_imports(*args) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the command line in a child process; also return the heavy libraries it imported."""
    code = (
        "import json, sys\n"
        "from sdbuild.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
        "print('heavy imports: ' + json.dumps(heavy), file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=900)
    line = next(l for l in reversed(done.stderr.splitlines()) if l.startswith("heavy imports: "))
    return done, json.loads(line.split(": ", 1)[1])
