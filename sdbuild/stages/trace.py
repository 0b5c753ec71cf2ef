"""Trace: the component's conversion-friendly module (or the recipe's multilingual projection), traced by TorchScript."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from sdbuild.stages import Job, component_kind
from sdbuild.stages.download import checkpoint_dir, vae_dir

PROJECTION = "multilingual_projection"  # the component, and the name of its input file in a job
PROJECTION_DIGEST = "multilingual_projection_sha256"


def build_options(fields: dict, component: str | None = None):
    """The module options from the stage's recipe fields; ``component`` picks the safety checker's variant."""
    from sdbuild.models import SAFETY_CHECKER_IMAGE_SIZED, TOKENS, BuildOptions

    res = fields.get("resolution") or {"height": 512, "width": 512}
    options = BuildOptions(
        attention=fields.get("attention") or "ORIGINAL",
        height=res["height"],
        width=res["width"],
        unet_batch_one=bool(fields.get("unet_batch_one")),
        sequence_length=fields.get("encoder_sequence_length") or TOKENS,
    )
    if component == SAFETY_CHECKER_IMAGE_SIZED:
        options = replace(options, checker_images=(options.height, options.width))
    return options


def run(job: Job, out: Path) -> dict:
    """Write ``module.pt`` (TorchScript, float32 weights) and ``io.json`` (inputs with their declared dtypes, outputs, precision)."""
    import torch

    from sdbuild.convert import give_freed_memory_back, skip_weight_init, trace_module
    from sdbuild.models import build_component, build_multilingual_projection, sample_inputs

    give_freed_memory_back()  # this stage runs in a process of its own
    phases = {}
    started = time.perf_counter()
    # Every weight comes from the checkpoint (build_component checks it): no random ones first.
    download = job.upstream["download"]
    if job.component == PROJECTION:
        # The user's own TorchScript file, not a module of ours: its weights are in it.
        model = build_multilingual_projection(projection_file(job), checkpoint_dir(download))
    else:
        with skip_weight_init():
            options = build_options(job.fields, job.component)
            model = build_component(component_kind(job.component), checkpoint_dir(download), options, vae=vae_dir(download))
    phases["build_s"] = round(time.perf_counter() - started, 1)
    example = sample_inputs(model.inputs, seed=0)
    args = [torch.from_numpy(example[s.name]) for s in model.inputs]
    started = time.perf_counter()
    traced = trace_module(model.module, args)
    phases["trace_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    torch.jit.save(traced, str(out / "module.pt"))
    phases["save_s"] = round(time.perf_counter() - started, 1)
    io = {
        "inputs": [
            {"name": s.name, "shape": list(s.shape), "kind": s.kind, "high": s.high, "dtype": s.dtype} for s in model.inputs
        ],
        "outputs": model.outputs,
        "precision": model.precision,
        "info": model.info,
    }
    (out / "io.json").write_text(json.dumps(io, indent=2))
    return {"inputs": {s.name: list(s.shape) for s in model.inputs}, "outputs": model.outputs, "phases_s": phases}


def projection_file(job: Job) -> Path:
    """The recipe's projection file, checked to be the one whose digest is in this stage's key."""
    from sdbuild.cache import sha256_file
    from sdbuild.errors import SdbuildError

    path = job.upstream[PROJECTION]
    if sha256_file(path) != job.fields[PROJECTION_DIGEST]:
        raise SdbuildError(f"multilingual_projection: {path} changed during the build; run it again")
    return path


def read_io(entry_path: Path) -> dict:
    return json.loads((Path(entry_path) / "io.json").read_text())
