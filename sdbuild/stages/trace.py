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
# Components whose inputs are sized by the image: with several resolutions, one function (or shape) each.
RESOLUTION_KINDS = ("unet", "controlled_unet", "controlnet", "vae_decoder", "vae_encoder")
PLACEHOLDERS = "placeholders.json"  # sdbuild.convert.placeholders.RECORD, beside module.pt
FUNCTIONS_DIR = "functions"  # trace/functions/<h_w>/{module.pt, io.json}: the resolutions after the first


def resolutions_of(fields: dict) -> list[dict]:
    """The recipe's resolutions ({height, width}) as the stage's fields hold them: one or a list."""
    res = fields.get("resolution") or {"height": 512, "width": 512}
    return list(res) if isinstance(res, list) else [res]


def traced_resolutions(fields: dict, component: str | None) -> list[dict]:
    """The resolutions a component is traced at: every one for an image model with several (``multires``
    set), else the first. (``enumerated`` converts the first's trace; the others give its shapes and references.)"""
    resolutions = resolutions_of(fields)
    if component_kind(component) in RESOLUTION_KINDS and fields.get("multires") and len(resolutions) > 1:
        return resolutions
    return resolutions[:1]


def build_options(fields: dict, component: str | None = None, resolution: dict | None = None):
    """The module options from the stage's recipe fields; ``component`` picks the safety checker's variant;
    ``resolution`` ({height, width}) overrides the recipe's first one."""
    from sdbuild.models import SAFETY_CHECKER_IMAGE_SIZED, TOKENS, BuildOptions

    res = resolution or resolutions_of(fields)[0]
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


def run_with_weights(job: Job, out: Path) -> dict:
    """``run`` with every weight in ``module.pt`` (no placeholders): what the trace stage wrote before them."""
    return run(job, out, placeholders=False)


def run(job: Job, out: Path, placeholders: bool = True) -> dict:
    """Write ``module.pt`` (TorchScript), ``io.json`` (inputs with their declared dtypes, outputs, precision)
    and, where the weights are placeholders, ``placeholders.json`` (``sdbuild.convert.placeholders``).

    Each checkpoint tensor from ``placeholders.MIN_ELEMENTS`` elements up is a placeholder in
    ``module.pt`` wherever the module's tensors can be traced back to the checkpoint's
    (``lazy_weights``); elsewhere, and with ``placeholders`` false, the module holds every weight.

    With several resolutions traced (``traced_resolutions``), the first is at
    the top and each other one under ``functions/<name>/``; the top ``io.json``
    lists them all under ``functions`` (name, height, width, dir), in recipe order.
    """
    from sdbuild.convert import give_freed_memory_back
    from sdbuild.recipe import function_name

    give_freed_memory_back()  # this stage runs in a process of its own
    resolutions = traced_resolutions(job.fields, job.component)
    functions = []
    facts = {}
    for i, res in enumerate(resolutions):
        name = function_name(res["height"], res["width"])
        folder = out if i == 0 else out / FUNCTIONS_DIR / name
        folder.mkdir(parents=True, exist_ok=True)
        facts[name] = _trace_one(job, folder, res, placeholders)
        functions.append({"name": name, "height": res["height"], "width": res["width"], "dir": str(folder.relative_to(out))})
    if len(functions) > 1:
        io = read_io(out)
        io["functions"] = functions
        (out / "io.json").write_text(json.dumps(io, indent=2))
        return {"functions": facts}
    return facts[functions[0]["name"]]


def _trace_one(job: Job, out: Path, resolution: dict, placeholders: bool = True) -> dict:
    """Trace the component at one ``resolution`` into ``out`` (module.pt, io.json, placeholders.json where it has them)."""
    import torch

    from sdbuild.convert import skip_weight_init, trace_module
    from sdbuild.models import build_component, build_multilingual_projection, sample_inputs

    phases = {}
    started = time.perf_counter()
    # Every weight comes from the checkpoint (build_component checks it): no random ones first.
    download = job.upstream["download"]
    if job.component == PROJECTION:
        # The user's own TorchScript file, not a module of ours: its weights are in it.
        model = build_multilingual_projection(projection_file(job), checkpoint_dir(download))
    else:
        options = build_options(job.fields, job.component, resolution)
        model = _with_placeholders(job, options, out) if placeholders else None
        if model is None:
            with skip_weight_init():
                model = build_component(component_kind(job.component), checkpoint_dir(download), options, vae=vae_dir(download))
    weights = "placeholders" if (out / PLACEHOLDERS).is_file() else "with weights"
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
    return {"inputs": {s.name: list(s.shape) for s in model.inputs}, "outputs": model.outputs, "weights": weights,
            "phases_s": phases}  # fmt: skip


def _with_placeholders(job: Job, options, out: Path):
    """The component's module with placeholders for its large weights, its record written beside the trace;
    None (one log line: why) where its tensors cannot be traced back to the checkpoint's."""
    import sys

    from sdbuild.convert.placeholders import place, roots_of
    from sdbuild.models.lazy_weights import NotLazy, lazy_component

    download = job.upstream["download"]
    try:
        model, weights = lazy_component(component_kind(job.component), checkpoint_dir(download), options, vae=vae_dir(download))
        record = place(weights, model.precision, roots_of(download))
    except NotLazy as e:
        print(f"trace {job.component}: traced with its weights: {e}", file=sys.stderr, flush=True)
        return None
    (out / PLACEHOLDERS).write_text(json.dumps(record, indent=2))
    return model


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


def traced_functions(entry_path: Path) -> list[dict]:
    """The trace entry's resolutions: [{name, height, width, dir (absolute)}]; one entry (name None) when traced once."""
    entry_path = Path(entry_path)
    functions = read_io(entry_path).get("functions")
    if not functions:
        return [{"name": None, "dir": entry_path}]
    return [dict(f, dir=entry_path / f["dir"]) for f in functions]
