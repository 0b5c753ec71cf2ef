"""Calibrate: the unet's activation ranges for int8 activations (W8A8), measured on real prompts.

The calibration prompts run through the float16 build's own text-to-image
pipeline (``sdbuild.generate``) on the reference executor: its text encoder
and unet packages from the convert stage, the tokenizer and scheduler of the
download. The unet's activations are watched over every denoising step; their
ranges are the compress stage's input. Keyed by the prompts, seed, steps and
guidance scale (``compression.calibration``) and the two packages' keys.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdbuild.stages import Job
from sdbuild.stages.convert import PACKAGE
from sdbuild.stages.download import checkpoint_dir

RANGES = "activation_ranges.json"
SCHEDULER = "DDIM"


def run(job: Job, out: Path) -> dict:
    """Write ``activation_ranges.json``: {"ranges": {var name: [min, max]}, "calibration": settings, facts}."""
    from sdbuild.compress.activations import calibrate_unet
    from sdbuild.generate import Pipeline

    settings = job.fields["calibration"]
    packages = {"text_encoder": job.upstream["convert:text_encoder"] / PACKAGE, "unet": job.upstream["convert:unet"] / PACKAGE}
    pipe = Pipeline.from_packages(packages, checkpoint_dir(job.upstream["download"]))
    ranges, facts = calibrate_unet(
        pipe, settings["prompts"], seed=settings["seed"], steps=settings["steps"],
        guidance_scale=settings["guidance_scale"], scheduler=SCHEDULER,
    )
    result = {"calibration": {**settings, "scheduler": SCHEDULER}, **facts, "ranges": ranges}
    (out / RANGES).write_text(json.dumps(result, indent=1, sort_keys=True))
    return {"calibration": facts}


def read_ranges(entry: Path) -> dict[str, list[float]]:
    """The ranges a calibrate entry holds: {var name: [min, max]}."""
    return json.loads((Path(entry) / RANGES).read_text())["ranges"]
