"""Several resolutions in one bundle: multifunction packages (one static-shape function per
resolution, weights stored once), enumerated shapes, and generation at each size.

One tiny multi-resolution build per module, on the shared ``warm_artifacts`` cache (the
text encoder's stages are a hit from the other modules' tiny builds).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from builds import build_once
from helpers import assert_one_line_error, run_cli, run_cli_here, write_recipe
from sdbuild.errors import RecipeError
from sdbuild.generate import GenerationError, Pipeline, make_scheduler
from sdbuild.metrics import psnr
from sdbuild.recipe import load_recipe

PROMPT = "a photo of a cat on a red sofa"
SIZES = [(64, 64), (64, 96), (96, 64)]  # square (the default), landscape, portrait
RESOLUTIONS = "resolution: [" + ", ".join(f"{{height: {h}, width: {w}}}" for h, w in SIZES) + "]\n"
BASE = "model: {version: 'synthetic:tiny-sd'}\ntarget: macOS15\nverify: {samples: 1}\n"
RECIPES = {
    "mr3": BASE + RESOLUTIONS,
    "mr1": BASE + "resolution: {height: 64, width: 64}\n",
}
MATCH_DB = 30.0  # the issue's bar for a bundle's image against diffusers'
SHARED_MAX = 1.25  # the issue's bar: three resolutions' weight bytes against one's


def build(artifacts: Path, name: str) -> tuple[Path, Path]:
    """(build folder, checkpoint folder) of recipe ``name``, built once per run."""
    built = build_once(artifacts, name, RECIPES[name])
    return built.build_dir, built.checkpoint


@pytest.fixture(scope="module")
def mr3(artifacts):
    return build(artifacts, "mr3")


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("weight.bin"))


# --------------------------------------------------------------------------- functions


def test_every_image_model_has_one_function_per_resolution_first_the_default(mr3):
    from sdbuild.convert.multifunction import function_names
    from sdbuild.mil.executor import load_program

    resources = mr3[0] / "Resources"
    names = [f"h{h}_w{w}" for h, w in SIZES]
    for model in ("Unet", "VAEDecoder"):
        package = resources / f"{model}.mlpackage"
        assert function_names(package) == names
        default = load_program(package)
        assert default.function_name == "h64_w64"
        for (h, w), name in zip(SIZES, names):
            program = load_program(package, function=name)
            first = "sample" if model == "Unet" else "z"
            assert program.inputs[first][0][-2:] == (h // 8, w // 8)
    # The text encoder does not depend on the size: built once, one function.
    assert function_names(resources / "TextEncoder.mlpackage") == []
    facts = json.loads((mr3[0] / "pipeline.json").read_text())
    assert [(r["height"], r["width"], r["function"]) for r in facts["resolutions"]] == [(h, w, n) for (h, w), n in zip(SIZES, names)]
    assert facts["multires"] == "functions"


def test_verify_checks_every_resolution(mr3):
    report = json.loads((mr3[0] / "build.json").read_text())
    for component in ("unet", "vae_decoder"):
        per = report["components"][component]["psnr_by_function"]
        assert list(per) == [f"h{h}_w{w}" for h, w in SIZES]
        assert all(figures["psnr_db"] >= 35 for figures in per.values())
        assert report["components"][component]["psnr"]["psnr_db"] == min(f["psnr_db"] for f in per.values())
    assert "text_encoder" in report["components"] and "psnr_by_function" not in report["components"]["text_encoder"]
    markdown = (mr3[0] / "report.md").read_text()
    assert "unet h64_w96" in markdown and "vae_decoder h96_w64" in markdown


def test_weights_are_stored_once(artifacts, mr3):
    one = weight_bytes(build(artifacts, "mr1")[0] / "Resources")
    three = weight_bytes(mr3[0] / "Resources")
    print(f"\nweight bytes: 1 resolution {one}, 3 resolutions {three} ({three / one:.3f}x)")
    assert three <= SHARED_MAX * one


def test_inspect_lists_functions_and_shapes(mr3):
    done = run_cli_here("inspect", mr3[0] / "Resources" / "Unet.mlpackage", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    facts = json.loads(done.stdout)
    functions = facts["packages"][0]["functions"]
    assert [f["name"] for f in functions] == [f"h{h}_w{w}" for h, w in SIZES]
    assert functions[0]["default"] and not functions[1]["default"]
    sample = next(i for i in functions[1]["inputs"] if i["name"] == "sample")
    assert sample["shape"] == [2, 4, 8, 12]


# --------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def reference(mr3):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(mr3[1], use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("height,width", SIZES)
def test_generate_at_each_size_matches_diffusers(mr3, reference, height, width):
    pipe = Pipeline.from_bundle(mr3[0], backend="executor", height=height, width=width)
    ours = pipe.generate(PROMPT, seed=3, steps=4, guidance_scale=2.0, scheduler="DDIM", rng="torch")
    assert ours.images.shape == (1, height, width, 3)
    reference.scheduler = make_scheduler("DDIM", pipe.scheduler_config)
    ref = reference(
        PROMPT, negative_prompt="", num_inference_steps=4, guidance_scale=2.0, height=height, width=width,
        generator=torch.Generator().manual_seed(3), output_type="np",
    ).images
    db = psnr(ref, ours.images)
    print(f"\n{height}x{width} bundle vs diffusers: {db:.2f} dB")
    assert db >= MATCH_DB


def test_a_size_the_bundle_lacks_is_one_line_listing_its_sizes(mr3, tmp_path):
    with pytest.raises(GenerationError, match=r"has no 72x64 .*it has: 64x64 \(default\), 64x96, 96x64"):
        Pipeline.from_bundle(mr3[0], backend="executor", height=72, width=64)
    done = run_cli_here("generate", "--bundle", mr3[0], "--prompt", "x", "--steps", "1", "--height", "80", "--width", "80", "-o", tmp_path)
    assert done.returncode == 2
    assert_one_line_error(done, "--height/--width", "80x80", "64x64 (default), 64x96, 96x64")


# --------------------------------------------------------------------------- refusals


def test_older_target_is_refused_naming_enumerated(tmp_path):
    path = write_recipe(tmp_path, "old", "model: {version: 'synthetic:tiny-sd'}\ntarget: macOS14\n" + RESOLUTIONS)
    with pytest.raises(RecipeError, match=r"need target macOS15 or iOS18 \(got target: macOS14\).*multires: enumerated"):
        load_recipe(path)
    done = run_cli("plan", path)
    assert done.returncode == 2
    assert_one_line_error(done, "resolution", "multires: enumerated")
    # One resolution needs no multifunction package: any target.
    assert load_recipe(write_recipe(tmp_path, "one", "model: {version: 'synthetic:tiny-sd'}\ntarget: macOS14\n")).multires_kind is None


def test_chunk_with_several_resolutions_is_one_line(tmp_path):
    path = write_recipe(tmp_path, "chunked", BASE + RESOLUTIONS + "chunk: {unet: 2}\n")
    with pytest.raises(RecipeError, match=r"chunk with several resolutions"):
        load_recipe(path)


def test_a_shape_listed_twice_is_refused(tmp_path):
    path = write_recipe(tmp_path, "twice", BASE + "resolution: [{height: 64, width: 64}, {height: 64, width: 64}]\n")
    with pytest.raises(RecipeError, match=r"lists a shape twice"):
        load_recipe(path)


# --------------------------------------------------------------------------- enumerated shapes

ENUMERATED = "model: {version: 'synthetic:tiny-sd'}\nverify: {samples: 1}\nmultires: enumerated\n" + RESOLUTIONS
RECIPES["mre"] = ENUMERATED  # target macOS14: enumerated shapes need no multifunction support


@pytest.fixture(scope="module")
def mre(artifacts):
    return build(artifacts, "mre")


def test_enumerated_shapes_one_program_every_size(mre):
    from sdbuild.convert.multifunction import function_names
    from sdbuild.mil.executor import load_program

    unet = mre[0] / "Resources" / "Unet.mlpackage"
    assert function_names(unet) == []
    done = run_cli_here("inspect", unet, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    sample = next(i for i in json.loads(done.stdout)["packages"][0]["inputs"] if i["name"] == "sample")
    assert sample["shape"] == [2, 4, 8, 8]  # the default: the first resolution
    assert sorted(map(tuple, sample["shapes"])) == sorted((2, 4, h // 8, w // 8) for h, w in SIZES)
    program = load_program(unet)
    feeds = {"sample": np.zeros((2, 4, 12, 8), np.float32), "timestep": np.ones(2, np.float32),
             "encoder_hidden_states": np.zeros(program.inputs["encoder_hidden_states"][0], np.float32)}
    assert program.run(feeds)["noise_pred"].shape == (2, 4, 12, 8)
    report = json.loads((mre[0] / "build.json").read_text())
    per = report["components"]["unet"]["psnr_by_function"]
    assert list(per) == [f"h{h}_w{w}" for h, w in SIZES] and all(f["psnr_db"] >= 35 for f in per.values())
    assert json.loads((mre[0] / "pipeline.json").read_text())["multires"] == "enumerated"


def test_enumerated_bundle_generates_a_non_default_size_as_diffusers(mre, reference):
    pipe = Pipeline.from_bundle(mre[0], backend="executor", height=64, width=96)
    ours = pipe.generate(PROMPT, seed=3, steps=4, guidance_scale=2.0, scheduler="DDIM", rng="torch")
    assert ours.images.shape == (1, 64, 96, 3)
    reference.scheduler = make_scheduler("DDIM", pipe.scheduler_config)
    ref = reference(
        PROMPT, negative_prompt="", num_inference_steps=4, guidance_scale=2.0, height=64, width=96,
        generator=torch.Generator().manual_seed(3), output_type="np",
    ).images
    db = psnr(ref, ours.images)
    print(f"\nenumerated 64x96 bundle vs diffusers: {db:.2f} dB")
    assert db >= MATCH_DB


def test_compression_clusters_shared_weights_once_and_keeps_them_shared(artifacts, mr3, tmp_path):
    from sdbuild.compress import palettize_package
    from sdbuild.convert.multifunction import function_names
    from sdbuild.mil.executor import load_program

    one = palettize_package(build(artifacts, "mr1")[0] / "Resources" / "Unet.mlpackage", tmp_path / "one.mlpackage", nbits=6, workers=1)
    three = palettize_package(mr3[0] / "Resources" / "Unet.mlpackage", tmp_path / "three.mlpackage", nbits=6, workers=1)
    print(f"\n6-bit weight bytes: 1 resolution {one.bytes_after}, 3 resolutions {three.bytes_after}")
    assert three.bytes_after <= SHARED_MAX * one.bytes_after
    assert three.bytes_after < 0.5 * three.bytes_before  # compressed, not just copied
    assert function_names(tmp_path / "three.mlpackage") == [f"h{h}_w{w}" for h, w in SIZES]
    program = load_program(tmp_path / "three.mlpackage", function="h96_w64")
    assert program.inputs["sample"][0] == (2, 4, 12, 8)
