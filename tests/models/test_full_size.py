"""Full-size SD 1.5 and SD 2.1-base components and SDXL's unet: conversion time, memory, PSNR (slow; -m slow).

Each case converts one component in a child process (tests/models/full_size.py)
and merges its figures into bench/results/models-<arch>.json, keyed by
component and attention implementation. Run one case at a time on a shared
machine: a full-size unet conversion holds several GiB.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .families import ATTENTIONS

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parents[1] / "bench" / "results"
CASES = [(a, c, att) for a in ("sd15", "sd21-base") for c in ("unet", "text_encoder", "vae_decoder") for att in ATTENTIONS]
CASES.append(("sdxl", "unet", "ORIGINAL"))  # 1024×1024; about 14 GiB with its float32 check


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("arch,component,attention", CASES)
def test_full_size_conversion(arch, component, attention, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(HERE / "full_size.py"), arch, component, attention, str(out)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"models-{arch}.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    table[f"{component}/{attention}"] = result
    path.write_text(json.dumps(dict(sorted(table.items())), indent=2) + "\n")

    assert min(result["fp32_psnr_db"].values()) >= 60
    assert min(result["fp16_executor_psnr_db"].values()) >= 35
    if attention != "ORIGINAL":
        assert result["max_rank"] <= 4
