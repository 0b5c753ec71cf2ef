"""Verify: PSNR of the shipped packages against the float32 PyTorch reference.

For each component, ``verify.samples`` seeded random inputs of the contract's
shapes go through the float32 PyTorch module (the reference) and through the
final package run by the reference executor (fp16, as a device holds values);
when the package is compressed, also through the uncompressed float16
package, so a user sees what compression alone cost. On macOS, Core ML itself
runs the package on the recipe's compute unit too.

The reference is the component's module built from the checkpoint (the
download the trace was made from) with each layer's weights bound from the
checkpoint's safetensors only while that layer runs, and its attention
computed a block of queries at a time (``lazy_weights``,
``chunked_attention``): the traced module's values to float rounding, at a
fraction of its memory. Where that module cannot be shown to be the traced
one (the recipe's own TorchScript projection, a checkpoint whose keys or
shapes do not map, no download at hand), the traced module is the reference,
and the log says why.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from sdbuild.metrics import psnr
from sdbuild.stages import PACKAGE_OF, Job
from sdbuild.stages.chunk import part_paths
from sdbuild.stages.convert import PACKAGE
from sdbuild.stages.trace import read_io

DEVICE_SKIPPED = "device check not run: Core ML prediction needs macOS (verified with the reference executor only)"


def _worst(ref: dict, out: dict) -> float:
    """The lowest PSNR over a model's outputs."""
    return min(psnr(ref[name], out[name]) for name in ref)


def run(job: Job, out: Path) -> dict:
    """Write ``psnr.json``: the worst figure of every kind over the samples and, with several
    resolutions, over every function (each function's own under ``functions``)."""
    from sdbuild.stages.trace import traced_functions

    from sdbuild.convert import give_freed_memory_back
    from sdbuild.convert.multifunction import function_names

    give_freed_memory_back()  # this stage runs in a process of its own: one model's memory goes before the next's
    functions = traced_functions(job.upstream["trace"])
    if len(functions) == 1:
        summary = _verify_function(job, job.upstream["trace"], None)
    else:
        # A multifunction package runs each resolution's function; an enumerated one, its one program at each shape.
        named = bool(function_names(job.upstream["convert"] / PACKAGE))
        per = {f["name"]: _verify_function(job, f["dir"], f["name"] if named else None) for f in functions}
        first = next(iter(per.values()))
        summary = {key: min(p[key] for p in per.values()) for key in first if key.endswith("psnr_db")}
        summary["functions"] = per
        summary["device"], summary["samples"] = first["device"], first["samples"]
        if "note" in first:
            summary["note"] = first["note"]
    (out / "psnr.json").write_text(json.dumps(summary, indent=2))
    return {"psnr": {k: v for k, v in summary.items() if k.endswith("psnr_db")}}


def _verify_function(job: Job, trace_dir: Path, function: str | None) -> dict:
    """PSNR figures of one function (one resolution; None: the package's only one) against its traced module.

    One model is in memory at a time: each runs every sample and is freed before the next loads, so
    verify's peak is the largest single model's, not the sum of the reference and two packages."""
    from sdbuild.models import FLOAT32, TensorSpec, as_declared, sample_inputs

    io = read_io(trace_dir)
    specs = [TensorSpec(i["name"], tuple(i["shape"]), i["kind"], i["high"], i.get("dtype", FLOAT32)) for i in io["inputs"]]
    seeds = [job.fields["verify.seed"] + i for i in range(job.fields["verify.samples"])]
    # In the declared dtypes, as a pipeline feeds them; the reference gets the same values in float32.
    feeds = [as_declared(sample_inputs(specs, seed=seed), specs) for seed in seeds]
    shipped_dir = job.input(PACKAGE_OF)

    ref = _reference_outputs(job, trace_dir, io, specs, feeds)
    if "chunk" in job.upstream:
        # What ships is the chain of parts: check it, and that it equals the whole package.
        whole = _package_outputs(shipped_dir / PACKAGE, function, feeds, "fp32")
        got, chained = _chain_outputs(part_paths(job.upstream["chunk"]), feeds)
    else:
        got = _package_outputs(shipped_dir / PACKAGE, function, feeds, "fp16")
    base = _package_outputs(job.upstream["convert"] / PACKAGE, function, feeds, "fp16") if "compress" in job.upstream else None
    device = _device_model(shipped_dir / PACKAGE, job.fields["compute_unit"], function)

    samples = []
    for i, seed in enumerate(seeds):
        sample = {"seed": seed, "psnr_db": _worst(ref[i], got[i])}
        if "chunk" in job.upstream:
            sample["chain_psnr_db"] = _worst(whole[i], chained[i])
        if base is not None:
            sample["float16_psnr_db"] = _worst(ref[i], base[i])
            sample["vs_float16_psnr_db"] = _worst(base[i], got[i])
        if device is not None:
            sample["device_psnr_db"] = _worst(ref[i], device.predict(feeds[i]))
        samples.append(sample)

    summary = {key: min(s[key] for s in samples) for key in samples[0] if key.endswith("psnr_db")}
    summary["samples"] = samples
    summary["device"] = job.fields["compute_unit"] if device is not None else None
    if device is None:
        summary["note"] = DEVICE_SKIPPED
    return summary


def _reference_outputs(job: Job, trace_dir: Path, io: dict, specs: list, feeds: list) -> list[dict]:
    """The float32 reference's outputs for every sample (name -> float32 array); the module is freed after."""
    import numpy as np
    import torch

    from sdbuild.models.chunked_attention import chunked_scores

    module, weights = _reference_module(job, trace_dir, io)
    outputs = []
    with contextlib.ExitStack() as stack:
        if weights is not None:
            stack.enter_context(weights.bound())
            stack.enter_context(chunked_scores())
        for feed in feeds:
            with torch.no_grad():
                result = module(*[torch.from_numpy(feed[s.name].astype(np.float32)) for s in specs])
            result = result if isinstance(result, (tuple, list)) else (result,)
            outputs.append({name: t.numpy().astype(np.float32) for name, t in zip(io["outputs"], result)})
    return outputs


def _reference_module(job: Job, trace_dir: Path, io: dict):
    """(module, LazyWeights) built from the checkpoint where it maps onto the traced module; else the traced
    module itself (module.pt, every weight loaded) and None, with one log line saying why."""
    import torch

    from sdbuild.convert.placeholders import bind_module, read_record
    from sdbuild.models.lazy_weights import NotLazy

    try:
        return _lazy_reference(job, io)
    except NotLazy as e:
        print(f"verify {job.component}: the traced module is the reference: {e}", file=sys.stderr, flush=True)
    module = torch.jit.load(str(trace_dir / "module.pt")).eval()
    if record := read_record(trace_dir, job.upstream.get("download")):
        bind_module(module, record)
    return module, None


def _lazy_reference(job: Job, io: dict):
    """The component's module with its weights bound a layer at a time, for the trace's inputs (``io``)."""
    from sdbuild.models import vae_scale_factor
    from sdbuild.models.lazy_weights import NotLazy, lazy_component
    from sdbuild.stages import component_kind
    from sdbuild.stages.download import checkpoint_dir, vae_dir
    from sdbuild.stages.trace import PROJECTION

    if job.component == PROJECTION:
        raise NotLazy("the recipe's own TorchScript projection has no checkpoint to map")
    download = job.upstream.get("download")
    if download is None:
        raise NotLazy("no download entry at hand")
    kind = component_kind(job.component)
    vae = vae_dir(download)
    factor = vae_scale_factor(json.loads((vae / "config.json").read_text())) if (vae / "config.json").is_file() else 8
    options = _options_of(kind, {i["name"]: i["shape"] for i in io["inputs"]}, factor)
    model, weights = lazy_component(kind, checkpoint_dir(download), options, vae=vae)
    built = [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in model.inputs]
    traced = [{"name": i["name"], "shape": list(i["shape"]), "dtype": i.get("dtype")} for i in io["inputs"]]
    if built != traced or model.outputs != io["outputs"]:
        raise NotLazy(f"the checkpoint's module takes {built} -> {model.outputs}, the trace {traced} -> {io['outputs']}")
    return model.module, weights


def _options_of(kind: str, shapes: dict, factor: int):
    """The module options the trace's input shapes were made with (``BuildOptions``; attention left as it
    is: the reference's is chunked whatever the recipe's). ``factor``: the VAE's pixels per latent pixel."""
    from dataclasses import replace

    from sdbuild.models import BuildOptions

    options = BuildOptions()
    if "sample" in shapes:  # the unets and the ControlNet
        batch, _, height, width = shapes["sample"]
        options = replace(options, height=height * factor, width=width * factor, unet_batch_one=batch == 1,
                          sequence_length=shapes["encoder_hidden_states"][-1])  # fmt: skip
    if "controlnet_cond" in shapes:  # at pixel size
        options = replace(options, height=shapes["controlnet_cond"][2], width=shapes["controlnet_cond"][3])
    if "z" in shapes:
        options = replace(options, height=shapes["z"][2] * factor, width=shapes["z"][3] * factor)
    if "x" in shapes:
        options = replace(options, height=shapes["x"][2], width=shapes["x"][3])
    if "images" in shapes:  # the safety checker's, either variant
        options = replace(options, checker_images=tuple(shapes["images"][1:3]))
    return options


def _package_outputs(package: Path, function: str | None, feeds: list, precision: str) -> list[dict]:
    """A package's outputs for every sample on the reference executor; the program is freed after. It holds
    no weights: each is read from the package's weight file, or decompressed, as its op runs (``executor.IN_FILE_MIN``)."""
    from sdbuild.mil.executor import load_program

    program = load_program(package, function=function)
    return [program.run(feed, precision=precision) for feed in feeds]


def _chain_outputs(paths: list, feeds: list) -> tuple[list[dict], list[dict]]:
    """The chained parts' outputs for every sample: float16 (as shipped) and float32 (to compare with the whole)."""
    from sdbuild.mil.chunk import chain_run
    from sdbuild.mil.executor import load_program

    parts = [load_program(p) for p in paths]
    return [chain_run(parts, f, precision="fp16") for f in feeds], [chain_run(parts, f, precision="fp32") for f in feeds]


def _device_model(package: Path, compute_unit: str, function: str | None = None):
    """Core ML itself on the recipe's compute unit, where it exists (macOS); else None. ``function``: of a multifunction package."""
    if sys.platform != "darwin":
        return None
    import coremltools as ct

    from sdbuild.mlpackage import open_readonly

    named = {"function_name": function} if function else {}
    # Opening the cache entry itself would rewrite its manifest.
    return open_readonly(package, compute_units=getattr(ct.ComputeUnit, compute_unit), **named)


def read_psnr(entry_path: Path) -> dict:
    return json.loads((Path(entry_path) / "psnr.json").read_text())
