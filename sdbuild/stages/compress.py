"""Compress: palettize or quantize the weights of a converted float16 package (and, for W8A8,
quantize the unet's activations with the ranges the calibrate stage measured)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sdbuild.stages import Job
from sdbuild.stages.convert import PACKAGE


def run(job: Job, out: Path) -> dict:
    """Write the compressed ``model.mlpackage``: n-bit palettes (optionally pruned first, or with
    int8 palette entries), pruned only, linear 8-bit (with int8 activations: W8A8) or mixed-bit."""
    from sdbuild.compress import linear8_package, mixed_bit_package, palettize_package

    settings = job.fields["compression"]
    src = job.upstream["convert"] / PACKAGE
    if settings.get("nbits") is not None or settings.get("sparsity") is not None:
        stats = palettize_package(
            src,
            out / PACKAGE,
            nbits=settings.get("nbits"),
            group_size=settings.get("group_size"),
            sparsity=settings.get("sparsity"),
            lut_dtype=settings.get("lut_dtype"),
        )
    elif settings.get("activations"):
        from sdbuild.compress.activations import read_ranges, w8a8_package

        stats = w8a8_package(src, out / PACKAGE, read_ranges(job.upstream["calibrate"]))
    elif settings.get("linear8"):
        stats = linear8_package(src, out / PACKAGE)
    else:
        analysis = job.fields.get("pre_analysis_file") or job.upstream["analyze"] / "analysis.json"
        stats = mixed_bit_package(src, out / PACKAGE, Path(analysis), settings["mixed_bit"]["recipe"])
    return {"compression": _plain(stats)}


def _plain(stats) -> dict:
    if dataclasses.is_dataclass(stats):
        return dataclasses.asdict(stats)
    return dict(stats) if isinstance(stats, dict) else {"stats": str(stats)}
