"""Inpainting: a 9-channel inpainting checkpoint builds (the VAE encoder added by itself) and
``sdbuild generate --image --mask`` matches diffusers' StableDiffusionInpaintPipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_one_line_error, run_cli_here, write_recipe
from models.single_file import make_family
from sdbuild.generate import GenerationError, Pipeline, make_scheduler
from sdbuild.metrics import psnr

PROMPT = "a photo of a cat on a red sofa"
MATCH_DB = 30.0  # the bar against diffusers


@pytest.fixture(scope="module")
def inpaint_checkpoint(tmp_path_factory) -> Path:
    return make_family("sd1", tmp_path_factory.mktemp("inpaint") / "tiny-sd-inpaint", seed=7, inpainting=True)


@pytest.fixture(scope="module")
def inpaint_bundle(artifacts, inpaint_checkpoint) -> Path:
    from sdbuild.executor import prepare, run_build

    recipe = write_recipe(
        artifacts, "inpaint",
        f"name: inpaint\nmodel: {{version: '{inpaint_checkpoint}'}}\nresolution: {{height: 64, width: 64}}\nverify: {{samples: 1}}\n",
    )
    return run_build(prepare(recipe, artifacts)).build_dir


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> tuple[Path, Path]:
    """A smooth gradient and a mask (white square: repaint), as PNG files."""
    folder = tmp_path_factory.mktemp("pictures")
    ys, xs = np.mgrid[0:64, 0:64] / 63.0
    image = np.stack([xs, ys, 1 - xs * ys], axis=-1)
    Image.fromarray((image * 255).round().astype(np.uint8)).save(folder / "image.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 20:52] = 255
    Image.fromarray(mask).convert("RGB").save(folder / "mask.png")
    return folder / "image.png", folder / "mask.png"


def test_inpainting_bundle_ships_the_vae_encoder_and_a_9_channel_unet(inpaint_bundle):
    from sdbuild.mil.executor import load_program

    resources = inpaint_bundle / "Resources"
    assert (resources / "VAEEncoder.mlpackage").is_dir()
    assert load_program(resources / "Unet.mlpackage").inputs["sample"][0] == (2, 9, 8, 8)


def test_inpainting_matches_diffusers(inpaint_bundle, inpaint_checkpoint, pictures):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    from sdbuild.generate import load_image, load_mask

    image, mask = load_image(pictures[0]), load_mask(pictures[1])
    pipe = Pipeline.from_bundle(inpaint_bundle, backend="executor")
    ours = pipe.generate(PROMPT, seed=4, steps=4, guidance_scale=2.0, scheduler="DDIM", rng="torch", image=image, mask=mask, strength=1.0)
    # The folder's model_index names the text-to-image class: the inpainting pipeline over its components.
    ref_pipe = StableDiffusionInpaintPipeline(**StableDiffusionPipeline.from_pretrained(inpaint_checkpoint, use_safetensors=True).components)
    ref_pipe.set_progress_bar_config(disable=True)
    ref_pipe.scheduler = make_scheduler("DDIM", pipe.scheduler_config)
    ref = ref_pipe(
        PROMPT, image=Image.open(pictures[0]), mask_image=Image.open(pictures[1]), negative_prompt="", height=64, width=64,
        num_inference_steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(4), output_type="np",
    ).images
    db = psnr(ref, ours.images)
    print(f"\ninpainting bundle vs diffusers: {db:.2f} dB")
    assert db >= MATCH_DB
    # The mask matters: another mask, same seed, gives another image.
    other = pipe.generate(PROMPT, seed=4, steps=4, guidance_scale=2.0, scheduler="DDIM", rng="torch", image=image, mask=1.0 - mask, strength=1.0)
    assert psnr(ref, other.images) < MATCH_DB


def test_inpainting_cli_and_its_refusals(inpaint_bundle, pictures, tmp_path):
    image, mask = pictures
    done = run_cli_here("generate", "--bundle", inpaint_bundle, "--prompt", PROMPT, "--steps", "2", "--guidance-scale", "2",
                   "--image", image, "--mask", mask, "-o", tmp_path, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(tmp_path.glob("*.png"))) == 1
    no_mask = run_cli_here("generate", "--bundle", inpaint_bundle, "--prompt", PROMPT, "--steps", "1", "-o", tmp_path)
    assert no_mask.returncode == 2
    assert_one_line_error(no_mask, "inpainting unet", "--image and --mask")
    with pytest.raises(GenerationError, match="--mask goes with --image"):
        from sdbuild.generate import run_generate

        run_generate(inpaint_bundle, PROMPT, steps=1, mask=mask, output_dir=tmp_path)
