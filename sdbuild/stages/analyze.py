"""Analyze: the mixed-bit palettization pre-analysis of the unet, on its PyTorch module.

It measures on inputs of its own (``analysis``: ``recipe.AnalysisInputs``
with its defaults filled in), not on the recipe's resolution: the analysed
weights are the same at every latent size, and a smaller one is what lets a
full-size analysis finish within the hour on two cores.

Long work, so it is resumable: per-layer results go to the executor's scratch
folder for this key as they come, and a rerun after a kill picks them up.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from sdbuild.stages import Job
from sdbuild.stages.download import checkpoint_dir
from sdbuild.stages.trace import build_options

SEED = 0  # input i is seeded SEED + i
SMALL_MODEL = 50_000_000  # parameters


def analysis_inputs(specs, samples: int, batch: int, latent: int) -> list[dict]:
    """``samples`` seeded inputs (name → float32 array) for a unet whose inputs are ``specs``:
    ``batch`` rows each, the latent ``sample`` ``latent`` × ``latent`` (the unet takes any size
    its downsampling divides; every other input keeps its shape past the batch)."""
    from sdbuild.models import sample_inputs

    shaped = [
        replace(s, shape=(batch, s.shape[1], latent, latent) if s.name == "sample" else (batch, *s.shape[1:])) for s in specs
    ]
    return [sample_inputs(shaped, seed=SEED + i) for i in range(samples)]


def run(job: Job, out: Path) -> dict:
    import torch

    from sdbuild.compress import pre_analyze
    from sdbuild.compress.analysis import ANALYSIS_FILE, PLOT_FILE
    from sdbuild.models import build_component

    checkpoint = checkpoint_dir(job.upstream["download"])
    options = build_options(job.fields)
    settings = job.fields["analysis"]
    model = build_component("unet", checkpoint, options)
    inputs = [
        {k: torch.from_numpy(v) for k, v in x.items()}
        for x in analysis_inputs(model.inputs, settings["samples"], settings["batch"], settings["latent"])
    ]
    work = job.scratch or out
    small = sum(p.numel() for p in model.module.parameters()) < SMALL_MODEL
    del model  # the factory builds the analysed one: two float32 unets at once would be 3.4 GB more for SD 1.5
    result = pre_analyze(
        lambda: build_component("unet", checkpoint, options).module,
        work,
        inputs=inputs,
        model_version=job.fields["model.version"],
        # Small models, and any model on two cores, run faster on one thread than on several fighting for
        # busy cores: SD 1.5 at a 16x16 latent took 2.7 s a forward on one thread, 14 s on two (load 10).
        threads=1 if small or (os.cpu_count() or 1) <= 2 else None,
    )
    for name in (ANALYSIS_FILE, PLOT_FILE):
        if (Path(result).parent / name).exists() and work != out:
            shutil.copyfile(Path(result).parent / name, out / name)
    return {}
