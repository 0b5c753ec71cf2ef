"""A generate request: its arguments in one object, checked once before any model loads.

    request = GenerateRequest(bundle=Path("artifacts/builds/tiny"), prompt="a cat", steps=20).checked()

``GenerateRequest`` is the one list of what ``sdbuild generate`` takes: the
CLI fills it from its parsed arguments by name (``from_namespace``) and
``run_generate`` from its keyword arguments. ``checked`` refuses what no image
can come from (``GenerationError``, one line naming the flag) and settles the
defaults that depend on other arguments; what needs the bundle's files is
checked by ``command`` next, still before any model loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

from sdbuild.generate.errors import GenerationError
from sdbuild.generate.schedulers import scheduler_name


MAX_SEED = 2**32 - 1  # numpy's RandomState and Apple's pipelines take a uint32 seed
MAX_STEPS = 1000  # the schedulers' training timesteps
MAX_GUIDANCE = 100.0
MAX_IMAGES = 64
RNG_MODES = ("numpy", "torch")
# Apple's Swift package default (StableDiffusionPipeline.Configuration): the refiner takes over after 80% of the steps.
REFINER_START = 0.8


@dataclass(frozen=True)
class GenerateRequest:
    """What ``sdbuild generate`` is asked: the bundle, the prompt and the settings; file arguments as paths."""

    bundle: Path
    prompt: str
    negative_prompt: str = ""
    seed: int = 93
    steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str = "DDIM"
    rng: str = "numpy"
    image_count: int = 1
    image: Path | None = None  # start image: image to image
    strength: float | None = None  # default: 0.75 for image to image, 1 for inpainting (diffusers')
    mask: Path | None = None  # with image: inpainting
    compute_unit: str | None = None
    controlnet: tuple[str, ...] = ()
    controlnet_inputs: tuple[Path, ...] = ()
    controlnet_scale: float = 1.0
    height: int | None = None
    width: int | None = None
    refiner_start: float = REFINER_START
    output_dir: Path = Path(".")
    progress: bool = False

    @classmethod
    def from_namespace(cls, args, **more) -> "GenerateRequest":
        """The request an ``argparse`` namespace holds, each field under its own name; ``more`` sets others."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
        return cls(**{**given, **more})

    def __post_init__(self):
        # Paths and lists as the CLI and Python callers give them, held one way.
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("bundle", Path(self.bundle))
        set_("output_dir", Path(self.output_dir))
        for name in ("image", "mask"):
            if getattr(self, name) is not None:
                set_(name, Path(getattr(self, name)))
        set_("controlnet", tuple(self.controlnet or ()))
        set_("controlnet_inputs", tuple(Path(p) for p in self.controlnet_inputs or ()))

    def checked(self) -> "GenerateRequest":
        """This request with its defaults settled, once every argument is one an image can come from."""
        strength = self.strength
        if strength is None:  # diffusers' defaults: 0.75 for image-to-image, 1 for inpainting
            strength = 1.0 if self.mask is not None else 0.75
        check_settings(seed=self.seed, steps=self.steps, guidance_scale=self.guidance_scale, image_count=self.image_count,
                       strength=strength, rng=self.rng, refiner_start=self.refiner_start, scheduler=self.scheduler)
        check_controlnets(list(self.controlnet), len(self.controlnet_inputs), self.controlnet_scale)
        if not self.bundle.is_dir():
            raise GenerationError(f"--bundle {self.bundle}: no such folder")
        blocker = next((p for p in (self.output_dir, *self.output_dir.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise GenerationError(f"-o {self.output_dir}: {blocker} is a file, not a folder; give a folder for the images")
        if self.mask is not None and self.image is None:
            raise GenerationError("--mask goes with --image: give the image to inpaint")
        return replace(self, strength=strength)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def check_settings(*, seed, steps, guidance_scale, image_count, strength, rng, refiner_start, scheduler) -> None:
    """Refuse settings no image can come from (GenerationError, one line); ``Pipeline.generate`` and requests share it."""
    if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise GenerationError(f"--seed {seed}: out of range; give a whole number from 0 to {MAX_SEED}")
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise GenerationError(f"--steps {steps}: give a whole number from 1 to {MAX_STEPS}")
    if not _finite(guidance_scale) or not 0 < guidance_scale <= MAX_GUIDANCE:
        raise GenerationError(f"--guidance-scale {guidance_scale}: give a finite number above 0 and at most {MAX_GUIDANCE:g} (7.5 is usual; 1 turns guidance off)")
    if not isinstance(image_count, int) or not 1 <= image_count <= MAX_IMAGES:
        raise GenerationError(f"--image-count {image_count}: give a whole number from 1 to {MAX_IMAGES}")
    if not _finite(strength) or not 0 < strength <= 1:
        raise GenerationError(f"--strength {strength}: give a number above 0 and at most 1")
    if rng not in RNG_MODES:
        raise GenerationError(f"--rng: unknown mode '{rng}'; choose one of {', '.join(RNG_MODES)}")
    if not _finite(refiner_start) or not 0 <= refiner_start <= 1:
        raise GenerationError(f"--refiner-start {refiner_start:g}: must be in [0, 1] (the fraction of steps the base runs)")
    scheduler_name(scheduler)  # an unknown name fails here


def check_controlnets(names: list[str], image_count: int, scale) -> list[float]:
    """One control image per ControlNet, one scale or one each, every scale finite in [0, MAX_GUIDANCE]; the scales, one per ControlNet."""
    if len(names) != image_count:
        raise GenerationError(
            f"--controlnet-inputs: {image_count} control image{'s' if image_count != 1 else ''} for "
            f"{len(names)} ControlNet{'s' if len(names) != 1 else ''}; give one image per ControlNet, in the same order"
        )
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(names)
    for s in scales or [scale]:
        if not _finite(s) or not 0 <= s <= MAX_GUIDANCE:
            raise GenerationError(f"--controlnet-scale {s}: give a finite number from 0 to {MAX_GUIDANCE:g}")
    if len(scales) != len(names):
        raise GenerationError(f"--controlnet-scale: {len(scales)} scales for {len(names)} ControlNets; give one, or one each")
    return [float(s) for s in scales]
