"""``sdbuild generate``: check the request, load the bundle, generate, write PNGs."""

from __future__ import annotations

from pathlib import Path

from sdbuild.generate.discovery import _require_controlled_unet, _require_encoder, find_bundle, find_controlnet
from sdbuild.generate.errors import GenerationError
from sdbuild.generate.images import image_file_name, load_image, load_mask, save_png
from sdbuild.generate.pipeline import REFINER_START, Pipeline
from sdbuild.generate.request import check_request
from sdbuild.generate.runners import default_backend
from sdbuild.generate.schedulers import scheduler_name


def run_generate(
    bundle: Path,
    prompt: str,
    negative_prompt: str = "",
    seed: int = 93,
    steps: int = 50,
    guidance_scale: float = 7.5,
    scheduler: str = "DDIM",
    rng: str = "numpy",
    image_count: int = 1,
    image: Path | None = None,
    strength: float | None = None,
    compute_unit: str | None = None,
    controlnet: list[str] | None = None,
    controlnet_inputs: list[Path] | None = None,
    controlnet_scale: float = 1.0,
    output_dir: Path = Path("."),
    progress: bool = False,
    height: int | None = None,
    width: int | None = None,
    mask: Path | None = None,
    refiner_start: float = REFINER_START,
) -> dict:
    """``sdbuild generate``: load the bundle, generate, write PNGs.

    Returns {"images": [paths], "notes": [lines], "timings": {name: seconds}}.
    Every user error is a GenerationError (one line) raised before any model runs.
    """
    if strength is None:  # diffusers' defaults: 0.75 for image-to-image, 1 for inpainting
        strength = 1.0 if mask is not None else 0.75
    controlnet, controlnet_inputs = list(controlnet or []), list(controlnet_inputs or [])
    check_request(
        bundle=bundle, seed=seed, steps=steps, guidance_scale=guidance_scale, image_count=image_count,
        strength=strength, controlnet_scale=controlnet_scale, output_dir=output_dir,
    )
    scheduler_name(scheduler)  # an unknown name fails before the models load
    if not 0 <= refiner_start <= 1:
        raise GenerationError(f"--refiner-start {refiner_start:g}: must be in [0, 1] (the fraction of steps the base runs)")
    if len(controlnet) != len(controlnet_inputs):
        raise GenerationError(
            f"--controlnet-inputs: {len(controlnet_inputs)} control image{'s' if len(controlnet_inputs) != 1 else ''} for "
            f"{len(controlnet)} ControlNet{'s' if len(controlnet) != 1 else ''}; give one image per ControlNet, in the same order"
        )
    start_image = load_image(image) if image is not None else None
    if mask is not None and start_image is None:
        raise GenerationError("--mask goes with --image: give the image to inpaint")
    mask_image = load_mask(mask) if mask is not None else None
    control_images = [load_image(p, flag="--controlnet-inputs") for p in controlnet_inputs]
    if start_image is not None or controlnet:
        # Refused before any model loads: the checks need only the file list.
        files = find_bundle(Path(bundle), compiled_ok=default_backend() == "coreml")
        if start_image is not None:
            _require_encoder(files)
        if controlnet:
            _require_controlled_unet(files)
            for name in controlnet:
                find_controlnet(files, name)
    pipe = Pipeline.from_bundle(Path(bundle), compute_unit=compute_unit, height=height, width=width)
    result = pipe.generate(
        prompt,
        negative_prompt=negative_prompt,
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        scheduler=scheduler,
        rng=rng,
        image_count=image_count,
        image=start_image,
        strength=strength,
        progress=progress,
        controlnet=controlnet,
        controlnet_images=control_images,
        controlnet_scale=controlnet_scale,
        mask=mask_image,
        refiner_start=refiner_start,
    )
    paths = []
    for i, img in enumerate(result.images):
        index = i if image_count > 1 else None
        settings = dict(result.settings, **({"image_index": i} if index is not None else {}))
        paths.append(str(save_png(img, Path(output_dir) / image_file_name(prompt, seed, index), settings)))
    timings = dict(result.timings, load_s=round(pipe.load_seconds, 4))
    return {
        "images": paths,
        "notes": result.notes,
        "timings": timings,
        "backend": pipe.backend if pipe.compute_unit is None else f"{pipe.backend} ({pipe.compute_unit})",
    }
