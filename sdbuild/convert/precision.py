"""The float16 precision pass, folding each weight's cast as soon as it can.

coremltools' ``common::add_fp16_cast`` inserts a ``cast`` to float16 before
every op that reads a float32 value; for a constant the cast's value is
computed on the spot, and only the later ``const_elimination`` and
``dead_code_elimination`` passes replace the casts by float16 constants and
drop the float32 ones. Between the two, every weight is held in float32 and
in float16. ``add_fp16_cast_folding`` does the same casts op by op, and once
all the readers of a float32 constant read it through casts, it replaces
those casts by float16 constants as ``const_elimination`` would (same value,
same name, same place) and removes the float32 constant, whose memory then
goes back.
"""

from __future__ import annotations

import contextlib
import gc

import numpy as np

from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import types
from coremltools.converters.mil.mil.types.type_mapping import string_to_nptype
from coremltools.converters.mil.mil.passes.defs.quantization import add_fp16_cast
from coremltools.converters.mil.mil.passes.pass_registry import register_pass

PASS_NAME = "sdbuild::add_fp16_cast_folding"
_SLICE = 1 << 20  # elements per slice of a weight in the overflow test


@register_pass(namespace="sdbuild")
class add_fp16_cast_folding(add_fp16_cast):
    """``common::add_fp16_cast``, with casts of float32 constants folded as soon as all their readers are cast."""

    def apply(self, prog):
        # The TorchScript module the frontend loaded may sit in a reference cycle; until it
        # is collected, its tensors keep the float32 weights alive whatever the program drops.
        gc.collect()
        with _broadcast_casts():
            super().apply(prog)

    @staticmethod
    def fp16_overflow(op) -> bool:
        """The base pass's test, computed in slices: any finite-range input constant above float16's range.

        The base pass takes ``np.where`` of a whole weight (four int64 index
        arrays: about 1 GB for SD's largest convolution) once per reader.
        """
        for var in _input_vars(op):
            if var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32"):
                flat = np.asarray(var.op.val.val).reshape(-1)
                for start in range(0, flat.size, _SLICE):
                    magnitude = np.abs(flat[start : start + _SLICE])
                    # Magnitudes from 1e38 up stand for infinities (attention masks): float16 inf is fine.
                    if np.max(magnitude, where=magnitude < 1e38, initial=0.0) > 65504:
                        return True
        return False

    def transform_op(self, op):
        constants = [v for v in _input_vars(op) if v.op is not None and v.op.op_type == "const" and v.dtype == types.fp32]
        transformed = super().transform_op(op)
        for var in constants:
            _fold_casts_of(var)
        return transformed


def _input_vars(op):
    for value in op.inputs.values():
        yield from value if isinstance(value, (list, tuple)) else (value,)


def _fold_casts_of(var) -> None:
    """If every reader of the float32 constant ``var`` is a float16 cast, make each cast a constant and drop ``var``."""
    readers = list(var.child_ops)
    if not readers or var in var.op.enclosing_block.outputs:
        return
    for reader in readers:
        out = reader.outputs[0]
        if reader.op_type != "cast" or out.dtype != types.fp16 or out.val is None:
            return
    for cast in readers:
        out = cast.outputs[0]
        block = cast.enclosing_block
        # Built in the pass's own block context: entering the block again would, on leaving,
        # re-walk the whole block (coremltools' non-replaceable-var propagation) for each weight.
        folded = mb.const(val=out.val, before_op=cast, name=out.name)
        block.replace_uses_of_var_after_op(anchor_op=cast, old_var=out, new_var=folded)
        block.remove_ops([cast])
        out._sym_val = None  # the folded const holds the value now; the removed cast stays listed until the pass ends
    const = var.op
    const.enclosing_block.remove_ops([const])
    # The base pass walks a list of the block's ops taken before it started, removed ops
    # included, so the removed const stays reachable until the pass ends: let go of its
    # value (held by its output and by its ``val`` input) now.
    var._sym_val = None
    const.val._sym_val = None


@contextlib.contextmanager
def _broadcast_casts():
    """Within: casting a broadcast constant (one value, zero strides: a placeholder, ``convert.placeholders``)
    casts its one value and broadcasts the result, instead of making the whole array."""
    from coremltools.converters.mil.mil.ops.defs.iOS15.elementwise_unary import cast

    from sdbuild.convert.placeholders import is_broadcast

    original = cast.__dict__["get_cast_value"]
    get_cast_value = original.__func__

    def cast_value(cls, input_var, dtype_val):
        val = input_var.val
        if isinstance(val, np.ndarray) and val.size > 1 and is_broadcast(val.shape, val.strides):
            one = np.array(val.flat[0]).astype(string_to_nptype(dtype_val))
            return np.broadcast_to(one, val.shape)
        return get_cast_value(cls, input_var, dtype_val)

    cast.get_cast_value = classmethod(cast_value)
    try:
        yield
    finally:
        cast.get_cast_value = original


# --- upcast attention ----------------------------------------------------------

# Ops that carry attention scores from the q·k product to the softmax unchanged in kind:
# the mask addition and the reshapes and transposes a converter puts between them.
_SCORE_PATH = frozenset({"add", "mul", "real_div", "reshape", "transpose", "squeeze", "expand_dims"})
_PRODUCTS = frozenset({"matmul", "einsum"})
_MAX_PATH = 4


def cast_all(op) -> bool:
    """The float16 pass's op selector for a model computed in float16 throughout."""
    return True


def cast_all_but_attention_scores(op) -> bool:
    """The op selector for ``upcast_attention`` models (SD 2.1's unet): attention scores stay float32.

    diffusers computes q·kᵀ and the softmax in float32 for these models and
    casts the probabilities back before they weight the values; scores of
    large-norm queries overflow float16 otherwise. False (keep float32) for
    every ``softmax``, the ``matmul``/``einsum`` whose product reaches a
    softmax through at most a few mask additions, reshapes and transposes,
    and the ops on that path; True for all others.
    """
    if op.op_type == "softmax":
        return False
    out = op.outputs[0] if op.outputs else None
    if out is None or not _reaches_softmax(out, _MAX_PATH):
        return True
    if op.op_type in _PRODUCTS:
        return False
    return not (op.op_type in _SCORE_PATH and _comes_from_product(op, _MAX_PATH))


def _reaches_softmax(var, steps: int) -> bool:
    for child in var.child_ops:
        if child.op_type == "softmax":
            return True
        if steps and child.op_type in _SCORE_PATH and _reaches_softmax(child.outputs[0], steps - 1):
            return True
    return False


def _comes_from_product(op, steps: int) -> bool:
    for var in _input_vars(op):
        producer = var.op
        if producer is None:
            continue
        if producer.op_type in _PRODUCTS:
            return True
        if steps and producer.op_type in _SCORE_PATH and _comes_from_product(producer, steps - 1):
            return True
    return False
