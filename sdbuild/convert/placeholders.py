"""Tracing and converting a component without its float32 weights, then binding them into the package.

The trace stage builds the component's module with no weight read
(``lazy_weights.lazy_component``) and gives every checkpoint tensor of at
least ``MIN_ELEMENTS`` elements a placeholder: one element of a value of its
own, broadcast (``expand``) to the tensor's shape, so ``module.pt`` holds a
few bytes per weight. ``placeholders.json`` beside it says which checkpoint
file (relative to the download's checkpoint or VAE folder, never an absolute
path) and key each placeholder value stands for. Smaller tensors keep their
values. Checkpoint tensors that coremltools' ``const_deduplication`` would
make one constant (same shape, same first elements, equal values) share a
placeholder.

The convert stage converts that module: the placeholders stay broadcast
through the passes (``precision.add_fp16_cast_folding`` casts one element of
them), ``fuse_conv_scale`` on a placeholder weight records its scaling and
leaves a new placeholder. ``check_program`` then refuses the program unless
every large floating-point constant is an intact placeholder (its own value,
its shape, zero strides) and every placeholder is there; after the package is
saved, ``bind_package`` writes each real tensor over its placeholder's blob
in ``weight.bin``, rounded as the converter rounds. Any refusal (``Refused``)
sends the caller back to converting the module with its weights
(``bind_module``), which every other reader of ``module.pt`` uses too.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdbuild.mlpackage import iter_ops, iter_spec_ops

MIN_ELEMENTS = 4096  # tensors from this size up are placeholders
RECORD = "placeholders.json"
_PREFIX = 100  # elements const_deduplication hashes before comparing whole values (its LENGTH_OF_HASHKEY)
_DERIVED_FROM = 8 * 1023  # placeholder numbers from here: values made while converting (fuse_conv_scale)
_SAMPLES = 17  # positions of a placeholder blob checked before it is overwritten


class Refused(Exception):
    """The program or package cannot be shown to take the real weights as they are; the message says why."""


def placeholder_value(number: int) -> float:
    """A value of its own for each placeholder number: exact in float16, never 0, 1 or a power of two."""
    exponent, mantissa = divmod(number, 1023)
    if exponent > 18:
        raise Refused(f"more than {19 * 1023} placeholders")
    return float((1 + (mantissa + 1) / 1024) * 2.0 ** (exponent - 4))


# --- trace ---------------------------------------------------------------------


def place(weights, precision: str, roots: dict[str, Path]) -> dict:
    """Bind the small tensors of a ``LazyWeights``' module for good and give each large one a placeholder;
    the record to write as ``placeholders.json``.

    ``precision``: the program's (float16 rounds before constants are compared); ``roots``: the folders
    file paths are recorded relative to (``checkpoint``, ``vae``), first match wins.
    """
    import torch
    from torch import nn

    from sdbuild.models.lazy_weights import NotLazy

    final = np.float16 if precision == "float16" else np.float32
    numbers: dict[tuple[int, str], int] = {}  # (checkpoint, key) -> placeholder number
    candidates: dict[tuple, list[int]] = {}  # (shape, first elements as rounded) -> placeholder numbers
    entries: list[dict] = []
    sources: list[tuple] = []  # per placeholder: (checkpoint, key)
    refuse = None
    for group in weights.bindings.values():
        for binding in group:
            shape = tuple(binding.placeholder.shape)
            if binding.placeholder.numel() < MIN_ELEMENTS:
                binding.bind()
                continue
            source = (id(binding.checkpoint), binding.key)
            if source not in numbers:
                head = binding.checkpoint.tensor(binding.key, count=_PREFIX).to(torch.float32).numpy().astype(final)
                same = candidates.setdefault((shape, head.tobytes()), [])
                number = None
                for other in same:
                    match = _compare(sources[other], (binding.checkpoint, binding.key), final)
                    if match == "equal":
                        number = other
                        break
                    if match == "close":
                        refuse = f"{binding.key} and {sources[other][1]} are close, not equal: deduplication keeps either"
                if number is None:
                    number = len(entries)
                    path, key = binding.checkpoint.file(binding.key)
                    entries.append({"value": placeholder_value(number), "shape": list(shape), **_relative(path, roots),
                                    "key": key, "dtype": binding.checkpoint.dtype(binding.key)})  # fmt: skip
                    sources.append((binding.checkpoint, binding.key))
                    same.append(number)
                numbers[source] = number
            value = torch.full((1,) * len(shape), entries[numbers[source]]["value"], dtype=binding.placeholder.dtype)
            tensor = value.expand(shape)
            table = binding.owner._parameters if binding.is_parameter else binding.owner._buffers
            table[binding.name] = nn.Parameter(tensor, requires_grad=False) if binding.is_parameter else tensor
    if not entries:
        raise NotLazy("no tensor is large enough for a placeholder")
    return {"version": 1, "min_elements": MIN_ELEMENTS, "precision": precision, "refuse": refuse, "placeholders": entries,
            "own": _own_tensors(weights.module)}  # fmt: skip


def _own_tensors(module) -> list[dict]:
    """The module's large tensors that are not the checkpoint's (a causal mask): shape and digests as float32
    and float16, so that a constant with those bytes is known to stand for no placeholder."""
    import hashlib

    own = []
    for _, tensor in [*module.named_parameters(), *module.named_buffers()]:
        shape = tuple(tensor.shape)
        if _broadcast_value(shape, tensor.stride(), lambda: 0.0) is not None or tensor.numel() < MIN_ELEMENTS or not tensor.is_floating_point():
            continue
        value = tensor.detach().float().numpy()
        digests = {str(np.dtype(d)): hashlib.sha256(np.ascontiguousarray(value.astype(d)).tobytes()).hexdigest()
                   for d in (np.float32, np.float16)}  # fmt: skip
        own.append({"shape": list(value.shape), **digests})
    return own


def _compare(a: tuple, b: tuple, final) -> str:
    """``equal`` (same bytes as the program holds them), ``close`` (const_deduplication's tolerance) or ``different``."""
    import torch
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.passes.defs.cleanup.const_deduplication import const_deduplication

    x, y = (c.tensor(k).to(torch.float32).numpy().astype(final) for c, k in (a, b))
    if x.tobytes() == y.tobytes():
        return "equal"
    atol = const_deduplication.DTYPE2ATOL[types.fp16 if final == np.float16 else types.fp32]
    return "close" if np.allclose(x, y, rtol=0.0, atol=atol) else "different"


def _relative(path: Path, roots: dict[str, Path]) -> dict:
    from sdbuild.models.lazy_weights import NotLazy

    for name, root in roots.items():
        for p, r in ((path, root), (path.resolve(), root.resolve())):
            if p.is_relative_to(r):
                return {"root": name, "file": p.relative_to(r).as_posix()}
    raise NotLazy(f"{path} is in neither of the download's folders")


def roots_of(download: Path) -> dict[str, Path]:
    """The folders a record's files are relative to, for a download entry."""
    from sdbuild.stages.download import checkpoint_dir, vae_dir

    return {"checkpoint": checkpoint_dir(download), "vae": vae_dir(download)}


# --- reading the record and the real tensors ------------------------------------


@dataclass
class Record:
    """A trace's ``placeholders.json`` with its files found in a download: each placeholder by value."""

    placeholders: dict[float, dict]
    precision: str
    refuse: str | None
    own: list[dict] = field(default_factory=list)
    _headers: dict = field(default_factory=dict)

    def real(self, value: float):
        """The checkpoint tensor a placeholder value stands for, as the module holds it: float32, its shape (torch)."""
        import torch

        return self.stored(value).to(torch.float32)

    def stored(self, value: float):
        """The tensor as stored (its checkpoint dtype), in the module's shape (torch)."""
        from sdbuild.models.lazy_weights import _Checkpoint

        entry = self.placeholders[value]
        path = entry["path"]
        if path not in self._headers:
            self._headers[path] = _Checkpoint(None, [path])
        return self._headers[path].tensor(entry["key"]).reshape(entry["shape"])


def read_record(trace_dir: Path, download: Path | None) -> Record | None:
    """The trace's placeholders (None where its module holds its weights); their files in ``download``."""
    path = Path(trace_dir) / RECORD
    if not path.is_file():
        return None
    if download is None:
        from sdbuild.errors import SdbuildError

        raise SdbuildError(f"{trace_dir}: the traced module holds placeholders and no download entry is at hand")
    record = json.loads(path.read_text())
    roots = roots_of(download)
    placeholders = {}
    for entry in record["placeholders"]:
        root = roots[entry["root"]]
        file = root / entry["file"]
        if not file.resolve().is_relative_to(root.resolve()):
            from sdbuild.errors import SdbuildError

            raise SdbuildError(f"{path}: placeholder file {entry['file']!r} is outside the download; delete the trace entry and build again")
        placeholders[float(entry["value"])] = dict(entry, path=file, shape=tuple(entry["shape"]))
    return Record(placeholders, record["precision"], record.get("refuse"), record.get("own", []))


def bind_module(module, record: Record) -> None:
    """Put the real tensors into a loaded module's placeholders (a TorchScript module from ``module.pt``), in place."""
    import torch

    tensors = [*module.named_parameters(), *module.named_buffers()]
    with torch.no_grad():
        for name, tensor in tensors:
            value = _broadcast_value(tuple(tensor.shape), tensor.stride(), lambda: tensor.reshape(-1)[0].item())
            if value is None:
                continue
            if value not in record.placeholders:
                raise Refused(f"{name}: a broadcast tensor that stands for no placeholder")
            tensor.set_(record.real(value).reshape(tensor.shape).contiguous())


def is_broadcast(shape, strides) -> bool:
    """Whether an array of ``shape`` and ``strides`` is one element broadcast: every stride 0 but a size-1 dimension's."""
    return not any(stride and size != 1 for size, stride in zip(shape, strides))


def _broadcast_value(shape, strides, first) -> float | None:
    """The one value of a large tensor broadcast from one element (``is_broadcast``), or None."""
    if int(np.prod(shape)) < MIN_ELEMENTS or not is_broadcast(shape, strides):
        return None
    return float(first())


# --- convert -------------------------------------------------------------------


@dataclass
class Derived:
    """A placeholder made while converting: ``scale`` times a placeholder (``fuse_conv_scale``), in ``dtype``."""

    source: float
    scale: object
    dtype: str


class Conversion:
    """The placeholders of one conversion: the trace's and those ``fuse_conv_scale`` made."""

    def __init__(self, record: Record):
        self.record = record
        self.derived: dict[float, Derived] = {}
        self._made: dict[tuple, float] = {}

    def known(self, val, materialized: bool = False) -> float | None:
        """The placeholder value of a broadcast constant, or None; ``materialized``: of a constant that
        holds one value throughout too (a pass made the whole array of a placeholder)."""
        if not isinstance(val, np.ndarray) or val.dtype.kind != "f":
            return None
        value = _broadcast_value(val.shape, val.strides, lambda: val.flat[0])
        if value is None and materialized and val.size >= MIN_ELEMENTS:
            first = val.flat[0]
            value = float(first) if np.all(val == first) else None
        return value if value in self.record.placeholders or value in self.derived else None

    def derive(self, source: float, scale, dtype) -> float:
        key = (source, type(scale).__name__, repr(scale), str(dtype))
        if key not in self._made:
            value = placeholder_value(_DERIVED_FROM + len(self._made))
            self._made[key] = value
            self.derived[value] = Derived(source, scale, str(dtype))
        return self._made[key]

    def shape(self, value: float) -> tuple:
        return self.record.placeholders[self.derived[value].source if value in self.derived else value]["shape"]

    def real(self, value: float, dtype) -> np.ndarray:
        """The real tensor a placeholder value stands for, as the converter would hold it in ``dtype``."""
        if value in self.derived:
            derived = self.derived[value]
            base = self.record.real(derived.source).numpy()
            return np.array(base * derived.scale).astype(derived.dtype).astype(dtype)
        entry = self.record.placeholders[value]
        if entry["dtype"] == "F16" and dtype == np.float16:
            return self.record.stored(value).numpy()  # float16 -> float32 -> float16 is the same bytes
        real = self.record.real(value).numpy()
        if dtype == np.float16:
            magnitude = np.abs(real)
            # The float16 pass keeps an op float32 for such a weight (precision.fp16_overflow).
            if np.max(magnitude, where=magnitude < 1e38, initial=0.0) > 65504:
                raise Refused(f"{entry['key']} overflows float16")
        return real.astype(dtype)

    @contextlib.contextmanager
    def passes(self):
        """Within: ``fuse_conv_scale`` scaling a placeholder weight leaves a placeholder standing for the scaled one."""
        from coremltools.converters.mil.mil.passes.defs.optimize_conv import fuse_conv_scale

        original = fuse_conv_scale.__dict__["_try_to_transform"]
        fuse = original.__func__

        def try_to_transform(conv_op, scale_op):
            source = self.known(conv_op.weight.val, materialized=True)
            if source is None:
                return fuse(conv_op, scale_op)
            scale = _scalar_scale(scale_op)
            name, block, dtype = scale_op.outputs[0].name, conv_op.enclosing_block, conv_op.weight.val.dtype
            if not fuse(conv_op, scale_op):
                return False
            if scale is None:
                return True  # scaled per channel: no longer a placeholder, which check_program refuses
            conv = next(op for op in block.operations if op.name == name and op.op_type in ("conv", "conv_transpose"))
            weight = conv.weight
            value = np.broadcast_to(np.array(self.derive(source, scale, dtype), dtype=dtype), weight.shape)
            weight._sym_val.val = value
            weight.op.val._sym_val.val = value
            return True

        fuse_conv_scale._try_to_transform = staticmethod(try_to_transform)
        try:
            yield
        finally:
            fuse_conv_scale._try_to_transform = original

    def check_program(self, prog) -> dict[str, float]:
        """Every large floating-point constant of ``prog`` (name -> placeholder value); Refused unless each is an
        intact placeholder and every placeholder of the trace is there."""
        found: dict[str, float] = {}
        for op in iter_ops(prog):
            if op.op_type != "const":
                continue
            val = op.outputs[0].val
            if not isinstance(val, np.ndarray) or val.dtype.kind != "f" or val.size < MIN_ELEMENTS:
                continue
            value = self.known(val, materialized=True)
            if value is None and self._own(val):
                continue
            if value is None:
                raise Refused(f"{op.name}: a large {val.dtype} constant {val.shape} that is no placeholder")
            if tuple(val.shape) != tuple(self.shape(value)):
                raise Refused(f"{op.name}: placeholder of shape {tuple(self.shape(value))} as {val.shape}")
            found[op.outputs[0].name] = value
        used = {self.derived[v].source if v in self.derived else v for v in found.values()}
        missing = set(self.record.placeholders) - used
        if missing:
            raise Refused(f"{len(missing)} placeholders are not in the program (e.g. {self.record.placeholders[min(missing)]['key']})")
        return found

    def _own(self, val: np.ndarray) -> bool:
        """Whether ``val`` is one of the module's own large tensors (``_own_tensors``), byte for byte."""
        import hashlib

        shaped = [o for o in self.record.own if tuple(o["shape"]) == tuple(val.shape) and str(val.dtype) in o]
        if not shaped:
            return False
        digest = hashlib.sha256(np.ascontiguousarray(val).tobytes()).hexdigest()
        return any(o[str(val.dtype)] == digest for o in shaped)

    def bind_package(self, package: Path, found: dict[str, float]) -> int:
        """Write the real tensors over their placeholders' blobs in ``package``'s weight file; the blobs written."""
        from sdbuild.mlpackage import BLOB_SENTINEL, WEIGHT_FILE, load_spec, read_blob_record

        blobs = {}
        for function in load_spec(package).mlProgram.functions.values():
            for block in function.block_specializations.values():
                for op in iter_spec_ops(block):
                    if op.type != "const" or not op.outputs or op.outputs[0].name not in found:
                        continue
                    value = op.attributes["val"]
                    if value.WhichOneof("value") != "blobFileValue":
                        raise Refused(f"{op.outputs[0].name}: a placeholder not in the weight file")
                    blobs.setdefault(value.blobFileValue.offset, (op.outputs[0].name, found[op.outputs[0].name]))
        names = {name for name, _ in blobs.values()}
        if names != set(found):
            raise Refused(f"{len(set(found) - names)} placeholder constants are not in the saved package")
        with open(package / WEIGHT_FILE, "r+b") as f:
            for offset, (name, value) in sorted(blobs.items()):
                sentinel, _, size, data = read_blob_record(f, offset)
                shape = self.shape(value)
                count = int(np.prod(shape))
                if sentinel != BLOB_SENTINEL or size % count or size // count not in (2, 4):
                    raise Refused(f"{name}: blob of {size} bytes for {shape}")
                dtype = np.float16 if size // count == 2 else np.float32
                self._check_intact(f, data, count, dtype, value, name)
                real = self.real(value, dtype)
                if real.size != count:
                    raise Refused(f"{name}: the checkpoint tensor has {real.size} elements, the blob {count}")
                f.seek(data)
                f.write(np.ascontiguousarray(real).tobytes())
                del real
        return len(blobs)

    @staticmethod
    def _check_intact(f, data: int, count: int, dtype, value: float, name: str) -> None:
        """The blob holds the placeholder value at a sample of positions (first and last among them)."""
        itemsize = np.dtype(dtype).itemsize
        for position in np.linspace(0, count - 1, _SAMPLES).astype(np.int64):
            f.seek(data + int(position) * itemsize)
            if float(np.frombuffer(f.read(itemsize), dtype)[0]) != value:
                raise Refused(f"{name}: its blob does not hold its placeholder at element {position}")


def _scalar_scale(scale_op):
    """The scale ``fuse_conv_scale`` multiplies a weight by, as the same Python or NumPy object; None for a vector."""
    x, y = scale_op.x, scale_op.y
    scale = x.val if x.val is not None else y.val
    if isinstance(scale, np.ndarray):
        if scale.shape == ():
            scale = scale.tolist()
        elif scale.shape in ((1,), 1):
            scale = scale[0]
        else:
            return None
    if scale_op.op_type == "real_div":
        scale = 1.0 / scale
    return scale
