"""W8A8: linear 8-bit weights and int8 activations, calibrated on the float16 package's own runs.

coremltools' ``linear_quantize_activations`` calibrates through Core ML
prediction (macOS only): it adds every intermediate tensor to the model's
outputs and records their ranges. Here the reference executor runs the very
package instead, with a ``RangeObserver`` watching only the tensors
coremltools' insertion passes will ask about (``calibrated_names``). The
ranges then go to coremltools' own passes,
``compression::insert_prefix_quantize_dequantize_pair`` and
``compression::insert_suffix_quantize_dequantize_pair``, which take
precomputed statistics, and the weights to ``linear_quantize_weights``.

As Apple's converter (``activation_quantization.py``), activations are
quantized around the convolutions (and linear layers) only: additions,
concatenations, norms, SiLU and GELU stay float16. Apple's converter also
quantizes the attention einsums' inputs; coremltools' passes have no pattern
for ``matmul``, so attention stays float16 here.

    # the calibrate stage: the float16 pipeline on the reference executor, a RangeObserver on its unet
    ranges = {var name: [min, max]}
    w8a8_package(unet_package, dst, ranges)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from sdbuild.compress import package as pkg
from sdbuild.errors import PackageError

RANGES_FILE = "activation_ranges.json"  # what the calibrate stage writes, the compress stage reads
# The ops whose input and output activations are quantized (coremltools' patterns, Apple's choice of them).
QUANTIZED_OPS = ("conv", "linear")
# What coremltools' suffix pass folds into a quantized op's output (quantized after it instead).
_FOLDED_ACTIVATIONS = frozenset({"leaky_relu", "tanh", "scaled_tanh", "sigmoid", "hard_sigmoid", "relu", "relu6"})


def _is_const(var) -> bool:
    return var.op is not None and var.op.op_type == "const"


def quantized_outputs(op) -> str:
    """The var whose range quantizes ``op``'s output: its own, or that of a folded activation after it."""
    out = op.outputs[0]
    children = list(out.child_ops)
    if children and children[0].op_type in _FOLDED_ACTIVATIONS:
        return children[0].outputs[0].name
    return out.name


def concat_groups(prog) -> list[list[str]]:
    """Input and output names of every concat, for coremltools' rule that they share one range."""
    return [
        [v.name for v in op.values if not _is_const(v)] + [op.outputs[0].name]
        for op in _ops(prog)
        if op.op_type == "concat"
    ]


def read_ranges(folder: Path) -> dict[str, list[float]]:
    """The activation ranges a calibration wrote into ``folder``: {var name: [min, max]}."""
    return json.loads((Path(folder) / RANGES_FILE).read_text())["ranges"]


def _ops(prog):
    """Every op of a pymil Program, or of one Function (what the executor runs)."""
    return pkg.iter_ops(prog) if hasattr(prog, "functions") else pkg.iter_ops_of(prog)


def calibrated_names(prog) -> set[str]:
    """The tensors whose ranges the insertion passes read: the non-constant input and the
    output of every quantized op, and every concat's inputs and output (ranges shared).
    ``prog``: a pymil Program or Function."""
    names: set[str] = set()
    for op in _ops(prog):
        if op.op_type in QUANTIZED_OPS and not _is_const(op.x):
            names.update((op.x.name, quantized_outputs(op)))
    for group in concat_groups(prog):
        names.update(group)
    return names


def activation_config(skip: list[str] = ()):
    """coremltools' config for the insertion passes: symmetric int8 for ``QUANTIZED_OPS``;
    ``skip``: names of ops left alone (their input had no value to calibrate on)."""
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig

    per_op = OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8")
    return OptimizationConfig(
        op_type_configs={op_type: per_op for op_type in QUANTIZED_OPS},
        op_name_configs={name: None for name in skip},
    )


def activation_stats(prog, ranges: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """``ranges`` ({name: [min, max]}) as coremltools' passes read them ({name: {rmin, rmax}}),
    the tensors around each concat widened to one shared range as coremltools does."""
    from coremltools.optimize.coreml.experimental._post_training_quantization import (
        _adjust_concat_surrounding_activation_stats,
    )

    stats = {name: {"rmin": float(lo), "rmax": float(hi)} for name, (lo, hi) in ranges.items()}
    groups = [[n for n in group if n in stats] for group in concat_groups(prog)]
    _adjust_concat_surrounding_activation_stats([g for g in groups if g], stats)
    return stats


def uncalibrated_ops(prog, stats: dict) -> list[str]:
    """Quantized ops whose input or output no calibration run produced (computed from constants only)."""
    return [
        op.name
        for op in pkg.iter_ops(prog)
        if op.op_type in QUANTIZED_OPS and not _is_const(op.x)
        and (op.x.name not in stats or quantized_outputs(op) not in stats)
    ]


def w8a8_package(src: Path, dst: Path, ranges: dict[str, list[float]]):
    """Write ``dst``: the float16 package ``src`` with quantize/dequantize pairs (int8, symmetric,
    one scale per tensor from ``ranges``) around its convolutions and linear layers, and linear
    8-bit weights (symmetric int8 per output channel, as ``linear8_package``).

    ``ranges``: {var name: [min, max]} from calibration runs of ``src`` itself. Returns
    CompressionStats (method ``w8a8``); ``notes`` counts the quantized activations.
    """
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    from sdbuild.compress.palettize import _finish, linear8_pass

    started = time.perf_counter()
    mlmodel = pkg.load_mlmodel(src)
    if pkg.spec_version(mlmodel) < 8:
        raise PackageError(f"{src}: activation quantization needs an iOS17/macOS14 program or later (quantize ops)")
    prog = pkg.load_pymil(mlmodel)
    stats = activation_stats(prog, ranges)
    config = activation_config(uncalibrated_ops(prog, stats))
    passes = []
    for name in ("compression::insert_prefix_quantize_dequantize_pair", "compression::insert_suffix_quantize_dequantize_pair"):
        insert = PASS_REGISTRY[name]
        insert.set_options([PassOption("config", config), PassOption("activation_stats", stats)])
        passes.append(insert)
    # coremltools' own clean-up after the insertion: back-to-back dequantize -> quantize pairs of one scale go.
    passes.append(PASS_REGISTRY["common::dequantize_quantize_pair_elimination"])
    written = pkg.apply_passes(mlmodel, [*passes, linear8_pass()], dst)  # as saved: the weights' widths, the quantize count
    stats_out = _finish("w8a8", src, dst, started, 1, program=written, nbits=8)
    quantized = sum(1 for op in pkg.iter_ops(written) if op.op_type == "quantize")
    stats_out.notes.append(f"{quantized} activations quantized to int8")
    return stats_out
