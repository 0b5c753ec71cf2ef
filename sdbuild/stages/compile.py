"""Compile: .mlpackage → .mlmodelc with Apple's coremlcompiler (macOS with Xcode tools only)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from sdbuild.errors import SdbuildError
from sdbuild.stages import Job

COMPILED = "model.mlmodelc"


def compiler_available() -> bool:
    return sys.platform == "darwin" and shutil.which("xcrun") is not None


SKIP_REASON = (
    "compile skipped: Apple's coremlcompiler needs macOS with Xcode tools; the bundle keeps .mlpackage files "
    "(run the same recipe on a Mac with the same cache to finish: everything before compile is reused)"
)


def run(job: Job, out: Path) -> dict:
    src = next(p for p in job.upstream.values() if (p / "model.mlpackage").exists()) / "model.mlpackage"
    done = subprocess.run(
        ["xcrun", "coremlcompiler", "compile", str(src), str(out)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SdbuildError(f"coremlcompiler failed for {job.component}: {done.stderr.strip().splitlines()[-1:]}")
    (out / "model.mlmodelc").exists() or next(out.glob("*.mlmodelc")).rename(out / COMPILED)
    return {}
