"""Analyze: the mixed-bit palettization pre-analysis of the unet, on its PyTorch module.

Long work, so it is resumable: per-layer results go to the executor's scratch
folder for this key as they come, and a rerun after a kill picks them up.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sdbuild.stages import Job
from sdbuild.stages.download import checkpoint_dir
from sdbuild.stages.trace import build_options

SAMPLES = 2  # seeded inputs the end-to-end PSNR is measured on
SEED = 0
SMALL_MODEL = 50_000_000  # parameters


def run(job: Job, out: Path) -> dict:
    import torch

    from sdbuild.compress import pre_analyze
    from sdbuild.compress.analysis import ANALYSIS_FILE, PLOT_FILE
    from sdbuild.models import build_component, sample_inputs

    checkpoint = checkpoint_dir(job.upstream["download"])
    options = build_options(job.fields)
    model = build_component("unet", checkpoint, options)
    inputs = [
        {k: torch.from_numpy(v) for k, v in sample_inputs(model.inputs, seed=SEED + i).items()} for i in range(SAMPLES)
    ]
    work = job.scratch or out
    small = sum(p.numel() for p in model.module.parameters()) < SMALL_MODEL
    del model  # the factory builds the analysed one: two float32 unets at once would be 3.4 GB more for SD 1.5
    result = pre_analyze(
        lambda: build_component("unet", checkpoint, options).module,
        work,
        inputs=inputs,
        model_version=job.fields["model.version"],
        # Small models run faster on one thread than on several fighting for busy cores.
        threads=1 if small else None,
    )
    for name in (ANALYSIS_FILE, PLOT_FILE):
        if (Path(result).parent / name).exists() and work != out:
            shutil.copyfile(Path(result).parent / name, out / name)
    return {}
