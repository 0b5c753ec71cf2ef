"""Benchmark: 6-bit palettization of a full-size SD 1.5 unet, coremltools' defaults against ours.

    .venv/bin/python bench/palettize.py [--nbits 6] [--cache /tmp/sdbuild-bench]

The unet has SD 1.5's public configuration and seeded random weights (no hub
is reachable); converting it to a float16 package takes minutes and about
8 GB, so the package is cached under ``--cache`` between runs. Both
palettizers then run in this one process, one after the other, on the same
package:

- coremltools: ``ct.optimize.coreml.palettize_weights`` with
  ``OpPalettizerConfig(mode="kmeans", nbits=N)``, its defaults otherwise
  (scikit-learn k-means, one layer at a time, one process);
- ours: ``sdbuild.compress.palettize_package`` (histogram k-means, layers
  spread over every core).

Quality is compared on the weights themselves: per layer, the mean squared
error of the decompressed weight against the float16 original, as a ratio
ours / coremltools (below 1: ours is closer). Writes
``bench/results/palettize.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sdbuild.compress import package as pkg  # noqa: E402
from sdbuild.compress import palettize_package  # noqa: E402
from sdbuild.compress.palettize import default_workers  # noqa: E402

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)


def sd15_unet_package(cache: Path, target: str = "macOS14") -> Path:
    """The converted float16 SD 1.5 unet (random weights, seed 0) for ``target``, built once and cached."""
    path = cache / ("sd15-unet-fp16.mlpackage" if target == "macOS14" else f"sd15-unet-fp16-{target}.mlpackage")
    if (path / "Manifest.json").is_file():
        return path
    import coremltools as ct
    import torch
    from diffusers import UNet2DConditionModel

    class Unet(torch.nn.Module):  # the contract's (B, C, 1, S) text layout
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            hidden = encoder_hidden_states.squeeze(2).transpose(1, 2)
            return self.unet(sample, timestep, hidden, return_dict=False)[0]

    torch.manual_seed(0)
    module = Unet(UNet2DConditionModel(**SD15_UNET)).eval()
    example = (torch.randn(2, 4, 64, 64), torch.tensor([10.0, 10.0]), torch.randn(2, 768, 1, 77))
    print("converting the SD 1.5 unet (minutes) ...", flush=True)
    started = time.perf_counter()
    with torch.no_grad():
        traced = torch.jit.trace(module, example)
    del module
    mlmodel = ct.convert(
        traced,
        inputs=[
            ct.TensorType(name="sample", shape=(2, 4, 64, 64)),
            ct.TensorType(name="timestep", shape=(2,)),
            ct.TensorType(name="encoder_hidden_states", shape=(2, 768, 1, 77)),
        ],
        outputs=[ct.TensorType(name="noise_pred")],
        convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, target),
        compute_precision=ct.precision.FLOAT16,
        skip_model_load=True,
    )
    del traced
    tmp = path.with_name(path.stem + ".partial.mlpackage")  # coremltools insists on the extension
    shutil.rmtree(tmp, ignore_errors=True)
    mlmodel.save(str(tmp))
    tmp.rename(path)
    print(f"converted in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def coremltools_default(src: Path, dst: Path, nbits: int) -> float:
    import coremltools as ct
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

    started = time.perf_counter()
    mlmodel = ct.models.MLModel(str(src), skip_model_load=True)
    config = OptimizationConfig(global_config=OpPalettizerConfig(mode="kmeans", nbits=nbits))
    out = palettize_weights(mlmodel, config)
    shutil.rmtree(dst, ignore_errors=True)
    out.save(str(dst))
    return time.perf_counter() - started


def weight_error_ratio(src: Path, ours: Path, theirs: Path) -> dict:
    """Per-layer weight MSE against the float16 original: ours / coremltools, summarised."""
    original = pkg.dense_weights(src)
    mse = {}
    for label, path in (("ours", ours), ("coremltools", theirs)):
        dense = pkg.dense_weights(path)
        mse[label] = {
            n: float(np.mean((dense[n].astype(np.float64) - original[n].astype(np.float64)) ** 2)) for n in original
        }
        del dense
    ratios = np.array([mse["ours"][n] / mse["coremltools"][n] for n in original if mse["coremltools"][n] > 0])
    total = sum(mse["ours"].values()) / sum(mse["coremltools"].values())
    return {
        "layers": len(ratios),
        "mse_ratio_median": float(np.median(ratios)),
        "mse_ratio_p90": float(np.percentile(ratios, 90)),
        "mse_ratio_max": float(ratios.max()),
        "mse_ratio_total": float(total),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nbits", type=int, default=6)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/sdbuild-bench"))
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "palettize.json")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)

    src = sd15_unet_package(args.cache)
    ours_dst, theirs_dst = args.cache / "ours.mlpackage", args.cache / "coremltools.mlpackage"
    print(f"palettizing {src} at {args.nbits} bits: coremltools defaults ...", flush=True)
    theirs_s = coremltools_default(src, theirs_dst, args.nbits)
    print(f"  {theirs_s:.1f} s; ours ...", flush=True)
    stats = palettize_package(src, ours_dst, args.nbits)
    print(f"  {stats.seconds:.1f} s; comparing weights ...", flush=True)
    quality = weight_error_ratio(src, ours_dst, theirs_dst)

    before = pkg.weight_file(src).stat().st_size
    result = {
        "model": "SD 1.5 unet (diffusers UNet2DConditionModel, public config, random weights), float16, macOS14",
        "nbits": args.nbits,
        "weight_bytes_float16": before,
        "coremltools": {
            "seconds": theirs_s,
            "weight_bytes": pkg.weight_file(theirs_dst).stat().st_size,
            "how": "ct.optimize.coreml.palettize_weights, OpPalettizerConfig(mode='kmeans'), defaults",
        },
        "ours": {
            "seconds": stats.seconds,
            "weight_bytes": stats.bytes_after,
            "workers": stats.workers,
            "how": "sdbuild.compress.palettize_package",
        },
        "speedup": theirs_s / stats.seconds,
        "weight_mse_ours_over_coremltools": quality,
        "machine": {
            "cpus": os.cpu_count(),
            "usable_cpus": default_workers(),
            "platform": platform.platform(),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(f"{'':14s}{'seconds':>10s}{'weight MB':>12s}{'workers':>9s}")
    print(f"{'float16':14s}{'':>10s}{before / 1e6:12.1f}")
    print(f"{'coremltools':14s}{theirs_s:10.1f}{result['coremltools']['weight_bytes'] / 1e6:12.1f}{1:9d}")
    print(f"{'ours':14s}{stats.seconds:10.1f}{stats.bytes_after / 1e6:12.1f}{stats.workers:9d}")
    print(f"speedup {result['speedup']:.1f}x; weight MSE ours/coremltools: total {quality['mse_ratio_total']:.3f}, "
          f"median layer {quality['mse_ratio_median']:.3f}, worst layer {quality['mse_ratio_max']:.3f}")
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
