"""W8A8 (``compression.activations: int8``) on the tiny model: built through the executor
(calibrate → compress → verify) on the shared warm cache beside a linear 8-bit build of the
same model; what the package holds, the calibration's cache, generation and the comparison page."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from builds import build_once
from helpers import write_recipe
from sdbuild.compress import package as pkg
from sdbuild.compress.activations import concat_groups, read_ranges

PROMPTS = ["a red fox in the snow", "a bowl of ramen on a wooden table"]
# Random-weight tiny unets lose about 30 dB to int8 activations on verify's random inputs
# (33 dB measured, against 54 dB for linear 8-bit weights alone): the floor is set below.
BASE = "model: {version: 'synthetic:tiny-sd'}\nresolution: {height: 64, width: 64}\nverify: {samples: 1, psnr_min_db: 20}\n"
CALIBRATION = f"calibration: {{prompts: {json.dumps(PROMPTS)}, steps: 3, guidance_scale: 2}}"
RECIPES = {
    "w8a8": BASE + f"compression: {{linear8: true, activations: int8, components: [unet], {CALIBRATION}}}\n",
    "l8": BASE + "compression: {linear8: true, components: [unet]}\n",
}


@pytest.fixture(scope="module")
def built(artifacts):
    return {name: build_once(artifacts, f"act-{name}", recipe) for name, recipe in RECIPES.items()}


def report(built, name) -> dict:
    return json.loads((built[name].build_dir / "build.json").read_text())


def unet_package(built, name):
    return built[name].build_dir / "Resources" / "Unet.mlpackage"


def entry(built, stage_name: str, name="w8a8"):
    """The cache entry of the build's ``stage_name`` stage of the unet."""
    stage = next(s for s in report(built, name)["stages"] if s["stage"] == stage_name and s["component"] == "unet")
    return built[name].build_dir.parent.parent / "cache" / stage_name / stage["key"]


def test_w8a8_builds_and_verifies_through_the_executor(built):
    w8a8, l8 = (report(built, n)["components"]["unet"] for n in ("w8a8", "l8"))
    assert w8a8["compressed"] and 20 <= w8a8["psnr"]["psnr_db"] < l8["psnr"]["psnr_db"] < w8a8["psnr"]["float16_psnr_db"]
    # The same 8-bit weight file; the quantize/dequantize pairs add ops (and their scalar scales) to the program only.
    weights = [pkg.weight_file(unet_package(built, n)).stat().st_size for n in ("w8a8", "l8")]
    assert weights[0] == weights[1] and l8["package_bytes"] < w8a8["package_bytes"] < 0.75 * w8a8["float16_bytes"]
    stages = {(s["stage"], s["component"]) for s in report(built, "w8a8")["stages"]}
    assert ("calibrate", "unet") in stages and ("calibrate", "unet") not in {(s["stage"], s["component"]) for s in report(built, "l8")["stages"]}


def test_package_holds_int8_activations_at_the_calibrated_scales_and_8_bit_weights(built):
    prog = pkg.load_pymil(unet_package(built, "w8a8"))
    ops = list(pkg.iter_ops(prog))
    counts = collections.Counter(op.op_type for op in ops)
    assert counts["quantize"] == counts["dequantize"] > 0 and counts["constexpr_affine_dequantize"] > 0
    from coremltools.converters.mil.mil import types

    assert all(op.outputs[0].dtype == types.int8 for op in ops if op.op_type == "quantize")
    # Every convolution and linear layer reads a dequantized int8 activation.
    quantized = [op for op in ops if op.op_type in ("conv", "linear")]
    assert quantized and all(op.x.op is not None and op.x.op.op_type == "dequantize" for op in quantized)
    assert set(b for b, _ in pkg.weight_bits(prog).values()) == {8}
    meta = pkg.load_mlmodel(unet_package(built, "w8a8")).get_spec().description.metadata.userDefined
    assert meta["com.sdbuild.compression"] == "linear 8-bit weights, int8 activations (W8A8)"
    # Symmetric int8: one scale per tensor, max |value| / 127 over what the calibration saw.
    ranges = read_ranges(entry(built, "calibrate"))
    # Tensors around a concat share one range (coremltools' rule): checked apart from the rest.
    shared = {n for group in concat_groups(pkg.load_pymil(entry(built, "convert") / "model.mlpackage")) for n in group}
    checked = 0
    for op in (op for op in ops if op.op_type == "quantize"):
        name = op.input.name
        if name in ranges and name not in shared:
            expected = np.float16(max(abs(v) for v in ranges[name]) / 127)
            assert np.isclose(np.float16(op.scale.val), expected, rtol=2e-3), name
            checked += 1
    assert checked > counts["quantize"] // 2


def test_calibration_is_a_cached_stage_that_follows_the_prompts(built, artifacts, tmp_path):
    from sdbuild.executor import prepare, run_build

    again = prepare(write_recipe(tmp_path, "act-w8a8", "name: act-w8a8\n" + RECIPES["w8a8"]), artifacts)
    run_build(again, until="calibrate")
    calibrate = next(n for n in again.nodes if n.stage.name == "calibrate")
    assert calibrate.status == "cached" and calibrate.entry.path == entry(built, "calibrate")
    other = RECIPES["w8a8"].replace(json.dumps(PROMPTS), '["a lighthouse at night"]')
    changed = prepare(write_recipe(tmp_path, "act-other", "name: act-other\n" + other), artifacts)
    run_build(changed, until="calibrate")
    recalibrated = next(n for n in changed.nodes if n.stage.name == "calibrate")
    assert recalibrated.key != calibrate.key  # built here (or by an earlier run of a kept SDBUILD_TEST_ARTIFACTS)
    first, second = read_ranges(calibrate.entry.path), read_ranges(recalibrated.entry.path)
    assert set(first) == set(second) and first != second
    facts = json.loads((recalibrated.entry.path / "activation_ranges.json").read_text())
    # One prompt, 3 steps: one unet call (both guidance halves in its batch of two) per step.
    assert facts["unet_calls"] == 3 and facts["calibration"]["prompts"] == ["a lighthouse at night"]


def test_generate_runs_a_w8a8_bundle(built):
    from sdbuild.generate import Pipeline
    from sdbuild.metrics import psnr

    images = {
        name: Pipeline.from_bundle(built[name].build_dir, backend="executor").generate(PROMPTS[0], seed=3, steps=3, guidance_scale=2.0).images
        for name in ("w8a8", "l8")
    }
    assert images["w8a8"].shape == images["l8"].shape == (1, 64, 64, 3)
    assert np.isfinite(images["w8a8"]).all() and images["w8a8"].std() > 0.01
    assert psnr(images["l8"], images["w8a8"]) > 15  # the same picture, int8 activations or not


def test_compare_page_lists_w8a8_beside_linear_8_bit(built, tmp_path):
    from sdbuild.compare import write_compare
    from tests.test_report import _Tables

    page = write_compare([built["l8"].build_dir, built["w8a8"].build_dir], tmp_path / "compare.html")
    tables = _Tables()
    tables.feed(page.read_text())
    rows = {r[0]: r[1:] for r in tables.tables["variants"]}
    assert rows["compression"] == ["linear 8-bit", "linear 8-bit weights, int8 activations (W8A8)"]
    assert rows["unet PSNR (dB)"] == [f"{report(built, n)['components']['unet']['psnr']['psnr_db']:.1f}" for n in ("l8", "w8a8")]
    assert rows["unet bytes"] == [str(report(built, n)["components"]["unet"]["package_bytes"]) for n in ("l8", "w8a8")]
