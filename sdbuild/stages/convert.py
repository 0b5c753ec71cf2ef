"""Convert: the traced module to a Core ML ML program (.mlpackage).

With several resolutions (``multires: functions``), each traced resolution is
converted on its own and the packages are merged into one multifunction
package (``sdbuild.convert.multifunction``): one static-shape function per
resolution, named ``h<height>_w<width>``, the first the default, the weights
stored once.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from sdbuild.stages import Job
from sdbuild.stages.trace import read_io, traced_functions

PACKAGE = "model.mlpackage"
PARTS = ".functions"  # per-resolution packages before the merge; removed before the entry is published


def run(job: Job, out: Path) -> dict:
    """Write ``model.mlpackage`` with the contract's input and output names (float32 I/O).

    The conversion holds one copy of the weights at a time (``sdbuild.convert``); where the trace
    holds placeholders, none: the weights are bound into the saved package from the checkpoint
    (the download, read through the trace), else the module is converted with its weights.
    """
    from sdbuild.convert.multifunction import merge_functions

    trace_dir = job.upstream["trace"]
    functions = traced_functions(trace_dir)
    started = time.perf_counter()
    if len(functions) == 1 or job.fields.get("multires") == "enumerated":
        shapes = enumerated_shapes(functions) if len(functions) > 1 else None
        facts = _convert_one(trace_dir, job.fields["target"], out / PACKAGE, shapes, job.upstream.get("download"))
        facts["phases_s"] = {"convert_s": round(time.perf_counter() - started, 1)}
        return facts
    parts = {}
    seconds = {}
    for function in functions:
        begun = time.perf_counter()
        parts[function["name"]] = out / PARTS / f"{function['name']}.mlpackage"
        facts = _convert_one(function["dir"], job.fields["target"], parts[function["name"]], download=job.upstream.get("download"))
        seconds[function["name"]] = round(time.perf_counter() - begun, 1)
    begun = time.perf_counter()
    merge_functions(parts, out / PACKAGE)
    shutil.rmtree(out / PARTS)
    facts["functions"] = [f["name"] for f in functions]
    facts["phases_s"] = {"convert_s": seconds, "merge_s": round(time.perf_counter() - begun, 1),
                         "total_s": round(time.perf_counter() - started, 1)}
    return facts


def enumerated_shapes(functions: list[dict]) -> dict[str, list[list[int]]]:
    """Input name -> its shape at each traced resolution (default first), for the inputs whose shape varies."""
    ios = [read_io(f["dir"]) for f in functions]
    out = {}
    for i, spec in enumerate(ios[0]["inputs"]):
        shapes = [io["inputs"][i]["shape"] for io in ios]
        if any(s != shapes[0] for s in shapes):
            out[spec["name"]] = shapes
    return out


def _convert_one(trace_dir: Path, target: str, package: Path, shapes: dict | None = None, download: Path | None = None) -> dict:
    """Convert the traced module in ``trace_dir`` (module.pt, io.json) to ``package``;
    ``shapes``: inputs that take several shapes (``enumerated_shapes``); ``download``: where the
    checkpoint of a trace with placeholders is. Facts: ``weights``: ``bound`` (into the saved
    package) or ``converted with weights`` (with why, where the trace had placeholders)."""
    from sdbuild.convert import convert_traced
    from sdbuild.convert.placeholders import Refused, read_record

    io = read_io(trace_dir)
    if shapes:
        io["inputs"] = [dict(i, shapes=shapes[i["name"]]) if i["name"] in shapes else i for i in io["inputs"]]
    upcast_attention = bool(io.get("info", {}).get("upcast_attention"))
    package.parent.mkdir(parents=True, exist_ok=True)
    record = read_record(trace_dir, download)
    facts = {"precision": io["precision"], "upcast_attention": upcast_attention}
    convert = lambda module, record=None: convert_traced(  # noqa: E731
        module, io["inputs"], io["outputs"], io["precision"], target, package, upcast_attention=upcast_attention, placeholders=record
    )
    if record is None:
        convert(trace_dir / "module.pt")
        return dict(facts, weights="converted with weights")
    why = record.refuse
    if why is None:
        try:
            bound = convert(trace_dir / "module.pt", record)
            return dict(facts, weights="bound", bound_blobs=bound)
        except Refused as e:
            why = str(e)
        except Exception as e:  # a pass that does not take a placeholder: the weights then
            why = f"{type(e).__name__}: {e}"
    print(f"convert {trace_dir.name}: converting with the weights: {why}", file=sys.stderr, flush=True)
    shutil.rmtree(package, ignore_errors=True)
    with_weights = package.parent / f".{package.stem}-with-weights.pt"
    _bound_module_file(trace_dir / "module.pt", record, with_weights)
    try:
        convert(with_weights)
    finally:
        with_weights.unlink(missing_ok=True)
    return dict(facts, weights=f"converted with weights: {why}")


def _bound_module_file(module_path: Path, record, target: Path) -> None:
    """Save the traced module with its placeholders bound to the real weights as ``target``."""
    import torch

    from sdbuild.convert.placeholders import bind_module

    module = torch.jit.load(str(module_path))
    bind_module(module, record)
    torch.jit.save(module, str(target))
