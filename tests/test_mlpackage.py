"""sdbuild.mlpackage is where the package format is known: the manifest, the weight file's blobs, Core ML's dtypes."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

import sdbuild
from sdbuild.errors import PackageError
from sdbuild.mlpackage import (
    BLOB_HEADER,
    BLOB_METADATA,
    BLOB_SENTINEL,
    MANIFEST,
    array_dtype,
    read_blob_record,
    read_manifest,
)


def _package(tmp_path: Path, weights_entry: bool) -> Path:
    package = tmp_path / "m.mlpackage"
    entries = {"A": {"path": "com.apple.CoreML/model.mlmodel", "name": "model.mlmodel"}}
    if weights_entry:
        entries["B"] = {"path": "elsewhere/weights", "name": "weights"}
    package.mkdir()
    (package / MANIFEST).write_text(json.dumps({"itemInfoEntries": entries, "rootModelIdentifier": "A"}))
    return package


@pytest.mark.parametrize("weights_entry", [False, True])
def test_the_manifest_names_the_spec_and_the_weights(tmp_path, weights_entry):
    files = read_manifest(_package(tmp_path, weights_entry))
    data = tmp_path / "m.mlpackage" / "Data"
    assert files.spec == data / "com.apple.CoreML" / "model.mlmodel"
    assert files.weights == data / ("elsewhere/weights" if weights_entry else "com.apple.CoreML/weights")


def test_a_missing_or_unreadable_manifest_is_one_line(tmp_path):
    with pytest.raises(PackageError, match=r"not an \.mlpackage \(Manifest\.json is missing\)"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text('{"itemInfoEntries": {}}')
    with pytest.raises(PackageError, match="Manifest.json is unreadable"):
        read_manifest(tmp_path)


def test_a_blob_record_is_read_or_reported_cut_short(tmp_path):
    path = tmp_path / "weight.bin"
    record = struct.pack("<IIQQ", BLOB_SENTINEL, 2, 8, BLOB_HEADER + BLOB_METADATA).ljust(BLOB_METADATA, b"\0")
    path.write_bytes(b"\0" * BLOB_HEADER + record + b"\1" * 8)
    with open(path, "rb") as f:
        assert read_blob_record(f, BLOB_HEADER) == (BLOB_SENTINEL, 2, 8, BLOB_HEADER + BLOB_METADATA)
        assert read_blob_record(f, BLOB_HEADER + 32) is None


def test_array_dtypes():
    assert (array_dtype(65552), array_dtype(65568), array_dtype(131104)) == ("float16", "float32", "int32")
    assert array_dtype(7) == "float32" and array_dtype(7, None) is None


def test_no_other_module_knows_the_format():
    # The manifest's file name, its keys, the blob sentinel and the dtype numbers are written in mlpackage.py alone.
    facts = re.compile(r'"Manifest\.json"|itemInfoEntries|0x[Dd][Ee][Aa][Dd][Bb][Ee][Ee][Ff]|65552')
    root = Path(sdbuild.__file__).parent
    knowing = sorted(str(p.relative_to(root)) for p in root.rglob("*.py") if facts.search(p.read_text()))
    assert knowing == ["mlpackage.py"]
