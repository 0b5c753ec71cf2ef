"""The memory-bounded trace + convert path makes the package the straightforward path makes.

The straightforward path is what the convert stage did before: load the
TorchScript module, ``ct.convert`` it with coremltools' default passes and
float16 compute precision, save. Both run on the same ``module.pt`` from the
trace stage; the packages are compared by the reference executor in float32
(and, where they should be, byte for byte in their weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sdbuild.metrics import psnr
from sdbuild.models import TensorSpec, sample_inputs
from sdbuild.stages import Job
from sdbuild.stages import convert as convert_stage
from sdbuild.stages import trace as trace_stage

WEIGHTS = Path("Data/com.apple.CoreML/weights/weight.bin")
CASES = [
    ("sd", "unet", "SPLIT_EINSUM"),
    ("sd", "text_encoder", "ORIGINAL"),
    ("sd", "vae_decoder", "ORIGINAL"),
    ("sdxl", "unet", "ORIGINAL"),
    ("sdxl", "text_encoder_2", "SPLIT_EINSUM"),
    ("sdxl", "vae_decoder", "ORIGINAL"),  # float32 compute: the folding pass stays out of the pipeline
]


def straightforward_convert(trace_dir: Path, target: str, package: Path) -> None:
    import coremltools as ct
    import torch

    io = trace_stage.read_io(trace_dir)
    traced = torch.jit.load(str(trace_dir / "module.pt"))
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(name=i["name"], shape=tuple(i["shape"]), dtype=np.float32) for i in io["inputs"]],
        outputs=[ct.TensorType(name=n, dtype=np.float32) for n in io["outputs"]],
        convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, target),
        compute_precision=ct.precision.FLOAT16 if io["precision"] == "float16" else ct.precision.FLOAT32,
        skip_model_load=True,
    )
    mlmodel.save(str(package))


@pytest.fixture(scope="module")
def checkpoints(tiny_sd_checkpoint, tiny_sdxl_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Download-entry folders (``source.json``) standing for the tiny checkpoints, by family."""
    entries = {}
    for family, path in (("sd", tiny_sd_checkpoint), ("sdxl", tiny_sdxl_checkpoint)):
        entry = tmp_path_factory.mktemp(f"download-{family}")
        (entry / "source.json").write_text(json.dumps({"kind": "local", "path": str(path)}))
        entries[family] = entry
    return entries


@pytest.mark.parametrize("family,component,attention", CASES)
def test_default_path_equals_straightforward(checkpoints, family, component, attention, tmp_path):
    from sdbuild.mil.executor import load_program

    fields = {"attention": attention, "resolution": {"height": 128, "width": 128}, "unet_batch_one": False}
    trace_dir, new_dir, old = tmp_path / "trace", tmp_path / "convert", tmp_path / "straightforward.mlpackage"
    trace_dir.mkdir()
    new_dir.mkdir()
    trace_stage.run(Job("trace", component, fields, {"download": checkpoints[family]}), trace_dir)
    facts = convert_stage.run(Job("convert", component, {"target": "macOS14"}, {"trace": trace_dir}), new_dir)
    straightforward_convert(trace_dir, "macOS14", old)
    new = new_dir / convert_stage.PACKAGE

    io = trace_stage.read_io(trace_dir)
    specs = [TensorSpec(i["name"], tuple(i["shape"]), i["kind"], i["high"]) for i in io["inputs"]]
    inputs = sample_inputs(specs, seed=1)
    expected = load_program(old).run(inputs, precision="fp32")
    got = load_program(new).run(inputs, precision="fp32")
    assert list(got) == list(expected) == io["outputs"]
    for name in expected:
        assert got[name].dtype == np.float32
        assert psnr(expected[name], got[name]) >= 60, name
    # Same constants, same order, same values: the weight files are one file.
    assert (new / WEIGHTS).read_bytes() == (old / WEIGHTS).read_bytes()
    assert facts["precision"] == io["precision"]


def _program_with_shared_weight():
    """A program whose weight const feeds two ops (one cast shared by both) and a small bias const."""
    from coremltools.converters.mil.mil import Builder as mb

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8, 1, 1)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 8, 4, 4))])
    def prog(x):
        weight = mb.const(val=w, name="weight")
        y = mb.conv(x=x, weight=weight, bias=mb.const(val=b, name="bias"), name="conv_a")
        z = mb.conv(x=x, weight=weight, name="conv_b")
        return mb.add(x=y, y=z, name="out")

    return prog


def _consts(prog) -> dict[str, np.ndarray]:
    """The floating-point constants of ``prog``'s main function by name, in program order."""
    return {
        op.outputs[0].name: op.outputs[0].val
        for op in prog.functions["main"].operations
        if op.op_type == "const"
        and isinstance(op.outputs[0].val, np.ndarray)
        and np.issubdtype(op.outputs[0].val.dtype, np.floating)
    }


def test_folding_pass_drops_float32_weights_as_it_goes():
    """Right after the pass, no float32 weight is left and no cast reads a const; the float16
    constants are those that add_fp16_cast + const_elimination + dead_code_elimination make."""
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    from sdbuild.convert.precision import PASS_NAME

    folded = _program_with_shared_weight()
    PASS_REGISTRY[PASS_NAME](folded)
    ops = folded.functions["main"].operations
    assert not [op for op in ops if op.op_type == "cast" and op.x.op is not None and op.x.op.op_type == "const"]
    assert all(v.dtype == np.float16 for v in _consts(folded).values())

    reference = _program_with_shared_weight()
    for name in ("common::add_fp16_cast", "common::const_elimination", "common::dead_code_elimination"):
        PASS_REGISTRY[name](reference)
    ref_consts, got_consts = _consts(reference), _consts(folded)
    assert list(got_consts) == list(ref_consts)
    for name, value in ref_consts.items():
        np.testing.assert_array_equal(got_consts[name], value)
    # The shared weight became one float16 const, read by both convolutions.
    assert sum(1 for name in got_consts if name.startswith("weight")) == 1


def test_skip_weight_init_leaves_parameters_unfilled_and_restores_init():
    import torch

    from sdbuild.convert import skip_weight_init

    filled = torch.zeros(4, 4)
    with skip_weight_init():
        torch.nn.init.kaiming_uniform_(filled)
        torch.nn.init.normal_(filled)
    assert torch.count_nonzero(filled) == 0
    torch.nn.init.normal_(filled)
    assert torch.count_nonzero(filled) > 0
