"""Chunk: split the finished unet package into consecutive parts (``UnetChunk1``, …)."""

from __future__ import annotations

import json
from pathlib import Path

from sdbuild.stages import PACKAGE_OF, Job
from sdbuild.stages.convert import PACKAGE

RESULT = "chunks.json"


def run(job: Job, out: Path) -> dict:
    """Write ``chunk1.mlpackage`` … ``chunkN.mlpackage`` and ``chunks.json`` (sizes, crossing tensors)."""
    from sdbuild.mil.chunk import chunk_program

    source = job.input(PACKAGE_OF) / PACKAGE
    n = job.fields["chunk"]["unet"]
    result = chunk_program(source, n, out)
    facts = result.to_dict()
    facts["source"] = PACKAGE
    for part in facts["parts"]:
        part["path"] = Path(part["path"]).name
    (out / RESULT).write_text(json.dumps(facts, indent=2))
    return {"parts": [{"path": p["path"], "weight_bytes": p["weight_bytes"]} for p in facts["parts"]]}


def part_paths(entry_path: Path) -> list[Path]:
    facts = json.loads((Path(entry_path) / RESULT).read_text())
    return [Path(entry_path) / p["path"] for p in facts["parts"]]


def chunk_facts(entry_path: Path) -> dict:
    return json.loads((Path(entry_path) / RESULT).read_text())
