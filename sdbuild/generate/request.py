"""A generate request's arguments, checked once before any model loads."""

from __future__ import annotations

import math
from pathlib import Path

from sdbuild.generate.errors import GenerationError


MAX_SEED = 2**32 - 1  # numpy's RandomState and Apple's pipelines take a uint32 seed
MAX_STEPS = 1000  # the schedulers' training timesteps
MAX_GUIDANCE = 100.0
MAX_IMAGES = 64


def check_request(*, bundle, seed, steps, guidance_scale, image_count, strength, controlnet_scale, output_dir) -> None:
    """Refuse arguments no image can come from, before any model loads (GenerationError, one line)."""

    def finite(x) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise GenerationError(f"--seed {seed}: out of range; give a whole number from 0 to {MAX_SEED}")
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise GenerationError(f"--steps {steps}: give a whole number from 1 to {MAX_STEPS}")
    if not finite(guidance_scale) or not 0 < guidance_scale <= MAX_GUIDANCE:
        raise GenerationError(f"--guidance-scale {guidance_scale}: give a finite number above 0 and at most {MAX_GUIDANCE:g} (7.5 is usual; 1 turns guidance off)")
    if not isinstance(image_count, int) or not 1 <= image_count <= MAX_IMAGES:
        raise GenerationError(f"--image-count {image_count}: give a whole number from 1 to {MAX_IMAGES}")
    if not finite(strength) or not 0 < strength <= 1:
        raise GenerationError(f"--strength {strength}: give a number above 0 and at most 1")
    if not finite(controlnet_scale) or not 0 <= controlnet_scale <= MAX_GUIDANCE:
        raise GenerationError(f"--controlnet-scale {controlnet_scale}: give a finite number from 0 to {MAX_GUIDANCE:g}")
    if not Path(bundle).is_dir():
        raise GenerationError(f"--bundle {bundle}: no such folder")
    out = Path(output_dir)
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise GenerationError(f"-o {output_dir}: {blocker} is a file, not a folder; give a folder for the images")
