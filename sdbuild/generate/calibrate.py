"""The calibrate stage's function: the unet's activation ranges for int8 activations (W8A8).

Declared in ``sdbuild.stages`` (``calibrate``, its scheduler in
``sdbuild.stages.calibrate``); it lives here because it runs the image
pipeline. The prompts run through the float16 text encoder and unet packages
of the convert stage with the download's tokenizer and scheduler; the unet's
activations are watched over every denoising step; their ranges are the
compress stage's input.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from sdbuild.compress.activations import RANGES_FILE, calibrated_names
from sdbuild.generate.pipeline import Pipeline
from sdbuild.stages import Job
from sdbuild.stages.calibrate import SCHEDULER
from sdbuild.stages.convert import PACKAGE
from sdbuild.stages.download import checkpoint_dir


def run(job: Job, out: Path) -> dict:
    """Write ``activation_ranges.json``: {"ranges": {var name: [min, max]}, "calibration": settings, facts}."""
    settings = job.fields["calibration"]
    packages = {"text_encoder": job.upstream["convert:text_encoder"] / PACKAGE, "unet": job.upstream["convert:unet"] / PACKAGE}
    pipe = Pipeline.from_packages(packages, checkpoint_dir(job.upstream["download"]))
    ranges, facts = calibrate_unet(
        pipe, settings["prompts"], seed=settings["seed"], steps=settings["steps"],
        guidance_scale=settings["guidance_scale"], scheduler=SCHEDULER,
    )
    result = {"calibration": {**settings, "scheduler": SCHEDULER}, **facts, "ranges": ranges}
    (out / RANGES_FILE).write_text(json.dumps(result, indent=1, sort_keys=True))
    return {"calibration": facts}


def calibrate_unet(pipe, prompts: list[str], seed: int, steps: int, guidance_scale: float = 7.5, scheduler: str = "DDIM"):
    """Run ``pipe`` (a float16 ``sdbuild.generate.Pipeline`` on the reference executor) over
    ``prompts`` and record the unet's activation ranges over every denoising step.

    Every prompt starts from the same seeded latents (as Apple's converter
    calibrates); under guidance both halves of each unet call are seen. No image
    is decoded. Returns ({var name: [min, max]} over ``calibrated_names``, facts:
    unet calls, seconds, tensors).
    """
    from sdbuild.mil.executor import RangeObserver

    started = time.perf_counter()
    unet = pipe.runners["unet"]
    observer = RangeObserver(calibrated_names(unet.programs[0].function))
    unet.observer = observer
    try:
        for prompt in prompts:
            pipe.generate(prompt, seed=seed, steps=steps, guidance_scale=guidance_scale, scheduler=scheduler, decode=False)
    finally:
        unet.observer = None
    missing = observer.names - observer.ranges.keys()
    facts = {
        "unet_calls": observer.runs,
        "seconds": round(time.perf_counter() - started, 3),
        "tensors": len(observer.ranges),
        "unseen": len(missing),  # computed from constants alone: their ops stay float16
    }
    return observer.ranges, facts
