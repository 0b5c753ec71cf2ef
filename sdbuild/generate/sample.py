"""The sample stage's function: the report's image, generated from the bundle just laid out.

Declared in ``sdbuild.stages`` (``sample``) with its settings in
``sdbuild.stages.sample``; it lives here because it runs the pipeline.
"""

from __future__ import annotations

from pathlib import Path

from sdbuild.generate.images import save_png
from sdbuild.generate.pipeline import Pipeline
from sdbuild.stages import Job
from sdbuild.stages.sample import SAMPLE, sample_settings


def run(job: Job, out: Path) -> dict:
    """Generate one image from ``job.upstream["bundle"]`` into ``out/sample.png``; returns its settings."""
    settings = sample_settings(job.fields["verify.seed"])
    pipe = Pipeline.from_bundle(job.upstream["bundle"])
    result = pipe.generate(settings["prompt"], seed=settings["seed"], steps=settings["steps"],
                           guidance_scale=settings["guidance_scale"], scheduler=settings["scheduler"], progress=False)
    save_png(result.images[0], out / SAMPLE, settings)
    return {"sample_image": {"path": SAMPLE, **settings}}
