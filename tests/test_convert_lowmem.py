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
# The SD unet's ORIGINAL attention is SDXL's (its case below): the SD unet is converted once, split.
CASES = [
    ("sd", "unet", "SPLIT_EINSUM"),
    ("sd", "text_encoder", "ORIGINAL"),
    ("sd", "vae_decoder", "ORIGINAL"),
    ("sdxl", "unet", "ORIGINAL"),
    ("sdxl", "text_encoder_2", "SPLIT_EINSUM"),
    ("sdxl", "vae_decoder", "ORIGINAL"),  # float32 compute: the folding pass stays out of the pipeline
]


def straightforward_convert(trace_dir: Path, target: str, package: Path) -> None:
    """``ct.convert`` with its defaults. Its program check runs once per pass pipeline instead of after
    every pass: the same package (``tests/test_convert_validation.py``), in half the time."""
    import coremltools as ct
    import torch

    from sdbuild.mil.validation import validate_once_per_pipeline

    io = trace_stage.read_io(trace_dir)
    traced = torch.jit.load(str(trace_dir / "module.pt"))
    with validate_once_per_pipeline():
        mlmodel = ct.convert(
            traced,
            inputs=[ct.TensorType(name=i["name"], shape=tuple(i["shape"]), dtype=np.dtype(i["dtype"])) for i in io["inputs"]],
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


# Where the placeholders are refused and the module converts with its weights (a large causal-mask constant).
FALLBACK = {("sdxl", "text_encoder_2", "SPLIT_EINSUM")}


def trace_in_child(function: str, component: str, fields: dict, download: Path, out: Path) -> dict:
    """``trace.<function>`` in a process of its own, forked from the stage server as the stage runs:
    TorchScript's value names depend on what was traced before in the same process, and the
    packages carry them. (A fork starts with the libraries imported and nothing traced, as each
    stage process does; a fresh interpreter would import them again, ~10 s a trace.)"""
    from sdbuild.executor import run_in_child

    job = Job("trace", component, fields, {"download": download})
    return run_in_child(f"sdbuild.stages.trace:{function}", job, out, out.parent / f"{out.name}.log")


def _package_files(package: Path) -> dict[str, bytes]:
    return {str(p.relative_to(package)): p.read_bytes() for p in sorted(package.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("family,component,attention", CASES)
def test_default_path_equals_straightforward(checkpoints, family, component, attention, tmp_path):
    """The trace with placeholders, converted and bound, is the package of the trace with its weights, byte for byte."""
    from sdbuild.mil.executor import load_program

    fields = {"attention": attention, "resolution": {"height": 128, "width": 128}, "unet_batch_one": False}
    download = checkpoints[family]
    dirs = {name: tmp_path / name for name in ("trace", "convert", "trace-weights", "convert-weights")}
    for folder in dirs.values():
        folder.mkdir()
    trace_dir, new_dir, old = dirs["trace"], dirs["convert"], tmp_path / "straightforward.mlpackage"
    trace_facts = trace_in_child("run", component, fields, download, trace_dir)
    assert trace_facts["weights"] == "placeholders" and (trace_dir / "placeholders.json").is_file()
    facts = convert_stage.run(Job("convert", component, {"target": "macOS14"}, {"trace": trace_dir, "download": download}), new_dir)
    assert facts["weights"] == ("bound" if (family, component, attention) not in FALLBACK else facts["weights"])
    if (family, component, attention) in FALLBACK:
        assert facts["weights"].startswith("converted with weights: ")
    # Today's path: the module traced with its weights, converted as it is.
    trace_in_child("run_with_weights", component, fields, download, dirs["trace-weights"])
    assert not (dirs["trace-weights"] / "placeholders.json").exists()
    old_facts = convert_stage.run(Job("convert", component, {"target": "macOS14"}, {"trace": dirs["trace-weights"]}), dirs["convert-weights"])
    assert old_facts["weights"] == "converted with weights"
    # Every other reader of module.pt binds the real weights into it: the module traced with them.
    import torch

    from sdbuild.convert.placeholders import bind_module, read_record

    bound, plain = torch.jit.load(str(trace_dir / "module.pt")), torch.jit.load(str(dirs["trace-weights"] / "module.pt"))
    bind_module(bound, read_record(trace_dir, download))
    state, plain_state = bound.state_dict(), plain.state_dict()
    assert list(state) == list(plain_state)
    assert all(torch.equal(state[k], plain_state[k]) for k in state)
    new = new_dir / convert_stage.PACKAGE
    assert _package_files(new) == _package_files(dirs["convert-weights"] / convert_stage.PACKAGE)
    assert (trace_dir / "module.pt").stat().st_size < (dirs["trace-weights"] / "module.pt").stat().st_size
    trace_dir = dirs["trace-weights"]
    straightforward_convert(trace_dir, "macOS14", old)

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


def test_folding_pass_keeps_broadcast_constants_broadcast():
    """A placeholder (one value, zero strides) comes out of the float16 pass as a float16 placeholder, never whole."""
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    from sdbuild.convert.precision import PASS_NAME

    placeholder = np.broadcast_to(np.float32(1.5009765625), (64, 8, 3, 3))

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 8, 4, 4))])
    def prog(x):
        return mb.conv(x=x, weight=mb.const(val=placeholder, name="weight"), name="conv")

    PASS_REGISTRY[PASS_NAME](prog)
    (folded,) = [v for v in _consts(prog).values() if v.size == placeholder.size]
    assert folded.dtype == np.float16 and folded.shape == placeholder.shape
    assert not any(folded.strides) and float(folded.flat[0]) == 1.5009765625


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


def _graph_text(traced) -> str:
    """The inlined graph without source locations or TorchScript's per-trace class-name mangling."""
    import re

    text = re.sub(r"#[^\n]*", "", str(traced.inlined_graph))
    return re.sub(r"\.?___torch_mangle_\d+", "", text)


TRACE_CASES = [
    ("sd", component, attention)
    for component in ("unet", "text_encoder", "vae_decoder")
    for attention in ("ORIGINAL", "SPLIT_EINSUM", "SPLIT_EINSUM_V2")
] + [("sdxl", "unet", "ORIGINAL"), ("sdxl", "text_encoder_2", "ORIGINAL")]


@pytest.mark.parametrize("family,component,attention", TRACE_CASES)
def test_trace_without_attention_values_records_the_plain_graph(
    tiny_sd_checkpoint, tiny_sdxl_checkpoint, family, component, attention, tmp_path
):
    """trace_module leaves attention unfilled, yet records the graph a plain trace records, and the saved module computes."""
    import torch

    from sdbuild.convert import trace_module
    from sdbuild.models import BuildOptions, build_component

    checkpoint = tiny_sd_checkpoint if family == "sd" else tiny_sdxl_checkpoint
    # 128 px: a 256-long query sequence in the unet's first transformer, longer than its chunks in V2
    model = build_component(component, checkpoint, BuildOptions(attention=attention, height=128, width=128))
    values = sample_inputs(model.inputs, seed=0)
    args = [torch.from_numpy(values[s.name]) for s in model.inputs]
    with torch.no_grad():
        plain = torch.jit.trace(model.module, args, strict=False, check_trace=False)
        eager = model.module(*args)
    ours = trace_module(model.module, args)
    assert _graph_text(ours) == _graph_text(plain)

    torch.jit.save(ours, str(tmp_path / "module.pt"))
    with torch.no_grad():
        got = torch.jit.load(str(tmp_path / "module.pt"))(*args)
    eager, got = (eager, got) if isinstance(eager, tuple) else ((eager,), (got,))
    for want, have in zip(eager, got):
        assert psnr(want.numpy(), have.numpy()) >= 100


def test_unfilled_attention_weights_are_not_resident_and_kernels_come_back():
    import psutil
    import torch

    from sdbuild.convert.tracing import unfilled_attention_weights

    a, b = torch.randn(16, 2048, 64), torch.randn(16, 64, 2048)
    process = psutil.Process()
    with unfilled_attention_weights():
        before = process.memory_info().rss
        scores = torch.matmul(a, b)  # 256 MiB of float32
        probabilities = scores.softmax(dim=-1)
        grown = process.memory_info().rss - before
        assert scores.shape == probabilities.shape == (16, 2048, 2048)
    assert grown < 64 * 2**20, f"{grown / 2**20:.0f} MiB became resident"
    del scores, probabilities
    # Outside, the built-in kernels compute again.
    small_a, small_b = a[:2, :3], b[:2, :, :5]
    expected = (small_a.unsqueeze(-1) * small_b.unsqueeze(1)).sum(dim=2)
    torch.testing.assert_close(torch.bmm(small_a, small_b), expected)
    rows = torch.tensor([[1.0, 2.0, 3.0]]).softmax(dim=-1)
    torch.testing.assert_close(rows.sum(), torch.tensor(1.0))
    assert rows[0, 2] > rows[0, 1] > rows[0, 0]


@pytest.mark.parametrize("attention", ["ORIGINAL", "SPLIT_EINSUM"])
def test_upcast_attention_keeps_scores_float32(attention, tmp_path):
    """An upcast_attention unet (SD 2.x-like) converts with q·k and softmax in float32, and only those."""
    import torch
    from coremltools.converters.mil.mil import types

    from models.families import diffusers_unet_output, unet_family, unet_inputs
    from sdbuild.compress.package import iter_ops, load_pymil
    from sdbuild.convert import convert_traced, trace_module
    from sdbuild.models.unet import Unet

    unet, _ = unet_family("sd2")
    assert unet.config.upcast_attention
    inputs = unet_inputs(unet, None, height=16, width=16)
    traced = trace_module(Unet.from_diffusers(unet, attention), list(inputs.values()))
    torch.jit.save(traced, str(tmp_path / "module.pt"))
    specs = [{"name": k, "shape": list(v.shape)} for k, v in inputs.items()]

    def softmax_and_products(upcast: bool):
        package = tmp_path / f"upcast-{upcast}.mlpackage"
        convert_traced(tmp_path / "module.pt", specs, ["noise_pred"], "float16", "macOS14", package, upcast_attention=upcast)
        ops = list(iter_ops(load_pymil(package)))
        softmax_inputs = [op.x.dtype for op in ops if op.op_type == "softmax"]
        float32_products = [op for op in ops if op.op_type in ("matmul", "einsum") and op.outputs[0].dtype == types.fp32]
        float32_convs = [op for op in ops if op.op_type == "conv" and op.outputs[0].dtype == types.fp32]
        return package, softmax_inputs, float32_products, float32_convs

    package, softmax_inputs, products, convs = softmax_and_products(True)
    assert softmax_inputs and set(softmax_inputs) == {types.fp32}
    assert len(products) == len(softmax_inputs)  # q·k of each head; the probabilities·v product is float16
    assert convs == []
    _, plain_softmax_inputs, plain_products, _ = softmax_and_products(False)
    assert set(plain_softmax_inputs) == {types.fp16} and plain_products == []

    from sdbuild.mil.executor import load_program

    values = {k: v.numpy() for k, v in inputs.items()}
    out = load_program(package).run(values, precision="fp16")["noise_pred"]
    assert psnr(diffusers_unet_output(unet, inputs).numpy(), out) >= 40


_FRAGMENT = """
import sys, numpy as np, psutil
if sys.argv[1] == "trace":
    from sdbuild.convert import give_freed_memory_back
    give_freed_memory_back()
process = psutil.Process()
block = np.ones(8 << 20, np.uint8)
del block  # glibc now serves blocks below 8 MiB from its heap, unless told otherwise
arrays = [np.ones(2 << 20, np.uint8) for _ in range(100)]
before = process.memory_info().rss
del arrays[::2]  # 100 MiB freed, in holes between live arrays
print((before - process.memory_info().rss) / 2**20)
"""


def test_giving_freed_memory_back_starts_no_process():
    """A stage's peak adds its child processes' peaks (RUSAGE_CHILDREN): a helper forked with the
    stage's pages (ctypes.util.find_library runs ldconfig) would count them a second time."""
    import subprocess
    import sys

    code = ("import resource; from sdbuild.convert import give_freed_memory_back; give_freed_memory_back(); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "0"


def test_trace_process_gives_freed_activations_back():
    """The trace stage's process frees memory for real; a default process keeps freed heap holes resident (glibc)."""
    import subprocess
    import sys

    def given_back_mib(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _FRAGMENT, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.strip())

    assert given_back_mib("trace") > 90
    assert given_back_mib("default") < 20  # what the stage setting is for


def test_trace_entry_does_not_depend_on_where_the_download_is(tiny_sd_checkpoint, tmp_path):
    """Two artifacts folders, the same checkpoint: the traces (placeholders.json included) are the same bytes,
    and the record names no absolute path; each converts to its own download's weights."""
    import shutil

    fields = {"attention": "ORIGINAL"}
    entries = {}
    for name in ("one", "two"):
        download = tmp_path / name / "artifacts" / "download"
        shutil.copytree(tiny_sd_checkpoint, download / "model")
        out = tmp_path / name / "trace"
        out.mkdir()
        assert trace_in_child("run", "text_encoder", fields, download, out)["weights"] == "placeholders"
        entries[name] = (download, out)
    (one_download, one), (two_download, two) = entries["one"], entries["two"]
    assert _package_files(one) == _package_files(two)
    record = (one / "placeholders.json").read_text()
    assert str(tmp_path) not in record and '"file": "text_encoder/' in record
    facts = convert_stage.run(Job("convert", "text_encoder", {"target": "macOS14"}, {"trace": two, "download": two_download}),
                              tmp_path / "two")  # fmt: skip
    assert facts["weights"] == "bound"


def test_a_record_naming_a_file_outside_the_download_is_refused(tmp_path):
    """A trace entry's placeholders.json (a remote cache may hand one over) cannot make convert read
    a file outside the download's folders."""
    import json as _json

    from sdbuild.convert.placeholders import RECORD, read_record
    from sdbuild.errors import SdbuildError

    download = tmp_path / "download"
    (download / "model").mkdir(parents=True)
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    trace = tmp_path / "trace"
    trace.mkdir()
    entry = {"value": 1.5, "shape": [64, 64], "root": "checkpoint", "file": "../../secret.safetensors", "key": "w"}
    (trace / RECORD).write_text(_json.dumps({"placeholders": [entry], "precision": "float32"}))
    with pytest.raises(SdbuildError, match="outside the download"):
        read_record(trace, download)
    entry["file"] = "unet/diffusion_pytorch_model.safetensors"
    (trace / RECORD).write_text(_json.dumps({"placeholders": [entry], "precision": "float32"}))
    assert read_record(trace, download).placeholders[1.5]["path"] == download / "model" / entry["file"]
