"""The SDXL refiner: ``model.refiner`` builds UnetRefiner beside the base; ``generate`` runs base then refiner.

One build of tiny-sdxl with tiny-sdxl-refiner (chunked, both layouts) serves
the bundle, Swift-loader and image tests; a refiner built alone serves the
image-to-image test. Images are compared with diffusers' StableDiffusionXLPipeline
(``denoising_end``) followed by StableDiffusionXLImg2ImgPipeline
(``denoising_start``) on the same checkpoints, through the reference executor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from builds import build_once
from helpers import assert_one_line_error, run_cli, run_cli_here, write_recipe
from sdbuild.generate import REFINER_START, Pipeline, make_scheduler
from sdbuild.metrics import psnr
from sdbuild.stages.bundle import python_package_name, swift_name

PROMPT = "a photo of a cat on a red sofa"
SIZE = "resolution: {height: 64, width: 64}\nverify: {samples: 1}\n"
RECIPES = {
    # Chunked, both layouts: Resources/ holds UnetChunk1/2 and UnetRefinerChunk1/2, python/ the whole unets.
    "xl-refined": "model: {version: 'synthetic:tiny-sdxl', refiner: 'synthetic:tiny-sdxl-refiner'}\n"
    "chunk: {unet: 2}\nbundle: {layout: both}\n" + SIZE,
    "xl-refiner-alone": "model: {version: 'synthetic:tiny-sdxl-refiner'}\n" + SIZE,
}
MATCH_DB = 30.0  # the issue's bar for a bundle's image against diffusers'
STEPS, GUIDANCE, SEED = 5, 2.0, 11
def build(artifacts: Path, name: str) -> tuple[Path, Path, Path | None]:
    """(build folder, checkpoint folder, refiner checkpoint folder or None) of recipe ``name``, built once per run."""
    built = build_once(artifacts, name, RECIPES[name])
    return built.build_dir, built.checkpoint, built.downloads.get("unet_refiner")


@pytest.fixture(scope="module")
def refined(artifacts):
    return build(artifacts, "xl-refined")


@pytest.fixture(scope="module")
def refined_pipe(refined):
    return Pipeline.from_bundle(refined[0], backend="executor")


def diffusers_refined(base: Path, refiner: Path, scheduler_config: dict, refiner_start: float) -> np.ndarray:
    """diffusers' base (``denoising_end``) then refiner (``denoising_start``) image [1, H, W, 3] in [0, 1].

    The refiner pipeline takes the base's second text encoder and VAE, as diffusers' SDXL guide does.
    """
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    first = StableDiffusionXLPipeline.from_pretrained(base, use_safetensors=True)
    second = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        refiner, text_encoder_2=first.text_encoder_2, vae=first.vae, use_safetensors=True
    )
    for pipe in (first, second):
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = make_scheduler("Euler", scheduler_config)
    common = dict(negative_prompt="", num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    latents = first(
        PROMPT, generator=torch.Generator().manual_seed(SEED), denoising_end=refiner_start, output_type="latent",
        height=64, width=64, **common,
    ).images  # fmt: skip
    return second(PROMPT, image=latents, denoising_start=refiner_start, output_type="np", **common).images


# --------------------------------------------------------------------------- the bundle


def test_refiner_bundle_ships_apple_names_and_interface(refined):
    from sdbuild.mil.executor import load_program

    build_dir = refined[0]
    resources = build_dir / "Resources"
    assert sorted(p.name for p in resources.glob("Unet*.mlpackage")) == [
        "UnetChunk1.mlpackage", "UnetChunk2.mlpackage", "UnetRefinerChunk1.mlpackage", "UnetRefinerChunk2.mlpackage",
    ]  # fmt: skip
    # The refiner shares the base's TextEncoder2: no encoder of its own ships.
    assert sorted(p.name for p in resources.glob("TextEncoder*.mlpackage")) == ["TextEncoder.mlpackage", "TextEncoder2.mlpackage"]
    python = sorted(p.name for p in (build_dir / "python").glob("*unet*.mlpackage")) + sorted(
        p.name for p in (build_dir / "python").glob("*refiner*.mlpackage")
    )
    assert python == [python_package_name("synthetic:tiny-sdxl", "unet"), python_package_name("synthetic:tiny-sdxl", "unet_refiner")]
    assert python[1] == "Stable_Diffusion_version_synthetic:tiny-sdxl_refiner.mlpackage"  # Apple's converter: <version>_refiner
    whole = load_program(build_dir / "python" / python[1])
    base = load_program(build_dir / "python" / python[0])
    refiner_unet = json.loads((refined[2] / "unet" / "config.json").read_text())
    te2 = json.loads((refined[1] / "text_encoder_2" / "config.json").read_text())
    assert whole.inputs["time_ids"][0] == (2, 5) and base.inputs["time_ids"][0] == (2, 6)
    assert whole.inputs["encoder_hidden_states"][0] == (2, te2["hidden_size"], 1, 77) == (2, refiner_unet["cross_attention_dim"], 1, 77)
    assert whole.inputs["text_embeds"][0] == (2, te2["projection_dim"])
    report = json.loads((build_dir / "build.json").read_text())
    figures = report["components"]["unet_refiner"]
    assert figures["psnr"]["psnr_db"] >= 35 and len(figures["chunks"]["parts"]) == 2
    print(f"\nUnetRefiner verify: {figures['psnr']}")


def test_refiner_bundle_loads_as_the_swift_package_does(refined):
    from swift_loader import walk_sdxl

    loaded = walk_sdxl(refined[0] / "Resources")
    assert [p.name for p in loaded.models["unet_refiner"]] == [f"{swift_name('unet_refiner', i)}.mlpackage" for i in (1, 2)]
    assert [p.name for p in loaded.models["unet"]] == ["UnetChunk1.mlpackage", "UnetChunk2.mlpackage"]


# --------------------------------------------------------------------------- images against diffusers


@pytest.mark.parametrize("refiner_start", [REFINER_START, 0.4])
def test_base_then_refiner_matches_diffusers(refined, refined_pipe, refiner_start, record_property):
    assert REFINER_START == 0.8  # Apple's Swift package default (Configuration.refinerStart)
    ours = refined_pipe.generate(
        PROMPT, seed=SEED, steps=STEPS, guidance_scale=GUIDANCE, scheduler="Euler", rng="torch", refiner_start=refiner_start
    )
    # Apple's switch: int(5 * 0.8) = 4 base steps, int(5 * 0.4) = 2.
    assert ours.settings["refiner_steps"] == STEPS - int(STEPS * refiner_start)
    ref = diffusers_refined(refined[1], refined[2], refined_pipe.scheduler_config, refiner_start)
    db = psnr(ref, ours.images)
    base_only = refined_pipe.generate(PROMPT, seed=SEED, steps=STEPS, guidance_scale=GUIDANCE, scheduler="Euler", rng="torch", refiner_start=1.0)
    without = psnr(ref, base_only.images)
    record_property(f"refined vs diffusers, start {refiner_start}", round(db, 2))
    print(f"\nbase+refiner (start {refiner_start}) vs diffusers: {db:.2f} dB; base alone vs the same: {without:.2f} dB")
    assert db >= MATCH_DB
    assert without < db - 10  # the refiner's steps matter: leaving them out is clearly different


def test_refiner_alone_image_to_image_matches_diffusers(artifacts, record_property):
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    build_dir, checkpoint, _ = build(artifacts, "xl-refiner-alone")
    resources = build_dir / "Resources"
    assert sorted(p.name for p in resources.glob("*.mlpackage")) == [
        "TextEncoder2.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage", "VAEEncoder.mlpackage",
    ]  # fmt: skip
    assert (resources / "vocab.json").read_bytes() == (checkpoint / "tokenizer_2" / "vocab.json").read_bytes()
    from swift_loader import walk_sdxl

    # Apple's Swift package opens it with no TextEncoder and tells the refiner by its 5 time_ids.
    assert sorted(walk_sdxl(resources).models) == ["text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    pipe = Pipeline.from_bundle(build_dir, backend="executor")
    assert pipe.refiner_only and not pipe.has_refiner
    ys, xs = np.mgrid[0:64, 0:64] / 63.0
    pil = Image.fromarray((np.stack([xs, ys, 1 - xs * ys], axis=-1) * 255).round().astype(np.uint8))  # a smooth gradient
    image = np.asarray(pil, np.float32) / 255.0  # both sides start from the same 8-bit pixels
    kw = dict(seed=SEED, steps=STEPS, guidance_scale=GUIDANCE, scheduler="Euler", rng="torch")
    ours = pipe.generate(PROMPT, image=image, strength=0.6, **kw)
    ref_pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(checkpoint, use_safetensors=True)
    ref_pipe.set_progress_bar_config(disable=True)
    ref_pipe.scheduler = make_scheduler("Euler", pipe.scheduler_config)
    ref = ref_pipe(
        PROMPT, image=pil, strength=0.6, negative_prompt="",
        num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED), output_type="np",
    ).images  # fmt: skip
    db = psnr(ref, ours.images)
    record_property("refiner alone img2img vs diffusers", round(db, 2))
    print(f"\nrefiner alone, image to image, vs diffusers: {db:.2f} dB")
    assert db >= MATCH_DB


# --------------------------------------------------------------------------- errors


def test_refiner_start_out_of_range_is_one_line(refined, tmp_path):
    done = run_cli_here("generate", "--bundle", refined[0], "--prompt", "x", "--refiner-start", "1.5", "-o", tmp_path)
    assert_one_line_error(done, "--refiner-start 1.5", "[0, 1]")


@pytest.mark.parametrize(
    "model, fragments",
    [
        ("{version: synthetic:tiny-sd, refiner: synthetic:tiny-sdxl-refiner}", ("model.refiner", "SD 1.x/2.x", "SDXL base")),
        ("{version: synthetic:tiny-sdxl, refiner: synthetic:tiny-sdxl}", ("model.refiner", "synthetic:tiny-sdxl is an SDXL base, not an SDXL refiner")),
    ],
)
def test_a_refiner_that_does_not_fit_is_one_line(model, fragments, tmp_path):
    recipe = write_recipe(tmp_path, "r", f"model: {model}\n" + SIZE)
    done = run_cli("plan", recipe, "--artifacts", tmp_path / "art")
    assert done.returncode == 2
    assert_one_line_error(done, *fragments)


def test_single_file_refiner_plans_unet_refiner_and_a_base_file_is_refused(tmp_path):
    from models.single_file import make_single_file

    from sdbuild.executor import prepare

    refiner_file, _ = make_single_file("sdxl-refiner", tmp_path / "refiner.safetensors", seed=1)
    base_file, _ = make_single_file("sdxl", tmp_path / "base.safetensors", seed=2)
    recipe = write_recipe(tmp_path, "r", f"model: {{version: 'synthetic:tiny-sdxl', refiner: '{refiner_file}'}}\n" + SIZE)
    plan = prepare(recipe, tmp_path / "art")
    fetch = next(n for n in plan.nodes if n.stage.name == "download" and n.component == "unet_refiner")
    # The file is detected from its tensors; its content digest is in the refiner's download key.
    assert fetch.fields["source"]["family"] == "sdxl-refiner" and fetch.fields["source"]["kind"] == "single_file"
    assert [n.stage.name for n in plan.nodes if n.component == "unet_refiner"] == ["download", "trace", "convert", "verify"]
    wrong = write_recipe(tmp_path, "w", f"model: {{version: 'synthetic:tiny-sdxl', refiner: '{base_file}'}}\n" + SIZE)
    done = run_cli("plan", wrong, "--artifacts", tmp_path / "art")
    assert done.returncode == 2
    assert_one_line_error(done, "model.refiner", "is an SDXL base, not an SDXL refiner")


@pytest.mark.parametrize(
    "compression, refiner_stages",
    [
        ("compression: {nbits: 6}\n", ["download", "trace", "convert", "compress", "verify"]),
        # A mixed-bit recipe is measured on the base unet: the refiner ships float16.
        ("compression: {mixed_bit: {recipe: recipe_4.50_bit_mixedpalette}}\n", ["download", "trace", "convert", "verify"]),
    ],
)
def test_refiner_is_compressed_with_the_unet(compression, refiner_stages, tmp_path):
    from sdbuild.executor import prepare

    recipe = write_recipe(tmp_path, "r", "model: {version: 'synthetic:tiny-sdxl', refiner: 'synthetic:tiny-sdxl-refiner'}\n" + compression + SIZE)
    plan = prepare(recipe, tmp_path / "art")
    assert [n.stage.name for n in plan.nodes if n.component == "unet_refiner"] == refiner_stages
