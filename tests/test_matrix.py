"""Matrix recipes: variants share every common stage, each distinct key built once."""

from __future__ import annotations

import json

from helpers import run_cli, run_cli_here, write_recipe

MATRIX = """
name: mx
model: {version: synthetic:tiny-sd}
components: [unet]
resolution: {height: 64, width: 64}
compression: {nbits: 6, components: [unet]}
verify: {samples: 1, psnr_min_db: 10}  # 2-bit random weights score about 16 dB
matrix:
  compression.nbits: [2, 4, 8]
"""


def test_matrix_json_lists_variants_with_commands_and_runners(tmp_path):
    recipe = write_recipe(tmp_path, "mx", MATRIX)
    done = run_cli("matrix", recipe, "--json")
    assert done.returncode == 0, done.stderr
    variants = json.loads(done.stdout)
    assert [v["name"] for v in variants] == ["mx-nbits-2", "mx-nbits-4", "mx-nbits-8"]
    assert variants[1]["overrides"]["compression.nbits"] == 4
    assert variants[1]["command"] == f"sdbuild run {recipe} --variant mx-nbits-4"
    assert "compile" in variants[0]["runners"]["macos"] and "convert" in variants[0]["runners"]["linux"]


def test_unknown_variant_is_one_line(tmp_path):
    recipe = write_recipe(tmp_path, "mx", MATRIX)
    done = run_cli("run", recipe, "--variant", "mx-nbits-5", "--artifacts", tmp_path / "art")
    assert done.returncode == 2  # the user's input
    assert done.stderr.strip() == f"error: --variant: {recipe} has no variant 'mx-nbits-5'; it has mx-nbits-2, mx-nbits-4, mx-nbits-8"


def test_three_value_matrix_builds_trace_and_convert_once_and_compress_three_times(tmp_path):
    recipe = write_recipe(tmp_path, "mx", MATRIX)
    art = tmp_path / "art"
    done = run_cli_here("run", recipe, "--artifacts", art)
    assert done.returncode == 0, done.stderr[-2000:]
    misses: dict[str, int] = {}
    keys: dict[str, set] = {}
    for name in ("mx-nbits-2", "mx-nbits-4", "mx-nbits-8"):
        report = json.loads((art / "builds" / name / "build.json").read_text())
        assert report["recipe"]["compression"]["nbits"] == int(name[-1])
        for row in report["stages"]:
            misses[row["stage"]] = misses.get(row["stage"], 0) + (row["cache"] == "miss")
            keys.setdefault(row["stage"], set()).add(row["key"])
    assert misses == {"download": 1, "trace": 1, "convert": 1, "compress": 3, "verify": 3}
    assert {stage: len(k) for stage, k in keys.items()} == misses
    # The matrix run ends with one comparison page of its variants.
    page = art / "compare" / "mx.html"
    assert f"comparison: {page}" in done.stdout
    assert all(f"<th>mx-nbits-{b}</th>" in page.read_text() for b in (2, 4, 8))
