"""Reference executor: run the ML program of a saved ``.mlpackage`` on the CPU with PyTorch.

Core ML prediction exists only on macOS; this runs the very program a package
ships, op by op, with the weights read from the package's own weight file, so
conversion, compression and chunking can be checked on Linux.

    prog = load_program("Unet.mlpackage")
    out = prog.run({"sample": x, "timestep": t, "encoder_hidden_states": c})

Loading parses the program (coremltools' MIL proto reader), checks the weight
file's structure and picks a kernel for every op (sdbuild.mil.kernels). The
weights themselves (float constants of ``IN_FILE_MIN`` elements and more)
stay in the package's weight file, and compressed ones (constexpr results of
``IN_FILE_MIN`` elements and more) stay compressed: each is read, or
decompressed, when an op that takes it runs and freed when the op is done, so
a loaded program holds no float copy of them. ``run`` then walks a
precomputed plan: per op a kernel, its constant arguments already bound (or
where in the weight file to read them), the names of its run-time arguments,
and what to round or free after it: an activation lives until its last reader.

Precision: ``fp32`` holds every value in float32 (the upper bound of what a
device can reach); ``fp16`` (default) rounds every float16 tensor of the
program to float16 after each op, as a device holds it. Either way the
arithmetic itself runs in float32.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import tempfile
import time
import warnings
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sdbuild.errors import ModelInputError, PackageError, UnsupportedOpError, UsageError
from sdbuild.mil import kernels as _kernels
from sdbuild.mil.validation import memoized_type_info
from sdbuild.mlpackage import (
    BLOB_HEADER,
    BLOB_SENTINEL,
    BLOB_STORAGE_VERSION,
    array_dtype,
    program_blob_refs,
    read_blob_record,
    read_manifest,
    weight_file_of,
)

PRECISIONS = ("fp16", "fp32")



# --------------------------------------------------------------------------- dtype kinds


def _kind(dtype) -> str:
    """'fp16', 'fp32', 'int', 'bool' or 'other' for a pymil builtin dtype."""
    from coremltools.converters.mil.mil import types

    if dtype in (types.fp16,):
        return "fp16"
    if types.is_float(dtype):
        return "fp32"
    if types.is_bool(dtype):
        return "bool"
    if types.is_int(dtype):
        return "int"
    return "other"


def _round_fp16(t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    return t.to(torch.float16).to(torch.float32)


def _as_fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def _as_int(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.int64:
        return t
    if t.is_floating_point():
        t = torch.trunc(t)
    return t.to(torch.int64)


def _as_bool(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.bool else t != 0


def _keep(t):
    return t


def _finisher(kind: str, precision: str, exact: bool) -> Callable:
    """What to apply to an op's result so it holds as the declared dtype would."""
    if kind == "fp16":
        return _as_fp32 if (precision == "fp32" or exact) else _round_fp16
    if kind == "fp32":
        return _as_fp32
    if kind == "int":
        return _as_int
    if kind == "bool":
        return _as_bool
    return _keep


# Float16 constants of at least this many elements (the weights) stay float16 in memory and are
# widened to float32 just before each op that reads them: a loaded model holds its weights once, at
# the package's own size, instead of a float32 copy beside them. Widening is exact: results are equal.
NARROW_MIN = 1 << 14


def _as_data(value) -> Any:
    """A stored constant (numpy array or scalar) as the tensor kernels take (large float16 ones narrow)."""
    if isinstance(value, str):
        return value
    arr = np.asarray(value)
    if arr.dtype == np.float16 and arr.size >= NARROW_MIN:
        arr = np.ascontiguousarray(arr)
        with warnings.catch_warnings():
            # The program's own (read-only) array is shared, not copied; nothing writes to it.
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)
    if arr.dtype.kind == "f":
        return torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))
    if arr.dtype.kind in "iu":
        return torch.from_numpy(np.array(arr, dtype=np.int64, order="C"))
    if arr.dtype.kind == "b":
        return torch.from_numpy(np.array(arr, order="C"))
    if arr.dtype.kind in "US":
        return str(arr)
    raise TypeError(f"constant of dtype {arr.dtype} has no tensor form")


def _is_narrow(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.float16


def _wide(value) -> Any:
    """A narrow (float16) constant as the float32 tensor kernels compute with; anything else as it is."""
    return value.to(torch.float32) if _is_narrow(value) else value


def _as_attr(value) -> Any:
    """A constant or run-time value as the plain Python value attribute inputs take."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# Float constants of at least this many elements (the weights) are left in the package's weight file:
# loading reads their shapes only, and each is read from the file while an op that takes it runs.
# The values are the file's bytes either way: results are equal.
IN_FILE_MIN = 1 << 14


class _WeightFile:
    """An open weight file (kept open, so a loaded program reads the file it was loaded from)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        weakref.finalize(self, os.close, self._fd)

    def read_into(self, array: np.ndarray, offset: int) -> None:
        view, done = memoryview(array).cast("B"), 0
        while done < len(view):
            if hasattr(os, "preadv"):  # straight into the array
                got = os.preadv(self._fd, [view[done:]], offset + done)
            else:
                chunk = os.pread(self._fd, len(view) - done, offset + done)
                got = len(chunk)
                view[done : done + got] = chunk
            if got <= 0:
                raise PackageError(f"{self.path}: the weight file ends at {offset + done} (changed since it was loaded?)")
            done += got


@dataclass(frozen=True)
class _InFile:
    """A weight left in its package's weight file: where it is, its dtype and shape."""

    file: _WeightFile
    offset: int  # of its data
    dtype: np.dtype
    shape: tuple

    def array(self) -> np.ndarray:
        """Its values, read from the file into an array of their own."""
        array = np.empty(self.shape, self.dtype)
        self.file.read_into(array, self.offset)
        return array

    def tensor(self) -> torch.Tensor:
        """As the kernels compute with: float32."""
        return _as_fp32(torch.from_numpy(self.array()))


@dataclass(frozen=True, eq=False)
class _Compressed:
    """A constexpr op's result left compressed: the constexpr ops that make it (a chain, in program order),
    each as its kernel and its constant inputs as loaded, run whenever a step takes the result.

    ``ops``: per op (kernel function, attribute params, ((param, how, ref), ...), output names), where
    ``how`` 0: ``ref`` is the value; 1: an ``_InFile`` to read; 2: the name of an earlier op's result.
    ``finish``: what the plan applies to a result that is not float16 (the op's finisher), as at load time.
    """

    ops: tuple
    name: str
    finish: Callable | None = None

    def array(self) -> np.ndarray:
        """Its values as the kernel makes them (numpy), decompressed into an array of their own."""
        return _run_constexprs(self.ops)[self.name]

    def tensor(self) -> torch.Tensor:
        """As the kernels compute with: float32, or through ``finish`` (the values a load-time result holds)."""
        array = np.asarray(self.array())
        data = _wide(_as_data(array))
        return data if array.dtype == np.float16 or self.finish is None else self.finish(data)


def _run_constexprs(ops) -> dict:
    """name -> result (numpy) of every output of ``ops`` (as ``_Compressed.ops``), run in order."""
    made: dict[str, Any] = {}
    for fn, attrs, args, outs in ops:
        kw = {}
        for param, how, ref in args:
            value = ref if how == 0 else ref.array() if how == 1 else made[ref]
            kw[param] = _as_attr(value) if param in attrs else value
        result = fn(**kw)
        made.update(zip(outs, result if isinstance(result, tuple) else (result,)))
    return made


def _materialized(value) -> Any:
    """A constant's data as ``_as_data`` makes it, read from the weight file or decompressed where it was left so."""
    if isinstance(value, _InFile):
        return _as_data(value.array())
    return value.tensor() if isinstance(value, _Compressed) else value


def _elements(var) -> int:
    """The number of elements of ``var`` (0 where its shape is not known)."""
    shape = var.shape
    return math.prod(shape) if all(isinstance(d, (int, np.integer)) for d in shape) else 0


# --------------------------------------------------------------------------- package reading


def _read_manifest(pkg: Path) -> tuple[Path, Path]:
    """(model spec file, weights folder) of a package, from its Manifest.json."""
    files = read_manifest(pkg)
    if not files.spec.is_file():
        raise PackageError(f"{pkg}: the model specification {files.spec.relative_to(pkg / 'Data')} is missing (truncated package?)")
    return files.spec, files.weights


def _read_spec(pkg: Path, spec_file: Path):
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(spec_file.read_bytes())
    except Exception as e:  # protobuf raises DecodeError and friends
        raise PackageError(f"{pkg}: the model specification is corrupted ({type(e).__name__})") from None
    if spec.WhichOneof("Type") != "mlProgram":
        raise PackageError(f"{pkg}: holds a {spec.WhichOneof('Type')} model; the reference executor runs ML programs only")
    return spec


def _check_weight_file(pkg: Path, path: Path, offsets: set[int]) -> None:
    """Walk the blob storage file and check every referenced blob lies whole inside it.

    The weight file's layout is ``sdbuild.mlpackage``'s (``BLOB_*``): a header
    (blob count, version), then per blob a metadata record (sentinel, dtype,
    size, data offset) and its data. Truncation or damaged records are caught
    here, before anything reads past the end of the file.
    """
    rel = path.relative_to(pkg)
    if not path.is_file():
        raise PackageError(f"{pkg}: weight file {rel} is missing (truncated package?)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(BLOB_HEADER)
        if len(header) < BLOB_HEADER:
            raise PackageError(f"{pkg}: weight file {rel} is truncated ({size} bytes, no header)")
        count, version = struct.unpack_from("<II", header)
        if version != BLOB_STORAGE_VERSION:
            raise PackageError(f"{pkg}: weight file {rel} is corrupted (storage version {version}, expected {BLOB_STORAGE_VERSION})")
        for offset in sorted(offsets):
            record = read_blob_record(f, offset)
            if record is None:
                raise PackageError(f"{pkg}: weight file {rel} is truncated ({size} bytes; a weight starts at {offset})")
            sentinel, _dtype, nbytes, data_offset = record
            if sentinel != BLOB_SENTINEL:
                raise PackageError(f"{pkg}: weight file {rel} is corrupted (bad weight record at offset {offset})")
            if data_offset + nbytes > size:
                raise PackageError(
                    f"{pkg}: weight file {rel} is truncated ({size} bytes; a weight needs bytes up to {data_offset + nbytes})"
                )
    if len(offsets) > count:
        raise PackageError(f"{pkg}: weight file {rel} is corrupted (header counts {count} weights, program uses {len(offsets)})")


def _check_weights(pkg: Path, spec, weights_dir: Path) -> None:
    by_file: dict[str, set[int]] = {}
    for name, offset in program_blob_refs(spec):
        by_file.setdefault(weight_file_of(weights_dir, name), set()).add(offset)
    for path, offsets in by_file.items():
        _check_weight_file(pkg, path, offsets)


def check_package_weights(pkg: Path, spec) -> None:
    """PackageError (one line) when a weight the ML program ``spec`` points at is missing or truncated in ``pkg``."""
    _spec_file, weights_dir = _read_manifest(Path(pkg))
    _check_weights(Path(pkg), spec, weights_dir)


# --------------------------------------------------------------------------- the program


@dataclass
class _Plan:
    """A precomputed run: steps plus the constant outputs folded at load time."""

    steps: list = field(default_factory=list)
    consts: dict = field(default_factory=dict)  # program outputs that are constants
    input_kinds: dict = field(default_factory=dict)


# The einsums of SPLIT_EINSUM's attention, in either operand order: equation -> where (q, k) are for the
# scores, where (probabilities, v) are for the values (kernels.fused_einsum_attention's canonical forms).
_SCORES_ORDER = {_kernels.EINSUM_SCORES: (0, 1), "bkhc,bchq->bkhq": (1, 0)}
_VALUES_ORDER = {_kernels.EINSUM_VALUES: (0, 1), "bchk,bkhq->bchq": (1, 0)}


class Program:
    """A loaded ML program, ready to run.

    ``inputs``: name -> (shape, numpy dtype) as the model declares them, in order.
    ``outputs``: output names in order; ``output_dtypes``: name -> declared numpy dtype.
    ``opset``: the main function's opset, e.g. "iOS17".
    """

    def __init__(self, path: Path, spec, function, kernel_table=None, function_name: str | None = None, in_file=None,
                 decompress_at_load: bool = False):
        self.path = path
        self.spec = spec
        self.function_name = function_name  # of a multifunction package; None for a single-function one
        self._function = function
        # A multifunction package declares inputs and outputs per function, none at the top.
        description = _function_description(spec, function_name) if function_name else spec.description
        self._table = kernel_table
        self.opset = function.opset_version.name if function.opset_version is not None else "iOS15"
        self._opset_number = function.opset_version.value if function.opset_version is not None else 6
        self.inputs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._allowed_shapes: dict[str, Callable[[tuple], bool]] = {}
        for feature in description.input:
            self._declare_input(feature)
        self.outputs: list[str] = [o.name for o in description.output]
        self.output_dtypes: dict[str, np.dtype] = {}
        for feature in description.output:
            arr = feature.type.multiArrayType
            self.output_dtypes[feature.name] = np.dtype(array_dtype(arr.dataType))
        # Program output vars, matched to the declared names by position.
        self._output_vars = [v.name for v in function.outputs]
        if len(self._output_vars) != len(self.outputs):
            raise PackageError(f"{path}: the program returns {len(self._output_vars)} values but declares {len(self.outputs)} outputs")
        self._const_data: dict[str, Any] = {}  # const var name -> tensor (shared by both precisions)
        # const var name -> where its value is in the weight file (its var holds a stand-in of its shape)
        self._in_file: dict[str, _InFile] = dict(in_file or {})
        self._raw_results: dict[str, Any] = {}  # small constexpr outputs (tensors), decompressed once
        self._raw_is_fp16: set[str] = set()  # constexpr outputs whose values are float16 already
        # constexpr outputs of IN_FILE_MIN elements or more (and the others of their ops): decompressed per step
        self._compressed: dict[str, _Compressed] = {}
        self._plans: dict[str, _Plan] = {}
        self._check_kernels()
        self._decompress_weights(decompress_at_load)

    @property
    def function(self):
        """The pymil Function this program runs (ops, vars and their names). A const op's var left in the
        weight file holds a stand-in of its shape (``IN_FILE_MIN``): its values are ``constant(var)``."""
        return self._function

    def constant(self, var) -> np.ndarray:
        """The values of a const op's ``var`` (read from the weight file where they were left there)."""
        return self._in_file[var.name].array() if var.name in self._in_file else np.asarray(var.val)

    def _kernel(self, op):
        k = _kernels.find_kernel(op.op_type, self._opset_number, self._table)
        if k is None or op.blocks:
            raise UnsupportedOpError(f"no kernel for op '{op.op_type}' (opset {self.opset}) in {self.path.name}")
        unknown = set(op.inputs) - k.params
        if unknown:
            raise UnsupportedOpError(
                f"op '{op.op_type}' (opset {self.opset}) in {self.path.name} has input(s) "
                f"{', '.join(sorted(unknown))} that its kernel does not know"
            )
        return k

    def _check_kernels(self) -> None:
        """Refuse, at load time, a program with any op the kernel table cannot run."""
        for op in self._function.operations:
            if op.op_type != "const":
                self._kernel(op)

    def _decompress_weights(self, at_load: bool) -> None:
        """Check the compile-time (constexpr) weight decompression ops; run those whose results are all
        small (every one, ``at_load``) once, now. One with a result of ``IN_FILE_MIN`` elements or more is left compressed
        (``_Compressed``): each step that takes its result runs it (with the constexpr ops it reads from)
        as the step runs, so a loaded program holds no decompressed weight."""
        raw: dict[str, Any] = {}  # numpy results of the ops run now, for constexpr ops that feed each other
        left: dict[str, dict] = {}  # result of an op left compressed -> the ops making it: program index -> op
        for index, op in enumerate(self._function.operations):
            if op.op_type == "const":
                continue
            k = self._kernel(op)
            if not k.raw:
                continue
            args, chain = [], {}
            for param, v in op.inputs.items():
                if v.op is not None and v.op.op_type == "const":
                    args.append((param, 1, self._in_file[v.name]) if v.name in self._in_file else (param, 0, v.val))
                elif v.name in raw:
                    args.append((param, 0, raw[v.name]))
                elif v.name in left:
                    args.append((param, 2, v.name))
                    chain.update(left[v.name])
                else:
                    raise PackageError(f"{self.path}: '{op.op_type}' op {op.name} has a non-constant input '{param}'")
            outs = [o.name for o in op.outputs]
            chain[index] = (k.fn, k.attrs, tuple(args), tuple(outs))
            if not at_load and any(_elements(o) >= IN_FILE_MIN for o in op.outputs):
                for name in outs:
                    left[name] = chain
                    self._compressed[name] = _Compressed(tuple(chain[i] for i in sorted(chain)), name)
                continue
            made = _run_constexprs(tuple(chain[i] for i in sorted(chain)))
            for name in outs:
                value = raw[name] = made[name]
                if np.asarray(value).dtype == np.float16:
                    self._raw_is_fp16.add(name)
                self._raw_results[name] = _as_data(value)

    # ---- inputs

    def _declare_input(self, feature) -> None:
        kind = feature.type.WhichOneof("Type")
        if kind != "multiArrayType":
            raise PackageError(f"{self.path}: input '{feature.name}' is a {kind}; only multi-array inputs are supported")
        arr = feature.type.multiArrayType
        shape = tuple(int(s) for s in arr.shape)
        dtype = np.dtype(array_dtype(arr.dataType))
        flex = arr.WhichOneof("ShapeFlexibility")
        if flex == "enumeratedShapes":
            shapes = {tuple(int(s) for s in e.shape) for e in arr.enumeratedShapes.shapes} | {shape}
            self._allowed_shapes[feature.name] = lambda s, shapes=shapes: tuple(s) in shapes
        elif flex == "shapeRange":
            ranges = [(r.lowerBound, r.upperBound) for r in arr.shapeRange.sizeRanges]
            self._allowed_shapes[feature.name] = lambda s, ranges=ranges: len(s) == len(ranges) and all(
                lo <= d and (hi < 0 or d <= hi) for d, (lo, hi) in zip(s, ranges)
            )
        else:
            self._allowed_shapes[feature.name] = lambda s, shape=shape: tuple(s) == shape
        self.inputs[feature.name] = (shape, dtype)

    def _check_inputs(self, feeds: dict) -> None:
        expected = ", ".join(self.inputs)
        for name in feeds:
            if name not in self.inputs:
                raise ModelInputError(f"{self.path.name}: unexpected input '{name}'; the model takes: {expected}")
        for name, (shape, dtype) in self.inputs.items():
            if name not in feeds:
                raise ModelInputError(
                    f"{self.path.name}: missing input '{name}' (expected shape {list(shape)}, {dtype.name})"
                )
            value = np.asarray(feeds[name])
            if value.dtype.kind not in "fiub" or (dtype.kind in "iu" and value.dtype.kind == "f"):
                raise ModelInputError(
                    f"{self.path.name}: input '{name}' has dtype {value.dtype}, expected {dtype.name}"
                )
            if not self._allowed_shapes[name](value.shape):
                raise ModelInputError(
                    f"{self.path.name}: input '{name}' has shape {list(value.shape)}, expected {list(shape)}"
                )

    # ---- planning

    def _const_tensor(self, var) -> Any:
        """A const op's value as the kernels take it, or where to read it (``_InFile``) when it is left in the weight file."""
        if var.name in self._in_file:
            return self._in_file[var.name]
        if isinstance(var.val, np.ndarray) and var.val.size >= IN_FILE_MIN and not any(var.val.strides):
            raise PackageError(f"{self.path}: constant '{var.name}' is a stand-in whose place in the weight file is unknown")
        if var.name not in self._const_data:
            self._const_data[var.name] = _as_data(var.val)
        return self._const_data[var.name]

    def _attention_chains(self) -> dict:
        """Find matmul -> [mul/real_div by a constant] -> softmax(last axis) -> matmul chains.

        Returns {final matmul op name: (first matmul, scale op or None, softmax, v, values first)}
        for chains whose intermediates nothing else reads. The first matmul may take q
        transposed; the last is probabilities @ v, or v @ probabilities^T (values first:
        Apple's ORIGINAL attention, channels first). The executor runs each with
        kernels.fused_attention, which rounds exactly as the separate ops would but
        never holds the whole score tensor.
        """
        outputs = set(self._output_vars)

        def sole_consumer(var):
            children = list(var.child_ops)
            return children[0] if len(children) == 1 and var.name not in outputs else None

        def flag(op, name):
            v = op.inputs.get(name)
            return bool(v.val) if v is not None else False

        chains = {}
        for op in self._function.operations:
            if op.op_type != "softmax":
                continue
            x = op.inputs["x"]
            axis = op.inputs["axis"].val if "axis" in op.inputs else -1
            if x.rank is None or axis not in (-1, x.rank - 1) or sole_consumer(x) is not op:
                continue
            producer, scale_op = x.op, None
            if producer is not None and producer.op_type in ("mul", "real_div"):
                y = producer.inputs["y"]
                if y.op is None or y.op.op_type != "const" or np.size(y.val) != 1:
                    continue
                scale_op = producer
                if sole_consumer(producer.inputs["x"]) is not producer:
                    continue
                producer = producer.inputs["x"].op
            if producer is None or producer.op_type != "matmul":
                continue
            final = sole_consumer(op.outputs[0])
            if final is None or final.op_type != "matmul" or flag(final, "transpose_x"):
                continue
            if final.inputs["x"] is op.outputs[0] and not flag(final, "transpose_y"):
                chains[final.name] = (producer, scale_op, op, final.inputs["y"], False)
            elif final.inputs["y"] is op.outputs[0] and flag(final, "transpose_y"):
                chains[final.name] = (producer, scale_op, op, final.inputs["x"], True)
        return chains

    def _einsum_attention_chains(self) -> dict:
        """Find SPLIT_EINSUM's per-head einsum(q, k) -> softmax(axis 1) -> einsum(probabilities, v) chains
        (``_SCORES_ORDER``, ``_VALUES_ORDER``: either operand order, as coremltools may swap them) whose
        intermediates nothing else reads: {final einsum op name: (first einsum, softmax, {q, k, v: operand var})}.

        Run with kernels.fused_einsum_attention, a block of queries at a time: each head's (B, Sk, 1, Sq)
        scores (128 MiB in SD 1.5's first transformer) and their softmax never exist whole.
        """
        outputs = set(self._output_vars)

        def sole_consumer(var):
            children = list(var.child_ops)
            return children[0] if len(children) == 1 and var.name not in outputs else None

        def equation(op):
            eq = op.inputs.get("equation")
            return str(eq.val) if eq is not None and eq.val is not None else None

        chains = {}
        for op in self._function.operations:
            if op.op_type != "softmax":
                continue
            x = op.inputs["x"]
            axis = int(op.inputs["axis"].val) if "axis" in op.inputs else -1
            first = x.op
            if x.rank != 4 or axis not in (1, -3) or first is None or sole_consumer(x) is not op:
                continue
            if first.op_type != "einsum" or equation(first) not in _SCORES_ORDER:
                continue
            final = sole_consumer(op.outputs[0])
            if final is None or final.op_type != "einsum" or equation(final) not in _VALUES_ORDER:
                continue
            scores_in, values_in = list(first.inputs["values"]), list(final.inputs["values"])
            probs_at, v_at = _VALUES_ORDER[equation(final)]
            if values_in[probs_at] is not op.outputs[0]:
                continue
            q_at, k_at = _SCORES_ORDER[equation(first)]
            chains[final.name] = (first, op, {"q": scores_in[q_at], "k": scores_in[k_at], "v": values_in[v_at]})
        return chains

    def _build_plan(self, precision: str) -> _Plan:
        """Bind constants and fold everything computable before the inputs are known."""
        plan = _Plan()
        known: dict[str, Any] = {}  # var name -> value computable now (folded results)
        dynamic: set[str] = set()
        for name, var in self._function.inputs.items():
            dynamic.add(name)
            plan.input_kinds[name] = _kind(var.dtype)

        def is_const(var) -> bool:
            return var.name in known or (var.op is not None and var.op.op_type == "const")

        def const_value(var):
            return known[var.name] if var.name in known else self._const_tensor(var)

        used_at: dict[str, int] = {}
        steps = []

        def bind(inputs: dict, attrs) -> tuple[dict, list]:
            """Constant inputs bound now (static); run-time ones named for the step (dyn)."""
            static, dyn = {}, []
            for param, v in inputs.items():
                if isinstance(v, (list, tuple)):
                    refs = []
                    for e in v:
                        if is_const(e):
                            refs.append((False, _wide(_materialized(const_value(e)))))
                        else:
                            refs.append((True, e.name))
                            used_at[e.name] = len(steps)
                    dyn.append((param, 2, refs))
                elif is_const(v):
                    value = const_value(v)
                    if param in attrs:
                        static[param] = _as_attr(_materialized(value))
                    elif isinstance(value, (_InFile, _Compressed)):
                        dyn.append((param, 4, value))  # read (or decompressed) when the step runs, freed after it
                    elif _is_narrow(value):
                        dyn.append((param, 3, value))  # widened when the step runs
                    else:
                        static[param] = value
                else:
                    dyn.append((param, 1 if param in attrs else 0, v.name))
                    used_at[v.name] = len(steps)
            return static, dyn

        chains = self._attention_chains()
        in_chain = {o.name for first, scale, soft, _, _ in chains.values() for o in (first, scale, soft) if o is not None}
        einsum_chains = self._einsum_attention_chains()
        in_chain |= {o.name for first, soft, _ in einsum_chains.values() for o in (first, soft)}

        def rounding(op):
            fin = _finisher(_kind(op.outputs[0].dtype), precision, False)
            return None if fin is _as_fp32 else fin

        for op in self._function.operations:
            if op.op_type == "const" or op.name in in_chain:
                continue
            if op.name in einsum_chains:
                first, soft, operands = einsum_chains[op.name]
                static, dyn = bind(operands, attrs=())
                static.update(finish_scores=rounding(first), finish_probs=rounding(soft))
                fin = _finisher(_kind(op.outputs[0].dtype), precision, False)
                steps.append([_kernels.fused_einsum_attention, static, dyn, [op.outputs[0].name], [fin], [], "einsum attention (fused)"])
                dynamic.add(op.outputs[0].name)
                continue
            if op.name in chains:
                first, scale_op, soft, v, values_first = chains[op.name]
                static, dyn = bind({"q": first.inputs["x"], "k": first.inputs["y"], "v": v}, attrs=())
                transpose_k, transpose_q = first.inputs.get("transpose_y"), first.inputs.get("transpose_x")
                static.update(
                    transpose_q=bool(transpose_q.val) if transpose_q is not None else False,
                    values_first=values_first,
                    transpose_k=bool(transpose_k.val) if transpose_k is not None else False,
                    scale=None if scale_op is None else float(np.asarray(scale_op.inputs["y"].val).reshape(-1)[0]),
                    scale_by_division=scale_op is not None and scale_op.op_type == "real_div",
                    finish_scores=rounding(first),
                    finish_scaled=None if scale_op is None else rounding(scale_op),
                    finish_probs=rounding(soft),
                )
                fin = _finisher(_kind(op.outputs[0].dtype), precision, False)
                steps.append([_kernels.fused_attention, static, dyn, [op.outputs[0].name], [fin], [], "attention (fused)"])
                dynamic.add(op.outputs[0].name)
                continue
            k = self._kernel(op)
            finishers = [_finisher(_kind(o.dtype), precision, k.exact) for o in op.outputs]
            out_names = [o.name for o in op.outputs]
            if k.raw:
                for name, fin in zip(out_names, finishers):
                    if name in self._compressed:
                        known[name] = replace(self._compressed[name], finish=fin)
                        continue
                    value = self._raw_results[name]
                    if name in self._raw_is_fp16:
                        known[name] = value if _is_narrow(value) else _as_fp32(value)
                    else:
                        known[name] = fin(_wide(value))
                continue
            vars_in = []
            for v in op.inputs.values():
                vars_in.extend(v if isinstance(v, (list, tuple)) else [v])
            if all(is_const(v) for v in vars_in):
                # An op on constants only: fold it now, with the run's own rounding.
                kw = {}
                for p, v in op.inputs.items():
                    if isinstance(v, (list, tuple)):
                        kw[p] = [_wide(_materialized(const_value(e))) for e in v]
                    else:
                        value = _materialized(const_value(v))
                        kw[p] = _as_attr(value) if p in k.attrs else _wide(value)
                with torch.inference_mode():
                    result = k.fn(**kw)
                results = result if isinstance(result, (tuple, list)) else (result,)
                for name, fin, value in zip(out_names, finishers, results):
                    known[name] = fin(value)
                continue

            static, dyn = bind(op.inputs, k.attrs)
            steps.append([k.fn, static, dyn, out_names, finishers, [], op.op_type])
            dynamic.update(out_names)

        # Free each intermediate after its last use, so full-size models fit in memory.
        keep = set(self._output_vars)
        for step in steps:
            for name in step[3]:
                if name not in used_at and name not in keep:
                    step[5].append(name)
        for name, i in used_at.items():
            if name not in keep:
                steps[i][5].append(name)
        plan.steps = [tuple(s) for s in steps]
        for name in self._output_vars:
            if name in known:
                plan.consts[name] = _materialized(known[name])
            elif name not in dynamic:
                raise PackageError(f"{self.path}: output '{name}' is not computed by the program")
        return plan

    def _plan(self, precision: str) -> _Plan:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        if precision not in self._plans:
            self._plans[precision] = self._build_plan(precision)
        return self._plans[precision]

    # ---- running

    def run(
        self, inputs: dict, precision: str = "fp16", profile: dict | None = None, observer: "RangeObserver | None" = None
    ) -> dict[str, np.ndarray]:
        """Run the program on ``inputs`` (name -> array of the declared shape).

        Float inputs may come as any float dtype: they are cast to the declared
        dtype as Core ML casts (round to nearest). Returns name -> array for
        every declared output, float outputs as float32 (float16-rounded values
        in fp16 mode; the declared dtypes are in ``output_dtypes``). With a dict
        as ``profile``, adds seconds per op type to it. With an ``observer``,
        every run-time value it names (program inputs included) is shown to it
        as the run makes it.
        """
        plan = self._plan(precision)
        self._check_inputs(inputs)
        env: dict[str, Any] = {}
        for name, (_shape, dtype) in self.inputs.items():
            value = np.asarray(inputs[name])
            kind = plan.input_kinds.get(name, "fp32")
            if kind == "fp16" and precision == "fp16":
                value = value.astype(np.float16)
            if kind in ("fp16", "fp32"):
                env[name] = torch.from_numpy(np.array(value, dtype=np.float32, order="C"))
            elif kind == "int":
                env[name] = torch.from_numpy(np.array(value.astype(dtype), dtype=np.int64))
            else:
                env[name] = torch.from_numpy(np.array(value.astype(bool)))
        with torch.inference_mode():
            if observer is not None:
                self._execute_observed(plan.steps, env, observer)
            elif profile is None:
                self._execute(plan.steps, env)
            else:
                self._execute_profiled(plan.steps, env, profile)
        results = {}
        for declared, var in zip(self.outputs, self._output_vars):
            value = plan.consts[var] if var in plan.consts else env[var]
            array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            dtype = self.output_dtypes[declared]
            if dtype.kind == "f":
                array = array.astype(np.float32, copy=False)
            elif array.dtype != dtype:
                array = array.astype(dtype)
            results[declared] = array
        return results

    @staticmethod
    def _execute(steps, env) -> None:
        for fn, static, dyn, outs, finishers, frees, _op_type in steps:
            kw = static.copy()
            for param, how, ref in dyn:
                if how == 0:
                    kw[param] = env[ref]
                elif how == 1:
                    kw[param] = _as_attr(env[ref])
                elif how == 3:
                    kw[param] = ref.to(torch.float32)
                elif how == 4:
                    kw[param] = ref.tensor()
                else:
                    kw[param] = [env[r] if is_var else r for is_var, r in ref]
            result = fn(**kw)
            if len(outs) == 1:
                if isinstance(result, (tuple, list)):
                    result = result[0]
                env[outs[0]] = finishers[0](result)
            else:
                for name, fin, value in zip(outs, finishers, result):
                    env[name] = fin(value)
            for name in frees:
                del env[name]

    @classmethod
    def _execute_profiled(cls, steps, env, profile: dict) -> None:
        for step in steps:
            start = time.perf_counter()
            cls._execute((step,), env)
            profile[step[6]] = profile.get(step[6], 0.0) + time.perf_counter() - start

    @classmethod
    def _execute_observed(cls, steps, env, observer: "RangeObserver") -> None:
        observer.runs += 1
        for name in observer.names & env.keys():
            observer.record(name, env[name])
        for step in steps:
            # Shown before the step runs: it frees the values read for the last time.
            cls._execute((step[:5] + ((),) + step[6:],), env)
            for name in observer.names.intersection(step[3]):
                observer.record(name, env[name])
            for name in step[5]:
                del env[name]

    def op_counts(self) -> dict[str, int]:
        """Number of ops per op type in the main function (consts included)."""
        counts: dict[str, int] = {}
        for op in self._function.operations:
            counts[op.op_type] = counts.get(op.op_type, 0) + 1
        return counts


class RangeObserver:
    """Running minimum and maximum of named values over runs (``Program.run(..., observer=)``).

    ``names``: the var names to watch; ``ranges``: name -> [min, max] of every
    value seen so far, as the run held it (float16-rounded in fp16 mode); ``runs``: runs watched.
    """

    def __init__(self, names):
        self.names = frozenset(names)
        self.ranges: dict[str, list[float]] = {}
        self.runs = 0

    def record(self, name: str, value) -> None:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() == 0:
            return
        lo, hi = torch.aminmax(value)
        seen = self.ranges.get(name)
        if seen is None:
            self.ranges[name] = [float(lo), float(hi)]
        else:
            seen[0], seen[1] = min(seen[0], float(lo)), max(seen[1], float(hi))


def _function_description(spec, name: str):
    return next(f for f in spec.description.functions if f.name == name)


# Blob data types read with plain file reads (whole bytes per value); sub-byte ones go through coremltools.
_READ_DIRECTLY = ("fp16", "fp32", "int8", "uint8", "int16", "uint16", "int32", "uint32")


@contextlib.contextmanager
def _weights_read_one_at_a_time(milproto):
    """Within: coremltools' program loader reads each whole-byte weight with one file read into an array of
    its own, instead of through its blob reader, which memory-maps the weight file and keeps it mapped
    while the program loads: every page it touched stayed resident beside the copies made of them (SD 1.5's
    float16 unet peaked at 3.6 GiB loading, 2.0 GiB loaded). The same values, bit for bit."""
    from coremltools.converters.mil.mil import types

    original = milproto._load_file_value
    direct = {getattr(types, name): np.dtype(name.replace("fp", "float")) for name in _READ_DIRECTLY}

    def load_file_value(context, filevalue_spec, dtype):
        if dtype not in direct:
            return original(context, filevalue_spec, dtype)
        path = os.path.join(context.weights_dir, filevalue_spec.fileName.split("/")[-1])
        with open(path, "rb") as f:
            _sentinel, _kind, nbytes, data_offset = read_blob_record(f, filevalue_spec.offset)
            f.seek(data_offset)
            return np.fromfile(f, dtype=direct[dtype], count=nbytes // direct[dtype].itemsize)

    milproto._load_file_value = load_file_value
    try:
        yield
    finally:
        milproto._load_file_value = original


# The inline input of an iOS16 constexpr op that coremltools' type inference reads the shape of only (the
# packed keys, the quantized values, the kept values): left in the weight file like a const op's weight.
_LEFT_INLINE = {"constexpr_lut_to_dense": "indices", "constexpr_affine_dequantize": "quantized_data",
                "constexpr_sparse_to_dense": "nonzero_data"}  # fmt: skip


@contextlib.contextmanager
def _weights_left_in_file(milproto, in_file: dict):
    """Within: coremltools' program loader gives each const op whose value is a float tensor of at least
    ``IN_FILE_MIN`` elements in a weight file a stand-in of its shape and dtype (one zero, broadcast: no
    memory) instead of reading it, and ``in_file`` gets its var's name -> where the value is (``_InFile``).
    The same for an iOS16 constexpr op's inline input named in ``_LEFT_INLINE`` of that many elements (of
    any whole-byte dtype: a compressed weight's packed keys); its other inline inputs are read as before."""
    from coremltools.converters.mil.mil import types

    load_const, load_value = milproto._load_const_op, milproto._load_value
    floats = {types.fp16: np.dtype(np.float16), types.fp32: np.dtype(np.float32)}
    whole = {getattr(types, name): np.dtype(name.replace("fp", "float")) for name in _READ_DIRECTLY}
    files: dict[str, _WeightFile] = {}
    current: list = []  # the const op being loaded (its var's name), or the constexpr op ([its input's blob, left])

    def leave_in_file(context, value_spec):
        if not current or value_spec.WhichOneof("value") != "blobFileValue" or value_spec.type.WhichOneof("type") != "tensorType":
            return load_value(context, value_spec)
        valuetype = milproto.proto_to_types(value_spec.type)
        blob = value_spec.blobFileValue
        if isinstance(current[-1], str):
            dtype = floats.get(valuetype.get_primitive())
        else:
            dtype = whole.get(valuetype.get_primitive()) if current[-1][0] == (blob.fileName, blob.offset) else None
        shape = tuple(int(d) for d in valuetype.get_shape())
        if dtype is None or int(np.prod(shape)) < IN_FILE_MIN:
            return load_value(context, value_spec)
        path = os.path.join(context.weights_dir, blob.fileName.split("/")[-1])
        if path not in files:
            files[path] = _WeightFile(Path(path))
        with open(path, "rb") as f:
            _sentinel, _kind, nbytes, data_offset = read_blob_record(f, blob.offset)
        need = int(np.prod(shape)) * dtype.itemsize
        if nbytes != need:
            raise PackageError(f"{path}: the weight at {blob.offset} holds {nbytes} bytes; its {shape} {dtype} needs {need}")
        left = _InFile(files[path], data_offset, dtype, shape)
        if isinstance(current[-1], str):
            in_file[current[-1]] = left
        else:
            current[-1][1] = left
        return np.broadcast_to(np.zeros((), dtype), shape)

    def load_const_op(context, op_spec):
        inline = op_spec.attributes.get(_LEFT_INLINE.get(op_spec.type, ""))
        if op_spec.type == "const" and len(op_spec.outputs) == 1:
            current.append(op_spec.outputs[0].name)
        elif inline is not None and inline.WhichOneof("value") == "blobFileValue":
            current.append([(inline.blobFileValue.fileName, inline.blobFileValue.offset), None])
        else:
            return load_const(context, op_spec)
        try:
            load_const(context, op_spec)
            if not isinstance(current[-1], str) and current[-1][1] is not None:
                op = context.get_var_from_name(op_spec.outputs[0].name).op
                in_file[op.inputs[_LEFT_INLINE[op_spec.type]].name] = current[-1][1]
        finally:
            current.pop()

    milproto._load_const_op, milproto._load_value = load_const_op, leave_in_file
    try:
        yield
    finally:
        milproto._load_const_op, milproto._load_value = load_const, load_value


def _only_function(spec, name: str):
    """``spec`` with function ``name`` alone, where its program has others besides.

    Each function of a multifunction package (one per resolution) is a whole
    program: building every one of them to run one took 3x the time for three
    resolutions. Weights stay in weight.bin, so the copy is of the ops only.
    Without ``name`` among them, ``spec`` itself (load_program names what it has).
    """
    functions = spec.mlProgram.functions
    if name not in functions or len(functions) == 1:
        return spec
    only = type(spec)()
    only.CopyFrom(spec)
    for other in [f for f in only.mlProgram.functions if f != name]:
        del only.mlProgram.functions[other]
    return only


def load_program(path, kernels: dict | None = None, function: str | None = None, *, decompress_at_load: bool = False) -> Program:
    """Load the ML program of the ``.mlpackage`` at ``path`` for running on the CPU.

    ``function``: which function of a multifunction package (one per
    resolution, e.g. ``h512_w768``); default: the package's default function.
    ``kernels`` replaces the kernel table (tests use it to drop a kernel).
    ``decompress_at_load``: decompress compressed weights once, now, and keep them (a model run many
    times, as generation runs the unet at every step: memory for time); by default each run decompresses
    a weight as the op that takes it runs and frees it after (verify: one run, bounded memory).
    Raises PackageError for a missing, truncated or corrupted package and
    UnsupportedOpError for an op without a kernel, each with a one-line message.
    """
    pkg = Path(path)
    if not pkg.exists():
        raise PackageError(f"{pkg}: no such model package")
    if not pkg.is_dir():
        raise PackageError(f"{pkg}: not an .mlpackage folder")
    spec_file, weights_dir = _read_manifest(pkg)
    spec = _read_spec(pkg, spec_file)
    _check_weights(pkg, spec, weights_dir)
    from coremltools.converters.mil.frontend.milproto import load as milproto

    name = function or spec.description.defaultFunctionName or "main"
    in_file: dict = {}
    try:
        with _weights_read_one_at_a_time(milproto), _weights_left_in_file(milproto, in_file), memoized_type_info():
            program = milproto.load(_only_function(spec, name), spec.specificationVersion, file_weights_dir=str(weights_dir))
    except Exception as e:
        message = str(e).splitlines()[0] if str(e) else ""
        raise PackageError(f"{pkg}: cannot read the ML program ({type(e).__name__}: {message})") from None
    if name not in program.functions:
        have = ", ".join(sorted(program.functions))
        raise PackageError(f"{pkg}: the program has no function '{name}' (it has: {have})")
    declared = {f.name for f in spec.description.functions}
    return Program(pkg, spec, program.functions[name], kernels, function_name=name if name in declared else None, in_file=in_file,
                   decompress_at_load=decompress_at_load)


def check_exec_paths(model: Path, inputs_npz: Path, output_npz: Path) -> None:
    """Refuse paths that cannot work, before the model loads (UsageError, one line)."""
    if not model.exists():
        raise UsageError(f"{model}: no such package; give an .mlpackage folder")
    if not inputs_npz.is_file():
        raise UsageError(f"--inputs {inputs_npz}: no such file; give an .npz of the model's inputs")
    if output_npz.is_dir():
        raise UsageError(f"--output {output_npz}: is a folder; give a file name ending in .npz")
    blocker = next((p for p in output_npz.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"--output {output_npz}: {blocker} is a file, not a folder")
    if output_npz.resolve() == inputs_npz.resolve():
        raise UsageError(f"--output {output_npz}: is the inputs file; give another name")


def exec_files(model: Path, inputs_npz: Path, output_npz: Path, precision: str = "fp16", profile: bool = False) -> dict:
    """Run ``model`` on the arrays in ``inputs_npz``; save the outputs to ``output_npz``.

    Outputs are saved under the model's output names. Returns
    {"outputs": {name: shape list}, "precision": ..., "seconds": run time,
    "profile": {op_type: seconds, slowest first} or None}.
    """
    check_exec_paths(Path(model), Path(inputs_npz), Path(output_npz))
    prog = load_program(model)
    try:
        with np.load(inputs_npz, allow_pickle=False) as data:
            feeds = {name: data[name] for name in data.files}
    except (OSError, ValueError) as e:
        raise ModelInputError(f"{inputs_npz}: cannot read the inputs ({e})") from None
    times: dict | None = {} if profile else None
    start = time.perf_counter()
    outputs = prog.run(feeds, precision=precision, profile=times)
    seconds = time.perf_counter() - start
    output_npz = Path(output_npz)
    output_npz.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a crash never leaves a half-written file under the final name.
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=output_npz.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **outputs)
        os.replace(tmp, output_npz)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {
        "outputs": {name: list(value.shape) for name, value in outputs.items()},
        "precision": precision,
        "seconds": seconds,
        "profile": dict(sorted(times.items(), key=lambda kv: -kv[1])) if times is not None else None,
    }
