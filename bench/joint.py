"""Benchmark: which compression to ship, unet by unet: bytes, PSNR and compression time per variant.

    .venv/bin/python bench/joint.py --model tiny          # the synthetic tiny unet, a minute or two
    .venv/bin/python bench/joint.py --model sd15          # full-size SD 1.5 unet, random weights: long

Variants: float16; 8/6/4-bit palettes per tensor; 4-bit palettes per group of
16 and 32 output channels; 4-bit with int8 palette entries; 50% sparse; 50%
sparse + 4-bit (joint); linear 8-bit; W8A8 (linear 8-bit weights and int8
activations, ``compression.activations``). Every variant compresses the same
float16 package, converted for iOS18 (grouped and joint forms need it).

W8A8 is calibrated here on random inputs, not on prompts: the bench has the
unet alone, no text encoder. Its ranges come from the reference executor
(fp16, a ``RangeObserver``) running the float16 package on 4 inputs drawn as
the measured one is (standard normal latents and encoder states, random
timesteps) with other seeds; its time counts that calibration
(``calibrate_s``) apart from the compression. A build calibrates on prompts
through the float16 pipeline instead (the ``calibrate`` stage).

PSNR is of the unet's output for one seeded input, run by the reference
executor (fp32 mode, the fastest) on each compressed package, against the same
run of the float16 package: what compression alone costs. With random weights
these figures measure the compressor, not image quality (see the README).
Writes ``bench/results/joint-<model>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sdbuild.compress import linear8_package, palettize_package  # noqa: E402
from sdbuild.compress.activations import calibrated_names, w8a8_package  # noqa: E402
from sdbuild.compress import package as pkg  # noqa: E402

VARIANTS = {
    "8-bit": dict(nbits=8),
    "6-bit": dict(nbits=6),
    "4-bit": dict(nbits=4),
    "4-bit g16": dict(nbits=4, group_size=16),
    "4-bit g32": dict(nbits=4, group_size=32),
    "4-bit int8 LUT": dict(nbits=4, lut_dtype="int8"),
    "50% sparse": dict(nbits=None, sparsity=0.5),
    "50% sparse + 4-bit": dict(nbits=4, sparsity=0.5),
    "linear 8-bit": "linear8",
    "W8A8": "w8a8",
}
CALIBRATION_SEEDS = (2, 3, 4, 5)  # the W8A8 calibration's inputs; PSNR is measured on seed 1's
ORDER = ["float16", *VARIANTS]


def tiny_package(cache: Path) -> tuple[Path, Callable[[int], dict]]:
    from sdbuild.models import sample_inputs
    from sdbuild.synthetic import make_synthetic
    from tests.compress.conftest import convert, tiny_unet

    path = cache / "tiny-unet-iOS18.mlpackage"
    checkpoint = cache / "tiny-sd"
    if not checkpoint.exists():
        make_synthetic("synthetic:tiny-sd", checkpoint)
    component = tiny_unet(checkpoint)
    if not (path / "Manifest.json").is_file():
        convert(component, path, "iOS18")
    return path, lambda seed: sample_inputs(component.inputs, seed)


def sd15_package(cache: Path) -> tuple[Path, Callable[[int], dict]]:
    from bench.palettize import sd15_unet_package

    def draw(seed: int) -> dict:
        rng = np.random.default_rng(seed)
        inputs = {
            "sample": rng.standard_normal((2, 4, 64, 64)).astype(np.float32),
            "timestep": np.array([500.0, 500.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 768, 1, 77)).astype(np.float32),
        }
        if seed != 1:  # calibration inputs: timesteps over the whole schedule (seed 1's stay those measured before)
            inputs["timestep"] = np.full(2, rng.integers(0, 1000), np.float32)
        return inputs

    return sd15_unet_package(cache, "iOS18"), draw


def calibrate(src: Path, draw) -> tuple[dict, float]:
    """Activation ranges of the float16 package over ``CALIBRATION_SEEDS``' inputs, and the seconds it took."""
    from sdbuild.mil.executor import RangeObserver, load_program

    started = time.perf_counter()
    program = load_program(src)
    observer = RangeObserver(calibrated_names(program.function))
    for seed in CALIBRATION_SEEDS:
        program.run(draw(seed), precision="fp16", observer=observer)
    return observer.ranges, time.perf_counter() - started


def run_unet(path: Path, inputs: dict) -> np.ndarray:
    from sdbuild.mil.executor import load_program

    out = load_program(path).run(inputs, precision="fp32")
    return next(iter(out.values()))


def main() -> None:
    from sdbuild.metrics import psnr

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/sdbuild-bench"))
    parser.add_argument("--only", action="append", help="run only these variants (repeatable)")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    src, draw = (tiny_package if args.model == "tiny" else sd15_package)(args.cache)
    inputs = draw(1)
    reference = run_unet(src, inputs)
    rows = [{"variant": "float16", "weight_bytes": pkg.weight_file(src).stat().st_size, "psnr_db": None, "seconds": 0.0}]
    for name, kw in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        dst = args.cache / f"{args.model}-{name.replace(' ', '_').replace('%', 'pc')}.mlpackage"
        print(f"{name} ...", flush=True)
        extra = {}
        if kw == "w8a8":
            ranges, seconds = calibrate(src, draw)
            stats = w8a8_package(src, dst, ranges)
            extra = {"calibrate_s": round(seconds, 2), "calibration": f"{len(CALIBRATION_SEEDS)} random inputs", "notes": stats.notes}
        else:
            stats = linear8_package(src, dst) if kw == "linear8" else palettize_package(src, dst, **kw)
        db = psnr(reference, run_unet(dst, inputs))
        rows.append({
            "variant": name, "weight_bytes": stats.bytes_after, "psnr_db": round(float(db), 2),
            "seconds": round(stats.seconds, 2), "average_bits": round(stats.average_bits, 2),
            "sparsity": round(pkg.weight_sparsity(dst), 3) if "sparsity" in (kw if isinstance(kw, dict) else {}) else 0.0,
            **extra,
        })
    out = ROOT / "bench" / "results" / f"joint-{args.model}.json"
    if args.only and out.is_file():  # a partial run keeps the rows it did not redo
        kept = [r for r in json.loads(out.read_text())["rows"] if r["variant"] not in args.only and r["variant"] != "float16"]
        rows = rows[:1] + kept + rows[1:]
        rows.sort(key=lambda r: ORDER.index(r["variant"]) if r["variant"] in ORDER else len(ORDER))
    result = {
        "model": {"tiny": "synthetic tiny SD unet (64x64)", "sd15": "SD 1.5 unet, public config, random weights, 512x512"}[args.model],
        "target": "iOS18",
        "psnr": "unet output, reference executor fp32 mode, one seeded input, vs the float16 package",
        "rows": rows,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": os.getloadavg()},
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| variant | weight bytes | vs float16 | PSNR (dB) | compress (s) |\n|---|---:|---:|---:|---:|")
    base = rows[0]["weight_bytes"]
    for r in rows:
        if "not_built" in r:
            print(f"| {r['variant']} | not built | | | |")
            continue
        db = "–" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}"
        seconds = f"{r['seconds']:.1f}" + (f" (+{r['calibrate_s']:.1f} calibration)" if "calibrate_s" in r else "")
        print(f"| {r['variant']} | {r['weight_bytes']:,} | {r['weight_bytes'] / base:.0%} | {db} | {seconds} |")
    print(f"written {out}")


if __name__ == "__main__":
    main()
