"""Sample: one image from the finished bundle, for the build report (``verify.sample_image``).

What the image is (prompt, steps, guidance, scheduler) is declared here; the
stage's function is ``sdbuild.generate.sample:run``, since making it takes the
image pipeline, which sits above the stages (it reads bundles they write).
"""

from __future__ import annotations

PROMPT = "a photo of an astronaut riding a horse on mars"
SAMPLE = "sample.png"
# Few steps and mild guidance: random-weight test models amplify float16 error under strong guidance.
STEPS, GUIDANCE, SCHEDULER = 8, 2.0, "DDIM"


def sample_settings(seed: int) -> dict:
    """The generation settings of the sample image, as its PNG and the report record them."""
    return {"prompt": PROMPT, "seed": seed, "steps": STEPS, "guidance_scale": GUIDANCE, "scheduler": SCHEDULER}
