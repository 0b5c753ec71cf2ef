"""Saved ``.mlpackage`` folders made byte-reproducible.

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
import tempfile
import uuid
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
    info = json.loads((Path(package) / MANIFEST).read_text())
    root = info["itemInfoEntries"][info["rootModelIdentifier"]]
    return Path(package) / "Data" / root["path"]


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
