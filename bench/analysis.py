"""Benchmark: the mixed-bit pre-analysis of a full-size unet, the plain forward against the replay.

    .venv/bin/python bench/analysis.py --model sd15 --sample 8     # time 8 layers' measurements both ways
    .venv/bin/python bench/analysis.py --model tiny --sample 8     # to try it

A measurement (one layer palettized at one width, the unet run on the
analysis's two seeded inputs, PSNR against float32) is what the analysis
repeats about 1,500 times on SD 1.5 (282 layers x 5 widths, then the curves
and recipes). This times the baseline forward and, for ``--sample`` layers
spread evenly over the execution order, one measurement each with the plain
forward (every call runs) and with the replay (the calls that end before the
layer is used are replayed from the baseline forward), checks both give the
same PSNR, and projects the whole analysis from the mean per-measurement
times: isolated layers at the sampled mean, curves and recipes at the plain
time (they swap early layers too, so the replay saves little there). Peak RSS
is the process's. The checkpoint is ``bench/convert.py``'s (public config,
random weights), the unet built as the analyze stage builds it.
Writes ``bench/results/analysis-<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    import torch

    from convert import checkpoint
    from sdbuild.compress import analysis
    from sdbuild.compress.kmeans import SUPPORTED_NBITS
    from sdbuild.models import BuildOptions, build_component, sample_inputs
    from sdbuild.stages.analyze import SAMPLES, SEED

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "sd15"), default="sd15")
    parser.add_argument("--sample", type=int, default=8, help="layers to time, spread over the execution order")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--cache", type=Path, default=Path("/work/bench-cache"))
    parser.add_argument("--out", type=Path, help="the JSON written (default bench/results/analysis-<model>.json)")
    args = parser.parse_args()
    load_before = os.getloadavg()

    ckpt = checkpoint(args.model, args.cache)
    size = 64 if args.model == "tiny" else 512
    options = BuildOptions(height=size, width=size)
    component = build_component("unet", ckpt, options)
    inputs = [{k: torch.from_numpy(v) for k, v in sample_inputs(component.inputs, seed=SEED + i).items()} for i in range(SAMPLES)]
    module = component.module
    del component

    built_gib = _peak_gib()
    started = time.perf_counter()
    model = analysis._Model(module, inputs, replay=True)
    setup_s = time.perf_counter() - started
    setup_gib = _peak_gib()
    layers = sorted(model.layers, key=lambda layer: layer.order)
    picks = [layers[i] for i in np.unique(np.linspace(0, len(layers) - 1, args.sample).round().astype(int))]
    rows = []
    for layer in picks:
        weight = {layer.name: model.palettized_layer(layer.name, args.bits)}
        replay, model.replay = model.replay, None
        t = time.perf_counter()
        plain_db = model.psnr_with(weight)
        plain_s = time.perf_counter() - t
        model.replay = replay
        t = time.perf_counter()
        replay_db = model.psnr_with(weight)
        replay_s = time.perf_counter() - t
        rows.append({"layer": layer.name, "order": layer.order, "plain_s": round(plain_s, 2),
                     "replay_s": round(replay_s, 2), "same_psnr": plain_db == replay_db,
                     "load": round(os.getloadavg()[0], 1), "peak_rss_gib": _peak_gib()})  # fmt: skip
        print(f"{layer.order:4d} {layer.name:60s} plain {plain_s:7.2f} s  replay {replay_s:7.2f} s  same {plain_db == replay_db}", flush=True)
    plain = float(np.mean([r["plain_s"] for r in rows]))
    fast = float(np.mean([r["replay_s"] for r in rows]))
    n_isolated = len(layers) * len(SUPPORTED_NBITS)
    n_rest = 2 + len(SUPPORTED_NBITS) * 16 + 12
    kept = sum(analysis._nbytes(out) for per in model.replay.kept for _, out in per.values())
    result = {
        "model": {"tiny": "synthetic tiny SD unet (64x64)", "sd15": "SD 1.5 unet, public config, random weights, 512x512"}[args.model],
        "layers": len(layers),
        "measurement": f"one layer at {args.bits} bits, {SAMPLES} seeded inputs (batch 2 each), PSNR vs float32",
        "setup_s": round(setup_s, 1),
        "peak_rss_gib_after": {"building the unet": built_gib, "setup (reference, baseline forwards, replay)": setup_gib},
        "replay_kept_gib": round(kept / 2**30, 2),
        "sampled": rows,
        "mean_measurement_s": {"plain": round(plain, 2), "replay": round(fast, 2)},
        "projected_analysis_min": {
            "plain": round((n_isolated + n_rest) * plain / 60, 1),
            "replay": round((n_isolated * fast + n_rest * plain) / 60, 1),
        },
        "peak_rss_gib": _peak_gib(),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "load_before": load_before, "load_after": os.getloadavg()},  # fmt: skip
    }
    out = args.out or ROOT / "bench" / "results" / f"analysis-{args.model}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("mean_measurement_s", "projected_analysis_min", "peak_rss_gib", "replay_kept_gib")}))
    print(f"written {out}")


def _peak_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


if __name__ == "__main__":
    main()
