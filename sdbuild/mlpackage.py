"""The ``.mlpackage`` format: reading a package's parts and writing it byte-reproducibly.

Reading: ``read_manifest`` (where the model spec and the weights lie),
``program_blob_refs``/``blob_refs`` (which weight blobs an ML program reads),
the weight file's layout (``BLOB_*``, ``read_blob_record``) and Core ML's
array data types (``ARRAY_DTYPES``). The executor, chunking, compression,
inspect and generate read packages through these.

Writing:
coremltools leaves three things in a package that change from one build of
the same model to the next: the conversion date in the user-defined metadata
(``com.github.apple.coremltools.conversion_date``), the order in which the
model spec's protobuf maps are serialized, and the item identifiers of
``Manifest.json``, fresh random UUIDs on every save. ``write_spec`` writes a
spec without the first, in protobuf's deterministic serialization, and
rewrites the manifest with identifiers derived from each item's path and
content; ``make_reproducible`` does both to a package as saved. Every stage
that saves a package (convert, compress, chunk) and the bundle call them, so
cache entries and bundles are the same bytes whenever their inputs are.

Both files are written as new files (the old one unlinked first), never
through an existing one: a bundle's packages hard-link their other files to
the cache entry's, which must stay as they are.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

CONVERSION_DATE = "com.github.apple.coremltools.conversion_date"
MANIFEST = "Manifest.json"
_CHUNK = 1 << 20


def readonly_view(package: Path) -> Path:
    """A private ``.mlpackage`` that reads ``package``'s data without touching ``package``.

    Opening a package with coremltools (``ct.models.MLModel``, its
    ``ModelPackage``) rewrites its ``Manifest.json`` in place: same bytes, new
    mtime, and permissions do not stop it when the build runs as root. A cache
    entry must not move, so loaders open this view instead: a fresh folder in
    TMPDIR with its own copy of the manifest and ``Data`` a symlink to the
    original's. The caller removes it (``shutil.rmtree``) when done.
    """
    package = Path(package).resolve()
    view = Path(tempfile.mkdtemp(prefix="view-")) / package.name
    view.mkdir()
    shutil.copyfile(package / MANIFEST, view / MANIFEST)
    (view / "Data").symlink_to(package / "Data", target_is_directory=True)
    return view


def open_readonly(package: Path, **kwargs):
    """``ct.models.MLModel`` of ``package`` (``kwargs`` passed on) through a ``readonly_view``, removed with the model."""
    import weakref

    import coremltools as ct

    view = readonly_view(package)
    model = ct.models.MLModel(str(view), **kwargs)
    weakref.finalize(model, shutil.rmtree, view.parent, True)
    return model


def spec_path(package: Path) -> Path:
    """The model spec file of ``package``, as its manifest names it."""
    return read_manifest(package).spec


def load_spec(package: Path):
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path(package).read_bytes())
    return spec


def write_spec(package: Path, spec) -> None:
    """Replace ``package``'s model spec by ``spec``: no conversion date, deterministic bytes; then its manifest."""
    spec.description.metadata.userDefined.pop(CONVERSION_DATE, None)
    target = spec_path(package)
    _replace(target, spec.SerializeToString(deterministic=True))
    write_manifest(package)


def make_reproducible(package: Path) -> None:
    """Rewrite a package as coremltools saved it so that its bytes depend on its content alone."""
    write_spec(package, load_spec(package))


def write_manifest(package: Path) -> None:
    """Rewrite ``Manifest.json`` with each item's identifier derived from its path and content.

    The identifier keeps the UUID form Core ML writes (a name-based UUID made
    from sha256 of the item's path and of its bytes), so readers that expect
    one still find one.
    """
    package = Path(package)
    info = json.loads((package / MANIFEST).read_text())
    root = info["itemInfoEntries"][info["rootModelIdentifier"]]["path"]
    entries = {}
    for item in sorted(info["itemInfoEntries"].values(), key=lambda e: e["path"]):
        digest = hashlib.sha256(item["path"].encode() + b"\0" + _content_digest(package / "Data" / item["path"]))
        identifier = str(uuid.UUID(bytes=digest.digest()[:16], version=5)).upper()
        entries[identifier] = dict(sorted(item.items()))
        if item["path"] == root:
            info["rootModelIdentifier"] = identifier
    info["itemInfoEntries"] = entries
    _replace(package / MANIFEST, (json.dumps(info, indent=4, sort_keys=True) + "\n").encode())


def _content_digest(path: Path) -> bytes:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, in name order)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        with open(file, "rb") as f:
            while block := f.read(_CHUNK):
                h.update(block)
    return h.digest()


def _replace(target: Path, data: bytes) -> None:
    # Unlink first: the old file may be a hard link to a cache entry's.
    target.unlink(missing_ok=True)
    target.write_bytes(data)


# --- reading: the manifest, the weight file's blobs, data types --------------------

# The weight file (blob storage, version 2): a 64-byte header (uint32 blob count, uint32 version, reserved),
# then per blob a 64-byte metadata record (uint32 sentinel, uint32 dtype, uint64 data size, uint64 data
# offset, reserved) and its data, every record 64-byte aligned.
BLOB_HEADER = 64
BLOB_METADATA = 64
BLOB_ALIGN = 64
BLOB_SENTINEL = 0xDEADBEEF
BLOB_STORAGE_VERSION = 2
DEFAULT_WEIGHTS = Path("com.apple.CoreML") / "weights"  # under Data/, where the manifest names none
WEIGHT_FILE = Path("Data") / DEFAULT_WEIGHTS / "weight.bin"  # the one weight file coremltools writes

# Core ML's ArrayFeatureType.ArrayDataType numbers -> numpy dtype names.
ARRAY_DTYPES = {65552: "float16", 65568: "float32", 65600: "float64", 131104: "int32", 131080: "int8"}


def array_dtype(data_type: int, default: str | None = "float32") -> str | None:
    """The numpy dtype name of a Core ML multi-array ``dataType`` number (``default`` for an unknown one)."""
    return ARRAY_DTYPES.get(data_type, default)


@dataclass(frozen=True)
class PackageFiles:
    """Where a package's parts lie, as its ``Manifest.json`` says: the model spec file and the weights folder."""

    spec: Path
    weights: Path


def read_manifest(package: Path) -> PackageFiles:
    """The model spec file and weights folder of ``package``; PackageError (one line) when its manifest is missing or unreadable."""
    from sdbuild.errors import PackageError

    package = Path(package)
    manifest = package / MANIFEST
    if not manifest.is_file():
        raise PackageError(f"{package}: not an .mlpackage ({MANIFEST} is missing)")
    try:
        info = json.loads(manifest.read_text())
        entries = info["itemInfoEntries"]
        root = entries[info["rootModelIdentifier"]]["path"]
    except (ValueError, KeyError, TypeError) as e:
        raise PackageError(f"{package}: {MANIFEST} is unreadable ({type(e).__name__}: {e})") from None
    weights = package / "Data" / DEFAULT_WEIGHTS
    for entry in entries.values():
        if isinstance(entry, dict) and entry.get("name") == "weights" and "path" in entry:
            weights = package / "Data" / entry["path"]
    return PackageFiles(package / "Data" / root, weights)


def blob_values(op):
    """Every weight-file value of the MIL ``op``: in its attributes (const, iOS16 constexpr ops) and
    bound inline to its inputs (iOS18 constexpr ops), nested blocks included."""
    for value in op.attributes.values():
        if value.WhichOneof("value") == "blobFileValue":
            yield value
    for arg in op.inputs.values():
        for binding in arg.arguments:
            if binding.WhichOneof("binding") == "value" and binding.value.WhichOneof("value") == "blobFileValue":
                yield binding.value
    for block in op.blocks:
        for inner in block.operations:
            yield from blob_values(inner)


def blob_refs(op) -> list[tuple[str, int]]:
    """(weight file name, offset) of every blob the MIL ``op`` reads."""
    return [(v.blobFileValue.fileName, v.blobFileValue.offset) for v in blob_values(op)]


def program_blob_refs(spec) -> list[tuple[str, int]]:
    """(weight file name, offset) of every blob the ML program ``spec`` reads, every function and block."""
    return [
        ref
        for function in spec.mlProgram.functions.values()
        for block in function.block_specializations.values()
        for op in block.operations
        for ref in blob_refs(op)
    ]


def weight_file_of(weights: Path, file_name: str) -> Path:
    """The file a blob reference's ``file_name`` (``@model_path/weights/weight.bin``) names in the ``weights`` folder."""
    return Path(weights) / file_name.split("/")[-1]


def read_blob_record(f, offset: int) -> tuple[int, int, int, int] | None:
    """(sentinel, dtype, data size, data offset) of the metadata record at ``offset`` of the open weight file ``f``; None when cut short."""
    f.seek(offset)
    record = f.read(BLOB_METADATA)
    if len(record) < BLOB_METADATA:
        return None
    return struct.unpack_from("<IIQQ", record)


def iter_ops_of(block):
    """Every op of ``block``, nested blocks included, in program order."""
    for op in list(block.operations):
        for inner in op.blocks:
            yield from iter_ops_of(inner)
        yield op


def iter_ops(prog):
    """Every op of every function of ``prog``, nested blocks included, in program order."""
    for function in prog.functions.values():
        yield from iter_ops_of(function)


def iter_spec_ops(block):
    """Every op of a saved program's ``block`` (the protobuf spec, not a pymil program), each before the ops of
    its nested blocks."""
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from iter_spec_ops(inner)
