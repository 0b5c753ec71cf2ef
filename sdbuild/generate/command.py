"""``sdbuild generate``: check the request (``request.GenerateRequest``), load the bundle, generate, write PNGs."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

from sdbuild.generate.discovery import _require_controlled_unet, _require_encoder, find_bundle, find_controlnet
from sdbuild.generate.images import image_file_name, load_image, load_mask, save_png
from sdbuild.generate.pipeline import Pipeline
from sdbuild.generate.request import GenerateRequest
from sdbuild.generate.runners import default_backend


def run_generate(bundle: Path | None = None, prompt: str | None = None, **options) -> dict:
    """``sdbuild generate``: load the bundle, generate, write PNGs.

    Takes a ``GenerateRequest`` (``run_generate(request)``) or its fields as
    keyword arguments (``run_generate(bundle, prompt, steps=20, …)``).
    Returns {"images": [paths], "notes": [lines], "timings": {name: seconds}, "backend"}.
    Every user error is a GenerationError (one line) raised before any model runs.
    """
    request = bundle if isinstance(bundle, GenerateRequest) else GenerateRequest(bundle=bundle, prompt=prompt, **options)
    return generate_images(request.checked())


def generate_images(request: GenerateRequest) -> dict:
    """Carry out a checked ``request`` (``GenerateRequest.checked``): what needs the bundle's files is checked first."""
    start_image = load_image(request.image) if request.image is not None else None
    mask_image = load_mask(request.mask) if request.mask is not None else None
    control_images = [load_image(p, flag="--controlnet-inputs") for p in request.controlnet_inputs]
    if start_image is not None or request.controlnet:
        # Refused before any model loads: the checks need only the file list.
        files = find_bundle(request.bundle, compiled_ok=default_backend() == "coreml")
        if start_image is not None:
            _require_encoder(files)
        if request.controlnet:
            _require_controlled_unet(files)
            for name in request.controlnet:
                find_controlnet(files, name)
    # A generation runs the unet at every step: a compressed one's weights are decompressed once, not at each run.
    pipe = Pipeline.from_bundle(request.bundle, compute_unit=request.compute_unit, height=request.height, width=request.width,
                                decompress_at_load=True)
    # The request's settings under Pipeline.generate's own names; the images loaded above in place of their paths.
    settings = {name: getattr(request, name) for name in _GENERATE_SETTINGS}
    result = pipe.generate(
        **settings, controlnet=list(request.controlnet), image=start_image, mask=mask_image, controlnet_images=control_images
    )
    paths = []
    for i, img in enumerate(result.images):
        index = i if request.image_count > 1 else None
        settings = dict(result.settings, **({"image_index": i} if index is not None else {}))
        paths.append(str(save_png(img, request.output_dir / image_file_name(request.prompt, request.seed, index), settings)))
    timings = dict(result.timings, load_s=round(pipe.load_seconds, 4))
    return {
        "images": paths,
        "notes": result.notes,
        "timings": timings,
        "backend": pipe.backend if pipe.compute_unit is None else f"{pipe.backend} ({pipe.compute_unit})",
    }


# Request fields Pipeline.generate takes as they are (file arguments are loaded first; the rest are the pipeline's).
_GENERATE_SETTINGS = tuple(
    f.name for f in fields(GenerateRequest)
    if f.name in inspect.signature(Pipeline.generate).parameters and f.name not in ("image", "mask", "controlnet")
)
