"""`sdbuild exec` as a user runs it: outputs by name, and one clear line for every bad input."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import run_cli_here


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    import coremltools as ct
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
            self.norm = torch.nn.GroupNorm(4, 8)

        def forward(self, sample):
            return torch.nn.functional.silu(self.norm(self.conv(sample)))

    torch.manual_seed(0)
    module = Block().eval()
    traced = torch.jit.trace(module, torch.randn(1, 4, 8, 8))
    model = ct.convert(
        traced, inputs=[ct.TensorType("sample", shape=(1, 4, 8, 8), dtype=np.float32)],
        outputs=[ct.TensorType("out", dtype=np.float32)], convert_to="mlprogram",
        minimum_deployment_target=ct.target.macOS14, compute_precision=ct.precision.FLOAT16,
    )
    path = tmp_path_factory.mktemp("pkg") / "Block.mlpackage"
    model.save(str(path))
    return path, module


def one_error_line(done, code):
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


def test_exec_writes_outputs_under_their_names(package, tmp_path):
    import torch

    from sdbuild.metrics import psnr

    path, module = package
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "in.npz", sample=x)
    done = run_cli_here("exec", path, "--inputs", tmp_path / "in.npz", "--output", tmp_path / "out.npz", "--precision", "fp32", "--profile")
    assert done.returncode == 0, done.stderr
    assert "time per op type" in done.stdout and "conv" in done.stdout
    out = np.load(tmp_path / "out.npz")
    assert out.files == ["out"]
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    assert psnr(ref, out["out"]) > 60


def test_wrong_input_shape(package, tmp_path):
    np.savez(tmp_path / "in.npz", sample=np.zeros((1, 4, 8, 9), np.float32))
    line = one_error_line(run_cli_here("exec", package[0], "--inputs", tmp_path / "in.npz", "--output", tmp_path / "o.npz"), 2)
    assert "sample" in line and "(1, 4, 8, 8)" in line.replace("[", "(").replace("]", ")")


def test_missing_and_extra_inputs(package, tmp_path):
    np.savez(tmp_path / "in.npz", other=np.zeros((1,), np.float32))
    line = one_error_line(run_cli_here("exec", package[0], "--inputs", tmp_path / "in.npz", "--output", tmp_path / "o.npz"), 2)
    assert "sample" in line


def test_truncated_package(package, tmp_path):
    import shutil

    broken = tmp_path / "Broken.mlpackage"
    shutil.copytree(package[0], broken)
    (broken / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").unlink()
    np.savez(tmp_path / "in.npz", sample=np.zeros((1, 4, 8, 8), np.float32))
    line = one_error_line(run_cli_here("exec", broken, "--inputs", tmp_path / "in.npz", "--output", tmp_path / "o.npz"), 1)
    assert "Broken.mlpackage" in line


def test_corrupted_weight_file(package, tmp_path):
    import shutil

    broken = tmp_path / "Corrupt.mlpackage"
    shutil.copytree(package[0], broken)
    weights = broken / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    np.savez(tmp_path / "in.npz", sample=np.zeros((1, 4, 8, 8), np.float32))
    line = one_error_line(run_cli_here("exec", broken, "--inputs", tmp_path / "in.npz", "--output", tmp_path / "o.npz"), 1)
    assert "weight" in line


def test_op_without_kernel(tmp_path):
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))], opset_version=ct.target.iOS16)
    def prog(x):
        noise = mb.random_normal(shape=np.array([2, 3], dtype=np.int32), mean=0.0, stddev=1.0)
        return mb.add(x=x, y=noise)

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16)
    path = tmp_path / "Noise.mlpackage"
    model.save(str(path))
    name = model.get_spec().description.input[0].name
    np.savez(tmp_path / "in.npz", **{name: np.zeros((2, 3), np.float32)})
    line = one_error_line(run_cli_here("exec", path, "--inputs", tmp_path / "in.npz", "--output", tmp_path / "o.npz"), 1)
    assert "random_normal" in line and "iOS16" in line
