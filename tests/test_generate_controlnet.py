"""sdbuild generate with ControlNets: images against diffusers' StableDiffusionControlNetPipeline.

One bundle, built once for the module, holds two ControlNets: the recipe's
``synthetic:tiny-controlnet`` and a local folder (the same synthetic builder,
another seed). Chunked, layout both: Resources/ holds ControlledUnetChunk1/2,
python/ the whole control-unet, so both discovery paths are exercised. As in
test_generate.py: torch RNG latents, DDIM, 4 steps, guidance 2, PSNR on the
decoded image in [0, 1].
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from builds import build_once
from helpers import assert_one_line_error, run_cli_here
from sdbuild.generate import GenerationError, Pipeline, find_bundle, find_controlnet, load_image, make_scheduler
from sdbuild.metrics import psnr

PROMPT = "a photo of a cat on a red sofa"
CN1 = "synthetic:tiny-controlnet"
MATCH_DB = 30.0  # the bar
GEN = dict(seed=7, steps=4, guidance_scale=2.0, scheduler="DDIM", rng="torch")


@pytest.fixture(scope="module")
def built(artifacts):
    """(build folder, SD checkpoint, {ControlNet id: its diffusers folder}, control image paths)."""
    from sdbuild.synthetic import make_synthetic

    work = artifacts
    cn2 = work / "cn2"
    if not cn2.is_dir():
        make_synthetic("synthetic:tiny-controlnet", cn2, seed=1)
    done = build_once(
        artifacts,
        "cn",
        "model: {version: synthetic:tiny-sd}\ncomponents: [text_encoder, unet, vae_decoder]\n"
        f"resolution: {{height: 64, width: 64}}\ncontrolnet: [{CN1}, {cn2}]\n"
        "chunk: {unet: 2}\nbundle: {layout: both}\nverify: {samples: 1}\n",
    )
    controlnets = {CN1: done.downloads[f"controlnet/{CN1}"], str(cn2): done.downloads[f"controlnet/{cn2}"]}
    # Control images: smooth shapes plus noise, different per ControlNet.
    images = []
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    for i, (fx, fy) in enumerate([(3.0, 1.0), (1.0, 4.0)]):
        rgb = np.stack([np.sin(fx * np.pi * xx), np.cos(fy * np.pi * yy), xx * yy], -1) * 0.5 + 0.5
        rgb = rgb + np.random.RandomState(i).uniform(-0.1, 0.1, rgb.shape)
        path = work / f"control{i}.png"
        from PIL import Image

        Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)).save(path)
        images.append(path)
    return done.build_dir, done.checkpoint, controlnets, images


@pytest.fixture(scope="module")
def swift_pipe(built):
    return Pipeline.from_bundle(built[0], backend="executor")


def reference(built, ids: list[str], scales: list[float], scheduler_config: dict) -> np.ndarray:
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    _, sd, folders, images = built
    nets = [ControlNetModel.from_pretrained(folders[i]) for i in ids]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        sd, controlnet=nets[0] if len(nets) == 1 else nets, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("DDIM", scheduler_config)
    pil = [Image.open(p).convert("RGB") for p in images[: len(ids)]]
    return pipe(
        PROMPT,
        image=pil[0] if len(pil) == 1 else pil,
        negative_prompt="",
        num_inference_steps=4,
        guidance_scale=2.0,
        controlnet_conditioning_scale=scales[0] if len(scales) == 1 else scales,
        generator=torch.Generator().manual_seed(7),
        height=64,
        width=64,
        output_type="np",
    ).images


def test_one_controlnet_matches_diffusers(built, swift_pipe):
    control = [load_image(built[3][0])]
    ours = swift_pipe.generate(PROMPT, controlnet=[CN1], controlnet_images=control, **GEN)
    assert [p.name for p in swift_pipe.bundle.models["controlled_unet"]] == ["ControlledUnetChunk1.mlpackage", "ControlledUnetChunk2.mlpackage"]
    ref = reference(built, [CN1], [1.0], swift_pipe.scheduler_config)
    assert ours.images.shape == ref.shape == (1, 64, 64, 3)
    db = psnr(ref, ours.images)
    print(f"\none ControlNet vs diffusers: {db:.2f} dB")
    assert db >= MATCH_DB
    assert ours.settings["controlnet"] == CN1
    # Not vacuous: the control changes the image.
    plain = swift_pipe.generate(PROMPT, **GEN)
    print(f"without control vs diffusers with: {psnr(ref, plain.images):.2f} dB")
    assert psnr(ref, plain.images) < MATCH_DB


def test_two_controlnets_match_diffusers_python_layout(built):
    ids, scales = list(built[2]), [0.8, 1.2]
    pipe = Pipeline.from_bundle(built[0] / "python", backend="executor")
    assert pipe.bundle.layout == "python"
    controls = [load_image(p) for p in built[3]]
    ours = pipe.generate(PROMPT, controlnet=ids, controlnet_images=controls, controlnet_scale=scales, **GEN)
    ref = reference(built, ids, scales, pipe.scheduler_config)
    db = psnr(ref, ours.images)
    print(f"\ntwo ControlNets vs diffusers: {db:.2f} dB")
    assert db >= MATCH_DB
    one = pipe.generate(PROMPT, controlnet=ids[:1], controlnet_images=controls[:1], controlnet_scale=scales[0], **GEN)
    assert psnr(ref, one.images) < MATCH_DB  # the second ControlNet counts


def test_controlnet_lookup_by_recipe_id_folder_and_file_name(built, tmp_path):
    build_dir, _, folders, _ = built
    cn2 = Path(list(folders)[1])
    swift = find_bundle(build_dir)
    python = find_bundle(build_dir / "python")
    assert find_controlnet(swift, CN1).name == "SyntheticTinyControlnet.mlpackage"
    assert find_controlnet(python, CN1).name == "synthetic:tiny-controlnet.mlpackage"
    # A folder id: as listed, as another spelling of the same folder, or by the bundle's file name.
    expected = find_controlnet(swift, str(cn2))
    assert expected.parent.name == "controlnet" and expected != find_controlnet(swift, CN1)
    assert find_controlnet(swift, str(cn2) + "/") == expected
    assert find_controlnet(swift, str(cn2.parent / ".." / cn2.parent.name / cn2.name)) == expected
    assert find_controlnet(swift, expected.name.removesuffix(".mlpackage")) == expected
    assert find_controlnet(python, str(cn2)).parent.name == "controlnet"
    with pytest.raises(GenerationError, match="not in this bundle; it holds"):
        find_controlnet(swift, "lllyasviel/sd-controlnet-mlsd")


def test_cli_generates_with_two_controlnets(built, tmp_path):
    from PIL import Image

    build_dir, _, folders, images = built
    done = run_cli_here(
        "generate", "--bundle", build_dir, "--prompt", PROMPT, "--seed", 3, "--steps", 1, "--guidance-scale", 2,
        "--controlnet", *folders, "--controlnet-inputs", *images, "--controlnet-scale", 0.5, "-o", tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    info = Image.open(tmp_path / "a_photo_of_a_cat_on_a_red_sofa.3.final.png").text
    assert info["controlnet"] == ", ".join(folders) and info["controlnet_scale"] == "0.5, 0.5"


def test_cli_controlnet_errors_are_one_line(built, tmp_path):
    from PIL import Image

    build_dir, _, _, images = built
    base = ("generate", "--bundle", build_dir, "--prompt", "x", "--steps", 1, "-o", tmp_path / "out")
    assert_one_line_error(run_cli_here(*base, "--controlnet", CN1, "--controlnet-inputs", *images), "2 control images for 1 ControlNet")
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(small)
    assert_one_line_error(run_cli_here(*base, "--controlnet", CN1, "--controlnet-inputs", small), "48x32 pixels", "64x64")
    assert_one_line_error(run_cli_here(*base, "--controlnet", "lllyasviel/sd-controlnet-mlsd", "--controlnet-inputs", images[0]), "not in this bundle")
    no_controlled = tmp_path / "no-controlled"
    shutil.copytree(build_dir / "Resources", no_controlled)
    for part in no_controlled.glob("ControlledUnet*"):
        shutil.rmtree(part)
    assert_one_line_error(run_cli_here("generate", "--bundle", no_controlled, "--prompt", "x", "--controlnet", CN1, "--controlnet-inputs", images[0]), "ControlledUnet")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
