"""Convert: the traced module to a Core ML ML program (.mlpackage)."""

from __future__ import annotations

import time
from pathlib import Path

from sdbuild.stages import Job
from sdbuild.stages.trace import read_io

PACKAGE = "model.mlpackage"


def run(job: Job, out: Path) -> dict:
    """Write ``model.mlpackage`` with the contract's input and output names (float32 I/O).

    The conversion holds one copy of the weights at a time (``sdbuild.convert``).
    """
    from sdbuild.convert import convert_traced

    trace_dir = job.upstream["trace"]
    io = read_io(trace_dir)
    upcast_attention = bool(io.get("info", {}).get("upcast_attention"))
    started = time.perf_counter()
    convert_traced(
        trace_dir / "module.pt",
        io["inputs"],
        io["outputs"],
        io["precision"],
        job.fields["target"],
        out / PACKAGE,
        upcast_attention=upcast_attention,
    )
    return {
        "precision": io["precision"],
        "upcast_attention": upcast_attention,
        "phases_s": {"convert_s": round(time.perf_counter() - started, 1)},
    }
