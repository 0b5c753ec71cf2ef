"""A build with a ControlNet: the controlled unet beside the plain one, named as CONTRACT.md says."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli, run_cli_here, write_recipe

RECIPE = """
name: tiny-cn
model: {version: synthetic:tiny-sd}
components: [unet]
resolution: {height: 64, width: 64}
controlnet: [synthetic:tiny-controlnet]
chunk: {unet: 2}
bundle: {layout: both}
verify: {samples: 1}
"""


@pytest.fixture(scope="module")
def build(warm_artifacts, tmp_path_factory):
    art = warm_artifacts
    recipe = write_recipe(tmp_path_factory.mktemp("r"), "tiny-cn", RECIPE)
    done = run_cli_here("run", recipe, "--artifacts", art)
    assert done.returncode == 0, done.stderr[-3000:]
    return art / "builds" / "tiny-cn"


def tree(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.mlpackage"))


def test_swift_tree_has_chunked_controlled_unet_and_controlnet(build):
    assert tree(build / "Resources") == [
        "ControlledUnetChunk1.mlpackage",
        "ControlledUnetChunk2.mlpackage",
        "UnetChunk1.mlpackage",
        "UnetChunk2.mlpackage",
        "controlnet/SyntheticTinyControlnet.mlpackage",
    ]


def test_python_tree_has_control_unet_and_controlnet(build):
    assert tree(build / "python") == [
        "Stable_Diffusion_version_synthetic:tiny-sd_control-unet.mlpackage",
        "Stable_Diffusion_version_synthetic:tiny-sd_unet.mlpackage",
        "controlnet/synthetic:tiny-controlnet.mlpackage",
    ]


def test_controlnet_and_controlled_unet_io_follow_the_contract(build):
    from sdbuild.mil.executor import load_program

    cn = load_program(build / "python" / "controlnet" / "synthetic:tiny-controlnet.mlpackage")
    assert list(cn.inputs) == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond"]
    assert cn.inputs["controlnet_cond"][0] == (2, 3, 64, 64)
    residuals = cn.outputs
    assert residuals == [f"additional_residual_{i}" for i in range(len(residuals))]
    unet = load_program(build / "python" / "Stable_Diffusion_version_synthetic:tiny-sd_control-unet.mlpackage")
    assert list(unet.inputs)[:3] == ["sample", "timestep", "encoder_hidden_states"]
    assert list(unet.inputs)[3:] == residuals
    assert unet.outputs == ["noise_pred"]


def test_every_shipped_model_verified(build):
    components = json.loads((build / "build.json").read_text())["components"]
    assert set(components) == {"unet", "controlled_unet", "controlnet/synthetic:tiny-controlnet"}
    for name, facts in components.items():
        assert facts["psnr"]["psnr_db"] >= 35, (name, facts["psnr"])
    assert components["controlled_unet"]["psnr"]["chain_psnr_db"] >= 60


def test_sdxl_with_controlnet_is_refused_in_one_line(tmp_path):
    recipe = write_recipe(tmp_path, "x", "model: {version: synthetic:tiny-sdxl}\ncontrolnet: [synthetic:tiny-controlnet]\n")
    done = run_cli("run", recipe, "--artifacts", tmp_path / "art")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: controlnet: SDXL ControlNets are not supported yet (Apple's SDXL pipeline takes no ControlNet)"


def test_batch_one_with_controlnet_is_a_recipe_error(tmp_path):
    recipe = write_recipe(tmp_path, "x", "model: {version: synthetic:tiny-sd}\nunet_batch_one: true\ncontrolnet: [synthetic:tiny-controlnet]\n")
    done = run_cli("run", recipe, "--artifacts", tmp_path / "art")
    assert done.returncode == 2
    assert "Apple's ControlNet pipelines run the unet at batch 2" in done.stderr
