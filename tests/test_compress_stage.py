"""The compress stage in builds: linear 8-bit, mixed-bit from a pre-analysis, and the PSNR gate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import run_cli, run_cli_here, write_recipe

BASE = """
model: {version: synthetic:tiny-sd}
components: [unet]
resolution: {height: 64, width: 64}
verify: {samples: 1}
"""
UNVERIFIED = BASE.replace("verify: {samples: 1}\n", "")  # for recipes that set their own verify gate (one key each)


@pytest.fixture(scope="module")
def art(warm_artifacts, tmp_path_factory):
    """Artifacts holding the tiny float16 unet (shared with other modules' builds)."""
    art = warm_artifacts
    recipe = write_recipe(tmp_path_factory.mktemp("r"), "cs16", "name: cs16\n" + BASE)
    done = run_cli_here("run", recipe, "--artifacts", art)
    assert done.returncode == 0, done.stderr[-2000:]
    return art


def components(art, name):
    return json.loads((art / "builds" / name / "build.json").read_text())["components"]


def stage_cache(art, name):
    return {r["stage"]: r["cache"] for r in json.loads((art / "builds" / name / "build.json").read_text())["stages"]}


def test_linear8_build_reports_size_and_both_psnrs(art, tmp_path):
    recipe = write_recipe(tmp_path, "cs8", "name: cs8\n" + BASE + "compression: {linear8: true, components: [unet]}\n")
    done = run_cli_here("run", recipe, "--artifacts", art)
    assert done.returncode == 0, done.stderr[-2000:]
    unet = components(art, "cs8")["unet"]
    assert unet["compressed"] and unet["package_bytes"] < 0.7 * unet["float16_bytes"]
    assert unet["psnr"]["psnr_db"] > 40 and unet["psnr"]["vs_float16_psnr_db"] > 40
    assert stage_cache(art, "cs8")["convert"] == "hit"


def test_analyze_then_mixed_bit_from_the_analysis_file(art, tmp_path):
    recipe = write_recipe(tmp_path, "mbp", "name: mbp\n" + BASE)
    done = run_cli_here("analyze", recipe, "--artifacts", art, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    facts = json.loads(done.stdout)
    assert Path(facts["plot"]).is_file()
    shutil.copyfile(facts["analysis"], tmp_path / "analysis.json")
    names = [n for n in facts["baselines"] if n.startswith("recipe_") and 5.0 <= float(n.split("_")[1]) <= 9.0]
    assert names, facts["baselines"]
    name = names[0]
    mixed = write_recipe(
        tmp_path, "mbp",
        "name: mbp\n" + UNVERIFIED + f"compression: {{mixed_bit: {{recipe: {name}, pre_analysis: analysis.json}}}}\nverify: {{samples: 1, psnr_min_db: 20}}\n",
    )
    done = run_cli_here("run", mixed, "--artifacts", art)
    assert done.returncode == 0, done.stderr[-2000:]
    unet = components(art, "mbp")["unet"]
    assert unet["compressed"] and unet["package_bytes"] < unet["float16_bytes"]
    # The prediction and the executor agree within 2 dB (float16 activations cost a little more).
    assert abs(unet["psnr"]["psnr_db"] - facts["baselines"][name]) < 2.5

    # Editing the analysis file must invalidate the compress entry, never read as cached.
    doc = json.loads((tmp_path / "analysis.json").read_text())
    doc["model_version"] += " (edited)"
    (tmp_path / "analysis.json").write_text(json.dumps(doc, indent=1))
    plan = json.loads(run_cli("plan", mixed, "--artifacts", art, "--json").stdout)
    status = {r["stage"]: r["status"] for r in plan if r["component"] == "unet"}
    assert status["convert"] == "cached" and status["compress"] == "to build"


def test_analyze_builds_the_analysis_alone_and_shares_it_across_resolutions(art, tmp_path):
    """Another resolution: the same analysis (its inputs are its own), and no trace or convert built for it."""
    first = json.loads(run_cli_here("analyze", write_recipe(tmp_path, "a1", "name: a1\n" + BASE), "--artifacts", art, "--json").stdout)
    wide = write_recipe(tmp_path, "a2", "name: a2\n" + BASE.replace("{height: 64, width: 64}", "{height: 64, width: 96}"))
    done = run_cli_here("analyze", wide, "--artifacts", art, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["analysis"] == first["analysis"]
    plan = json.loads(run_cli("plan", wide, "--artifacts", art, "--json").stdout)
    status = {r["stage"]: r["status"] for r in plan if r["component"] == "unet"}
    assert status["trace"] == "to build" and status["convert"] == "to build"


def test_unknown_mixed_bit_recipe_lists_the_available_ones(art, tmp_path):
    recipe = write_recipe(tmp_path, "bad", "name: bad\n" + BASE + "compression: {mixed_bit: {recipe: recipe_9.99_bit_mixedpalette}}\n")
    done = run_cli_here("run", recipe, "--artifacts", art)
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: compression.mixed_bit.recipe: unknown recipe 'recipe_9.99_bit_mixedpalette'")
    assert "recipe_" in line.split("available")[1]


def test_psnr_below_minimum_fails_and_keeps_the_previous_bundle(art, tmp_path):
    recipe = write_recipe(tmp_path, "gate", "name: gate\n" + UNVERIFIED + "compression: {nbits: 2, components: [unet]}\nverify: {samples: 1, psnr_min_db: 5}\n")
    assert run_cli_here("run", recipe, "--artifacts", art).returncode == 0
    before = (art / "builds" / "gate" / "build.json").read_text()
    strict = write_recipe(tmp_path, "gate", "name: gate\n" + UNVERIFIED + "compression: {nbits: 2, components: [unet]}\nverify: {samples: 1, psnr_min_db: 60}\n")
    done = run_cli_here("run", strict, "--artifacts", art)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: verify unet: PSNR ")
    assert "is below verify.psnr_min_db 60 dB; the bundle was not written" in done.stderr
    assert (art / "builds" / "gate" / "build.json").read_text() == before
