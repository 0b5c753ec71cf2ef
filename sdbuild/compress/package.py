"""Reading and rewriting the weights of a saved ML program package (``.mlpackage``).

Every compression here goes the same way: load the package as a pymil
program, run coremltools graph passes over it, save a new package. This
module holds that plumbing, and the one place that reads back which bit width
each weight ended up with, so stats and tests measure the file that ships.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np

from sdbuild.errors import PackageError
from sdbuild.mil.validation import validate_once_per_pipeline
from sdbuild.mlpackage import WEIGHT_FILE, iter_ops, iter_ops_of, open_readonly, read_manifest  # noqa: F401 (iter_ops: re-exported)

# coremltools compresses a const only above this many elements (its default);
# the pre-analysis uses the same line so both sides see the same layers.
WEIGHT_THRESHOLD = 2048
IOS18_SPEC_VERSION = 9  # Core ML specification version of iOS18 / macOS15
# Suffixes coremltools' compression passes give the op that replaces a const.
_COMPRESSED_SUFFIXES = ("_palettized", "_quantized", "_sparsified")


def weight_file(package: Path) -> Path:
    """The weight blob file of ``package``; PackageError when absent."""
    path = Path(package) / WEIGHT_FILE
    if not path.is_file():
        raise PackageError(f"{package}: no weight file at {WEIGHT_FILE}: not a saved ML program package")
    return path


def load_mlmodel(package: Path):
    """The package as a ``ct.models.MLModel`` (spec and weights only: nothing is compiled)."""
    package = Path(package)
    read_manifest(package)  # PackageError, one line, when it is not a package
    weight_file(package)
    # Through a private view: opening the package itself would rewrite its manifest (a cache entry's).
    mlmodel = open_readonly(package, skip_model_load=True)
    if mlmodel.get_spec().WhichOneof("Type") != "mlProgram":
        raise PackageError(f"{package}: not an ML program: only ML programs can be compressed")
    return mlmodel


def spec_version(mlmodel) -> int:
    return int(mlmodel.get_spec().specificationVersion)


def apply_passes(mlmodel, passes: list, dst: Path):
    """Run coremltools graph ``passes`` over ``mlmodel``'s program and save the result at ``dst``.

    Goes through coremltools' own helper (the one ``palettize_weights`` uses),
    so the program is read and written exactly as coremltools does it.
    Returns the pymil Program as saved: the helper's conversion back to a
    package runs its pipelines on the passes' program object itself, so
    reading ``dst`` again (seconds for a full-size unet) gives the same ops.
    """
    from coremltools.models.utils import _apply_graph_pass

    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    from sdbuild.mlpackage import make_reproducible

    from sdbuild.convert.multifunction import share_weights_across_functions

    with validate_once_per_pipeline():
        # A multifunction package's functions share weights: compressed alike, stored once again.
        default = mlmodel.get_spec().description.defaultFunctionName
        kept = []
        compressed = _apply_graph_pass(mlmodel, [*passes, share_weights_across_functions(default), _keep_program(kept)], skip_model_load=True)
    compressed.save(str(dst))
    make_reproducible(dst)  # the same package bytes for the same input and settings
    return kept[0]


def _keep_program(into: list):
    """A graph pass that changes nothing and appends the program it is given to ``into``."""
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass

    class _Keep(AbstractGraphPass):
        def apply(self, prog):
            into.append(prog)

    return _Keep()


def load_pymil(package_or_mlmodel):
    """The pymil Program of a package (path) or loaded MLModel, weights included."""
    from coremltools.models.utils import _apply_graph_pass

    mlmodel = package_or_mlmodel
    if isinstance(mlmodel, (str, Path)):
        mlmodel = load_mlmodel(Path(mlmodel))
    with validate_once_per_pipeline():
        return _apply_graph_pass(mlmodel, [], skip_model_load=True, return_pymil_prog=True)


def source_name(var_name: str) -> str:
    """The name of the const a compressed weight op replaced (strip coremltools' suffix)."""
    for suffix in _COMPRESSED_SUFFIXES:
        if var_name.endswith(suffix):
            return var_name[: -len(suffix)]
    return var_name


def is_weight_const(op) -> bool:
    """A float const above the compression threshold that is not itself a constexpr's input."""
    from coremltools.converters.mil.mil import types

    if op.op_type != "const":
        return False
    out = op.outputs[0]
    val = out.val
    if not isinstance(val, np.ndarray) or not types.is_float(out.dtype) or val.size <= WEIGHT_THRESHOLD:
        return False
    return not any(child.op_type.startswith("constexpr_") for child in out.child_ops)


def _feeds_constexpr_only(op) -> bool:
    """An op inside a compressed weight's chain (a palette's dequantizer, a sparse palettizer)."""
    children = [child for out in op.outputs for child in out.child_ops]
    return bool(children) and all(child.op_type.startswith("constexpr_") for child in children)


def _stored_width(var) -> int:
    """Bit width of the values ``var`` holds as stored: an index width where a palette op makes it."""
    producer = var.op
    if producer is not None and producer.op_type == "constexpr_lut_to_sparse":
        return int(producer.indices_nonzero_data.dtype.get_bitwidth())
    if producer is not None and producer.op_type == "constexpr_sparse_blockwise_shift_scale":
        return int(producer.nonzero_data.dtype.get_bitwidth())
    return int(var.dtype.get_bitwidth())


def weight_bits(package_or_prog) -> dict[str, tuple[int, int]]:
    """Bit width of every weight of a package: {source const name: (bits, elements)}.

    ``constexpr_lut_to_dense`` counts its index width, the affine/blockwise
    8-bit dequantizers count 8, a float const above the compression threshold
    counts 16 (float16) or 32. A pruned weight (``constexpr_sparse_to_dense``)
    counts the width its nonzero values are stored at (16, or the palette's
    index width when palettized too) over all its elements; its sparsity is
    ``weight_sparsity``'s. Palette, scale and mask storage is not counted: the
    bit width is the one a recipe's name states.
    """
    from coremltools.converters.mil.mil import types

    prog = package_or_prog if hasattr(package_or_prog, "functions") else load_pymil(package_or_prog)
    bits: dict[str, tuple[int, int]] = {}
    for op in iter_ops(prog):
        name = source_name(op.outputs[0].name) if op.outputs else op.name
        if op.op_type.startswith("constexpr_") and _feeds_constexpr_only(op):
            continue  # a link of a joint chain: the chain's last op stands for the weight
        if op.op_type == "constexpr_lut_to_dense":
            if "shape" in op.inputs:  # iOS16: lut [2**n], packed indices
                numel = int(np.prod(op.shape.val))
                bits[name] = (int(np.log2(op.lut.val.shape[-1])), numel)
            else:  # iOS18: indices typed uint<n>, lut [..., 2**n, 1]
                bits[name] = (int(op.indices.dtype.get_bitwidth()), int(op.indices.val.size))
        elif op.op_type in ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"):
            data = op.quantized_data if op.op_type == "constexpr_affine_dequantize" else op.data
            bits[name] = (int(data.dtype.get_bitwidth()), int(data.val.size))
        elif op.op_type == "constexpr_sparse_to_dense":
            numel = int(np.prod(op.shape.val)) if "shape" in op.inputs else int(np.prod(op.outputs[0].shape))
            bits[name] = (_stored_width(op.nonzero_data), numel)
        elif is_weight_const(op):
            width = 16 if op.outputs[0].dtype == types.fp16 else 32
            bits[name] = (width, int(op.outputs[0].val.size))
    return bits


def average_bits(bits: dict[str, tuple[int, int]]) -> float:
    """Element-weighted mean bit width of ``weight_bits`` output."""
    total = sum(n for _, n in bits.values())
    return float(sum(b * n for b, n in bits.values()) / total) if total else 0.0


def weight_fingerprint(weight: np.ndarray) -> str:
    """A hash of a weight's float16 values as a multiset.

    Sorting makes it blind to reshapes and transposes a converter may apply
    (a linear weight may arrive as a 1x1 convolution's, or transposed), so a
    PyTorch parameter and the package const made from it hash the same.
    """
    # Sorted as float32 (exact for float16 values): numpy 2.2's float16 sort misorders
    # large arrays on some x86 CPUs. Adding 0 turns -0 into +0.
    values = np.sort(np.asarray(weight, dtype=np.float16).astype(np.float32).reshape(-1)) + np.float32(0)
    return hashlib.blake2b(values.tobytes(), digest_size=16).hexdigest()


def materialize(op):
    """The value(s) of a constexpr op by coremltools' own ``decompress`` of its op definition.

    Its constexpr inputs are materialized first: coremltools' own
    ``materialized_val_inference`` stops at a chain three ops deep (an int8
    palette of a sparse palettized weight). Returns a tuple for ops with
    several outputs.
    """
    import inspect

    values = {}
    for name, var in op.inputs.items():
        producer = var.op
        if producer is not None and producer.op_type.startswith("constexpr_"):
            result = materialize(producer)
            values[name] = result[producer.outputs.index(var)] if len(producer.outputs) > 1 else result
        else:
            values[name] = var.val
    params = inspect.signature(type(op).decompress).parameters
    return type(op).decompress(**{name: values.get(name) for name in params})


def dense_weights(package_or_prog) -> dict[str, np.ndarray]:
    """Every weight of ``weight_bits`` as the model computes with it: {source const name: dense array}.

    Compressed weights are decompressed with coremltools' own op definitions.
    """
    prog = package_or_prog if hasattr(package_or_prog, "functions") else load_pymil(package_or_prog)
    names = set(weight_bits(prog))
    dense = {}
    for op in iter_ops(prog):
        name = source_name(op.outputs[0].name) if op.outputs else op.name
        if name not in names:
            continue
        if op.op_type == "const":
            dense[name] = op.outputs[0].val
        elif op.op_type.startswith("constexpr_") and not _feeds_constexpr_only(op):
            dense[name] = materialize(op)
    return dense


def weight_sparsity(package_or_prog) -> float:
    """Fraction of zeros over every weight of ``weight_bits``, after decompression."""
    dense = dense_weights(package_or_prog)
    total = sum(w.size for w in dense.values())
    return float(sum(np.count_nonzero(w == 0) for w in dense.values()) / total) if total else 0.0
