"""MBP: the pre-analysis on the tiny unet (JSON, plot, resumption) and applying its recipes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sdbuild.compress import mixed_bit_package
from sdbuild.compress import package as pkg
from sdbuild.compress.analysis import PARTIAL_FILE, PLOT_FILE
from sdbuild.compress.mixed_bit import map_layers
from sdbuild.errors import RecipeError
from tests.compress.conftest import executor_psnr


def _mid_recipe(data: dict) -> str:
    """The recipe nearest 4.5 bits (the seed's recommended neighbourhood)."""
    return min(data["recipes"], key=lambda r: abs(float(r.split("_")[1]) - 4.5))


def test_analysis_json_and_plot(analysis):
    data = json.loads(analysis.read_text())
    assert data["model_version"] == "synthetic:tiny-sd"
    baselines = data["baselines"]
    assert {"original", "linear_8bit"} <= set(baselines)
    recipes = [k for k in baselines if k.startswith("recipe_")]
    assert len(recipes) >= 5 and set(recipes) == set(data["recipes"])
    for name in recipes:
        bits = float(name.split("_")[1])
        assert name == f"recipe_{bits:.2f}_bit_mixedpalette"
        widths = data["recipes"][name]
        numel = {l["name"]: l["numel"] for l in data["layers"]}
        assert set(widths) == set(numel) and set(widths.values()) <= {1, 2, 4, 6, 8, 16}
        average = sum(widths[n] * numel[n] for n in numel) / sum(numel.values())
        assert round(average, 2) == bits
    # More bits, more signal, and nothing beats float16 weights by more than noise.
    ordered = sorted(recipes, key=lambda r: float(r.split("_")[1]))
    psnrs = [baselines[r] for r in ordered]
    assert psnrs == sorted(psnrs)
    assert max(psnrs) <= baselines["original"] + 0.5
    assert baselines["original"] > baselines["linear_8bit"] > 30
    for layer in data["layers"]:
        per = [layer["psnr"][str(b)] for b in (1, 2, 4, 6, 8)]
        assert per == sorted(per), layer["name"]
    for bits in ("1", "2", "4", "6", "8"):
        sizes = [p[0] for p in data["curves"][bits]]
        assert sizes == sorted(sizes, reverse=True) or sizes == sorted(sizes)
        assert min(sizes) == pytest.approx(100 * int(bits) / 16)
    png = analysis.parent / PLOT_FILE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not (analysis.parent / PARTIAL_FILE).exists()


def test_mixed_bit_beats_uniform_of_the_lower_width_at_equal_size(analysis):
    data = json.loads(analysis.read_text())
    beaten = 0
    for size, value in data["curves"]["mixed_bit"]:
        bits = 16 * size / 100
        lower = max((b for b in (1, 2, 4, 6, 8) if b < bits), default=None)
        if lower is None or bits > 8:
            continue
        curve = sorted(data["curves"][str(lower)])
        xs, ys = [p[0] for p in curve], [p[1] for p in curve]
        if not xs[0] <= size <= xs[-1]:
            continue
        uniform = float(np.interp(size, xs, ys))
        assert value > uniform, (size, value, lower, uniform)
        beaten += 1
    assert beaten >= 3


def test_mid_recipe_applies_at_its_width_and_scores_as_predicted(
    analysis, unet_package, analysis_inputs, reference_outputs, tmp_path
):
    data = json.loads(analysis.read_text())
    recipe = _mid_recipe(data)
    stats = mixed_bit_package(unet_package, tmp_path / "mbp.mlpackage", analysis, recipe)
    named = float(recipe.split("_")[1])
    measured = pkg.average_bits(pkg.weight_bits(tmp_path / "mbp.mlpackage"))
    assert abs(measured - named) < 0.1 and abs(stats.average_bits - named) < 0.1
    assert stats.notes == [] and stats.recipe == recipe
    assert stats.bytes_after < stats.bytes_before * (named + 1) / 16
    score = executor_psnr(tmp_path / "mbp.mlpackage", analysis_inputs, reference_outputs)
    print(f"{recipe}: predicted {data['baselines'][recipe]:.2f} dB, executor {score:.2f} dB")
    assert abs(score - data["baselines"][recipe]) < 2.0


def test_unknown_recipe_lists_the_available_ones(analysis, unet_package, tmp_path):
    with pytest.raises(RecipeError, match=r"unknown recipe 'recipe_9.99_bit_mixedpalette'.*available: recipe_"):
        mixed_bit_package(unet_package, tmp_path / "x.mlpackage", analysis, "recipe_9.99_bit_mixedpalette")


def test_layers_map_to_consts_by_value_and_by_position(analysis, unet_package):
    data = json.loads(analysis.read_text())
    prog = pkg.load_pymil(unet_package)
    by_value = map_layers(data["layers"], prog)
    assert len(set(by_value.values())) == len(data["layers"])
    consts = {op.name: op.outputs[0].val for op in pkg.iter_ops(prog) if op.op_type == "const"}
    same_values = [pkg.weight_fingerprint(consts[by_value[l["name"]]]) == l["fingerprint"] for l in data["layers"]]
    assert all(consts[by_value[l["name"]]].size == l["numel"] for l in data["layers"])
    # Most by value; the rest by position: coremltools folds the attention scale into the
    # query weights, and names those consts without the module path ("q_9_weight_0_to_fp16").
    assert sum(same_values) >= 0.9 * len(same_values)
    blind = [dict(layer, fingerprint="x") for layer in data["layers"]]
    assert map_layers(blind, prog) == by_value


RUN_ANALYSIS = """
import json, sys, time
from pathlib import Path
from tests.compress.conftest import tiny_unet
from sdbuild.compress import pre_analyze
from sdbuild.models import sample_inputs
ckpt, out = Path(sys.argv[1]), Path(sys.argv[2])
inputs = [sample_inputs(tiny_unet(ckpt).inputs, s) for s in (1, 2)]
pre_analyze(lambda: tiny_unet(ckpt).module, out, inputs=inputs, model_version="synthetic:tiny-sd",
            progress=lambda done, total, what: time.sleep(0.15), threads=1, **json.loads(sys.argv[3]))
"""
# What resumption keeps does not depend on how much each layer measures: two widths, two curve points and
# two recipes (the defaults: five, sixteen and twelve) make both runs a third of a whole analysis's work.
SMALL = {"nbits": [4, 8], "curve_points": 2, "recipes": 2}


def _saved_layers(partial: Path) -> dict[str, dict]:
    layers = {}
    if partial.is_file():
        for line in partial.read_text().splitlines()[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("key", "").startswith("layer/"):
                layers[record["key"][len("layer/"):]] = record
    return layers


def test_killed_analysis_resumes_without_redoing_done_layers(tiny_sd_checkpoint, analysis_inputs, tmp_path):
    from sdbuild.compress import pre_analyze
    from tests.compress.conftest import tiny_unet

    out = tmp_path / "analysis"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_ANALYSIS, str(tiny_sd_checkpoint), str(out), json.dumps(SMALL)],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    partial = out / PARTIAL_FILE
    deadline = time.monotonic() + 120
    try:
        while len(_saved_layers(partial)) < 4:
            assert proc.poll() is None, "the analysis ended before it could be killed"
            assert time.monotonic() < deadline, "no layer saved in time"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = _saved_layers(partial)
    assert not (out / "analysis.json").exists()

    result = pre_analyze(
        lambda: tiny_unet(tiny_sd_checkpoint).module, out, inputs=analysis_inputs, model_version="synthetic:tiny-sd",
        progress=lambda done, total, what: None, threads=1, **SMALL,
    )
    data = json.loads(result.read_text())
    first_run = {r["run"] for r in done_before.values()}
    assert len(first_run) == 1 and len(data["runs"]) == 2
    by_run = {l["name"]: l["run"] for l in data["layers"]}
    resumed = {name for name, run in by_run.items() if run in first_run}
    assert resumed == set(done_before)  # every saved layer kept, none measured again
    assert len(resumed) < len(by_run)  # and the rest measured by the second run
    for layer in data["layers"]:
        if layer["name"] in done_before:
            assert layer["psnr"] == done_before[layer["name"]]["value"]
