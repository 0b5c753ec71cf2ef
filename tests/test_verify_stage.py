"""The verify stage's memory: one model in memory at a time (the float32 reference, the shipped
package or its chunks, the float16 package), with the same figures as before; the reference built
from the checkpoint a layer at a time, within a stated tolerance of the traced module's figures."""

from __future__ import annotations

import json
import shutil
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
    entries = {n.stage.name: n.entry.path for n in plan.nodes if n.component == "unet"}
    return {**entries, "download": next(n.entry.path for n in plan.nodes if n.stage.name == "download")}


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
    upstream = {name: unet_entries[name] for name in ("download", "trace", "convert", "compress", "chunk")}
    job = Job("verify", "unet", {"verify.samples": 2, "verify.seed": 93, "compute_unit": "CPU_AND_NE"}, upstream)

    summary = verify._verify_function(job, upstream["trace"], None)

    parts = {str(p) for p in verify.part_paths(upstream["chunk"])}
    # The whole compressed package, the two chunks, the float16 package; the reference is built from the checkpoint.
    assert len(loads) == 4 and not any(path.endswith("module.pt") for path, _ in loads), loads
    for path, still_alive in loads:
        # Only a chain's parts are held together (they are one model's weights between them).
        allowed = parts if path in parts else set()
        assert set(still_alive) <= allowed, f"loading {path} while {still_alive} are held"
    # The same figures as the build's own verify stage wrote.
    built = verify.read_psnr(unet_entries["verify"])
    assert summary["samples"] == built["samples"]
    assert {"psnr_db", "chain_psnr_db", "float16_psnr_db", "vs_float16_psnr_db"} <= summary.keys()


PSNR_TOLERANCE_DB = 0.01  # the lazily bound, chunked reference against the traced module's, on the tiny unet


def test_the_reference_from_the_checkpoint_gives_the_traced_modules_figures(unet_entries, capsys, monkeypatch):
    """Where the module cannot be built a layer at a time, the traced module with the checkpoint's weights
    bound into its placeholders is the reference (and the log says so); else the module built from the
    checkpoint a layer at a time: every figure within ``PSNR_TOLERANCE_DB``."""
    from sdbuild.models.lazy_weights import NotLazy

    fields = {"verify.samples": 2, "verify.seed": 93, "compute_unit": "CPU_AND_NE"}
    stages = ("trace", "convert", "compress", "chunk")
    upstream = {s: unet_entries[s] for s in ("download", *stages)}

    def not_lazy(job, io):
        raise NotLazy("not built lazily here")

    with monkeypatch.context() as patched:
        patched.setattr(verify, "_lazy_reference", not_lazy)
        traced = verify._verify_function(Job("verify", "unet", fields, upstream), unet_entries["trace"], None)
    assert "the traced module is the reference: not built lazily here" in capsys.readouterr().err
    lazy = verify._verify_function(Job("verify", "unet", fields, upstream), unet_entries["trace"], None)
    assert "the traced module is the reference" not in capsys.readouterr().err
    for key in ("psnr_db", "float16_psnr_db", "chain_psnr_db", "vs_float16_psnr_db"):
        assert abs(lazy[key] - traced[key]) <= PSNR_TOLERANCE_DB, (key, lazy[key], traced[key])
    # The reference alone moves: figures against the packages only are the same.
    assert lazy["chain_psnr_db"] == traced["chain_psnr_db"] and lazy["vs_float16_psnr_db"] == traced["vs_float16_psnr_db"]


def test_verify_reads_the_download_behind_its_trace_without_keying_it(artifacts):
    """The job gets the download its trace was made from; the key is what it was with no ``reads``: it
    moves only through the code digest (the graph fixture in test_graph pins the rest)."""
    from dataclasses import replace

    from graph_cases import structural_keys
    from sdbuild import executor
    from sdbuild.executor import prepare, read_through
    from sdbuild.stages import STAGES

    recipe = write_recipe(artifacts, "verify-memory", RECIPE)
    with structural_keys():
        plan = prepare(recipe, artifacts)
        node = next(n for n in plan.nodes if n.stage.name == "verify" and n.component == "unet")
        assert "download" in node.stage.reads and not any(d.stage.name == "download" for d in node.deps)
        assert not any(name.startswith("download") for name in node.record["upstream"])
        keyed = node.key
        node.stage = replace(node.stage, reads=())
        executor.assign_keys([node])
        assert node.key == keyed
        node.stage = STAGES["verify"]
    download = next(n for n in plan.nodes if n.stage.name == "download")
    assert read_through(node) == {}  # nothing built yet in this plan: no entry to hand over
    download.entry = type("Entry", (), {"path": artifacts / "some-download"})()
    assert read_through(node) == {"download": artifacts / "some-download"}


def test_a_checkpoint_that_does_not_map_leaves_the_traced_module_as_the_reference(unet_entries, tmp_path, capsys):
    """A checkpoint lacking a key of the module: the traced module is the reference, and the log says why."""
    from safetensors.torch import load_file, save_file

    from sdbuild.stages.download import checkpoint_dir
    from sdbuild.stages.trace import read_io

    source = checkpoint_dir(unet_entries["download"])
    folder = tmp_path / "checkpoint"
    shutil.copytree(source, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors.pop("conv_out.bias")
    save_file(tensors, weights)
    download = tmp_path / "download"
    download.mkdir()
    (download / "source.json").write_text(json.dumps({"kind": "local", "path": str(folder)}))
    job = Job("verify", "unet", {}, {"download": download, "trace": unet_entries["trace"]})

    module, weights_bound = verify._reference_module(job, unet_entries["trace"], read_io(unet_entries["trace"]))
    assert weights_bound is None and isinstance(module, torch.jit.ScriptModule)
    assert "verify unet: the traced module is the reference:" in capsys.readouterr().err
    (download / "source.json").write_text(json.dumps({"kind": "local", "path": str(source)}))
    module, weights_bound = verify._reference_module(job, unet_entries["trace"], read_io(unet_entries["trace"]))
    assert weights_bound is not None and not isinstance(module, torch.jit.ScriptModule)
