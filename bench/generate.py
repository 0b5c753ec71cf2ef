"""Benchmark: seconds per denoising step, sdbuild generate on the reference executor against diffusers on PyTorch.

    .venv/bin/python bench/generate.py [--artifacts DIR] [--steps 8] [--repeats 2] [--sdxl]

Builds the tiny synthetic SD model (``synthetic:tiny-sd``, 64×64, float16
bundle; ``--sdxl`` adds ``synthetic:tiny-sdxl``) through the ordinary
executor into ``--artifacts`` (cached between runs), then, in this one
process, generates the same image both ways: sdbuild's ``Pipeline`` over the
bundle (reference executor, fp16) and diffusers' pipeline on the same
checkpoint (float32, CPU), same prompt, DDIM, guidance 2, torch RNG. Both
time every step including the scheduler; the first run of each is a warm-up,
then the two alternate. Reports seconds per step (fastest run, and the median
beside it: the machine may be shared), the PSNR between the two
images, and writes ``bench/results/generate.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")
logging.getLogger("coremltools").setLevel(logging.ERROR)

import torch  # noqa: E402

from sdbuild.executor import prepare, run_build  # noqa: E402
from sdbuild.generate import Pipeline, make_scheduler  # noqa: E402
from sdbuild.metrics import psnr  # noqa: E402
from sdbuild.stages.download import checkpoint_dir  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "generate.json"
PROMPT = "a photo of a cat on a red sofa"
MODELS = {"tiny-sd": "synthetic:tiny-sd", "tiny-sdxl": "synthetic:tiny-sdxl"}


def build_bundle(artifacts: Path, name: str, version: str) -> tuple[Path, Path]:
    recipe = artifacts / f"bench-{name}.yaml"
    recipe.write_text(f"name: bench-{name}\nmodel: {{version: '{version}'}}\nresolution: {{height: 64, width: 64}}\n")
    plan = prepare(recipe, artifacts)
    return run_build(plan).build_dir, checkpoint_dir(plan.nodes[0].entry.path)


class StepTimer:
    """diffusers' step-end callback: the wall time of every step."""

    def __init__(self):
        self.marks: list[float] = []

    def __call__(self, pipe, step, timestep, kwargs):
        self.marks.append(time.perf_counter())
        return kwargs


def time_diffusers(pipe, scheduler_config: dict, steps: int, seed: int) -> tuple[float, np.ndarray]:
    """diffusers' seconds per step: between the first and the last step-end marks (needs steps >= 2)."""
    pipe.scheduler = make_scheduler("DDIM", scheduler_config)
    timer = StepTimer()
    out = pipe(
        PROMPT,
        negative_prompt="",
        num_inference_steps=steps,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        height=64,
        width=64,
        callback_on_step_end=timer,
    ).images
    return (timer.marks[-1] - timer.marks[0]) / (len(timer.marks) - 1), out


def time_sdbuild(pipe: Pipeline, steps: int, seed: int) -> tuple[float, np.ndarray]:
    """sdbuild's seconds per step: the whole denoising loop (unet calls and scheduler) over the steps."""
    result = pipe.generate(PROMPT, seed=seed, steps=steps, guidance_scale=2.0, scheduler="DDIM", rng="torch")
    return result.timings["denoise_s"] / steps, result.images


def bench_model(artifacts: Path, name: str, steps: int, repeats: int) -> dict:
    from diffusers import DiffusionPipeline

    bundle, checkpoint = build_bundle(artifacts, name, MODELS[name])
    load_start = time.perf_counter()
    ours = Pipeline.from_bundle(bundle, backend="executor")
    ours_load = time.perf_counter() - load_start
    load_start = time.perf_counter()
    theirs = DiffusionPipeline.from_pretrained(checkpoint, use_safetensors=True)
    theirs_load = time.perf_counter() - load_start
    theirs.set_progress_bar_config(disable=True)
    ours_steps, theirs_steps = [], []
    for i in range(repeats + 1):  # run 0 warms up both
        a, ours_image = time_sdbuild(ours, steps, seed=i)
        b, theirs_image = time_diffusers(theirs, ours.scheduler_config, steps, seed=i)
        if i:
            ours_steps.append(a)
            theirs_steps.append(b)
    row = {
        "model": MODELS[name],
        "steps": steps,
        "repeats": repeats,
        "unet_batch": ours.unet_batch,
        # The fastest run is the least disturbed by other work on a shared machine; medians beside it.
        "sdbuild_executor_fp16_s_per_step": round(min(ours_steps), 4),
        "diffusers_torch_fp32_s_per_step": round(min(theirs_steps), 4),
        "sdbuild_executor_fp16_s_per_step_median": round(statistics.median(ours_steps), 4),
        "diffusers_torch_fp32_s_per_step_median": round(statistics.median(theirs_steps), 4),
        "sdbuild_load_s": round(ours_load, 3),
        "diffusers_load_s": round(theirs_load, 3),
        "psnr_db_sdbuild_vs_diffusers": round(psnr(theirs_image, ours_image), 2),
    }
    row["ratio_executor_over_diffusers"] = round(row["sdbuild_executor_fp16_s_per_step"] / row["diffusers_torch_fp32_s_per_step"], 2)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="/tmp/sdbuild-bench-generate", help="build cache for the tiny bundles")
    ap.add_argument("--steps", type=int, default=8, help="at least 2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sdxl", action="store_true", help="also the tiny SDXL model")
    args = ap.parse_args()
    artifacts = Path(args.artifacts)
    artifacts.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    rows = [bench_model(artifacts, "tiny-sd", args.steps, args.repeats)]
    if args.sdxl:
        rows.append(bench_model(artifacts, "tiny-sdxl", args.steps, args.repeats))
    report = {
        "what": "seconds per denoising step (unet with guidance, batch 2, plus scheduler), 64x64, DDIM, guidance 2",
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Both sides run interleaved in one process, so a busy machine slows both alike; the ratio is the figure.
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "results": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'model':22} {'executor s/step':>16} {'diffusers s/step':>17} {'ratio':>6} {'PSNR dB':>8}")
    for r in rows:
        print(
            f"{r['model']:22} {r['sdbuild_executor_fp16_s_per_step']:16.4f} {r['diffusers_torch_fp32_s_per_step']:17.4f} "
            f"{r['ratio_executor_over_diffusers']:6.2f} {r['psnr_db_sdbuild_vs_diffusers']:8.2f}"
        )
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
