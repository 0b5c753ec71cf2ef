"""The reference executor on whole models: Stable Diffusion building blocks converted from
PyTorch, compressed weights, the program API, and the errors a user can meet."""

from __future__ import annotations

import functools
import gc
import math
import shutil
import weakref

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import coremltools as ct
import coremltools.optimize.coreml as cto

from sdbuild.errors import ModelInputError, PackageError, UnsupportedOpError
from sdbuild.metrics import psnr
from sdbuild.mil import executor as executor_module
from sdbuild.mil import kernels
from sdbuild.mil.executor import exec_files, load_program

from .milcheck import FP16_MIN_DB, FP32_MIN_DB, check_torch, convert_mil, convert_torch


# --------------------------------------------------------------------------- SD building blocks


class Attention(nn.Module):
    """Batched-matmul attention ("ORIGINAL") with a residual: x [B, S, C]."""

    def __init__(self, dim=32, heads=4, context_dim=24):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(context_dim, dim, bias=False)
        self.v = nn.Linear(context_dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context):
        b, s, c = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, s, self.heads, -1).transpose(1, 2)
        k = self.k(context).reshape(b, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.v(context).reshape(b, context.shape[1], self.heads, -1).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(a.transpose(1, 2).reshape(b, s, c))


class SplitEinsumAttention(nn.Module):
    """Per-head einsum attention in the (B, C, 1, S) layout with 1x1 convolutions."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q = nn.Conv2d(dim, dim, 1, bias=False)
        self.k = nn.Conv2d(dim, dim, 1, bias=False)
        self.v = nn.Conv2d(dim, dim, 1, bias=False)
        self.out = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        d = x.shape[1] // self.heads
        q, k, v = self.q(x), self.k(x), self.v(x)
        outs = []
        for i in range(self.heads):
            qi, ki, vi = (t[:, i * d : (i + 1) * d] for t in (q, k, v))
            w = torch.einsum("bchq,bchk->bkhq", qi, ki) * d**-0.5
            w = w.softmax(dim=1)
            outs.append(torch.einsum("bkhq,bchk->bchq", w, vi))
        return self.out(torch.cat(outs, dim=1))


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus a projected time embedding, with a 1x1 skip."""

    def __init__(self, cin=8, cout=16, temb=12):
        super().__init__()
        self.norm1 = nn.GroupNorm(4, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(4, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, x, t):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(F.silu(t))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Resampling(nn.Module):
    """The unet's and VAE's up/downsamplers, and a bilinear resize, in one model."""

    def __init__(self, c=8):
        super().__init__()
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.up_conv = nn.Conv2d(c, c, 3, padding=1)
        self.up_t = nn.ConvTranspose2d(c, c, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x):
        d = self.down(x)
        u = self.up_conv(F.interpolate(d, scale_factor=2.0, mode="nearest"))
        b = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        a = F.interpolate(x, size=(13, 11), mode="bilinear", align_corners=True)
        return u, self.up_t(d), b, a


class TextEncoder(nn.Module):
    """CLIP-like: float token ids -> embedding gather, causal attention, quick-gelu MLP."""

    def __init__(self, vocab=50, dim=32, length=8):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, length, dim) * 0.1)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.final = nn.LayerNorm(dim)
        self.register_buffer("mask", torch.full((length, length), float("-inf")).triu(1))

    def forward(self, input_ids):
        ids = input_ids.to(torch.int64)
        x = self.tok(ids) + self.pos
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        w = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + self.mask
        x = x + self.proj(w.softmax(-1) @ v)
        h = self.fc1(self.norm2(x))
        x = x + self.fc2(h * torch.sigmoid(1.702 * h))
        x = self.final(x)
        pooled = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]
        return x, pooled


def test_attention_block_ios16(model_dir):
    torch.manual_seed(0)
    inputs = {"x": torch.randn(2, 16, 32), "context": torch.randn(2, 7, 24)}
    check_torch(Attention(), inputs, model_dir, "iOS16", op_type=["matmul", "softmax", "layer_norm"])
    # The matmul -> softmax -> matmul chain ran fused, in both modes.
    prog = load_program(convert_torch(Attention(), inputs, model_dir, "iOS16", "fp16"))
    for precision in ("fp16", "fp32"):
        assert "attention (fused)" in [step[6] for step in prog._plan(precision).steps]


def test_fused_attention_rounds_like_the_separate_ops():
    def round16(t):
        return t.half().float()

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (37, 11, 11))
    scores = round16(q @ k.transpose(-1, -2))
    scaled = round16(scores * 0.35)
    expected = round16(round16(scaled.softmax(-1)) @ v)
    # A small chunk forces several blocks of query rows.
    got = kernels.fused_attention(
        q, k, v, True, 0.35, False, round16, round16, round16, chunk_elements=3 * 2 * 11 * 5
    )
    torch.testing.assert_close(round16(got), expected, rtol=0, atol=0)
    exact = kernels.fused_attention(q, k.transpose(-1, -2), v, False, 2.0, True, None, None, None)
    torch.testing.assert_close(exact, ((q @ k.transpose(-1, -2)) / 2.0).softmax(-1) @ v, rtol=1e-5, atol=1e-6)


class SdbuildSplitEinsum(nn.Module):
    """sdbuild's own SPLIT_EINSUM attention (sdbuild.models.attention) between 1x1 convolutions: x (B, C, 1, S)."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Conv2d(dim, dim, 1) for _ in range(4))

    def forward(self, x):
        from sdbuild.models.attention import attention

        return self.out(attention(self.q(x), self.k(x), self.v(x), self.heads, "SPLIT_EINSUM"))


def test_fused_einsum_attention_rounds_like_the_separate_ops():
    def round16(t):
        return t.half().float()

    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 8, 1, 37, generator=g), torch.randn(2, 11, 1, 8, generator=g), torch.randn(2, 8, 1, 11, generator=g)
    probs = round16(round16(torch.einsum(kernels.EINSUM_SCORES, q, k)).softmax(dim=1))
    expected = round16(torch.einsum(kernels.EINSUM_VALUES, probs, v))
    got = kernels.fused_einsum_attention(q, k, v, round16, round16, chunk_elements=2 * 11 * 5)  # 5 queries a block
    torch.testing.assert_close(round16(got), expected, rtol=0, atol=0)


def _fused_steps_matching_separate(package, feeds: dict, precision: str, monkeypatch, label: str, finder: str) -> int:
    """Run ``package`` with its attention chains fused (steps labelled ``label``), then with ``Program.finder``
    finding none (the separate ops, no step so labelled); returns how many steps ran fused. The outputs:
    fp16 mode, the separate ops' bit for bit (every value rounded to float16 as they round it); fp32 mode,
    within float32 rounding (the blocks' sums are added in another order)."""
    prog = load_program(package)
    fused = [step[6] for step in prog._plan(precision).steps].count(label)
    got = prog.run(feeds, precision=precision)
    monkeypatch.setattr(executor_module.Program, finder, lambda self: {})
    separate = load_program(package)
    assert label not in [step[6] for step in separate._plan(precision).steps]
    for name, value in separate.run(feeds, precision=precision).items():
        if precision == "fp16":
            np.testing.assert_array_equal(got[name], value)
        else:
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6)
    return fused


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_split_einsum_attention_runs_fused_a_block_of_queries_at_a_time(precision, model_dir, monkeypatch):
    """SPLIT_EINSUM's einsum -> softmax -> einsum per head runs as one step, a few queries at a time, without
    a head's whole scores: in fp16 mode the separate ops' outputs bit for bit (every value is rounded to
    float16 as they round it); in fp32 mode within float32 rounding (the blocks' sums are added in another order)."""
    torch.manual_seed(6)
    x = torch.randn(2, 32, 1, 40)
    package = convert_torch(SdbuildSplitEinsum().eval(), {"x": x}, model_dir, "iOS17", "fp16")
    monkeypatch.setattr(kernels, "EINSUM_CHUNK_ELEMENTS", 2 * 40 * 7)  # 7 queries of 40 keys a block
    assert _fused_steps_matching_separate(package, {"x": x.numpy()}, precision, monkeypatch, "einsum attention (fused)", "_einsum_attention_chains") == 4


class SdbuildOriginal(SdbuildSplitEinsum):
    """sdbuild's own ORIGINAL attention, channels first as Apple's: q^T k, softmax, v probabilities^T."""

    def forward(self, x):
        from sdbuild.models.attention import attention

        return self.out(attention(self.q(x), self.k(x), self.v(x), self.heads, "ORIGINAL"))


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_channels_first_attention_runs_fused(precision, model_dir, monkeypatch):
    """ORIGINAL's matmul(q, k, transpose_x) -> softmax -> matmul(v, probabilities, transpose_y) runs as one
    step, a block of queries at a time (its whole scores were 1 GiB in SD 1.5's first transformer): the
    separate ops' outputs bit for bit in fp16 mode, within float32 rounding in fp32 mode."""
    torch.manual_seed(6)
    x = torch.randn(2, 32, 1, 40)
    package = convert_torch(SdbuildOriginal().eval(), {"x": x}, model_dir, "iOS17", "fp16")
    monkeypatch.setattr(kernels, "fused_attention", functools.partial(kernels.fused_attention, chunk_elements=2 * 4 * 40 * 7))
    assert _fused_steps_matching_separate(package, {"x": x.numpy()}, precision, monkeypatch, "attention (fused)", "_attention_chains") == 1


def test_attention_block_ios18_uses_sdpa(model_dir):
    torch.manual_seed(1)
    inputs = {"x": torch.randn(2, 16, 32), "context": torch.randn(2, 7, 24)}
    check_torch(Attention(), inputs, model_dir, "iOS18", op_type="scaled_dot_product_attention")


def test_split_einsum_attention(model_dir):
    torch.manual_seed(2)
    check_torch(SplitEinsumAttention(), {"x": torch.randn(1, 32, 1, 12)}, model_dir, "iOS17", op_type=["einsum", "conv"])


def test_resnet_block_with_group_norm(model_dir):
    torch.manual_seed(3)
    inputs = {"x": torch.randn(2, 8, 10, 10), "t": torch.randn(2, 12)}
    # GroupNorm converts to its decomposition: reshape, reduce_mean, sub, mul, rsqrt/real_div...
    check_torch(ResnetBlock(), inputs, model_dir, "iOS16", op_type=["reduce_mean", "conv", "silu", "linear"])


def test_up_and_downsampling(model_dir):
    torch.manual_seed(4)
    check_torch(
        Resampling(), {"x": torch.randn(1, 8, 8, 6)}, model_dir, "iOS16",
        op_type=["upsample_nearest_neighbor", "conv_transpose", "upsample_bilinear"],
    )


def test_text_encoder(model_dir):
    torch.manual_seed(5)
    ids = torch.tensor([[49.0, 3, 17, 8, 0, 0, 0, 0]])
    check_torch(TextEncoder(), {"input_ids": ids}, model_dir, "iOS17", op_type=["gather", "cast", "layer_norm"])


# --------------------------------------------------------------------------- compressed weights


class Compressible(nn.Module):
    """Weights large enough for coremltools' compression (> 2048 elements each)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 96)

    def forward(self, x):
        h = F.silu(self.conv(x))
        return self.fc(h.mean(dim=(2, 3)))


def _dense_weights(pkg):
    """name -> decompressed weight array, as coremltools itself decompresses them."""
    dense = cto.decompress_weights(ct.models.MLModel(str(pkg), skip_model_load=True))
    path = pkg.with_name(pkg.stem + "_dense.mlpackage")
    dense.save(str(path))
    prog = load_program(path)
    return {op.outputs[0].val.shape: prog.constant(op.outputs[0]) for op in prog._function.operations
            if op.op_type == "const" and np.ndim(op.outputs[0].val) >= 2}


def _reference_with(module, weights_by_shape, x):
    """The module's output with its weights replaced by the package's decompressed weights."""
    ref = Compressible()
    ref.load_state_dict(module.state_dict())
    with torch.no_grad():
        for p in (ref.conv.weight, ref.fc.weight):
            p.copy_(torch.from_numpy(np.asarray(weights_by_shape[tuple(p.shape)], np.float32)))
        return ref(x).numpy()


COMPRESSIONS = {
    "lut4-per-tensor-ios16": ("iOS16", lambda: cto.palettize_weights, cto.OpPalettizerConfig(mode="kmeans", nbits=4), "constexpr_lut_to_dense"),
    "lut6-grouped-ios18": (
        "iOS18", lambda: cto.palettize_weights,
        cto.OpPalettizerConfig(mode="uniform", nbits=6, granularity="per_grouped_channel", group_size=8),
        "constexpr_lut_to_dense",
    ),
    "lut4-channel-scale-ios18": (
        "iOS18", lambda: cto.palettize_weights,
        cto.OpPalettizerConfig(mode="uniform", nbits=4, granularity="per_grouped_channel", group_size=16, enable_per_channel_scale=True),
        "constexpr_blockwise_shift_scale",
    ),
    "lut2-vector-ios18": (
        "iOS18", lambda: cto.palettize_weights, cto.OpPalettizerConfig(mode="kmeans", nbits=2, cluster_dim=2),
        "constexpr_lut_to_dense",
    ),
    "int8-per-channel-ios16": (
        "iOS16", lambda: cto.linear_quantize_weights, cto.OpLinearQuantizerConfig(mode="linear", dtype="int8"),
        "constexpr_affine_dequantize",
    ),
    "int8-per-tensor-ios16": (
        "iOS16", lambda: cto.linear_quantize_weights,
        cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="uint8", granularity="per_tensor"),
        "constexpr_affine_dequantize",
    ),
    "int4-per-block-ios18": (
        "iOS18", lambda: cto.linear_quantize_weights,
        cto.OpLinearQuantizerConfig(mode="linear", dtype="int4", granularity="per_block", block_size=8),
        "constexpr_blockwise_shift_scale",
    ),
    "sparse-ios16": ("iOS16", lambda: cto.prune_weights, cto.OpMagnitudePrunerConfig(target_sparsity=0.5), "constexpr_sparse_to_dense"),
    "sparse-ios18": ("iOS18", lambda: cto.prune_weights, cto.OpMagnitudePrunerConfig(target_sparsity=0.5), "constexpr_sparse_to_dense"),
}


def _assert_decompressed_per_step(path, feeds, expected: dict, precision: str, monkeypatch) -> None:
    """With every weight over ``IN_FILE_MIN`` (2048 here), the program decompresses each as a step takes it
    (none held after loading or after a run), and gives ``expected`` (every weight decompressed at load) bit for bit."""
    monkeypatch.setattr(executor_module, "IN_FILE_MIN", 2048)
    prog = load_program(path)
    monkeypatch.undo()
    assert prog._compressed and not [t for t in prog._raw_results.values() if t.numel() >= 2048]
    out = prog.run(feeds, precision=precision)
    for name in expected:
        np.testing.assert_array_equal(out[name], expected[name])
    held = [v for step in prog._plan(precision).steps for v in step[1].values() if isinstance(v, torch.Tensor)]
    held += [ref for step in prog._plan(precision).steps for _param, how, ref in step[2] if how == 3]
    assert not [t for t in held if t.numel() >= 2048]
    taken = [ref for step in prog._plan(precision).steps for _param, how, ref in step[2] if how == 4]
    assert len(taken) == 2 and all(isinstance(ref, executor_module._Compressed) for ref in taken)


@pytest.mark.parametrize("name", list(COMPRESSIONS))
def test_compressed_weights(name, model_dir, monkeypatch):
    target, compressor, op_config, op_type = COMPRESSIONS[name]
    torch.manual_seed(6)
    module = Compressible().eval()
    x = torch.randn(1, 16, 6, 6)
    for precision, floor in (("fp32", FP32_MIN_DB), ("fp16", FP16_MIN_DB)):
        pkg = convert_torch(module, {"x": x}, model_dir, target, precision)
        compressed = compressor()(ct.models.MLModel(str(pkg), skip_model_load=True), cto.OptimizationConfig(global_config=op_config))
        path = pkg.with_name(f"{pkg.stem}_{name}.mlpackage")
        compressed.save(str(path))
        prog = load_program(path)
        assert op_type in prog.op_counts()
        # Decompression runs once at load time: no constexpr op is left in the plan.
        assert not [s for s in prog._plan(precision).steps if s[6].startswith("constexpr_")]
        reference = _reference_with(module, _dense_weights(path), x)
        out = prog.run({"x": x.numpy()}, precision=precision)
        db = psnr(reference, list(out.values())[0])
        assert db >= floor, f"{name} {precision}: {db:.1f} dB"
        for run_precision in ("fp16", "fp32"):
            expected = prog.run({"x": x.numpy()}, precision=run_precision)
            _assert_decompressed_per_step(path, {"x": x.numpy()}, expected, run_precision, monkeypatch)


def test_joint_sparse_and_palettized_ios18(model_dir, monkeypatch):
    torch.manual_seed(7)
    module = Compressible().eval()
    x = torch.randn(1, 16, 6, 6)
    pkg = convert_torch(module, {"x": x}, model_dir, "iOS18", "fp16")
    model = ct.models.MLModel(str(pkg), skip_model_load=True)
    model = cto.prune_weights(model, cto.OptimizationConfig(global_config=cto.OpMagnitudePrunerConfig(target_sparsity=0.5)))
    model = cto.palettize_weights(
        model, cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="uniform", nbits=4)), joint_compression=True
    )
    path = pkg.with_name(pkg.stem + "_joint.mlpackage")
    model.save(str(path))
    prog = load_program(path)
    assert "constexpr_lut_to_sparse" in prog.op_counts()
    reference = _reference_with(module, _dense_weights(path), x)
    out = prog.run({"x": x.numpy()})
    assert psnr(reference, list(out.values())[0]) >= FP16_MIN_DB
    for precision in ("fp16", "fp32"):
        expected = prog.run({"x": x.numpy()}, precision=precision)
        _assert_decompressed_per_step(path, {"x": x.numpy()}, expected, precision, monkeypatch)


def _outputs_with_narrow_min(monkeypatch, path, feeds, precision, narrow_min):
    monkeypatch.setattr(executor_module, "NARROW_MIN", narrow_min)
    prog = load_program(path)
    return prog, prog.run(feeds, precision=precision)


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_float16_weights_are_held_float16_and_give_the_same_results(precision, model_dir, monkeypatch):
    """Weights stay float16 in memory (half a float32 copy), widened op by op: the same results, bit for bit."""
    torch.manual_seed(9)
    module = Compressible().eval()
    x = torch.randn(1, 16, 6, 6)
    dense = convert_torch(module, {"x": x}, model_dir, "iOS18", "fp16")
    lut = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=4))
    palettized = dense.with_name(dense.stem + "_narrow_lut4.mlpackage")
    cto.palettize_weights(ct.models.MLModel(str(dense), skip_model_load=True), lut).save(str(palettized))
    for path in (dense, palettized):
        _, wide = _outputs_with_narrow_min(monkeypatch, path, {"x": x.numpy()}, precision, 1 << 62)
        prog, narrow = _outputs_with_narrow_min(monkeypatch, path, {"x": x.numpy()}, precision, 1)
        for name in wide:
            np.testing.assert_array_equal(narrow[name], wide[name])
        held = [ref for step in prog._plan(precision).steps for _param, how, ref in step[2] if how == 3]
        convs = prog.op_counts()["conv"]
        assert len(held) >= convs and all(t.dtype == torch.float16 for t in held), (path.name, len(held), convs)


class Deep(nn.Module):
    """A chain of convolutions whose weights (64 * 64 * 3 * 3 elements) are over ``IN_FILE_MIN``."""

    def __init__(self, depth=5, width=64):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth))

    def forward(self, x):
        for conv in self.convs:
            x = F.silu(conv(x))
        return x


@pytest.fixture(scope="module")
def deep_packages(model_dir):
    torch.manual_seed(10)
    module = Deep().eval()
    x = torch.randn(1, 64, 8, 8)
    return {p: convert_torch(module, {"x": x}, model_dir, "iOS17", p) for p in ("fp16", "fp32")}, {"x": x.numpy()}


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_weights_are_read_from_the_weight_file_one_op_at_a_time(precision, deep_packages, monkeypatch):
    """A loaded program holds no weight: each is read from weight.bin as its op runs and freed after it,
    and the results are those of the program with every weight loaded, bit for bit."""
    packages, feeds = deep_packages
    path = packages[precision]
    loaded, expected = _run_with_everything_loaded(monkeypatch, path, feeds, precision)
    prog = load_program(path)
    weights = [op.inputs["weight"] for op in prog.function.operations if op.op_type == "conv"]
    assert len(weights) == 5
    by_name = {op.outputs[0].name: op.outputs[0] for op in loaded.function.operations if op.op_type == "const"}
    for var in weights:
        assert var.val.shape == (64, 64, 3, 3) and not any(var.val.strides)  # a stand-in, no memory
        np.testing.assert_array_equal(prog.constant(var), by_name[var.name].val)
    assert not [t for t in prog._const_data.values() if isinstance(t, torch.Tensor) and t.numel() >= 64 * 64 * 9]

    assert _run_counting_alive(monkeypatch, executor_module._InFile, "array", prog, feeds, expected, precision) == (2 * len(weights), 0)


def _run_with_everything_loaded(monkeypatch, path, feeds, precision):
    """``path`` loaded and run as before weights stayed in the weight file and compressed ones compressed:
    every weight and decompressed result held in memory. The program and its outputs."""
    monkeypatch.setattr(executor_module, "IN_FILE_MIN", 1 << 62)
    try:
        program = load_program(path)
        return program, program.run(feeds, precision=precision)
    finally:
        monkeypatch.undo()


def _run_counting_alive(monkeypatch, cls, method: str, prog, feeds, expected, precision) -> tuple[int, int]:
    """Run ``prog`` twice, its outputs ``expected`` bit for bit, with ``cls.method`` watched: how many values it
    made, and the most of them still alive (after a collection) when it made another. None outlives the runs."""
    made, alive = [], []
    original = getattr(cls, method)

    def watched(self):
        gc.collect()
        alive.append(sum(r() is not None for r in made))
        result = original(self)
        made.append(weakref.ref(result))
        return result

    monkeypatch.setattr(cls, method, watched)
    frozen = gc.get_freeze_count()  # a make-test worker's libraries (tests/conftest.py), or nothing
    gc.freeze()  # what lived before the runs stays: each collection walks only what they made (a whole one took 0.1 s)
    try:
        for _ in range(2):
            out = prog.run(feeds, precision=precision)
            for name in expected:
                np.testing.assert_array_equal(out[name], expected[name])
        gc.collect()
    finally:
        gc.unfreeze()
        if frozen:  # the worker's heap set aside again, as it was, the runs' garbage gone first
            gc.collect()
            gc.freeze()
    assert not [r for r in made if r() is not None]
    return len(made), max(alive)


@pytest.fixture(scope="module")
def deep_palettized(model_dir):
    """Deep palettized two ways, each weight's constexpr results over ``IN_FILE_MIN``: iOS18 per grouped
    channel with a per-channel scale (a chain: constexpr_lut_to_dense into constexpr_blockwise_shift_scale),
    and 6 bits per tensor at iOS17 (constexpr_lut_to_dense's iOS16 form, its packed keys an inline input)."""
    torch.manual_seed(11)
    module = Deep().eval()
    x = torch.randn(1, 64, 8, 8)
    configs = {
        "iOS18": cto.OpPalettizerConfig(mode="uniform", nbits=4, granularity="per_grouped_channel", group_size=16, enable_per_channel_scale=True),
        "iOS17": cto.OpPalettizerConfig(mode="kmeans", nbits=6),
    }
    paths = {}
    for target, config in configs.items():
        dense = convert_torch(module, {"x": x}, model_dir, target, "fp16")
        paths[target] = dense.with_name(f"{dense.stem}_{target}_palettized.mlpackage")
        model = cto.palettize_weights(ct.models.MLModel(str(dense), skip_model_load=True), cto.OptimizationConfig(global_config=config))
        model.save(str(paths[target]))
    return paths, {"x": x.numpy()}


@pytest.mark.parametrize("target", ["iOS18", "iOS17"])
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_compressed_weights_are_decompressed_one_op_at_a_time(precision, target, deep_palettized, monkeypatch):
    """A loaded compressed program holds no decompressed weight: each step that takes one runs its constexpr
    chain as it runs, and frees the result after it; the results are those of decompressing at load, bit for bit.
    The iOS16 form's packed keys stay in the weight file too, read as the step runs."""
    paths, feeds = deep_palettized
    path = paths[target]
    eager, expected = _run_with_everything_loaded(monkeypatch, path, feeds, precision)
    prog = load_program(path)
    counts = prog.op_counts()
    chain = ["constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"] if target == "iOS18" else ["constexpr_lut_to_dense"]
    assert [counts.get(t) for t in chain] == [5] * len(chain) and sum(counts.get(t, 0) for t in counts if t.startswith("constexpr_")) == 5 * len(chain)
    assert len([t for t in eager._raw_results.values() if t.numel() >= 64 * 64 * 9]) == 5 * len(chain)
    assert len(prog._compressed) == 5 * len(chain) and {len(c.ops) for c in prog._compressed.values()} == set(range(1, len(chain) + 1))
    assert not [t for t in prog._raw_results.values() if t.numel() >= executor_module.IN_FILE_MIN]
    if target == "iOS17":
        packed = [prog._in_file[op.inputs["indices"].name] for op in prog.function.operations if op.op_type == "constexpr_lut_to_dense"]
        assert len(packed) == 5 and all(p.dtype == np.uint8 and p.shape == (64 * 64 * 9 * 6 // 8,) for p in packed)
        assert not [v for op in prog.function.operations for v in op.inputs.values()
                    if isinstance(v.val, np.ndarray) and v.val.size >= executor_module.IN_FILE_MIN and any(v.val.strides)]

    assert _run_counting_alive(monkeypatch, executor_module._Compressed, "tensor", prog, feeds, expected, precision) == (2 * 5, 0)
    assert not [t for t in prog._raw_results.values() if t.numel() >= executor_module.IN_FILE_MIN]

    # A model run many times (generation's unet, every step) may decompress once, at load, and keep them.
    from sdbuild.generate.runners import ExecutorRunner

    assert len(ExecutorRunner([path]).programs[0]._compressed) == 5 * len(chain)  # by default, as verify runs
    kept = ExecutorRunner([path], decompress_at_load=True).programs[0]
    assert not kept._compressed and len([t for t in kept._raw_results.values() if t.numel() >= 64 * 64 * 9]) == 5 * len(chain)
    out = kept.run(feeds, precision=precision)
    for name in expected:
        np.testing.assert_array_equal(out[name], expected[name])


def test_an_activation_lives_until_its_last_reader(deep_packages, monkeypatch):
    """The run frees each value after the last op that reads it: a chain holds two at a time, whatever its length."""
    packages, feeds = deep_packages
    prog = load_program(packages["fp16"])

    class Env(dict):
        stored, most = 0, 0

        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            Env.stored += 1
            Env.most = max(Env.most, len(self))

    original = executor_module.Program._execute

    def execute(steps, env):
        counted = Env(env)
        original(steps, counted)
        env.update(counted)

    monkeypatch.setattr(executor_module.Program, "_execute", staticmethod(execute))
    out = prog.run(feeds)
    assert next(iter(out.values())).shape == (1, 64, 8, 8)
    assert Env.stored >= 10 and Env.most <= 2, (Env.stored, Env.most)


# --------------------------------------------------------------------------- the program API


@pytest.fixture(scope="module")
def resnet_packages(model_dir):
    torch.manual_seed(8)
    module = ResnetBlock().eval()
    inputs = {"x": torch.randn(2, 8, 10, 10), "t": torch.randn(2, 12)}
    fp16 = convert_torch(module, inputs, model_dir, "iOS17", "fp16")
    # float16 inputs and outputs, as the shipped unet has them.
    fp16_io = convert_torch(
        module, inputs, model_dir, "iOS17", "fp16",
        outputs=[ct.TensorType(name="noise_pred", dtype=np.float16)],
    )
    with torch.no_grad():
        ref = module(*inputs.values()).numpy()
    return {"fp16": fp16, "fp16_io": fp16_io, "inputs": {k: v.numpy() for k, v in inputs.items()}, "ref": ref}


def test_inputs_and_outputs_are_declared_in_order(resnet_packages):
    prog = load_program(resnet_packages["fp16_io"])
    assert list(prog.inputs) == ["x", "t"]
    assert prog.inputs["x"][0] == (2, 8, 10, 10)
    assert prog.outputs == ["noise_pred"]
    assert prog.output_dtypes["noise_pred"] == np.float16
    assert prog.opset == "iOS17"


def test_fp16_mode_rounds_like_a_device(resnet_packages):
    prog = load_program(resnet_packages["fp16_io"])
    feeds, ref = resnet_packages["inputs"], resnet_packages["ref"]
    out16 = prog.run(feeds, precision="fp16")["noise_pred"]
    out32 = prog.run(feeds, precision="fp32")["noise_pred"]
    # Every value held as float16 in fp16 mode; fp32 mode is the upper bound.
    np.testing.assert_array_equal(out16, out16.astype(np.float16).astype(np.float32))
    assert psnr(ref, out32) > psnr(ref, out16) >= FP16_MIN_DB
    # float32 feeds for float16 inputs are cast as Core ML casts: round to nearest.
    pre_rounded = {k: v.astype(np.float16) for k, v in feeds.items()}
    np.testing.assert_array_equal(prog.run(pre_rounded)["noise_pred"], out16)


def test_profile_counts_time_per_op_type(resnet_packages):
    prog = load_program(resnet_packages["fp16"])
    profile = {}
    prog.run(resnet_packages["inputs"], profile=profile)
    assert "conv" in profile and all(s >= 0 for s in profile.values())


def test_range_observer_sees_inputs_intermediates_and_outputs_over_runs(resnet_packages):
    """The calibration hook (W8A8): running min/max of the named values, freed intermediates included."""
    from sdbuild.mil.executor import RangeObserver

    prog = load_program(resnet_packages["fp16_io"])
    hidden = next(op.outputs[0].name for op in prog.function.operations if op.op_type == "linear")  # of t: no norm before it
    out_var = prog.function.outputs[0].name
    observer = RangeObserver({"x", hidden, out_var, "no_such_var"})
    feeds = [resnet_packages["inputs"], {k: v * 3 for k, v in resnet_packages["inputs"].items()}]
    outs = [prog.run(f, observer=observer)["noise_pred"] for f in feeds]
    np.testing.assert_array_equal(outs[0], prog.run(feeds[0])["noise_pred"])  # watching changes nothing
    assert observer.runs == 2 and set(observer.ranges) == {"x", hidden, out_var}
    xs = np.stack([f["x"].astype(np.float16).astype(np.float32) for f in feeds])
    assert observer.ranges["x"] == [xs.min(), xs.max()]
    assert observer.ranges[out_var] == [min(o.min() for o in outs), max(o.max() for o in outs)]
    first = RangeObserver({hidden})
    prog.run(feeds[0], observer=first)
    # A freed intermediate, seen on both runs: the tripled input widens its range at both ends.
    assert observer.ranges[hidden][0] < first.ranges[hidden][0] < first.ranges[hidden][1] < observer.ranges[hidden][1]


def test_weights_read_directly_are_coremltools_own_values(resnet_packages):
    """The loader's one-read-per-weight path gives the values coremltools' blob reader gives, bit for bit."""
    from coremltools.converters.mil.frontend.milproto import load as milproto

    from sdbuild.mil.executor import _read_manifest, _read_spec, _weights_read_one_at_a_time

    pkg = resnet_packages["fp16"]
    spec_file, weights_dir = _read_manifest(pkg)
    spec = _read_spec(pkg, spec_file)

    def consts():
        program = milproto.load(spec, spec.specificationVersion, file_weights_dir=str(weights_dir))
        return {op.name: op.outputs[0].val for op in program.functions["main"].operations if op.op_type == "const"}

    theirs = consts()
    with _weights_read_one_at_a_time(milproto):
        ours = consts()
    assert milproto._load_file_value.__name__ == "_load_file_value"  # restored
    big = [name for name, value in theirs.items() if np.size(value) > 100]
    assert big and ours.keys() == theirs.keys()
    for name in theirs:
        assert np.asarray(ours[name]).dtype == np.asarray(theirs[name]).dtype
        np.testing.assert_array_equal(ours[name], theirs[name])


def _reads(step) -> set[str]:
    """The run-time values a plan step reads."""
    names = set()
    for _param, how, ref in step[2]:
        if how in (0, 1):
            names.add(ref)
        elif how == 2:
            names.update(r for is_var, r in ref if is_var)
    return names


def test_each_value_is_freed_after_its_last_use(resnet_packages, monkeypatch):
    """After every op, the executor holds only values an op still to run reads, and the outputs: each
    intermediate (and each program input) is dropped by the op that reads it last."""
    prog = load_program(resnet_packages["fp16_io"])
    steps = prog._plan("fp16").steps
    outputs = set(prog._output_vars)
    alive_after = []
    execute = executor_module.Program._execute

    def step_by_step(steps, env):
        for i, step in enumerate(steps):
            execute((step,), env)
            later = set().union(*map(_reads, steps[i + 1 :]))
            assert set(env) <= later | outputs, (step[6], set(env) - later - outputs)
            alive_after.append(len(env))

    monkeypatch.setattr(executor_module.Program, "_execute", staticmethod(step_by_step))
    out = prog.run(resnet_packages["inputs"])["noise_pred"]
    assert len(alive_after) == len(steps) and alive_after[-1] == 1  # the output alone at the end
    assert max(alive_after) < len(steps) / 2  # a few values alive at once, not every op's
    monkeypatch.undo()
    np.testing.assert_array_equal(out, prog.run(resnet_packages["inputs"])["noise_pred"])


def test_exec_files_round_trip(resnet_packages, tmp_path):
    inputs = tmp_path / "in.npz"
    np.savez(inputs, **resnet_packages["inputs"])
    result = exec_files(resnet_packages["fp16_io"], inputs, tmp_path / "out" / "out.npz", precision="fp32", profile=True)
    assert result["outputs"] == {"noise_pred": [2, 16, 10, 10]}
    assert result["profile"] and list(result["profile"].values()) == sorted(result["profile"].values(), reverse=True)
    with np.load(tmp_path / "out" / "out.npz") as saved:
        assert psnr(resnet_packages["ref"], saved["noise_pred"]) >= FP32_MIN_DB - 10  # fp16 weights
    assert exec_files(resnet_packages["fp16"], inputs, tmp_path / "o2.npz")["profile"] is None


class ReluUpsample(nn.Module):
    def forward(self, x):
        return F.interpolate(torch.relu(x), scale_factor=2.0, mode="nearest")


def test_enumerated_input_shapes(model_dir):
    # One model, several resolutions (a recipe's list of resolutions).
    shapes = ct.EnumeratedShapes(shapes=[(1, 4, 8, 8), (1, 4, 6, 10)], default=(1, 4, 8, 8))
    traced = torch.jit.trace(ReluUpsample(), torch.zeros(1, 4, 8, 8))
    model = ct.convert(traced, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                       inputs=[ct.TensorType(name="x", shape=shapes)], compute_precision=ct.precision.FLOAT32)
    path = model_dir / "enumerated.mlpackage"
    model.save(str(path))
    loaded = load_program(path)
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 10)).astype(np.float32)
    out = list(loaded.run({"x": x}, precision="fp32").values())[0]
    np.testing.assert_array_equal(out, np.maximum(x, 0).repeat(2, 2).repeat(2, 3))
    with pytest.raises(ModelInputError, match=r"\[1, 4, 7, 7\]"):
        loaded.run({"x": np.zeros((1, 4, 7, 7), np.float32)})


# --------------------------------------------------------------------------- errors a user can meet


def _one_line(excinfo):
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def test_wrong_inputs_are_named(resnet_packages):
    prog = load_program(resnet_packages["fp16"])
    feeds = resnet_packages["inputs"]
    with pytest.raises(ModelInputError) as e:
        prog.run({"x": feeds["x"]})
    assert "missing input 't'" in _one_line(e) and "[2, 12]" in _one_line(e)
    with pytest.raises(ModelInputError) as e:
        prog.run({**feeds, "extra": feeds["t"]})
    assert "unexpected input 'extra'" in _one_line(e)
    with pytest.raises(ModelInputError) as e:
        prog.run({**feeds, "x": feeds["x"][:, :, :9]})
    assert "'x'" in _one_line(e) and "[2, 8, 9, 10]" in _one_line(e) and "[2, 8, 10, 10]" in _one_line(e)
    with pytest.raises(ModelInputError) as e:
        prog.run({**feeds, "t": np.array(["a"] * 24).reshape(2, 12)})
    assert "dtype" in _one_line(e)


@pytest.fixture
def package_copy(resnet_packages, tmp_path):
    dst = tmp_path / "model.mlpackage"
    shutil.copytree(resnet_packages["fp16"], dst)
    return dst


def _weight_file(pkg):
    return pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"


def test_truncated_weight_file(package_copy):
    weights = _weight_file(package_copy)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(PackageError) as e:
        load_program(package_copy)
    assert "truncated" in _one_line(e) and "weight.bin" in _one_line(e)


def test_corrupted_weight_record(package_copy):
    weights = _weight_file(package_copy)
    data = bytearray(weights.read_bytes())
    data[64:68] = b"\x00\x01\x02\x03"  # the first weight's sentinel
    weights.write_bytes(bytes(data))
    with pytest.raises(PackageError) as e:
        load_program(package_copy)
    assert "corrupted" in _one_line(e)


def test_corrupted_weight_header(package_copy):
    weights = _weight_file(package_copy)
    data = bytearray(weights.read_bytes())
    data[4] = 0x7F  # storage version
    weights.write_bytes(bytes(data))
    with pytest.raises(PackageError) as e:
        load_program(package_copy)
    assert "corrupted" in _one_line(e)


@pytest.mark.parametrize("missing", ["Manifest.json", "Data/com.apple.CoreML/model.mlmodel", "Data/com.apple.CoreML/weights/weight.bin"])
def test_truncated_package(package_copy, missing):
    (package_copy / missing).unlink()
    with pytest.raises(PackageError) as e:
        load_program(package_copy)
    assert "missing" in _one_line(e)


def test_corrupted_model_spec(package_copy):
    (package_copy / "Data/com.apple.CoreML/model.mlmodel").write_bytes(b"\xff\x00garbage" * 10)
    with pytest.raises(PackageError) as e:
        load_program(package_copy)
    _one_line(e)


def test_missing_package(tmp_path):
    with pytest.raises(PackageError) as e:
        load_program(tmp_path / "nope.mlpackage")
    assert "no such model package" in _one_line(e)


def test_op_without_kernel_is_refused(resnet_packages):
    without_conv = {k: v for k, v in kernels.KERNELS.items() if k != "conv"}
    with pytest.raises(UnsupportedOpError) as e:
        load_program(resnet_packages["fp16"], kernels=without_conv)
    assert _one_line(e) == "no kernel for op 'conv' (opset iOS17) in " + resnet_packages["fp16"].name


def test_exotic_op_is_refused(model_dir):
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(3, 4))], opset_version=ct.target.iOS16)
    def prog(x):
        # Random draws have no reference answer to match: the executor refuses them.
        return mb.add(x=x, y=mb.random_normal(shape=mb.shape(x=x), seed=1))

    path = convert_mil(prog, model_dir, "iOS16", "fp32", stem="exotic")
    feeds = model_dir / "exotic-inputs.npz"
    np.savez(feeds, x=np.zeros((3, 4), np.float32))
    with pytest.raises(UnsupportedOpError) as e:
        exec_files(path, feeds, model_dir / "exotic-outputs.npz")
    assert "no kernel for op 'random_normal' (opset iOS16)" in _one_line(e)


def test_unreadable_inputs_file(resnet_packages, tmp_path):
    bad = tmp_path / "in.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelInputError) as e:
        exec_files(resnet_packages["fp16"], bad, tmp_path / "out.npz")
    _one_line(e)
