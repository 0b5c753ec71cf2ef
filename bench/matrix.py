"""Benchmark: a three-variant matrix in one run against three separate cold builds.

    .venv/bin/python bench/matrix.py

The matrix is recipes/tiny.yaml with ``compression.nbits: [4, 6, 8]``. One
run builds all three variants into one fresh artifacts folder (download,
trace and convert once, compress/verify/sample per variant); the other side
builds each variant alone into its own fresh folder, as three machines
without a shared cache would. Both run here, one after the other, and write
``bench/results/matrix.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sdbuild(*args) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sdbuild.cli", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"sdbuild {' '.join(map(str, args))} failed: {done.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - started


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        recipe = tmp / "tiny-matrix.yaml"
        # A 4-bit random-weight unet scores below the tiny recipe's 35 dB gate: lower it for all three.
        recipe.write_text(
            f"extends: {ROOT / 'recipes' / 'tiny.yaml'}\nname: tiny-matrix\nverify: {{psnr_min_db: 20}}\n"
            "matrix:\n  compression.nbits: [4, 6, 8]\n"
        )
        load_before = os.getloadavg()
        matrix_s = sdbuild("run", recipe, "--artifacts", tmp / "matrix")
        separate = {}
        for variant in ("tiny-matrix-nbits-4", "tiny-matrix-nbits-6", "tiny-matrix-nbits-8"):
            separate[variant] = sdbuild("run", recipe, "--variant", variant, "--artifacts", tmp / variant)
        built = {}
        for name in separate:
            report = json.loads((tmp / "matrix" / "builds" / name / "build.json").read_text())
            for row in report["stages"]:
                built[row["stage"]] = built.get(row["stage"], 0) + (row["cache"] == "miss")
    result = {
        "matrix_wall_s": round(matrix_s, 1),
        "separate_wall_s": {k: round(v, 1) for k, v in separate.items()},
        "separate_total_s": round(sum(separate.values()), 1),
        "speedup": round(sum(separate.values()) / matrix_s, 2),
        "stages_built_in_matrix": built,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    out = ROOT / "bench" / "results" / "matrix.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"matrix (3 variants, one run): {result['matrix_wall_s']} s")
    print(f"three separate cold builds:   {result['separate_total_s']} s  ({result['speedup']}x)")
    print(f"stages built in the matrix run: {built}")


if __name__ == "__main__":
    main()
