"""Program chunking: split a saved unet ML program into N consecutive parts.

A full-size unet is too large for one Core ML model on iOS/iPadOS (each model
must stay under about 1 GB), so it ships as ``UnetChunk1``, ``UnetChunk2``, ….
This module cuts the program of a saved ``.mlpackage`` at the MIL protobuf
level: the ops keep their order, names, attributes and weight blobs byte for
byte (compressed ``constexpr_*`` weights included), and no coremltools graph
pass runs, so nothing is re-quantized and no numerics change.

    result = chunk_program(Path("Unet.mlpackage"), 2, Path("out"))   # out/chunk1.mlpackage, out/chunk2.mlpackage
    out = chain_run(result.paths, {"sample": x, "timestep": t, "encoder_hidden_states": c}, precision="fp32")

Where the cuts go: the runtime ops (everything but ``const`` and weight
decompression) form a sequence; every blob of weights counts toward the first
runtime op that reads it. Near each equal-weight point (within
``balance_tolerance`` of one part's share) the cut goes where the fewest bytes
of intermediate tensors are live across it, then the fewest tensors.

What crosses a cut: every value computed before the cut and read after it is
an output of the part that computes it and an input of the part that reads
it (a value that skips a part goes straight from producer to reader, not
through copies). A float16 value crosses as float32, under its name with
``_fp32`` appended: the producing part casts it up, the reading part back
down (the same numbers), as coremltools' ``bisect_model`` and Apple's
chunker pass it, to spare the app float16 arrays between models. The model's own inputs are inputs of every part that reads
them, and the final outputs (``noise_pred``) come from the last part.
``const`` ops, weight decompression and casts of model inputs are repeated
in every part that needs them rather than passed across.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdbuild.errors import PackageError, SdbuildError
from sdbuild.mlpackage import (
    BLOB_ALIGN,
    BLOB_HEADER,
    BLOB_METADATA,
    BLOB_SENTINEL,
    BLOB_STORAGE_VERSION,
    blob_refs,
    blob_values,
    read_blob_record,
    read_manifest,
    weight_file_of,
)

# MIL tensor dtypes a Core ML model input or output may have (float16 since
# iOS16 / specification version 7), with their sizes in bytes.
_IO_DTYPES = {"FLOAT16": ("float16", 2), "FLOAT32": ("float32", 4), "INT32": ("int32", 4)}
_FLOAT16_IO_SPEC_VERSION = 7
_CROSSING_SUFFIX = "_fp32"  # a float16 value's name as the float32 tensor passed between parts


class ChunkError(SdbuildError):
    """A program that cannot be cut as asked."""


@dataclass(frozen=True)
class TensorInfo:
    """A named tensor: its static shape and dtype name (``float16``, ``float32``, ``int32``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "bytes": self.bytes}

    def crossing(self) -> "TensorInfo":
        """This value as it passes between parts: float16 goes as float32, renamed (``_CROSSING_SUFFIX``)."""
        if self.dtype != "float16":
            return self
        return TensorInfo(self.name + _CROSSING_SUFFIX, self.shape, "float32")


@dataclass
class ChunkPart:
    """One saved part: ``weight_bytes`` of weight data it holds, its I/O in order."""

    path: Path
    weight_bytes: int
    package_bytes: int
    op_count: int  # runtime ops; consts and weight decompression not counted
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "weight_bytes": self.weight_bytes,
            "package_bytes": self.package_bytes,
            "op_count": self.op_count,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }


@dataclass
class Cut:
    """A cut between two runtime ops, and the intermediate tensors live across it."""

    after_op: str  # name of the last op before the cut
    before_op: str  # name of the first op after it
    crossing_tensors: list[TensorInfo]

    @property
    def crossing_bytes(self) -> int:
        return sum(t.bytes for t in self.crossing_tensors)

    def to_dict(self) -> dict:
        return {
            "after_op": self.after_op,
            "before_op": self.before_op,
            "crossing_bytes": self.crossing_bytes,
            "crossing_tensors": [t.to_dict() for t in self.crossing_tensors],
        }


@dataclass
class ChunkResult:
    """What ``chunk_program`` wrote: the parts in run order and the cuts between them."""

    source: Path
    weight_bytes: int  # the whole program's weight data
    parts: list[ChunkPart] = field(default_factory=list)
    cuts: list[Cut] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        return [p.path for p in self.parts]

    def to_dict(self) -> dict:
        return {
            "source": str(self.source),
            "weight_bytes": self.weight_bytes,
            "parts": [p.to_dict() for p in self.parts],
            "cuts": [c.to_dict() for c in self.cuts],
        }


# --------------------------------------------------------------------------- reading the package


def _read_package(src: Path):
    """(spec, weights folder) of a saved ML program package."""
    from coremltools.proto import Model_pb2

    files = read_manifest(src)
    spec_file, weights = files.spec, files.weights
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_file.read_bytes())
    if spec.WhichOneof("Type") != "mlProgram":
        raise ChunkError(f"{src}: holds a {spec.WhichOneof('Type')} model; only ML programs can be chunked")
    return spec, weights


def _write_blobs(path: Path, weights_dir: Path, keys: list[tuple[str, int]]) -> list[int]:
    """Copy the blobs ``keys`` (file name, offset) into a new blob storage file; returns their new offsets.

    Each blob keeps its metadata record (dtype, size) and its data byte for
    byte; only the data offset changes, and everything stays 64-byte aligned
    as Core ML's reader expects. Blobs are read one at a time, so a full-size
    unet's weights never sit in memory whole.
    """
    offsets = []
    sources: dict[str, object] = {}
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<II", len(keys), BLOB_STORAGE_VERSION).ljust(BLOB_HEADER, b"\0"))
            for name, offset in keys:
                if name not in sources:
                    sources[name] = open(weight_file_of(weights_dir, name), "rb")
                src = sources[name]
                src.seek(offset)
                record = bytearray(src.read(BLOB_METADATA))
                _sentinel, _dtype, nbytes, data_offset = struct.unpack_from("<IIQQ", record)
                src.seek(data_offset)
                data = src.read(nbytes)
                if len(data) != nbytes:
                    raise PackageError(f"{weight_file_of(weights_dir, name)}: truncated weight at offset {offset}")
                new_offset = f.tell()
                offsets.append(new_offset)
                struct.pack_into("<Q", record, 16, new_offset + BLOB_METADATA)
                f.write(record)
                f.write(data)
                f.write(b"\0" * (-f.tell() % BLOB_ALIGN))
    finally:
        for src in sources.values():
            src.close()
    return offsets


# --------------------------------------------------------------------------- program analysis


def _arg_names(op) -> list[str]:
    """Names of the values ``op`` reads, nested blocks' reads of outer values included."""
    names = [b.name for arg in op.inputs.values() for b in arg.arguments if b.WhichOneof("binding") == "name"]
    for block in op.blocks:
        inner = {o.name for inner_op in block.operations for o in inner_op.outputs}
        inner |= {i.name for i in block.inputs}
        for inner_op in block.operations:
            names += [n for n in _arg_names(inner_op) if n not in inner]
        names += [n for n in block.outputs if n not in inner]
    return names


def _tensor_info(name: str, value_type) -> TensorInfo | None:
    """The tensor a model input/output of this MIL type would be; None when it cannot be one."""
    from coremltools.proto import MIL_pb2

    if value_type.WhichOneof("type") != "tensorType":
        return None
    tensor = value_type.tensorType
    dtype = _IO_DTYPES.get(MIL_pb2.DataType.Name(tensor.dataType))
    if dtype is None or tensor.rank < 1 or len(tensor.dimensions) != tensor.rank:
        return None
    if any(d.WhichOneof("dimension") != "constant" for d in tensor.dimensions):
        return None
    return TensorInfo(name, tuple(int(d.constant.size) for d in tensor.dimensions), dtype[0])


@dataclass
class _Analysis:
    """The program seen as a sequence of runtime ops with live ranges of their values."""

    ops: list  # every op of the main block, in order
    runtime: list[int]  # positions (in ops) of the runtime ops
    replicable: set[int]  # positions of ops repeated in every part that needs them
    producer: dict[str, int]  # value name -> position of the op that computes it
    runtime_index: dict[str, int]  # value name -> index in runtime of the op computing it
    types: dict[str, object]  # value name -> MIL ValueType
    weight_at: list[int]  # per runtime op: bytes of weights it reads first
    blob_bytes: dict[tuple[str, int], int]
    crossing_bytes: np.ndarray  # per cut position c (between runtime c-1 and c)
    crossing_count: np.ndarray
    representable: np.ndarray  # per cut position: every crossing value can be a model I/O
    last_use: dict[str, int]


def _analyse(block, input_names: set[str], weights_dir: Path, outputs: list[str], float16_io: bool = True) -> _Analysis:
    ops = list(block.operations)
    producer, types = {}, {}
    const_like: set[str] = set()  # values known before any input: consts, decompressed weights
    replicable: set[int] = set()
    runtime: list[int] = []
    for pos, op in enumerate(ops):
        args = _arg_names(op)
        for o in op.outputs:
            producer[o.name] = pos
            types[o.name] = o.type
        if op.type == "const" or all(a in const_like for a in args):
            const_like.update(o.name for o in op.outputs)
            replicable.add(pos)
        elif op.type == "cast" and args and all(a in input_names or a in const_like for a in args):
            # A cast of a model input costs nothing to repeat; passing it would add an I/O tensor.
            replicable.add(pos)
        else:
            runtime.append(pos)
    runtime_index = {}
    for i, pos in enumerate(runtime):
        for o in ops[pos].outputs:
            runtime_index[o.name] = i

    # Weight bytes, each blob counted at the first runtime op that reaches it.
    refs = {r for op in ops for r in blob_refs(op)}
    blob_bytes = _blob_sizes(weights_dir, refs)
    closure: dict[int, set] = {}

    def blobs_of(pos: int) -> set:
        if pos not in closure:
            found = set(blob_refs(ops[pos]))
            for a in _arg_names(ops[pos]):
                if a in producer and producer[a] in replicable:
                    found |= blobs_of(producer[a])
            closure[pos] = found
        return closure[pos]

    seen: set = set()
    weight_at = []
    for pos in runtime:
        fresh = blobs_of(pos) - seen
        seen |= fresh
        weight_at.append(sum(blob_bytes[r] for r in fresh))

    # Live ranges of runtime values, and what is live across each cut position.
    R = len(runtime)
    last_use: dict[str, int] = {}
    for i, pos in enumerate(runtime):
        for a in _arg_names(ops[pos]):
            if a in runtime_index:
                last_use[a] = max(last_use.get(a, -1), i)
    for name in outputs:
        if name in runtime_index:
            last_use[name] = R
    cross_bytes = np.zeros(R + 2, dtype=np.int64)
    cross_count = np.zeros(R + 2, dtype=np.int64)
    unrepresentable = np.zeros(R + 2, dtype=np.int64)
    for name, last in last_use.items():
        first = runtime_index[name] + 1  # live across cuts first..last
        if last < first:
            continue
        info = _tensor_info(name, types[name])
        if info is None or (info.dtype == "float16" and not float16_io):
            unrepresentable[first] += 1
            unrepresentable[last + 1] -= 1
        else:
            cross_bytes[first] += info.crossing().bytes
            cross_bytes[last + 1] -= info.crossing().bytes
        cross_count[first] += 1
        cross_count[last + 1] -= 1
    return _Analysis(
        ops=ops,
        runtime=runtime,
        replicable=replicable,
        producer=producer,
        runtime_index=runtime_index,
        types=types,
        weight_at=weight_at,
        blob_bytes=blob_bytes,
        crossing_bytes=np.cumsum(cross_bytes)[: R + 1],
        crossing_count=np.cumsum(cross_count)[: R + 1],
        representable=np.cumsum(unrepresentable)[: R + 1] == 0,
        last_use=last_use,
    )


def _blob_sizes(weights_dir: Path, refs: set[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """Data bytes of every referenced blob, read from its metadata record only."""
    sizes = {}
    by_file: dict[str, list[int]] = {}
    for name, offset in refs:
        by_file.setdefault(name, []).append(offset)
    for name, offsets in by_file.items():
        path = weight_file_of(weights_dir, name)
        if not path.is_file():
            raise PackageError(f"weight file {path} is missing")
        with open(path, "rb") as f:
            for offset in offsets:
                record = read_blob_record(f, offset)
                if record is None or record[0] != BLOB_SENTINEL:
                    raise PackageError(f"{path}: damaged or truncated weight record at offset {offset}")
                sizes[(name, offset)] = record[2]
    return sizes


def choose_cuts(analysis: _Analysis, n: int, balance_tolerance: float, last_cut: int) -> list[int]:
    """Cut positions c_1 < … < c_{n-1}; part k runs runtime ops [c_{k-1}, c_k).

    For each equal-weight point, the candidates are the cut positions whose
    weight before them lies within ``balance_tolerance`` of a part's share of
    it; among them the cut with the fewest crossing bytes wins, then the
    fewest crossing tensors, then the nearest to the point. When no position
    falls in that window (a model of a few large layers), the nearest
    positions to the point compete instead.
    """
    cumulative = np.concatenate([[0], np.cumsum(analysis.weight_at)])  # weight before position c
    total = int(cumulative[-1])
    share = total / n
    cuts: list[int] = []
    for k in range(1, n):
        lo = (cuts[-1] + 1) if cuts else 1
        hi = last_cut - (n - 1 - k)  # leave room for the remaining cuts
        valid = [c for c in range(lo, hi + 1) if analysis.representable[c]]
        if not valid:
            raise ChunkError(
                f"cannot cut the program into {n} parts: every cut in reach would pass a value that cannot be a "
                "model input (a flexible shape, a non-tensor or an unsupported dtype); chunking needs one static resolution"
            )
        target = share * k
        distance = {c: abs(int(cumulative[c]) - target) for c in valid}
        window = [c for c in valid if distance[c] <= balance_tolerance * share]
        if not window:
            nearest = min(distance.values())
            window = [c for c in valid if distance[c] == nearest]
        cuts.append(min(window, key=lambda c: (analysis.crossing_bytes[c], analysis.crossing_count[c], distance[c])))
    return cuts


# --------------------------------------------------------------------------- writing the parts


def _op_name(op) -> str:
    attr = op.attributes.get("name")
    if attr is not None and attr.immediateValue.tensor.strings.values:
        return attr.immediateValue.tensor.strings.values[0]
    return op.outputs[0].name if op.outputs else op.type


def _feature(info: TensorInfo, description: str = ""):
    from coremltools.proto import FeatureTypes_pb2, Model_pb2

    feature = Model_pb2.FeatureDescription(name=info.name, shortDescription=description)
    array = feature.type.multiArrayType
    array.shape.extend(info.shape)
    array.dataType = {
        "float16": FeatureTypes_pb2.ArrayFeatureType.FLOAT16,
        "float32": FeatureTypes_pb2.ArrayFeatureType.FLOAT32,
        "int32": FeatureTypes_pb2.ArrayFeatureType.INT32,
    }[info.dtype]
    return feature


def _string_const(name: str, text: str):
    """A MIL ``const`` op holding the string ``text`` (a cast's dtype), as coremltools writes one."""
    from coremltools.proto import MIL_pb2

    op = MIL_pb2.Operation(type="const")
    string = MIL_pb2.ValueType()
    string.tensorType.dataType = MIL_pb2.STRING
    op.outputs.add(name=name).type.CopyFrom(string)
    for key, value in (("name", name), ("val", text)):
        attr = op.attributes[key]
        attr.type.CopyFrom(string)
        attr.immediateValue.tensor.strings.values.append(value)
    return op


def _cast_ops(src: str, dst: str, value_type, dtype: str) -> list:
    """``dst = cast(src, dtype)`` (``fp16`` | ``fp32``) as MIL ops; ``value_type``: src's MIL type, shape kept."""
    from coremltools.proto import MIL_pb2

    dtype_const = _string_const(f"{dst}_dtype", dtype)
    cast = MIL_pb2.Operation(type="cast")
    cast.inputs["x"].arguments.add(name=src)
    cast.inputs["dtype"].arguments.add(name=f"{dst}_dtype")
    out = cast.outputs.add(name=dst)
    out.type.CopyFrom(value_type)
    out.type.tensorType.dataType = MIL_pb2.FLOAT32 if dtype == "fp32" else MIL_pb2.FLOAT16
    name = cast.attributes["name"]
    name.type.tensorType.dataType = MIL_pb2.STRING
    name.immediateValue.tensor.strings.values.append(dst)
    return [dtype_const, cast]


def _remap_blobs(op, new_offsets: dict[tuple[str, int], int]) -> None:
    for value in blob_values(op):
        value.blobFileValue.offset = new_offsets[(value.blobFileValue.fileName, value.blobFileValue.offset)]


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def chunk_program(src: Path, n: int, dst_dir: Path, balance_tolerance: float = 0.1) -> ChunkResult:
    """Split the ML program of the package ``src`` into ``n`` parts ``dst_dir/chunk1.mlpackage`` ….

    ``src``: a saved ``.mlpackage`` (float16 or with compressed weights).
    Each part keeps the source's specification version, deployment target,
    metadata and weight blobs (byte for byte). Inputs of part k: the model
    inputs it reads (same names, shapes, dtypes) and the intermediate tensors
    earlier parts computed, under their MIL names with the dtype the op
    produced, float16 ones as float32 (``TensorInfo.crossing``). Outputs:
    what later parts read, and the model's outputs (``noise_pred``
    [B, 4, H, W]) from the last part. Returns the parts with their weight
    bytes and I/O, and every cut's crossing tensors.
    """
    import coremltools as ct
    from coremltools.proto import MIL_pb2

    from sdbuild.mlpackage import make_reproducible

    src, dst_dir = Path(src), Path(dst_dir)
    if n < 1:
        raise ChunkError(f"chunk count must be at least 1, not {n}")
    spec, weights_dir = _read_package(src)
    function_name = spec.description.defaultFunctionName or "main"
    functions = spec.mlProgram.functions
    if len(functions) != 1 or function_name not in functions:
        raise ChunkError(f"{src}: only single-function programs can be chunked (found {', '.join(functions)})")
    function = functions[function_name]
    block = function.block_specializations[function.opset]
    input_names = [i.name for i in function.inputs]
    outputs = list(block.outputs)
    io_version_ok = spec.specificationVersion >= _FLOAT16_IO_SPEC_VERSION
    analysis = _analyse(block, set(input_names), weights_dir, outputs, float16_io=io_version_ok)
    R = len(analysis.runtime)

    # Final outputs come from the last part: no cut after the first op computing one.
    last_cut = min((analysis.runtime_index[o] for o in outputs if o in analysis.runtime_index), default=R - 1)
    last_cut = min(last_cut, R - 1)
    if n > 1 and last_cut < n - 1:
        raise ChunkError(f"{src}: the program has {R} runtime ops; it cannot be cut into {n} parts")
    cuts = choose_cuts(analysis, n, balance_tolerance, last_cut) if n > 1 else []
    bounds = [0, *cuts, R]
    part_of = np.zeros(R, dtype=np.int64)  # runtime op index -> part
    for k in range(n):
        part_of[bounds[k] : bounds[k + 1]] = k

    orig_features = {f.name: f for f in spec.description.input}
    orig_out_features = {f.name: f for f in spec.description.output}
    orig_inputs = {i.name: i for i in function.inputs}

    dst_dir.mkdir(parents=True, exist_ok=True)
    result = ChunkResult(src, weight_bytes=sum(analysis.blob_bytes.values()))
    for k in range(n):
        runtime_positions = [analysis.runtime[i] for i in range(bounds[k], bounds[k + 1])]
        # The part's ops: its runtime ops and every replicable op they reach, in program order.
        chosen: set[int] = set(runtime_positions)
        stack = list(runtime_positions)
        while stack:
            pos = stack.pop()
            for a in _arg_names(analysis.ops[pos]):
                p = analysis.producer.get(a)
                if p is not None and p in analysis.replicable and p not in chosen:
                    chosen.add(p)
                    stack.append(p)
        positions = sorted(chosen)
        computed = {o.name for p in positions for o in analysis.ops[p].outputs}
        read = [a for p in positions for a in _arg_names(analysis.ops[p])]

        # Inputs: model inputs it reads, then earlier parts' values, in program order.
        model_inputs = [name for name in input_names if name in set(read)]
        carried = sorted(
            {a for a in read if a not in computed and a in analysis.runtime_index},
            key=lambda a: analysis.runtime_index[a],
        )
        # Outputs: values computed here that later parts read, then the model outputs.
        handed_on = sorted(
            (
                name
                for name in computed
                if name in analysis.runtime_index
                and part_of[analysis.runtime_index[name]] == k
                and analysis.last_use.get(name, -1) >= bounds[k + 1]
                and name not in outputs
            ),
            key=lambda a: analysis.runtime_index[a],
        )
        part_outputs = handed_on + ([o for o in outputs if o in computed] if k == n - 1 else [])
        missing = [o for o in outputs if o not in computed] if k == n - 1 else []
        if missing:
            raise ChunkError(f"{src}: output(s) {', '.join(missing)} not computed by the last part")

        def info(name: str) -> TensorInfo:
            t = _tensor_info(name, analysis.types[name])
            if t is None:
                raise ChunkError(f"{src}: value '{name}' crosses a cut but cannot be a model input or output")
            if t.dtype == "float16" and not io_version_ok:
                raise ChunkError(
                    f"{src}: float16 value '{name}' crosses a cut; float16 model I/O needs iOS16/macOS13 or newer"
                )
            return t

        part_spec = type(spec)()
        part_spec.CopyFrom(spec)
        part_fn = part_spec.mlProgram.functions[function_name]
        for opset in list(part_fn.block_specializations):
            if opset != function.opset:
                del part_fn.block_specializations[opset]
        part_block = part_fn.block_specializations[function.opset]
        del part_block.operations[:]
        del part_block.outputs[:]
        del part_fn.inputs[:]
        del part_spec.description.input[:]
        del part_spec.description.output[:]

        # Weights: only the blobs this part reads, in their original order, bytes unchanged.
        refs = sorted({r for p in positions for r in blob_refs(analysis.ops[p])}, key=lambda r: (r[0], r[1]))
        with tempfile.TemporaryDirectory(prefix=f".chunk{k + 1}-", dir=dst_dir) as tmp:
            weights_tmp = Path(tmp) / "weights"
            weights_tmp.mkdir()
            new_offsets: dict[tuple[str, int], int] = {}
            for file_name in sorted({r[0] for r in refs}):
                keys = [r for r in refs if r[0] == file_name]
                offsets = _write_blobs(weights_tmp / file_name.split("/")[-1], weights_dir, keys)
                new_offsets.update(zip(keys, offsets))
            if not refs:
                _write_blobs(weights_tmp / "weight.bin", weights_dir, [])
            in_infos, out_infos = [], []
            for name in model_inputs:
                part_fn.inputs.add().CopyFrom(orig_inputs[name])
                part_spec.description.input.add().CopyFrom(orig_features[name])
                in_infos.append(_tensor_info(name, orig_inputs[name].type))
            for name in carried:
                t = info(name).crossing()
                source_part = int(part_of[analysis.runtime_index[name]]) + 1
                arg = part_fn.inputs.add(name=t.name)
                arg.type.CopyFrom(analysis.types[name])
                if t.name != name:  # float16 inside, float32 across: cast back down first thing
                    arg.type.tensorType.dataType = MIL_pb2.FLOAT32
                    part_block.operations.extend(_cast_ops(t.name, name, analysis.types[name], "fp16"))
                part_spec.description.input.add().CopyFrom(_feature(t, f"intermediate value from chunk {source_part}"))
                in_infos.append(t)
            for p in positions:
                op = part_block.operations.add()
                op.CopyFrom(analysis.ops[p])
                _remap_blobs(op, new_offsets)
            for name in part_outputs:
                t = info(name) if name in orig_out_features else info(name).crossing()
                if name in orig_out_features:
                    part_spec.description.output.add().CopyFrom(orig_out_features[name])
                else:
                    if t.name != name:  # handed on as float32
                        part_block.operations.extend(_cast_ops(name, t.name, analysis.types[name], "fp32"))
                    part_spec.description.output.add().CopyFrom(_feature(t, f"intermediate value for chunk {k + 2} and later"))
                part_block.outputs.append(t.name)
                out_infos.append(t)

            path = dst_dir / f"chunk{k + 1}.mlpackage"
            if path.exists():
                shutil.rmtree(path)
            ct.models.MLModel(part_spec, weights_dir=str(weights_tmp), skip_model_load=True).save(str(path))
            make_reproducible(path)
        result.parts.append(
            ChunkPart(
                path=path,
                weight_bytes=sum(analysis.blob_bytes[r] for r in refs),
                package_bytes=_tree_bytes(path),
                op_count=len(runtime_positions),
                inputs=in_infos,
                outputs=out_infos,
            )
        )

    for c in cuts:
        live = sorted(
            (name for name, last in analysis.last_use.items() if analysis.runtime_index[name] < c <= last),
            key=lambda a: analysis.runtime_index[a],
        )
        result.cuts.append(
            Cut(
                after_op=_op_name(analysis.ops[analysis.runtime[c - 1]]),
                before_op=_op_name(analysis.ops[analysis.runtime[c]]),
                crossing_tensors=[_tensor_info(name, analysis.types[name]).crossing() for name in live],
            )
        )
    return result


# --------------------------------------------------------------------------- running the parts


def chain_run(parts: list, inputs: dict, precision: str = "fp16") -> dict[str, np.ndarray]:
    """Run chunk packages (paths or loaded ``Program`` objects) in order with the reference executor.

    ``inputs``: the whole model's inputs (name -> array). Every part gets the
    model inputs and earlier parts' outputs it declares; returns the last
    part's outputs (name -> array, e.g. ``noise_pred`` [B, 4, H, W]).
    """
    from sdbuild.mil.executor import Program, load_program

    if not parts:
        raise ValueError("chain_run: no parts given")
    values = dict(inputs)
    out: dict[str, np.ndarray] = {}
    for part in parts:
        program = part if isinstance(part, Program) else load_program(part)
        missing = [name for name in program.inputs if name not in values]
        if missing:
            raise ChunkError(f"{program.path.name}: input(s) {', '.join(missing)} come from no earlier part nor the inputs")
        out = program.run({name: values[name] for name in program.inputs}, precision=precision)
        values.update(out)
    return out
