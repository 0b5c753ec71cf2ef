"""Benchmark: the mixed-bit pre-analysis of a full-size unet: measurement times, projection, ranking.

    .venv/bin/python bench/analysis.py --model sd15 --sample 8     # 8 layers, the analysis's default inputs
    .venv/bin/python bench/analysis.py --model sd15 --sample 8 --samples 2 --batch 2 --latent 64 \
        --out bench/results/analysis-sd15-old.json                 # the inputs it measured on before
    .venv/bin/python bench/analysis.py --model sd15 --sample 8 --against bench/results/analysis-sd15-old.json
    .venv/bin/python bench/analysis.py --model tiny --sample 999 --bits 1,2,4,6,8   # every tiny layer

A measurement (one layer palettized at one width, the unet run on the
analysis's seeded inputs, PSNR against float32) is what the analysis
repeats about 1,500 times on SD 1.5 (282 layers x 5 widths, then the curves
and recipes). This times the baseline forward and, for ``--sample`` layers
spread evenly over the execution order: the k-means palettes at every
width (the analysis computes each once), then per ``--bits`` width one
measurement with the replay (the calls that end before the layer is used
are replayed from the baseline forward) and, at the first width, with the
plain forward (every call runs), checking both give the same PSNR. It
projects the whole analysis from the means: isolated layers at the replay
mean plus the palettes, curves and recipes at the plain time (they swap
early layers too, so the replay saves little there). ``--against`` a
result of other inputs: Spearman's rank correlation of the sampled layers'
PSNR (per width and over all). Peak RSS is the process's. The checkpoint
is ``bench/convert.py``'s (public config, random weights).
Writes ``bench/results/analysis-<model>.json`` (or ``--out``).
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
    from sdbuild.models import BuildOptions, build_component
    from sdbuild.recipe import AnalysisInputs
    from sdbuild.stages.analyze import analysis_inputs

    default = AnalysisInputs()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "sd15"), default="sd15")
    parser.add_argument("--sample", type=int, default=8, help="layers to time, spread over the execution order")
    parser.add_argument("--bits", default="4", help="widths measured per layer, e.g. 1,2,4,6,8")
    parser.add_argument("--samples", type=int, default=default.samples, help="seeded inputs")
    parser.add_argument("--batch", type=int, default=default.batch, help="rows per input")
    parser.add_argument("--latent", type=int, default=default.latent, help="latent height and width")
    parser.add_argument("--attention", default="ORIGINAL", help="the unet's attention implementation (recipe's attention)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--no-plain", action="store_true", help="replay only (for --against: the PSNR is the same)")
    parser.add_argument("--against", type=Path, help="a result of this bench on other inputs: rank correlation")
    parser.add_argument("--cache", type=Path, default=Path("/work/bench-cache"))
    parser.add_argument("--out", type=Path, help="the JSON written (default bench/results/analysis-<model>.json)")
    args = parser.parse_args()
    widths = [int(b) for b in args.bits.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    ckpt = checkpoint(args.model, args.cache)
    component = build_component("unet", ckpt, BuildOptions(attention=args.attention))
    inputs = [
        {k: torch.from_numpy(v) for k, v in x.items()}
        for x in analysis_inputs(component.inputs, args.samples, args.batch, args.latent)
    ]
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
        t = time.perf_counter()
        for b in SUPPORTED_NBITS:
            model.palettized_layer(layer.name, b)  # the palette, kept: what the analysis computes once
        palettes_s = time.perf_counter() - t
        row = {"layer": layer.name, "order": layer.order, "numel": layer.numel, "palettes_s": round(palettes_s, 2), "psnr": {}, "replay_s": {}}
        for b in widths:
            weight = {layer.name: model.palettized_layer(layer.name, b)}
            t = time.perf_counter()
            replay_db = model.psnr_with(weight)
            row["replay_s"][str(b)] = round(time.perf_counter() - t, 2)
            row["psnr"][str(b)] = replay_db
            if b == widths[0] and not args.no_plain:
                replay, model.replay = model.replay, None
                t = time.perf_counter()
                plain_db = model.psnr_with(weight)
                row["plain_s"] = round(time.perf_counter() - t, 2)
                model.replay = replay
                row["same_psnr"] = plain_db == replay_db
        row.update(load=round(os.getloadavg()[0], 1), peak_rss_gib=_peak_gib())
        rows.append(row)
        print(f"{layer.order:4d} {layer.name:60s} palettes {palettes_s:6.2f} s  plain {row.get('plain_s', float('nan')):7.2f} s  "
              f"replay {np.mean(list(row['replay_s'].values())):7.2f} s  same {row.get('same_psnr')}", flush=True)  # fmt: skip
    plain = float(np.mean([r["plain_s"] for r in rows if "plain_s" in r] or [np.nan]))
    fast = float(np.mean([s for r in rows for s in r["replay_s"].values()]))
    palettes = float(np.mean([r["palettes_s"] for r in rows]))
    n_isolated = len(layers) * len(SUPPORTED_NBITS)
    n_rest = 2 + len(SUPPORTED_NBITS) * 16 + 12
    kept = sum(analysis._nbytes(out) for per in model.replay.kept for _, out in per.values())
    shapes = {k: list(v.shape) for k, v in inputs[0].items()}
    result = {
        "model": {"tiny": "synthetic tiny SD unet", "sd15": "SD 1.5 unet, public config, random weights"}[args.model],
        "layers": len(layers),
        "inputs": {"samples": args.samples, "batch": args.batch, "latent": args.latent, "shapes": shapes},
        "measurement": f"one layer at {args.bits} bits, {args.samples} seeded input(s) of batch {args.batch}, "
        f"latent {args.latent}x{args.latent}, PSNR vs float32",
        "attention": args.attention,
        "torch_threads": torch.get_num_threads(),
        "setup_s": round(setup_s, 1),
        "peak_rss_gib_after": {"building the unet": built_gib, "setup (reference, baseline forwards, replay)": setup_gib},
        "replay_kept_gib": round(kept / 2**30, 2),
        "sampled": rows,
        "mean_measurement_s": {"plain": round(plain, 2), "replay": round(fast, 2)},
        "mean_palettes_s": round(palettes, 2),
        "projected_analysis_min": {
            "plain": round((n_isolated * plain + len(layers) * palettes + n_rest * plain + setup_s) / 60, 1),
            "replay": round((n_isolated * fast + len(layers) * palettes + n_rest * plain + setup_s) / 60, 1),
        },
        "peak_rss_gib": _peak_gib(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_before": load_before, "load_after": os.getloadavg()},  # fmt: skip
    }
    if args.against:
        result["rank_correlation"] = rank_correlation(json.loads(args.against.read_text()), result)
    out = args.out or ROOT / "bench" / "results" / f"analysis-{args.model}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    keys = ("mean_measurement_s", "mean_palettes_s", "projected_analysis_min", "peak_rss_gib", "replay_kept_gib", "rank_correlation")
    print(json.dumps({k: result[k] for k in keys if k in result}))
    print(f"written {out}")


def rank_correlation(before: dict, now: dict) -> dict:
    """Spearman's rank correlation of the layers' PSNR in ``before`` and ``now`` (the layers and widths
    both measured): per width, and over every (layer, width)."""
    from scipy.stats import spearmanr

    old = {(r["layer"], b): p for r in before["sampled"] for b, p in r.get("psnr", {}).items()}
    new = {(r["layer"], b): p for r in now["sampled"] for b, p in r["psnr"].items()}
    common = sorted(set(old) & set(new))
    out = {"inputs_before": before.get("inputs"), "pairs": len(common)}
    for b in sorted({b for _, b in common}, key=int):
        keys = [k for k in common if k[1] == b]
        if len(keys) > 2:
            out[f"{b}-bit"] = round(float(spearmanr([old[k] for k in keys], [new[k] for k in keys])[0]), 3)
    if len(common) > 2:
        out["all"] = round(float(spearmanr([old[k] for k in common], [new[k] for k in common])[0]), 3)
    return out


def _peak_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


if __name__ == "__main__":
    main()
