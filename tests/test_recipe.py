"""Recipe validation: every error is one line naming file, key path and line."""

from __future__ import annotations

import json
import pytest

from sdbuild.errors import RecipeError
from sdbuild.recipe import check_buildable, expand_matrix, load_recipe, recipe_schema

from helpers import REPO, run_cli, write_recipe

BASE = "model:\n  version: synthetic:tiny-sd\nresolution: {height: 64, width: 64}\n"


def error_of(path) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_recipe_defaults_and_name_from_stem(tmp_path):
    r = load_recipe(write_recipe(tmp_path, "my-variant", BASE))
    assert r.name == "my-variant"
    assert r.resolution.height == 64
    assert r.get("compression.nbits") is None
    assert r.bundle.layout == "swift"


def test_every_shipped_recipe_validates():
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        load_recipe(path)


def test_unknown_key_names_file_key_line_and_allowed_keys(tmp_path):
    p = write_recipe(tmp_path, "r", BASE + "bundle:\n  layot: swift\n")
    assert error_of(p) == f"{p}:5: bundle.layot: unknown key; allowed keys here: layout"


def test_unknown_top_level_key(tmp_path):
    p = write_recipe(tmp_path, "r", BASE + "chunks: 2\n")
    msg = error_of(p)
    assert msg.startswith(f"{p}:4: chunks: unknown key; allowed keys here: name, model,")


def test_wrong_type(tmp_path):
    p = write_recipe(tmp_path, "r", BASE + "verify:\n  samples: two\n")
    assert error_of(p) == f"{p}:5: verify.samples: Input should be a valid integer, unable to parse string as an integer (got 'two')"


def test_bad_enum_value(tmp_path):
    p = write_recipe(tmp_path, "r", BASE + "attention: FAST\n")
    assert error_of(p) == (
        f"{p}:4: attention: Input should be 'ORIGINAL', 'SPLIT_EINSUM' or 'SPLIT_EINSUM_V2' (got 'FAST')"
    )


def test_bad_nbits_in_child_reports_child_line(tmp_path):
    write_recipe(tmp_path, "base", BASE)
    p = write_recipe(tmp_path, "child", "extends: base.yaml\ncompression:\n  nbits: 5\n")
    assert error_of(p) == f"{p}:3: compression.nbits: Input should be 1, 2, 4, 6 or 8 (got 5)"


def test_error_in_parent_names_parent_file(tmp_path):
    parent = write_recipe(tmp_path, "base", BASE + "target: macOS99\n")
    p = write_recipe(tmp_path, "child", "extends: base.yaml\n")
    assert error_of(p).startswith(f"{parent}:4: target: Input should be 'macOS13'")


def test_missing_required_key(tmp_path):
    p = write_recipe(tmp_path, "r", "resolution: {height: 64, width: 64}\n")
    assert error_of(p) == f"{p}: model: required key is missing: add it to the recipe"


def test_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    assert error_of(p) == f"{p}: recipe file not found"


def test_missing_extends_file(tmp_path):
    p = write_recipe(tmp_path, "r", "extends: base/none.yaml\n" + BASE)
    assert error_of(p) == (
        f"{p}:1: extends: file not found: {tmp_path / 'base/none.yaml'} (paths are relative to the recipe's folder)"
    )


def test_cyclic_extends(tmp_path):
    a = write_recipe(tmp_path, "a", "extends: b.yaml\n" + BASE)
    b = write_recipe(tmp_path, "b", "extends: a.yaml\n")
    assert error_of(a) == f"{b}:1: extends: cyclic extends: {a} -> {b} -> {a}"


def test_invalid_yaml(tmp_path):
    p = write_recipe(tmp_path, "r", "model: {version: x\n")
    assert error_of(p).startswith(f"{p}:2: not valid YAML:")


def test_name_cannot_leave_builds_folder(tmp_path):
    p = write_recipe(tmp_path, "r", BASE + "name: ../../etc\n")
    assert error_of(p) == f"{p}:4: name: must be letters, digits, '.', '_' or '-' (it names the build folder)"


def test_compression_needs_exactly_one_kind(tmp_path):
    p = write_recipe(tmp_path, "r", BASE + "compression: {nbits: 6, linear8: true}\n")
    assert error_of(p) == (
        f"{p}:4: compression: set exactly one of nbits, linear8, mixed_bit, or sparsity alone (or omit compression for float16); got nbits, linear8"
    )


def test_sparsity_forms_and_what_they_go_with(tmp_path):
    joint = load_recipe(write_recipe(tmp_path, "j", BASE + "compression: {nbits: 4, sparsity: 0.5, lut_dtype: int8}\n"))
    assert (joint.compression.sparsity, joint.compression.lut_dtype) == (0.5, "int8")
    assert load_recipe(write_recipe(tmp_path, "s", BASE + "compression: {sparsity: '2:4'}\n")).compression.sparsity == "2:4"
    p = write_recipe(tmp_path, "u", BASE + "compression: {sparsity: 2:4}\n")  # YAML 1.1 reads 2:4 as 124
    assert error_of(p).startswith(f"{p}:4: compression.sparsity: 124.0 must be a fraction between 0 and 1 (0.5), or 'n:m' in quotes")
    p = write_recipe(tmp_path, "b", BASE + "compression: {sparsity: '5:4'}\n")
    assert error_of(p) == f"{p}:4: compression.sparsity: '5:4' is not n:m with 1 <= n <= m (e.g. '2:4')"
    p = write_recipe(tmp_path, "l", BASE + "compression: {linear8: true, sparsity: 0.5}\n")
    assert error_of(p) == f"{p}:4: compression: sparsity goes alone or with nbits (joint sparse + palettized), not with linear8"
    p = write_recipe(tmp_path, "d", BASE + "compression: {sparsity: 0.5, lut_dtype: int8}\n")
    assert error_of(p) == f"{p}:4: compression: lut_dtype goes with nbits (it is the type of the palette entries)"


W8A8 = "compression: {linear8: true, activations: int8, components: [unet]}\n"


def test_int8_activations_refusals_name_the_key_and_the_fix(tmp_path):
    p = write_recipe(tmp_path, "a", BASE + "compression: {nbits: 8, activations: int8}\n")
    assert error_of(p) == f"{p}:4: compression: activations: int8 goes with linear8: true (W8A8: 8-bit weights and activations)"
    p = write_recipe(tmp_path, "c", BASE + "compression: {linear8: true, activations: int8}\n")  # default components
    assert error_of(p) == (
        f"{p}:4: compression: activations: int8 quantizes the unet's activations only (as Apple's converter); "
        "set components: [unet] (other components: a second recipe with linear8 alone)"
    )
    p = write_recipe(tmp_path, "t", BASE + "target: macOS13\n" + W8A8)
    assert error_of(p) == f"{p}:5: compression: activations: int8 needs target macOS14 or iOS17 or later (Core ML's quantize ops); got target: macOS13"
    p = write_recipe(tmp_path, "r", "model: {version: synthetic:tiny-sd}\nresolution: [{height: 64, width: 64}, {height: 64, width: 96}]\ntarget: macOS15\n" + W8A8)
    assert error_of(p) == f"{p}:4: compression: activations: int8 is not built for several resolutions (one calibration per shape): build one recipe per resolution"
    p = write_recipe(tmp_path, "n", BASE + "controlnet: [synthetic:tiny-controlnet]\n" + W8A8)
    assert "controlnet with compression.activations: int8 is not built" in error_of(p)
    p = write_recipe(tmp_path, "m", BASE + W8A8 + "multilingual_projection: proj.pt\n")
    assert error_of(p) == f"{p}:5: multilingual_projection: with compression.activations: int8 is not built (calibration runs the CLIP text encoder); remove one of them"
    p = write_recipe(tmp_path, "k", BASE + "compression: {linear8: true, calibration: {steps: 2}}\n")
    assert error_of(p) == f"{p}:4: compression: calibration goes with activations: int8 (it is what the activations are calibrated on)"


def test_int8_activations_calibrate_on_the_default_prompts_unless_given(tmp_path):
    p = write_recipe(tmp_path, "w", BASE + W8A8)
    recipe = load_recipe(p)
    check_buildable(recipe, p)
    settings = recipe.compression.calibration_settings
    assert len(settings["prompts"]) >= 4 and settings["steps"] >= 10 and settings["seed"] == 0
    p = write_recipe(tmp_path, "g", BASE + "compression: {linear8: true, activations: int8, components: [unet], calibration: {prompts: [a fox], steps: 3}}\n")
    assert load_recipe(p).compression.calibration_settings == {"prompts": ["a fox"], "steps": 3, "seed": 0, "guidance_scale": 7.5}
    assert load_recipe(write_recipe(tmp_path, "l", BASE + "compression: {linear8: true}\n")).compression.calibration_settings is None


def test_deep_merge_child_wins(tmp_path):
    write_recipe(tmp_path, "base", BASE + "verify: {samples: 3, seed: 1}\ncompression: {nbits: 6}\n")
    p = write_recipe(tmp_path, "child", "extends: base.yaml\nverify: {seed: 7}\n")
    r = load_recipe(p)
    assert (r.verify.samples, r.verify.seed, r.compression.nbits) == (3, 7, 6)
    assert r.name == "child"


def test_features_once_refused_are_buildable(tmp_path):
    # The safety checker and int8 activations, once refused by check_buildable, are built now.
    for name, body in (("ok", "components: [unet, safety_checker]\n"), ("w8a8", W8A8)):
        ok = write_recipe(tmp_path, name, BASE + body)
        check_buildable(load_recipe(ok), ok)


def test_schema_lists_keys():
    schema = recipe_schema()
    assert {"model", "attention", "compression", "chunk", "bundle", "verify", "matrix", "extends"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_matrix_expands_to_named_variants(tmp_path):
    p = write_recipe(tmp_path, "m", BASE + "compression: {nbits: 6}\nmatrix:\n  compression.nbits: [4, 6, 8]\n")
    variants = expand_matrix(p)
    assert [v[0] for v in variants] == ["m-nbits-4", "m-nbits-6", "m-nbits-8"]
    built = load_recipe(p, variants[0][1])
    assert built.compression.nbits == 4 and built.name == "m-nbits-4" and built.matrix is None


def test_cli_recipe_error_is_one_line_exit_2_and_writes_nothing(tmp_path):
    p = write_recipe(tmp_path, "r", BASE + "attention: FAST\n")
    art = tmp_path / "art"
    done = run_cli("run", str(p), "--artifacts", str(art))
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {p}:4: attention: Input should be 'ORIGINAL', 'SPLIT_EINSUM' or 'SPLIT_EINSUM_V2' (got 'FAST')"
    assert "Traceback" not in done.stderr + done.stdout
    assert not art.exists()


def test_cli_int8_activations_of_sdxl_are_one_line_exit_2(tmp_path):
    p = write_recipe(tmp_path, "r", "model: {version: synthetic:tiny-sdxl}\n" + W8A8)
    done = run_cli("run", str(p), "--artifacts", str(tmp_path / "art"))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: compression.activations: int8: model.version is an SDXL model; W8A8 is built for SD 1.x/2.x unets "
        "only (as Apple's converter): remove activations for linear 8-bit weights"
    )
    assert not (tmp_path / "art" / "cache").exists()


def test_cli_refiner_off_the_hub_offline_is_one_line(tmp_path):
    p = write_recipe(tmp_path, "r", "model: {version: synthetic:tiny-sdxl, refiner: stabilityai/stable-diffusion-xl-refiner-1.0}\n")
    done = run_cli("run", str(p), "--artifacts", str(tmp_path / "art"))
    assert done.returncode != 0 and "model.refiner: cannot reach the Hugging Face Hub" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_cli_schema_is_json():
    done = run_cli("schema")
    assert done.returncode == 0
    assert json.loads(done.stdout)["title"] == "Recipe"


HUB_RECIPES = ["sd14", "sd15", "sd21-base-6bit", "sdxl", "sdxl-6bit"]


@pytest.mark.parametrize("name", HUB_RECIPES)
def test_hub_recipes_plan_up_to_download_without_network(name, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [sys.executable, "-m", "sdbuild.cli", "plan", str(REPO / "recipes" / f"{name}.yaml"), "--json", "--artifacts", str(tmp_path / "art")],
        capture_output=True, text=True, env=env,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert rows[0]["stage"] == "download" and rows[0]["status"] == "needs network"
    assert "not in the local cache" in rows[0]["detail"]
    assert not (tmp_path / "art").exists()


def test_real_recipes_say_what_the_published_tables_say():
    sd21 = load_recipe(REPO / "recipes" / "sd21-base-6bit.yaml")
    assert (sd21.attention, sd21.compute_unit, sd21.compression.nbits, sd21.chunk.unet) == ("SPLIT_EINSUM_V2", "CPU_AND_NE", 6, 2)
    sdxl = load_recipe(REPO / "recipes" / "sdxl-6bit.yaml")
    assert (sdxl.attention, sdxl.compute_unit, sdxl.compression.nbits, sdxl.resolution.height) == ("ORIGINAL", "CPU_AND_GPU", 6, 1024)


def test_analysis_inputs_default_and_bad_values_are_one_line_errors(tmp_path):
    mixed = "compression: {mixed_bit: {recipe: recipe_4.50_bit_mixedpalette%s}}\n"
    assert load_recipe(write_recipe(tmp_path, "d", BASE + mixed % "")).analysis_settings == {"samples": 1, "batch": 1, "latent": 16}
    assert load_recipe(write_recipe(tmp_path, "f", BASE)).analysis_settings == {"samples": 1, "batch": 1, "latent": 16}
    set_ = load_recipe(write_recipe(tmp_path, "s", BASE + mixed % ", analysis: {samples: 2, batch: 2, latent: 64}"))
    assert set_.analysis_settings == {"samples": 2, "batch": 2, "latent": 64}
    p = write_recipe(tmp_path, "r", BASE + mixed % ", analysis: {latent: 12}")
    assert error_of(p) == f"{p}:4: compression.mixed_bit.analysis.latent: Input should be a multiple of 8 (got 12)"
    p = write_recipe(tmp_path, "r", BASE + mixed % ", analysis: {batch: 3}")
    assert error_of(p) == f"{p}:4: compression.mixed_bit.analysis.batch: Input should be 1 or 2 (got 3)"
    p = write_recipe(tmp_path, "r", BASE + mixed % ", pre_analysis: a.json, analysis: {latent: 16}")
    assert error_of(p) == (
        f"{p}:4: compression.mixed_bit: analysis goes with pre_analysis: auto (it says what the pre-analysis built here measures on)"
    )
