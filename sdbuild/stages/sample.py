"""A sample image from a finished bundle, for the build report (``verify.sample_image``)."""

from __future__ import annotations

from pathlib import Path

from sdbuild.stages import Job

PROMPT = "a photo of an astronaut riding a horse on mars"
SAMPLE = "sample.png"
# Few steps and mild guidance: random-weight test models amplify float16 error under strong guidance.
STEPS, GUIDANCE, SCHEDULER = 8, 2.0, "DDIM"


def run(job: Job, out: Path) -> dict:
    """Generate one image from ``job.upstream["bundle"]`` into ``out/sample.png``; returns its settings."""
    from sdbuild.generate import Pipeline, save_png

    pipe = Pipeline.from_bundle(job.upstream["bundle"])
    seed = job.fields["verify.seed"]
    result = pipe.generate(PROMPT, seed=seed, steps=STEPS, guidance_scale=GUIDANCE, scheduler=SCHEDULER, progress=False)
    settings = {"prompt": PROMPT, "seed": seed, "steps": STEPS, "guidance_scale": GUIDANCE, "scheduler": SCHEDULER}
    save_png(result.images[0], out / SAMPLE, settings)
    return {"sample_image": {"path": SAMPLE, **settings}}
