"""Compress: palettize or quantize the weights of a converted float16 package."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sdbuild.stages import Job
from sdbuild.stages.convert import PACKAGE


def run(job: Job, out: Path) -> dict:
    from sdbuild.compress import palettize_package

    settings = job.fields["compression"]
    src = job.upstream["convert"] / PACKAGE
    stats = palettize_package(src, out / PACKAGE, nbits=settings["nbits"], group_size=settings.get("group_size"))
    return {"compression": _plain(stats)}


def _plain(stats) -> dict:
    if dataclasses.is_dataclass(stats):
        return dataclasses.asdict(stats)
    return dict(stats) if isinstance(stats, dict) else {"stats": str(stats)}
