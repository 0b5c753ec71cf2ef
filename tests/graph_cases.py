"""The recipes whose planned graphs ``tests/test_graph.py`` compares with a recorded fixture.

The repository's recipes with their hub checkpoints swapped for the synthetic models of the same
family (planning resolves the checkpoint; no hub is reachable), plus what each case adds:
ControlNet, refiner, several resolutions and a mixed-bit pre-analysis, the safety checker in both layouts,
W8A8's calibration (with the text encoder shipped, and built for it alone).
"""

from __future__ import annotations

import contextlib

from helpers import REPO

RECIPES = REPO / "recipes"
CASES = [
    ("tiny", RECIPES / "tiny.yaml", {}),
    # Compressed text encoder and unet, chunked unet; a ControlNet adds the controlled unet (compressed, chunked).
    ("sd21-base-6bit+controlnet", RECIPES / "sd21-base-6bit.yaml",
     {"model.version": "synthetic:tiny-sd", "controlnet": ["synthetic:tiny-controlnet"]}),
    # The refiner's own download and chain, compressed and chunked with the unet.
    ("sdxl-6bit+refiner", RECIPES / "sdxl-6bit.yaml",
     {"model.version": "synthetic:tiny-sdxl", "model.refiner": "synthetic:tiny-sdxl-refiner", "chunk": {"unet": 2}}),
    # Two resolutions as functions; the unet's mixed-bit pre-analysis (analyze) feeding compress.
    ("tiny+multires+mixed-bit", RECIPES / "tiny.yaml",
     {"target": "macOS15", "resolution": [{"height": 64, "width": 64}, {"height": 64, "width": 96}],
      "compression": {"mixed_bit": {"recipe": "recipe_4.50_bit_mixedpalette", "pre_analysis": "auto"}, "components": ["unet"]}}),
    # Both layouts with the safety checker: its two variants (the image is not 512x512).
    ("sd15+safety-checker", RECIPES / "sd15.yaml",
     {"model.version": "synthetic:tiny-sd", "resolution": {"height": 64, "width": 96},
      "components": ["text_encoder", "unet", "vae_decoder", "safety_checker"]}),
    # W8A8: the unet's calibration (the float16 text encoder's and unet's packages) feeding its compress.
    ("tiny+w8a8", RECIPES / "tiny.yaml",
     {"compression": {"linear8": True, "activations": "int8", "components": ["unet"]}}),
    # The same with the text encoder not shipped: built for the calibration alone.
    ("tiny-unet-only+w8a8", RECIPES / "tiny.yaml",
     {"components": ["unet", "vae_decoder"], "compression": {"linear8": True, "activations": "int8", "components": ["unet"]}}),
]


@contextlib.contextmanager
def structural_keys():
    """Keys with the code digest and the library versions held fixed: what they still cover is the
    graph's shape, each stage's name, version and fields, and its upstream keys. (Any edit to a
    stage's source moves its real key, as it must; so do upgrades.)"""
    from sdbuild import executor

    saved = executor.code_digest, executor.library_versions
    executor.code_digest = lambda modules, *a: "code"
    executor.library_versions = lambda names: {"python": "v", **{n: "v" for n in names}}
    try:
        yield
    finally:
        executor.code_digest, executor.library_versions = saved
