"""multilingual_projection: a TorchScript projection built as MultilingualTextEncoderProjection.

A tiny projection (Linear(512, C) with the layout change, scripted and saved)
is built with the tiny SD model, in both layouts, through the warm cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, run_cli, run_cli_here, write_recipe
from swift_loader import walk_sd
from tiny_projection import save_projection

WIDTH = 32  # the tiny SD unet's cross_attention_dim
RECIPE = """
name: {name}
model: {{version: synthetic:tiny-sd}}
resolution: {{height: 64, width: 64}}
multilingual_projection: projection.pt
bundle: {{layout: both}}
verify: {{samples: 1}}
"""
SWIFT = "Resources/MultilingualTextEncoderProjection.mlpackage"
PYTHON = "python/Stable_Diffusion_version_synthetic:tiny-sd_multilingual_text_encoder_projection.mlpackage"


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ml")
    save_projection(folder / "projection.pt", WIDTH)
    return folder


@pytest.fixture(scope="module")
def built(artifacts, recipe_dir) -> Path:
    from sdbuild.executor import prepare, run_build

    recipe = write_recipe(recipe_dir, "ml", RECIPE.format(name="ml"))
    return run_build(prepare(recipe, artifacts)).build_dir


def test_projection_has_apples_interface(built):
    import coremltools as ct

    spec = ct.utils.load_spec(str(built / SWIFT))
    inputs = [(f.name, list(f.type.multiArrayType.shape), f.type.multiArrayType.dataType) for f in spec.description.input]
    outputs = [(f.name, list(f.type.multiArrayType.shape), f.type.multiArrayType.dataType) for f in spec.description.output]
    float32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    assert inputs == [("nlcontextualembeddings_output", [1, 256, 512], float32)]
    assert outputs == [("encoder_hidden_states", [1, WIDTH, 1, 256], float32)]
    assert spec.specificationVersion == ct.target.macOS14.value  # NLContextualEmbedding's first release


def test_projection_sits_in_both_layouts_and_the_unet_takes_its_tokens(built):
    assert (built / SWIFT).is_dir() and (built / PYTHON).is_dir()
    assert not (built / "Resources" / "TextEncoder.mlpackage").exists()
    loaded = walk_sd(built / "Resources", multilingual=True)
    assert loaded.sequence_length == 256 and loaded.hidden_width == WIDTH
    assert [p.name for p in loaded.models["unet"]] == ["Unet.mlpackage"]


def test_projection_verifies_against_the_torchscript_module(built, recipe_dir):
    from sdbuild.metrics import psnr
    from sdbuild.mil.executor import load_program

    figures = json.loads((built / "build.json").read_text())["components"]["multilingual_projection"]
    assert figures["psnr"]["psnr_db"] >= 60, figures
    # And directly: the user's file against the shipped package, float32 on the reference executor.
    x = np.random.default_rng(5).standard_normal((1, 256, 512)).astype(np.float32)
    with torch.no_grad():
        want = torch.jit.load(str(recipe_dir / "projection.pt"))(torch.from_numpy(x)).numpy()
    for package in (SWIFT, PYTHON):
        got = load_program(built / package).run({"nlcontextualembeddings_output": x}, precision="fp32")
        assert psnr(want, got["encoder_hidden_states"]) >= 60


def test_apples_file_layout_gets_the_transpose(tiny_sd_checkpoint, tmp_path):
    """A bare Linear (what Apple's converter takes) gives [1, 256, C]; the built module moves it to [1, C, 1, 256]."""
    from sdbuild.models import build_multilingual_projection

    path = save_projection(tmp_path / "projection.pt", WIDTH, layout="BSC")
    model = build_multilingual_projection(path, tiny_sd_checkpoint)
    x = torch.randn(1, 256, 512)
    with torch.no_grad():
        want = torch.jit.load(str(path))(x).transpose(1, 2).unsqueeze(2)
        assert torch.equal(model.module(x), want)
    assert [s.name for s in model.inputs] == ["nlcontextualembeddings_output"] and model.outputs == ["encoder_hidden_states"]


def trace_keys(recipe: Path, artifacts: Path) -> dict[str, str]:
    from sdbuild.executor import prepare

    return {n.component: n.key for n in prepare(recipe, artifacts).nodes if n.stage.name == "trace"}


def test_keys_follow_the_files_content_not_its_path_or_time(recipe_dir, artifacts, tmp_path):
    first = trace_keys(write_recipe(recipe_dir, "keys", RECIPE.format(name="keys")), artifacts)
    (tmp_path / "elsewhere").mkdir()
    moved = save_projection(tmp_path / "elsewhere" / "projection.pt", WIDTH)
    os.utime(moved, (1, 1))
    second = trace_keys(write_recipe(tmp_path / "elsewhere", "keys", RECIPE.format(name="keys")), artifacts)
    assert second == first
    save_projection(moved, WIDTH, seed=1)
    third = trace_keys(write_recipe(tmp_path / "elsewhere", "keys", RECIPE.format(name="keys")), artifacts)
    assert third["multilingual_projection"] != first["multilingual_projection"]
    assert third["unet"] == first["unet"]
    # The unet takes 256 tokens with a projection: another trace than without one.
    plain = trace_keys(write_recipe(tmp_path, "plain", "model: {version: synthetic:tiny-sd}\nresolution: {height: 64, width: 64}\n"), artifacts)
    assert plain["unet"] != first["unet"]


def test_compressed_when_the_recipe_lists_it(artifacts, recipe_dir):
    from sdbuild.executor import prepare, run_build

    text = RECIPE.format(name="ml8") + "compression: {nbits: 8, components: [multilingual_projection]}\n"
    build_dir = run_build(prepare(write_recipe(recipe_dir, "ml8", text), artifacts)).build_dir
    facts = json.loads((build_dir / "build.json").read_text())["components"]
    assert facts["multilingual_projection"]["compressed"] and not facts["unet"]["compressed"]
    assert facts["multilingual_projection"]["package_bytes"] < facts["multilingual_projection"]["float16_bytes"]
    assert facts["multilingual_projection"]["psnr"]["psnr_db"] >= 35


# --- refusals: one line, exit status 2 ----------------------------------------------------------


def _bad_files(folder: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    torch.save(torch.nn.Linear(512, WIDTH).state_dict(), folder / "pickled.pt")
    (folder / "noise.pt").write_bytes(os.urandom(256))
    torch.jit.save(torch.jit.script(torch.nn.Linear(256, WIDTH)), folder / "narrow.pt")
    torch.jit.save(torch.jit.script(torch.nn.Linear(512, 16)), folder / "width.pt")
    return {
        "missing": (folder / "absent.pt", ("multilingual_projection: file not found", "absent.pt")),
        "pickled": (folder / "pickled.pt", ("not a TorchScript file", "torch.jit.save")),
        "noise": (folder / "noise.pt", ("not a TorchScript file",)),
        "narrow": (folder / "narrow.pt", ("does not take the embedding [1, 256, 512]",)),
        "width": (folder / "width.pt", ("gives [1, 256, 16]", f"need [1, 256, {WIDTH}]")),
    }


@pytest.mark.parametrize("case", ["missing", "pickled", "noise", "narrow", "width"])
def test_bad_projection_file_is_one_line(case, artifacts, tmp_path):
    path, fragments = _bad_files(tmp_path)[case]
    recipe = write_recipe(tmp_path, "bad", RECIPE.format(name="bad").replace("projection.pt", path.name))
    done = run_cli_here("run", recipe, "--artifacts", artifacts, "--until", "trace")
    assert done.returncode == 2, done.stderr[-2000:]
    assert_one_line_error(done, *fragments)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("target: macOS13\n", "multilingual_projection: needs target macOS14 or iOS17 or later"),
        ("target: iOS16\n", "got target: iOS16"),
        ("components: [text_encoder, unet, vae_decoder]\n", "remove text_encoder from components"),
    ],
)
def test_recipe_refusals_are_one_line(text, fragment, tmp_path):
    save_projection(tmp_path / "projection.pt", WIDTH)
    recipe = write_recipe(tmp_path, "bad", RECIPE.format(name="bad") + text)
    done = run_cli("plan", recipe, "--artifacts", tmp_path / "art")
    assert done.returncode == 2
    assert_one_line_error(done, fragment, "bad.yaml:")


def test_sdxl_is_refused_in_one_line(tmp_path):
    save_projection(tmp_path / "projection.pt", WIDTH)
    recipe = write_recipe(tmp_path, "bad", "model: {version: synthetic:tiny-sdxl}\nmultilingual_projection: projection.pt\n")
    done = run_cli("plan", recipe, "--artifacts", tmp_path / "art")
    assert done.returncode == 2
    assert_one_line_error(done, "Apple's SDXL pipeline takes no multilingual text encoder")
