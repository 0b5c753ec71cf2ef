"""The verify stage's memory: one model in memory at a time (the float32 reference, the shipped
package or its chunks, the float16 package), with the same figures as before."""

from __future__ import annotations

import weakref

import pytest
import torch

from helpers import write_recipe
from sdbuild.mil import executor as executor_module
from sdbuild.stages import Job
from sdbuild.stages import verify

RECIPE = """name: verify-memory
model: {version: "synthetic:tiny-sd"}
components: [unet]
attention: SPLIT_EINSUM
resolution: {height: 64, width: 64}
target: macOS14
compression: {nbits: 6, components: [unet]}
chunk: {unet: 2}
verify: {psnr_min_db: 20, samples: 2, seed: 93}
"""


@pytest.fixture(scope="module")
def unet_entries(artifacts):
    """The unet's stage folders of a compressed, chunked build: stage name -> entry path."""
    from sdbuild.executor import prepare, run_build

    plan = prepare(write_recipe(artifacts, "verify-memory", RECIPE), artifacts)
    run_build(plan)
    return {n.stage.name: n.entry.path for n in plan.nodes if n.component == "unet"}


def _tracked(load, loads: list, alive: list):
    """``load`` that records, at each call, what it loads and which earlier loads are still alive."""

    def wrapper(path, *args, **kwargs):
        loads.append((str(path), [p for p, ref in alive if ref() is not None]))
        model = load(path, *args, **kwargs)
        alive.append((str(path), weakref.ref(model)))
        return model

    return wrapper


def test_verify_loads_one_model_at_a_time_and_reports_what_the_build_did(unet_entries, monkeypatch):
    loads, alive = [], []
    monkeypatch.setattr(torch.jit, "load", _tracked(torch.jit.load, loads, alive))
    monkeypatch.setattr(executor_module, "load_program", _tracked(executor_module.load_program, loads, alive))
    upstream = {name: unet_entries[name] for name in ("trace", "convert", "compress", "chunk")}
    job = Job("verify", "unet", {"verify.samples": 2, "verify.seed": 93, "compute_unit": "CPU_AND_NE"}, upstream)

    summary = verify._verify_function(job, upstream["trace"], None)

    parts = {str(p) for p in verify.part_paths(upstream["chunk"])}
    # The reference, the whole compressed package, the two chunks, the float16 package.
    assert len(loads) == 5, loads
    for path, still_alive in loads:
        # Only a chain's parts are held together (they are one model's weights between them).
        allowed = parts if path in parts else set()
        assert set(still_alive) <= allowed, f"loading {path} while {still_alive} are held"
    # The same figures as the build's own verify stage wrote.
    built = verify.read_psnr(unet_entries["verify"])
    assert summary["samples"] == built["samples"]
    assert {"psnr_db", "chain_psnr_db", "float16_psnr_db", "vs_float16_psnr_db"} <= summary.keys()
