"""Helpers for the reference executor's tests: tiny models converted with coremltools.

Every check converts a model twice (float32 and float16 compute precision),
runs the saved packages through the executor and compares with a reference
computed without the executor: fp32 package in fp32 mode >= 60 dB, fp16
package in fp16 mode >= 35 dB.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
logging.getLogger("coremltools").setLevel(logging.ERROR)

import coremltools as ct  # noqa: E402

from sdbuild.metrics import psnr  # noqa: E402
from sdbuild.mil.executor import load_program  # noqa: E402
from sdbuild.mil.validation import validate_once_per_pipeline  # noqa: E402

FP32_MIN_DB = 60.0
FP16_MIN_DB = 35.0

# ct.convert runs a full gc.collect() per call: 0.3 s with torch loaded, most of a tiny
# model's conversion. The tests convert hundreds of tiny models, so skip it.
import types as _types  # noqa: E402

from coremltools.converters import _converters_entry  # noqa: E402

_converters_entry.gc = _types.SimpleNamespace(collect=lambda *a, **k: 0)

TARGETS = {"iOS16": ct.target.iOS16, "iOS17": ct.target.iOS17, "iOS18": ct.target.iOS18}
_counter = itertools.count()


def _save(mlmodel, folder: Path, stem: str) -> Path:
    path = folder / f"{stem}_{next(_counter)}.mlpackage"
    mlmodel.save(str(path))
    return path


def convert_torch(module, inputs: dict, folder: Path, target="iOS16", precision="fp32", **kwargs):
    """Trace ``module`` on ``inputs`` (name -> tensor) and save an ML program; returns the package path."""
    module = module.eval()
    with torch.no_grad():
        traced = torch.jit.trace(module, tuple(inputs.values()))
    with validate_once_per_pipeline():  # as the convert stage: the program checked once per pass pipeline
        mlmodel = ct.convert(
            traced,
            inputs=[ct.TensorType(name=n, shape=t.shape) for n, t in inputs.items()],
            convert_to="mlprogram",
            minimum_deployment_target=TARGETS[target],
            compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16,
            **kwargs,
        )
    return _save(mlmodel, folder, type(module).__name__)


def convert_mil(program, folder: Path, target="iOS16", precision="fp32", stem="mil"):
    """Convert a MIL builder program (built at ``target``'s opset) and save it."""
    with validate_once_per_pipeline():
        mlmodel = ct.convert(
            program,
            convert_to="mlprogram",
            minimum_deployment_target=TARGETS[target],
            compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16,
        )
    return _save(mlmodel, folder, stem)


def assert_close(pkg_fp32: Path, pkg_fp16: Path, feeds: dict, reference: dict, op_type=None):
    """Run both packages (fp32 package in fp32 mode, fp16 package in fp16 mode) against ``reference``.

    ``op_type`` (a name or a list) must appear in both programs, so a test
    cannot pass because coremltools rewrote the op away.
    Returns {"fp32": dB, "fp16": dB} (worst output of each).
    """
    figures = {}
    for pkg, mode, floor in ((pkg_fp32, "fp32", FP32_MIN_DB), (pkg_fp16, "fp16", FP16_MIN_DB)):
        prog = load_program(pkg)
        if op_type is not None:
            wanted = [op_type] if isinstance(op_type, str) else list(op_type)
            counts = prog.op_counts()
            missing = [o for o in wanted if o not in counts]
            assert not missing, f"{missing} not in the converted program: {sorted(counts)}"
        out = prog.run(feeds, precision=mode)
        worst = np.inf
        for name, ref in reference.items():
            ref = np.asarray(ref, dtype=np.float32)
            got = out[name]
            assert got.shape == ref.shape, f"{name}: shape {got.shape} vs reference {ref.shape}"
            db = psnr(ref, got)
            worst = min(worst, db)
        assert worst >= floor, f"{mode}: PSNR {worst:.1f} dB < {floor} dB"
        figures[mode] = worst
    return figures


def check_torch(module, inputs: dict, folder: Path, target="iOS16", op_type=None, reference=None, **kwargs):
    """Convert ``module`` at both precisions and compare the executor with the module itself."""
    module = module.eval()
    with torch.no_grad():
        out = module(*inputs.values()) if reference is None else reference
    outs = out if isinstance(out, (tuple, list)) else (out,)
    pkg32 = convert_torch(module, inputs, folder, target, "fp32", **kwargs)
    pkg16 = convert_torch(module, inputs, folder, target, "fp16", **kwargs)
    names = load_program(pkg32).outputs
    feeds = {n: t.numpy() for n, t in inputs.items()}
    reference = {n: o.numpy() for n, o in zip(names, outs)}
    return assert_close(pkg32, pkg16, feeds, reference, op_type)


def check_mil(build, input_shapes: dict, reference_fn, folder: Path, target="iOS16", op_type=None, feeds=None, seed=0):
    """Build a one-op MIL program with float32 inputs ``input_shapes`` (name -> shape).

    ``build(**vars)`` returns the program's output var(s); ``reference_fn(**arrays)``
    returns the expected output array(s), computed without the executor.
    """
    from coremltools.converters.mil import Builder as mb

    rng = np.random.default_rng(seed)
    if feeds is None:
        feeds = {n: rng.standard_normal([d or 2 for d in s]).astype(np.float32) for n, s in input_shapes.items()}
    from coremltools.converters.mil.mil import get_new_symbol

    # None marks a flexible dimension, so shape-dependent ops are not folded away.
    specs = [mb.TensorSpec(shape=tuple(get_new_symbol() if d is None else d for d in s)) for s in input_shapes.values()]
    names = list(input_shapes)

    # mb.program names the inputs after the function's own arguments.
    scope = {"build": build}
    exec(f"def body({', '.join(names)}):\n    return build({', '.join(f'{n}={n}' for n in names)})", scope)
    body = scope["body"]
    program = mb.program(input_specs=specs, opset_version=TARGETS[target])(body)
    pkg32 = convert_mil(program, folder, target, "fp32", stem=op_type if isinstance(op_type, str) else "mil")
    program = mb.program(input_specs=specs, opset_version=TARGETS[target])(body)
    pkg16 = convert_mil(program, folder, target, "fp16", stem=op_type if isinstance(op_type, str) else "mil")
    expected = reference_fn(*feeds.values())
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    outputs = load_program(pkg32).outputs
    reference = dict(zip(outputs, expected))
    return assert_close(pkg32, pkg16, feeds, reference, op_type)

