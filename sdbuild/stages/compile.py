"""Compile: .mlpackage → .mlmodelc with Apple's coremlcompiler (macOS with Xcode tools only).

Elsewhere the stage is not in the graph at all: the bundle keeps .mlpackage
files and the run says so in one line. Never a stand-in .mlmodelc.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

from sdbuild.errors import SdbuildError
from sdbuild.stages import PACKAGE_OF, Job
from sdbuild.stages.chunk import part_paths
from sdbuild.stages.convert import PACKAGE

SKIP_REASON = (
    "compile skipped: Apple's coremlcompiler needs macOS with Xcode tools; the bundle keeps .mlpackage files "
    "(run the same recipe on a Mac with the same cache to finish: everything before compile is reused)"
)


def compiler_available() -> bool:
    return sys.platform == "darwin" and shutil.which("xcrun") is not None


@functools.cache
def compiler_version() -> str:
    """The compiler's own version line: it enters the compile key."""
    done = subprocess.run(["xcrun", "coremlcompiler", "version"], capture_output=True, text=True)
    return done.stdout.strip() or done.stderr.strip() or "unknown"


def sources(job: Job) -> list[Path]:
    """The packages to compile: the chunk parts when chunked, else the finished package."""
    if "chunk" in job.upstream:
        return part_paths(job.upstream["chunk"])
    return [job.input(PACKAGE_OF) / PACKAGE]


def run(job: Job, out: Path) -> dict:
    """Write ``<name>.mlmodelc`` for every package (``model``, or ``chunk1``, ``chunk2``, …)."""
    compiled = []
    for package in sources(job):
        done = subprocess.run(["xcrun", "coremlcompiler", "compile", str(package), str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise SdbuildError(f"compile {job.component}: coremlcompiler failed on {package.name}: {last}")
        compiled.append(f"{package.stem}.mlmodelc")
    return {"compiled": compiled}


def compiled_paths(entry_path: Path, facts: dict) -> list[Path]:
    return [Path(entry_path) / name for name in facts["compiled"]]
