"""The reference executor's kernel table: one small PyTorch function per MIL op type.

A kernel is registered with ``@kernel("op_type")`` and looked up by name, as
coremltools registers its MIL ops. It receives the op's inputs as keyword
arguments under their MIL names:

* tensor inputs ("data") arrive as torch tensors: floats as float32, integers
  as int64, booleans as bool (scalars as 0-d tensors);
* inputs listed in ``attrs`` ("attributes": axes, perms, pad types, flags,
  scale factors) arrive as plain Python values: int, float, bool, str or a
  list of them, whether they were constants or computed at run time;
* a ``raw`` kernel (the compile-time ``constexpr_*`` decompression ops) gets
  the stored numpy arrays as they are, so packed weights are never widened.

An input a kernel leaves out of its signature is one it does not know: the
executor refuses such an op rather than ignore the input. Optional inputs a
model omits take the defaults written here, which follow coremltools' op
definitions. A kernel returns a tensor, or a tuple of them for ops with
several outputs; the executor casts results to the op's declared dtype and,
in fp16 mode, rounds float16 results.

An op whose form changed between opsets registers one kernel per form with
``since=`` (the opset that introduced it); the newest form not newer than the
model's opset runs.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

# Opset order as coremltools numbers them (AvailableTarget values).
OPSETS = {"iOS15": 6, "iOS16": 7, "iOS17": 8, "iOS18": 9}


@dataclass(frozen=True)
class Kernel:
    """One registered kernel: the function and how to feed it."""

    op_type: str
    fn: Callable
    since: int
    attrs: frozenset
    params: frozenset
    # True where float16 inputs give exactly float16-representable outputs
    # (data movement, max/min, relu...): fp16 mode then skips re-rounding.
    exact: bool
    raw: bool


KERNELS: dict[str, list[Kernel]] = {}


def kernel(*op_types: str, attrs=(), exact: bool = False, raw: bool = False, since: str = "iOS15"):
    """Register the decorated function as the kernel of ``op_types`` from opset ``since`` on.

    A second kernel for the same op and opset is refused (ValueError at import): one
    would silently replace the other. The same function again (a module reloaded) replaces itself.
    """

    def register(fn):
        params = frozenset(inspect.signature(fn).parameters)
        for op_type in op_types:
            entry = Kernel(op_type, fn, OPSETS[since], frozenset(attrs), params, exact, raw)
            for known in KERNELS.get(op_type, []):
                if known.since == entry.since and _qualified(known.fn) != _qualified(fn):
                    raise ValueError(f"kernel for {op_type} ({since}) registered twice: {_qualified(known.fn)} and {_qualified(fn)}")
            forms = [k for k in KERNELS.get(op_type, []) if k.since != entry.since]
            KERNELS[op_type] = sorted(forms + [entry], key=lambda k: k.since)
        return fn

    return register


def _qualified(fn: Callable) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def find_kernel(op_type: str, opset: int, table: dict[str, list[Kernel]] | None = None) -> Kernel | None:
    """The kernel for ``op_type`` at ``opset`` (an OPSETS value), or None when there is none."""
    forms = (KERNELS if table is None else table).get(op_type, [])
    usable = [k for k in forms if k.since <= opset]
    return usable[-1] if usable else None


# --------------------------------------------------------------------------- helpers


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _axes(axes, rank: int) -> list[int]:
    if axes is None:
        return list(range(rank))
    if isinstance(axes, int):
        axes = [axes]
    return [_axis(int(a), rank) for a in axes]


def _scalar(v):
    """A Python number from a 0-d/1-element tensor or a number."""
    if isinstance(v, torch.Tensor):
        return v.reshape(-1)[0].item()
    return v


def _channel_shaped(param: torch.Tensor, rank: int) -> torch.Tensor:
    """A per-channel vector [C] shaped to broadcast over axis 1 of a rank-``rank`` tensor."""
    return param.reshape([1, -1] + [1] * (rank - 2))


# --------------------------------------------------------------------------- elementwise


def _binary(op_type, fn, exact=False):
    @kernel(op_type, exact=exact)
    def binary(x, y):
        return fn(x, y)

    binary.__name__ = op_type
    return binary


for _name, _fn, _exact in [
    ("add", torch.add, False),
    ("sub", torch.sub, False),
    ("mul", torch.mul, False),
    ("pow", torch.pow, False),
    ("maximum", torch.maximum, True),
    ("minimum", torch.minimum, True),
    ("floor_div", torch.floor_divide, False),
    ("mod", torch.remainder, False),  # floor modulo, as numpy's %
    ("equal", torch.eq, True),
    ("not_equal", torch.ne, True),
    ("less", torch.lt, True),
    ("less_equal", torch.le, True),
    ("greater", torch.gt, True),
    ("greater_equal", torch.ge, True),
    ("logical_and", torch.logical_and, True),
    ("logical_or", torch.logical_or, True),
    ("logical_xor", torch.logical_xor, True),
]:
    _binary(_name, _fn, _exact)


@kernel("real_div")
def real_div(x, y):
    # MIL real_div is true division even for integer tensors; the executor casts the result
    # to the declared dtype.
    return torch.true_divide(x, y)


def _unary(op_type, fn, exact=False):
    @kernel(op_type, exact=exact)
    def unary(x):
        return fn(x)

    unary.__name__ = op_type
    return unary


for _name, _fn, _exact in [
    ("abs", torch.abs, True),
    ("acos", torch.acos, False),
    ("asin", torch.asin, False),
    ("atan", torch.atan, False),
    ("atanh", torch.atanh, False),
    ("ceil", torch.ceil, True),
    ("cos", torch.cos, False),
    ("cosh", torch.cosh, False),
    ("erf", torch.erf, False),
    ("exp", torch.exp, False),
    ("exp2", torch.exp2, False),
    ("floor", torch.floor, True),
    ("logical_not", torch.logical_not, True),
    ("round", torch.round, True),  # half to even: MIL rounds 0.5 to 0
    ("sign", torch.sign, True),
    ("sin", torch.sin, False),
    ("sinh", torch.sinh, False),
    ("sqrt", torch.sqrt, False),
    ("square", torch.square, False),
    ("tan", torch.tan, False),
    ("tanh", torch.tanh, False),
    ("identity", lambda x: x, True),
    ("relu", torch.relu, True),
    ("sigmoid", torch.sigmoid, False),
    ("silu", F.silu, False),
    ("softplus", F.softplus, False),
    ("softsign", F.softsign, False),
    ("relu6", F.relu6, True),
]:
    _unary(_name, _fn, _exact)


@kernel("inverse", attrs=("epsilon",))
def inverse(x, epsilon=1e-4):
    return torch.reciprocal(x + epsilon)


@kernel("log", attrs=("epsilon",))
def log(x, epsilon=1e-45):
    return torch.log(x + epsilon)


@kernel("rsqrt", attrs=("epsilon",))
def rsqrt(x, epsilon=1e-12):
    return torch.rsqrt(x + epsilon)


@kernel("clip", attrs=("alpha", "beta"))
def clip(x, alpha, beta):
    return torch.clamp(x, alpha, beta)


@kernel("threshold", attrs=("alpha",), exact=True)
def threshold(x, alpha):
    return torch.clamp(x, min=alpha)


@kernel("cast", attrs=("dtype",))
def cast(x, dtype):
    # The executor converts to the declared dtype (and rounds to float16 in fp16 mode);
    # here only what differs from a plain conversion: float to integer truncates, to bool tests != 0.
    if dtype == "bool":
        return x != 0
    if dtype.startswith(("int", "uint")) and x.is_floating_point():
        return torch.trunc(x).to(torch.int64)
    if dtype.startswith("fp"):
        return x.to(torch.float32)
    return x


# --------------------------------------------------------------------------- activations


@kernel("gelu", attrs=("mode",))
def gelu(x, mode="EXACT"):
    if mode == "EXACT":
        return F.gelu(x)
    if mode == "TANH_APPROXIMATION":
        return F.gelu(x, approximate="tanh")
    if mode == "SIGMOID_APPROXIMATION":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"gelu: unknown mode {mode!r}")


@kernel("elu", attrs=("alpha",))
def elu(x, alpha=1.0):
    return F.elu(x, alpha)


@kernel("leaky_relu", attrs=("alpha",))
def leaky_relu(x, alpha=0.01):
    return F.leaky_relu(x, alpha)


@kernel("clamped_relu", attrs=("alpha", "beta"))
def clamped_relu(x, alpha, beta):
    return torch.clamp(torch.where(x >= 0, x, alpha * x), max=beta)


@kernel("linear_activation", attrs=("alpha", "beta"))
def linear_activation(x, alpha, beta=0.0):
    return alpha * x + beta


@kernel("scaled_tanh", attrs=("alpha", "beta"))
def scaled_tanh(x, alpha=1.0, beta=1.0):
    return alpha * torch.tanh(beta * x)


@kernel("sigmoid_hard", attrs=("alpha", "beta"))
def sigmoid_hard(x, alpha=0.2, beta=0.5):
    return torch.clamp(alpha * x + beta, 0.0, 1.0)


@kernel("thresholded_relu", attrs=("alpha",), exact=True)
def thresholded_relu(x, alpha=1.0):
    return torch.where(x > alpha, x, torch.zeros_like(x))


@kernel("prelu")
def prelu(x, alpha):
    """x: [B, C, *spatial]; alpha: [C], one slope per channel."""
    a = _channel_shaped(alpha, x.dim())
    return torch.where(x >= 0, x, a * x)


@kernel("softplus_parametric")
def softplus_parametric(x, alpha, beta):
    """alpha * log(1 + exp(beta * x)) with per-channel alpha, beta: [C] over axis 1."""
    a, b = _channel_shaped(alpha, x.dim()), _channel_shaped(beta, x.dim())
    return a * F.softplus(b * x)


@kernel("softmax", attrs=("axis",))
def softmax(x, axis=-1):
    return torch.softmax(x, dim=axis)


# --------------------------------------------------------------------------- reductions


def _reduction(op_type, fn, exact=False):
    @kernel(op_type, attrs=("axes", "keep_dims"), exact=exact)
    def reduce(x, axes=None, keep_dims=False):
        dims = _axes(axes, x.dim())
        if not dims:
            return x
        return fn(x, dims, keep_dims)

    reduce.__name__ = op_type
    return reduce


def _amax(x, dims, keep):
    return torch.amax(x, dim=dims, keepdim=keep)


def _amin(x, dims, keep):
    return torch.amin(x, dim=dims, keepdim=keep)


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keep)
    return x


for _name, _fn, _exact in [
    ("reduce_mean", lambda x, d, k: torch.mean(x, dim=d, keepdim=k), False),
    ("reduce_sum", lambda x, d, k: torch.sum(x, dim=d, keepdim=k), False),
    ("reduce_max", _amax, True),
    ("reduce_min", _amin, True),
    ("reduce_prod", _prod, False),
    ("reduce_l1_norm", lambda x, d, k: torch.sum(x.abs(), dim=d, keepdim=k), False),
    ("reduce_l2_norm", lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)), False),
    ("reduce_sum_square", lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k), False),
    ("reduce_log_sum", lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)), False),
    ("reduce_log_sum_exp", lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k), False),
]:
    _reduction(_name, _fn, _exact)


@kernel("reduce_argmax", attrs=("axis", "keep_dims", "output_dtype"))
def reduce_argmax(x, axis=-1, keep_dims=False, output_dtype="int32"):
    return torch.argmax(x, dim=axis, keepdim=keep_dims)


@kernel("reduce_argmin", attrs=("axis", "keep_dims", "output_dtype"))
def reduce_argmin(x, axis=-1, keep_dims=False, output_dtype="int32"):
    return torch.argmin(x, dim=axis, keepdim=keep_dims)


# --------------------------------------------------------------------------- normalization


@kernel("batch_norm", attrs=("epsilon",))
def batch_norm(x, mean, variance, gamma=None, beta=None, epsilon=1e-5):
    """x: [B, C, *spatial]; mean, variance, gamma, beta: [C]."""
    return F.batch_norm(x, mean, variance, gamma, beta, training=False, eps=epsilon)


@kernel("instance_norm", attrs=("epsilon",))
def instance_norm(x, gamma=None, beta=None, epsilon=1e-5):
    """Normalizes each [B, C] slice over its spatial axes; gamma, beta: [C]."""
    dims = list(range(2, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + epsilon)
    if gamma is not None:
        y = y * _channel_shaped(gamma, x.dim())
    if beta is not None:
        y = y + _channel_shaped(beta, x.dim())
    return y


@kernel("layer_norm", attrs=("axes", "epsilon"))
def layer_norm(x, axes=None, gamma=None, beta=None, epsilon=1e-5):
    """Normalizes over ``axes``; gamma, beta have the shape of x over those axes."""
    dims = sorted(_axes(axes, x.dim()))
    if dims == list(range(x.dim() - len(dims), x.dim())):
        # Trailing axes: torch's fused kernel, the common transformer case.
        return F.layer_norm(x, x.shape[x.dim() - len(dims):], gamma, beta, epsilon)
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + epsilon)
    shape = [x.shape[d] if d in dims else 1 for d in range(x.dim())]
    if gamma is not None:
        y = y * gamma.reshape(shape)
    if beta is not None:
        y = y + beta.reshape(shape)
    return y


@kernel("l2_norm", attrs=("epsilon",))
def l2_norm(x, epsilon=1e-6):
    """Divides by the L2 norm over the last three axes (all leading axes are batch)."""
    norm = torch.sqrt(torch.sum(x * x, dim=[-3, -2, -1], keepdim=True) + epsilon)
    return x / norm


@kernel("local_response_norm", attrs=("size", "alpha", "beta", "k"))
def local_response_norm(x, size, alpha=1e-4, beta=0.75, k=1.0):
    return F.local_response_norm(x, size, alpha=alpha, beta=beta, k=k)


# --------------------------------------------------------------------------- convolution and pooling


def _spatial_pads(pad_type, pad, in_sizes, kernel_sizes, strides, dilations):
    """Per spatial axis (begin, end) padding of a conv or pool, by MIL's pad_type rules."""
    n = len(in_sizes)
    if pad_type == "custom":
        return [(int(pad[2 * i]), int(pad[2 * i + 1])) for i in range(n)]
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type in ("same", "same_lower"):
        pads = []
        for size, k, s, d in zip(in_sizes, kernel_sizes, strides, dilations):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            # "same" puts the odd pixel after, "same_lower" before.
            pads.append((small, large) if pad_type == "same" else (large, small))
        return pads
    raise ValueError(f"unknown pad_type {pad_type!r}")


def _pad_spatial(x, pads, value=0.0):
    """Pads x's trailing spatial axes by [(begin, end), ...] (first spatial axis first)."""
    if not any(b or e for b, e in pads):
        return x
    flat = []
    for b, e in reversed(pads):
        flat += [b, e]
    return F.pad(x, flat, value=value)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@kernel("conv", attrs=("strides", "pad_type", "pad", "dilations", "groups"))
def conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    """x: [B, C_in, *D]; weight: [C_out, C_in/groups, *K]; bias: [C_out] -> [B, C_out, *D_out]."""
    n = x.dim() - 2
    strides = list(strides) if strides is not None else [1] * n
    dilations = list(dilations) if dilations is not None else [1] * n
    pads = _spatial_pads(pad_type, pad, x.shape[2:], weight.shape[2:], strides, dilations)
    if all(b == e for b, e in pads):
        padding = [b for b, _ in pads]
    else:
        x = _pad_spatial(x, pads)
        padding = 0
    return _CONV[n](x, weight, bias, strides, padding, dilations, groups)


@kernel("conv_transpose", attrs=("pad", "output_shape", "pad_type", "strides", "dilations", "groups"))
def conv_transpose(
    x, weight, bias=None, pad=None, output_shape=None, pad_type="valid", strides=None, dilations=None, groups=1
):
    """x: [B, C_in, *D]; weight: [C_in, C_out/groups, *K]; bias: [C_out] -> [B, C_out, *D_out].

    The full transposed convolution is computed, then cropped by the pads
    (custom), to ``input * stride`` (same), or to ``output_shape``; a requested
    size beyond the full result is zero-filled at the end, before the bias.
    """
    n = x.dim() - 2
    strides = list(strides) if strides is not None else [1] * n
    dilations = list(dilations) if dilations is not None else [1] * n
    full = _CONV_T[n](x, weight, None, strides, 0, 0, groups, dilations)
    crops = []
    for i in range(n):
        size = full.shape[2 + i]
        if pad_type == "custom" and pad is not None:
            begin, end = int(pad[2 * i]), int(pad[2 * i + 1])
        elif pad_type in ("same", "same_lower"):
            total = size - x.shape[2 + i] * strides[i]
            small, large = total // 2, total - total // 2
            begin, end = (small, large) if pad_type == "same" else (large, small)
        else:
            begin, end = 0, 0
        want = size - begin - end
        if output_shape is not None:
            want = int(list(output_shape)[-n + i])
        crops.append((begin, want))
    y = full
    for i, (begin, want) in enumerate(crops):
        axis = 2 + i
        have = y.shape[axis] - begin
        y = y.narrow(axis, begin, min(want, have))
        if want > have:
            pads = [(0, 0)] * n
            pads[i] = (0, want - have)
            y = _pad_spatial(y, pads)
    if bias is not None:
        y = y + _channel_shaped(bias, y.dim())
    return y


def _pool_prepare(x, kernel_sizes, strides, pad_type, pad, ceil_mode, value):
    n = x.dim() - 2
    strides = list(strides) if strides is not None else [1] * n
    pads = _spatial_pads(pad_type, pad, x.shape[2:], kernel_sizes, strides, [1] * n)
    return _pad_spatial(x, pads, value), list(kernel_sizes), strides, pads


_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


@kernel("avg_pool", attrs=("kernel_sizes", "strides", "pad_type", "pad", "exclude_padding_from_average", "ceil_mode"))
def avg_pool(x, kernel_sizes, strides=None, pad_type="valid", pad=None, exclude_padding_from_average=False, ceil_mode=False):
    n = x.dim() - 2
    padded, k, s, pads = _pool_prepare(x, kernel_sizes, strides, pad_type, pad, ceil_mode, 0.0)
    total = _AVG[n](padded, k, s, 0, ceil_mode, True) * math.prod(k)
    if exclude_padding_from_average:
        ones = _pad_spatial(torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype), pads, 0.0)
        count = _AVG[n](ones, k, s, 0, ceil_mode, True) * math.prod(k)
        return total / count
    return total / math.prod(k)


@kernel("max_pool", attrs=("kernel_sizes", "strides", "pad_type", "pad", "ceil_mode"), exact=True)
def max_pool(x, kernel_sizes, strides=None, pad_type="valid", pad=None, ceil_mode=False):
    n = x.dim() - 2
    padded, k, s, _ = _pool_prepare(x, kernel_sizes, strides, pad_type, pad, ceil_mode, -math.inf)
    return _MAX[n](padded, k, s, 0, 1, ceil_mode)


@kernel("l2_pool", attrs=("kernel_sizes", "strides", "pad_type", "pad", "ceil_mode"))
def l2_pool(x, kernel_sizes, strides=None, pad_type="valid", pad=None, ceil_mode=False):
    n = x.dim() - 2
    padded, k, s, _ = _pool_prepare(x * x, kernel_sizes, strides, pad_type, pad, ceil_mode, 0.0)
    return torch.sqrt(_AVG[n](padded, k, s, 0, ceil_mode, True) * math.prod(k))


# --------------------------------------------------------------------------- linear algebra


@kernel("linear")
def linear(x, weight, bias=None):
    """x: [*, D_in]; weight: [D_out, D_in]; bias: [D_out] -> [*, D_out]."""
    return F.linear(x, weight, bias)


@kernel("matmul", attrs=("transpose_x", "transpose_y"))
def matmul(x, y, transpose_x=False, transpose_y=False):
    """Batched matmul with numpy broadcasting; transposes apply to the last two axes (rank >= 2)."""
    if transpose_x and x.dim() >= 2:
        x = x.transpose(-1, -2)
    if transpose_y and y.dim() >= 2:
        y = y.transpose(-1, -2)
    return torch.matmul(x, y)


def fused_attention(q, k, v, transpose_k, scale, scale_by_division, finish_scores, finish_scaled, finish_probs,
                    chunk_elements=1 << 22, transpose_q=False, values_first=False):  # fmt: skip
    """softmax(scale(q @ k^T)) @ v for the executor's fused matmul -> [mul] -> softmax -> matmul chains.

    q: [*B, L, E] or, ``transpose_q``, [*B, E, L]; k: [*B, S, E] (``transpose_k``) or [*B, E, S];
    v: [*B, S, EV] -> [*B, L, EV], or, ``values_first`` (the chain's last matmul is v @ probabilities^T,
    channels first as Apple's ORIGINAL attention has it), v: [*B, EV, S] -> [*B, EV, L].
    Not an op of its own: the executor runs such a chain with this when nothing
    else reads the intermediates. The intermediates are rounded by the same
    ``finish_*`` functions as the separate ops would be, one block of query rows
    at a time so the [*B, L, S] scores never exist whole; with no rounding to do
    (fp32 mode) torch's fused attention runs instead.
    """
    if transpose_q:
        q = q.transpose(-1, -2)
    if values_first:
        out = fused_attention(q, k, v.transpose(-1, -2), transpose_k, scale, scale_by_division, finish_scores,
                              finish_scaled, finish_probs, chunk_elements=chunk_elements)  # fmt: skip
        return out.transpose(-1, -2).contiguous()
    key = k.transpose(-1, -2) if not transpose_k else k
    factor = 1.0 if scale is None else (1.0 / scale if scale_by_division else scale)
    exact = all(f is None for f in (finish_scores, finish_scaled, finish_probs))
    if exact and q.shape[:-2] == key.shape[:-2] == v.shape[:-2]:
        return F.scaled_dot_product_attention(q, key, v, scale=factor)
    rows = max(1, chunk_elements // max(1, math.prod(q.shape[:-1]) // q.shape[-2] * key.shape[-2]))
    outs = []
    for start in range(0, q.shape[-2], rows):
        qc = q[..., start : start + rows, :]
        scores = torch.matmul(qc, key.transpose(-1, -2))
        if finish_scores is not None:
            scores = finish_scores(scores)
        if scale is not None:
            scores = scores / scale if scale_by_division else scores * scale
            if finish_scaled is not None:
                scores = finish_scaled(scores)
        probs = torch.softmax(scores, dim=-1)
        if finish_probs is not None:
            probs = finish_probs(probs)
        outs.append(torch.matmul(probs, v))
    return torch.cat(outs, dim=-2)


# SPLIT_EINSUM's per-head attention (sdbuild.models.attention): scores (B, Sk, 1, Sq), then the values.
EINSUM_SCORES, EINSUM_VALUES = "bchq,bkhc->bkhq", "bkhq,bchk->bchq"
EINSUM_CHUNK_ELEMENTS = 1 << 22  # scores per block of queries: 16 MiB in float32


def fused_einsum_attention(q, k, v, finish_scores, finish_probs, chunk_elements=None):
    """einsum(EINSUM_VALUES, softmax(einsum(EINSUM_SCORES, q, k), dim=1), v) for the executor's fused einsum
    chains: q (B, d, 1, Sq), k (B, Sk, 1, d), v (B, d, 1, Sk) -> (B, d, 1, Sq).

    One block of queries at a time, so the (B, Sk, 1, Sq) scores never exist whole; each block's scores and
    probabilities rounded by the same ``finish_*`` functions as the separate ops would round them.
    """
    rows = max(1, (chunk_elements or EINSUM_CHUNK_ELEMENTS) // max(1, q.shape[0] * k.shape[1]))
    outs = []
    for start in range(0, q.shape[3], rows):
        scores = torch.einsum(EINSUM_SCORES, q[..., start : start + rows], k)
        if finish_scores is not None:
            scores = finish_scores(scores)
        probs = torch.softmax(scores, dim=1)
        del scores
        if finish_probs is not None:
            probs = finish_probs(probs)
        outs.append(torch.einsum(EINSUM_VALUES, probs, v))
    return torch.cat(outs, dim=3)


@kernel("einsum", attrs=("equation",))
def einsum(values, equation):
    return torch.einsum(equation, *values)


@kernel("scaled_dot_product_attention", since="iOS18")
def scaled_dot_product_attention(query, key, value, attn_mask=None):
    """query: [B, *, L, E], key: [B, *, S, E], value: [B, *, S, EV] -> [B, *, L, EV].

    A bool mask marks the keys that take part; a float mask is added to the scores.
    """
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)


# --------------------------------------------------------------------------- shape and data movement


@kernel("reshape", attrs=("shape",), exact=True)
def reshape(x, shape):
    shape = [int(s) for s in shape]
    if len(shape) == x.dim():
        # 0 inherits the input's dimension when the ranks agree.
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@kernel("transpose", attrs=("perm",), exact=True)
def transpose(x, perm):
    return x.permute(*perm)


@kernel("expand_dims", attrs=("axes",), exact=True)
def expand_dims(x, axes):
    rank = x.dim() + len(axes)
    for a in sorted(_axis(int(a), rank) for a in axes):
        x = x.unsqueeze(a)
    return x


@kernel("squeeze", attrs=("axes",), exact=True)
def squeeze(x, axes=None):
    if axes is None:
        return x.reshape([s for s in x.shape if s != 1])
    drop = set(_axes(axes, x.dim()))
    return x.reshape([s for i, s in enumerate(x.shape) if i not in drop])


@kernel("concat", attrs=("axis", "interleave"), exact=True)
def concat(values, axis, interleave=False):
    if not interleave:
        return torch.cat(list(values), dim=axis)
    # interleave: take one slice of each input in turn along ``axis`` (inputs of equal size there).
    axis = _axis(axis, values[0].dim())
    stacked = torch.stack(list(values), dim=axis + 1)
    shape = list(values[0].shape)
    shape[axis] *= len(values)
    return stacked.reshape(shape)


@kernel("stack", attrs=("axis",), exact=True)
def stack(values, axis):
    return torch.stack(list(values), dim=axis)


@kernel("split", attrs=("num_splits", "split_sizes", "axis"), exact=True)
def split(x, axis, num_splits=None, split_sizes=None):
    if split_sizes is not None:
        return tuple(torch.split(x, [int(s) for s in split_sizes], dim=axis))
    size = x.shape[axis]
    chunk = -(-size // num_splits)
    return tuple(torch.split(x, chunk, dim=axis))


def _python_slice(begin, end, stride, begin_mask, end_mask):
    return slice(None if begin_mask else begin, None if end_mask else end, stride)


@kernel(
    "slice_by_index",
    attrs=("begin", "end", "stride", "begin_mask", "end_mask", "squeeze_mask"),
    exact=True,
)
def slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    """numpy-style x[begin:end:stride, ...] per axis; masks drop begin/end, squeeze_mask indexes."""
    rank = x.dim()
    stride = stride or [1] * rank
    begin_mask = begin_mask or [False] * rank
    end_mask = end_mask or [False] * rank
    squeeze_mask = squeeze_mask or [False] * rank
    y = x
    keep = []
    for i in range(rank):
        size = x.shape[i]
        if squeeze_mask[i]:
            b = 0 if begin_mask[i] else int(begin[i])
            y = y.narrow(i, b + size if b < 0 else b, 1)
            continue
        keep.append(i)
        idx = range(*_python_slice(int(begin[i]), int(end[i]), int(stride[i]), begin_mask[i], end_mask[i]).indices(size))
        if idx.step == 1:
            y = y.narrow(i, idx.start, max(len(idx), 0))
        else:
            y = y.index_select(i, torch.tensor(list(idx), dtype=torch.int64))
    if len(keep) != rank:
        y = y.reshape([y.shape[i] for i in keep])
    return y


@kernel("slice_by_size", attrs=("begin", "size"), exact=True)
def slice_by_size(x, begin, size):
    """x[begin[i] : begin[i] + size[i]] per axis; size -1 runs to the end."""
    for i, (b, s) in enumerate(zip(begin, size)):
        b = int(b) + x.shape[i] if int(b) < 0 else int(b)
        length = x.shape[i] - b if int(s) == -1 else int(s)
        x = x.narrow(i, b, length)
    return x


def _wrap_indices(indices, size):
    return torch.where(indices < 0, indices + size, indices)


def _gather_single(x, indices, axis):
    out = torch.index_select(x, axis, indices.reshape(-1))
    return out.reshape(x.shape[:axis] + indices.shape + x.shape[axis + 1:])


@kernel("gather", attrs=("axis", "batch_dims", "validate_indices"), exact=True)
def gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    """Takes slices of x along ``axis`` at ``indices``; the first ``batch_dims`` axes are shared."""
    axis = _axis(axis, x.dim())
    indices = _wrap_indices(indices.to(torch.int64), x.shape[axis])
    if batch_dims == 0:
        return _gather_single(x, indices, axis)
    # Batched: flatten the shared batch axes and gather each batch separately.
    bshape = x.shape[:batch_dims]
    xb = x.reshape((-1,) + x.shape[batch_dims:])
    ib = indices.reshape((-1,) + indices.shape[batch_dims:])
    outs = [_gather_single(xb[i], ib[i], axis - batch_dims) for i in range(xb.shape[0])]
    out = torch.stack(outs)
    return out.reshape(bshape + out.shape[1:])


@kernel("gather_along_axis", attrs=("axis", "validate_indices"), exact=True)
def gather_along_axis(x, indices, axis=0, validate_indices=False):
    axis = _axis(axis, x.dim())
    return torch.gather(x, axis, _wrap_indices(indices.to(torch.int64), x.shape[axis]))


@kernel("gather_nd", attrs=("batch_dims", "validate_indices"), exact=True)
def gather_nd(x, indices, batch_dims=0, validate_indices=False):
    """indices: [*I, K] index the first K axes after the batch axes of x."""
    bshape = x.shape[:batch_dims]
    xb = x.reshape((-1,) + x.shape[batch_dims:])
    ib = indices.reshape((xb.shape[0], -1, indices.shape[-1])).to(torch.int64)
    k = indices.shape[-1]
    outs = []
    for b in range(xb.shape[0]):
        idx = tuple(_wrap_indices(ib[b, :, j], xb.shape[1 + j]) for j in range(k))
        outs.append(xb[b][idx])
    out = torch.stack(outs)
    return out.reshape(bshape + indices.shape[batch_dims:-1] + x.shape[batch_dims + k:])


def _scatter_into(out: torch.Tensor, index: tuple, updates: torch.Tensor, mode: str) -> torch.Tensor:
    """out[index] <op>= updates for MIL's scatter modes; ``index`` is a tuple of index tensors."""
    if mode == "update":
        return out.index_put_(index, updates)
    if mode in ("add", "sub"):
        return out.index_put_(index, updates if mode == "add" else -updates, accumulate=True)
    # mul/div/max/min: reduce through a flat view so repeated indices combine.
    flat = torch.zeros(out.shape, dtype=torch.int64)
    flat.view(-1).copy_(torch.arange(out.numel()))
    positions = flat[index].reshape(-1)
    values = updates.reshape(-1)
    if mode == "div":
        values, mode = 1.0 / values, "mul"
    reduce = {"mul": "prod", "max": "amax", "min": "amin"}[mode]
    out.view(-1).index_reduce_(0, positions, values, reduce, include_self=True)
    return out


@kernel("scatter", attrs=("axis", "mode", "validate_indices"))
def scatter(data, indices, updates, axis=0, mode="add", validate_indices=False):
    """data with slices at ``indices`` [C] along ``axis`` combined with updates (mode update/add/sub/mul/div/max/min)."""
    axis = _axis(axis, data.dim())
    out = data.movedim(axis, 0).clone()
    idx = _wrap_indices(indices.to(torch.int64).reshape(-1), out.shape[0])
    _scatter_into(out, (idx,), updates.movedim(axis, 0), mode)
    return out.movedim(0, axis)


@kernel("scatter_along_axis", attrs=("axis", "mode", "validate_indices"))
def scatter_along_axis(data, indices, updates, axis=0, mode="add", validate_indices=False):
    """Element-wise scatter: data[..., indices[p], ...] along ``axis`` <op>= updates[p] (same shapes)."""
    axis = _axis(axis, data.dim())
    idx = _wrap_indices(indices.to(torch.int64), data.shape[axis])
    grids = list(torch.meshgrid(*[torch.arange(n) for n in idx.shape], indexing="ij"))
    grids[axis] = idx
    return _scatter_into(data.clone(), tuple(grids), updates, mode)


@kernel("scatter_nd", attrs=("mode", "validate_indices"))
def scatter_nd(data, indices, updates, mode="add", validate_indices=False):
    """indices [*I, K] address the first K axes of data; updates [*I, *data.shape[K:]]."""
    k = indices.shape[-1]
    flat = indices.to(torch.int64).reshape(-1, k)
    index = tuple(_wrap_indices(flat[:, j], data.shape[j]) for j in range(k))
    return _scatter_into(data.clone(), index, updates.reshape((flat.shape[0],) + tuple(data.shape[k:])), mode)


@kernel(
    "slice_update",
    attrs=("begin", "end", "stride", "begin_mask", "end_mask", "squeeze_mask"),
    exact=True,
    since="iOS18",
)
def slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    """x with x[begin:end:stride, ...] (slice_by_index's slicing) replaced by ``update``."""
    rank = x.dim()
    stride = stride or [1] * rank
    begin_mask = begin_mask or [False] * rank
    end_mask = end_mask or [False] * rank
    squeeze_mask = squeeze_mask or [False] * rank
    index = []
    for i in range(rank):
        if squeeze_mask[i]:
            b = 0 if begin_mask[i] else int(begin[i])
            index.append(torch.tensor([b + x.shape[i] if b < 0 else b]))
        else:
            sl = _python_slice(int(begin[i]), int(end[i]), int(stride[i]), begin_mask[i], end_mask[i])
            index.append(torch.tensor(list(range(*sl.indices(x.shape[i]))), dtype=torch.int64))
    grids = torch.meshgrid(*index, indexing="ij")
    out = x.clone()
    out[grids] = update.reshape(grids[0].shape)
    return out


@kernel("reverse_sequence", attrs=("seq_axis", "batch_axis"), exact=True)
def reverse_sequence(x, lengths, seq_axis=0, batch_axis=0):
    """Reverses the first lengths[b] entries along ``seq_axis`` of each batch entry b."""
    seq_axis, batch_axis = _axis(seq_axis, x.dim()), _axis(batch_axis, x.dim())
    out = x.clone()
    for b, n in enumerate(lengths.tolist()):
        part = x.select(batch_axis, b)
        axis = seq_axis - (1 if seq_axis > batch_axis else 0)
        head = part.narrow(axis, 0, int(n)).flip(axis)
        out.select(batch_axis, b).narrow(axis, 0, int(n)).copy_(head)
    return out


@kernel("tile", attrs=("reps",), exact=True)
def tile(x, reps):
    return x.repeat(*[int(r) for r in reps])


@kernel("pad", attrs=("pad", "mode", "constant_val"), exact=True)
def pad(x, pad, mode="constant", constant_val=0.0):
    """pad: [2N] (before, after) pairs for the last N axes, first of those axes first."""
    pairs = [(int(pad[2 * i]), int(pad[2 * i + 1])) for i in range(len(pad) // 2)]
    flat = []
    for b, e in reversed(pairs):
        flat += [b, e]
    if mode == "constant":
        return F.pad(x, flat, value=constant_val)
    torch_mode = {"reflect": "reflect", "replicate": "replicate"}[mode]
    # torch pads only the trailing 1-3 axes in these modes, with a batch axis in front.
    n = len(pairs)
    lead = x.shape[: x.dim() - n]
    y = x.reshape((1, -1) + tuple(x.shape[x.dim() - n:]))
    y = F.pad(y, flat, mode=torch_mode)
    return y.reshape(tuple(lead) + tuple(y.shape[2:]))


@kernel("flatten2d", attrs=("axis",), exact=True)
def flatten2d(x, axis=1):
    axis = _axis(axis, x.dim())
    return x.reshape(math.prod(x.shape[:axis]), -1)


@kernel("reverse", attrs=("axes",), exact=True)
def reverse(x, axes=None):
    return torch.flip(x, _axes(axes, x.dim()))


@kernel("depth_to_space", attrs=("block_size",), exact=True)
def depth_to_space(x, block_size):
    """[n, C, H, W] -> [n, C/b^2, H*b, W*b] in TensorFlow's depth-major (DCR) order:
    output channel c at block offset (i, j) reads input channel (i*b + j) * C/b^2 + c."""
    n, c, h, w = x.shape
    b = block_size
    y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


@kernel("pixel_shuffle", attrs=("upscale_factor",), exact=True)
def pixel_shuffle(x, upscale_factor):
    return F.pixel_shuffle(x, upscale_factor)


@kernel("pixel_unshuffle", attrs=("downscale_factor",), exact=True)
def pixel_unshuffle(x, downscale_factor):
    return F.pixel_unshuffle(x, downscale_factor)


@kernel("space_to_depth", attrs=("block_size",), exact=True)
def space_to_depth(x, block_size):
    """[n, C, H, W] -> [n, C*b^2, H/b, W/b], the inverse of depth_to_space (DCR order)."""
    n, c, h, w = x.shape
    b = block_size
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


@kernel("sliding_windows", attrs=("axis", "size", "stride"), exact=True)
def sliding_windows(x, axis, size, stride=1):
    axis = _axis(axis, x.dim())
    # unfold puts the window last; MIL puts it right after the window-count axis.
    return x.unfold(axis, size, stride).movedim(-1, axis + 1)


@kernel("crop", attrs=("crop_height", "crop_width"), exact=True)
def crop(x, crop_height, crop_width):
    h, w = x.shape[-2], x.shape[-1]
    return x[..., crop_height[0] : h - crop_height[1], crop_width[0] : w - crop_width[1]]


@kernel("shape", exact=True)
def shape(x):
    return torch.tensor(list(x.shape), dtype=torch.int64)


@kernel("select", exact=True)
def select(cond, a, b):
    return torch.where(cond.to(torch.bool), a, b)


@kernel("fill", attrs=("shape",), exact=True)
def fill(shape, value=None):
    if value is None:
        return torch.zeros([int(s) for s in shape], dtype=torch.float32)
    return torch.full([int(s) for s in shape], _scalar(value), dtype=value.dtype)


@kernel("fill_like", exact=True)
def fill_like(ref_tensor, value=None):
    if value is None:
        return torch.zeros(ref_tensor.shape, dtype=torch.float32)
    return torch.full(ref_tensor.shape, _scalar(value), dtype=value.dtype)


@kernel("range_1d", exact=True)
def range_1d(end, start, step):
    return torch.arange(_scalar(start), _scalar(end), _scalar(step))


@kernel("band_part", attrs=("lower", "upper"), exact=True)
def band_part(x, lower=-1, upper=-1):
    """Keeps x[..., i, j] where (lower < 0 or i - j <= lower) and (upper < 0 or j - i <= upper)."""
    m, n = x.shape[-2], x.shape[-1]
    i = torch.arange(m).unsqueeze(1)
    j = torch.arange(n).unsqueeze(0)
    keep = torch.ones((m, n), dtype=torch.bool)
    if lower >= 0:
        keep &= (i - j) <= lower
    if upper >= 0:
        keep &= (j - i) <= upper
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype))


@kernel("cumsum", attrs=("axis", "exclusive", "reverse"))
def cumsum(x, axis=0, exclusive=False, reverse=False):
    if reverse:
        x = torch.flip(x, [axis])
    y = torch.cumsum(x, dim=axis)
    if exclusive:
        y = y - x
    if reverse:
        y = torch.flip(y, [axis])
    return y


@kernel("one_hot", attrs=("one_hot_vector_size", "axis", "on_value", "off_value"))
def one_hot(indices, one_hot_vector_size, axis=-1, on_value=1, off_value=0):
    hot = F.one_hot(indices.to(torch.int64), one_hot_vector_size)
    rank = indices.dim() + 1
    hot = hot.movedim(-1, _axis(axis, rank))
    return torch.where(hot.bool(), torch.tensor(on_value), torch.tensor(off_value))


@kernel("argsort", attrs=("axis", "ascending"))
def argsort(x, axis=-1, ascending=False):
    return torch.argsort(x, dim=axis, descending=not ascending, stable=True)


@kernel("topk", attrs=("k", "axis", "ascending"))
def topk(x, k=1, axis=-1, ascending=False):
    values, indices = torch.topk(x, k, dim=axis, largest=not ascending, sorted=True)
    return values, indices


@kernel("topk", attrs=("k", "axis", "ascending", "sort", "return_indices", "output_indices_dtype"), since="iOS16")
def topk_ios16(x, k=1, axis=-1, ascending=False, sort=True, return_indices=True, output_indices_dtype="int32"):
    # With sort=False Core ML leaves the order unspecified; a sorted result is one valid order.
    values, indices = torch.topk(x, k, dim=axis, largest=not ascending, sorted=True)
    return (values, indices) if return_indices else values


@kernel("non_zero")
def non_zero(x):
    return torch.nonzero(x)


# --------------------------------------------------------------------------- resizing


def _sample_points(in_size: int, out_size: int, mode: str, scale: float | None = None) -> torch.Tensor:
    """Source coordinates of each output pixel along one axis, per MIL's sampling modes."""
    i = torch.arange(out_size, dtype=torch.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if out_size == 1:
            grid = torch.full((1,), (in_size - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0, dtype=torch.float64)
        else:
            grid = i * (in_size - 1) / (out_size - 1)
    elif mode == "DEFAULT":
        grid = i * ((in_size - in_size / out_size) / (out_size - 1)) if out_size > 1 else torch.zeros(1, dtype=torch.float64)
    elif mode == "OFFSET_CORNERS":
        delta = max(1, in_size - 1) / out_size
        grid = 0.5 * delta + i * delta
    elif mode == "UNALIGN_CORNERS":
        spacing = in_size / out_size
        grid = i * spacing + 0.5 * spacing - 0.5
    elif mode == "ASYMMETRIC":
        grid = i * (in_size / out_size)
    else:
        raise ValueError(f"unknown sampling mode {mode!r}")
    return grid.clamp(0, in_size - 1)


def _linear_resize_axis(x: torch.Tensor, axis: int, grid: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of x along ``axis`` at fractional source coordinates ``grid``."""
    size = x.shape[axis]
    lo = grid.floor().to(torch.int64).clamp(0, size - 1)
    hi = (lo + 1).clamp(max=size - 1)
    frac = (grid - lo.to(grid.dtype)).to(x.dtype)
    shape = [1] * x.dim()
    shape[axis] = -1
    a = x.index_select(axis, lo)
    b = x.index_select(axis, hi)
    return a + (b - a) * frac.reshape(shape)


def _bilinear(x, out_h, out_w, mode):
    h, w = x.shape[-2], x.shape[-1]
    y = _linear_resize_axis(x, x.dim() - 2, _sample_points(h, out_h, mode))
    return _linear_resize_axis(y, x.dim() - 1, _sample_points(w, out_w, mode))


@kernel("upsample_bilinear", attrs=("scale_factor_height", "scale_factor_width", "align_corners"))
def upsample_bilinear(x, scale_factor_height=1, scale_factor_width=1, align_corners=True):
    return upsample_bilinear_ios16(x, scale_factor_height, scale_factor_width, align_corners, not align_corners)


@kernel(
    "upsample_bilinear",
    attrs=("scale_factor_height", "scale_factor_width", "align_corners", "half_pixel_centers"),
    since="iOS16",
)
def upsample_bilinear_ios16(x, scale_factor_height=1, scale_factor_width=1, align_corners=True, half_pixel_centers=None):
    """Output [*, floor(H*sh), floor(W*sw)]. align_corners maps corner to corner; otherwise
    half_pixel_centers (default: not align_corners) samples at pixel centres, else at i*in/out."""
    if half_pixel_centers is None:
        half_pixel_centers = not align_corners
    out_h = int(math.floor(x.shape[-2] * scale_factor_height))
    out_w = int(math.floor(x.shape[-1] * scale_factor_width))
    if align_corners:
        mode = "STRICT_ALIGN_CORNERS"
    else:
        mode = "UNALIGN_CORNERS" if half_pixel_centers else "ASYMMETRIC"
    return _bilinear(x, out_h, out_w, mode)


@kernel("resize_bilinear", attrs=("target_size_height", "target_size_width", "sampling_mode"))
def resize_bilinear(x, target_size_height=1, target_size_width=1, sampling_mode="DEFAULT"):
    return _bilinear(x, int(target_size_height), int(target_size_width), sampling_mode)


def _nearest_index(in_size: int, out_size: int, scale: float | None = None) -> torch.Tensor:
    i = torch.arange(out_size, dtype=torch.float64)
    step = (1.0 / scale) if scale else in_size / out_size
    return torch.floor(i * step).to(torch.int64).clamp(0, in_size - 1)


@kernel("upsample_nearest_neighbor", attrs=("scale_factor_height", "scale_factor_width"), exact=True)
def upsample_nearest_neighbor(x, scale_factor_height=1, scale_factor_width=1):
    """Output [*, floor(H*sh), floor(W*sw)]; output pixel i reads input floor(i / scale)."""
    h, w = x.shape[-2], x.shape[-1]
    sh, sw = scale_factor_height, scale_factor_width
    if float(sh).is_integer() and float(sw).is_integer():
        # Integer factors: a plain repeat, the unet's upsampler.
        return x.repeat_interleave(int(sh), dim=-2).repeat_interleave(int(sw), dim=-1)
    rows = _nearest_index(h, int(math.floor(h * sh)), sh)
    cols = _nearest_index(w, int(math.floor(w * sw)), sw)
    return x.index_select(x.dim() - 2, rows).index_select(x.dim() - 1, cols)


@kernel("resize_nearest_neighbor", attrs=("target_size_height", "target_size_width"), exact=True)
def resize_nearest_neighbor(x, target_size_height, target_size_width):
    h, w = x.shape[-2], x.shape[-1]
    rows = _nearest_index(h, int(target_size_height))
    cols = _nearest_index(w, int(target_size_width))
    return x.index_select(x.dim() - 2, rows).index_select(x.dim() - 1, cols)


@kernel("resize", attrs=("shape", "resized_dims", "interpolation_mode", "sampling_mode"), since="iOS17")
def resize(x, shape, resized_dims, interpolation_mode="LINEAR", sampling_mode="DEFAULT"):
    """Resizes the last ``resized_dims`` axes of x to the last entries of ``shape`` (0 keeps a size)."""
    shape = [int(s) for s in shape]
    y = x
    for k in range(int(resized_dims)):
        axis = x.dim() - 1 - k
        out = shape[len(shape) - 1 - k] or x.shape[axis]
        if interpolation_mode == "NEAREST_NEIGHBOR":
            y = y.index_select(axis, _nearest_index(x.shape[axis], out))
        else:
            y = _linear_resize_axis(y, axis, _sample_points(x.shape[axis], out, sampling_mode))
    return y


# --------------------------------------------------------------------------- activation quantization (iOS17)


def _per_axis(param: torch.Tensor, rank: int, axis):
    if param.dim() == 0 or axis is None:
        return param
    shape = [1] * rank
    shape[_axis(axis, rank)] = -1
    return param.reshape(shape)


_INT_RANGE = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767), "uint16": (0, 65535)}


@kernel("quantize", attrs=("axis", "output_dtype"), since="iOS17")
def quantize(input, scale, output_dtype, zero_point=None, axis=None):
    lo, hi = _INT_RANGE[output_dtype]
    q = torch.round(input / _per_axis(scale, input.dim(), axis))
    if zero_point is not None:
        q = q + _per_axis(zero_point, input.dim(), axis)
    return q.clamp(lo, hi).to(torch.int64)


@kernel("dequantize", attrs=("axis",), since="iOS17")
def dequantize(input, scale, zero_point=None, axis=None):
    x = input.to(torch.float32)
    if zero_point is not None:
        x = x - _per_axis(zero_point, input.dim(), axis)
    return x * _per_axis(scale, input.dim(), axis)


# --------------------------------------------------------------------------- weight decompression (constexpr)
#
# Raw kernels: they receive the stored numpy arrays (packed bytes stay bytes) and
# run once at load time (results cached as constants) or, for a result of IN_FILE_MIN elements or
# more, each time a step that takes it runs (executor._Compressed).


def _unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Element i of a little-endian bit stream of ``nbits``-bit fields (LSB of byte 0 first).

    Up to 8 bits a field (a palette's keys), 8 fields at a time: each ``nbits`` bytes are one 64-bit word
    and field j is its bits from ``nbits * j`` on, so a weight of n keys takes a few n-byte arrays to
    unpack (a step decompresses it each time it runs), not one byte per bit."""
    packed = packed.astype(np.uint8, copy=False).reshape(-1)
    if nbits > 8:
        bits = np.unpackbits(packed, bitorder="little")[: count * nbits]
        weights = (1 << np.arange(nbits, dtype=np.uint64)).astype(np.uint64)
        return (bits.reshape(count, nbits).astype(np.uint64) * weights).sum(axis=1)
    groups = -(-count // 8)
    stream = np.zeros(groups * nbits, np.uint8)
    stream[: min(packed.size, stream.size)] = packed[: stream.size]
    stream = stream.reshape(groups, nbits)
    words = np.zeros(groups, np.uint64)
    for j in range(nbits):
        words |= stream[:, j].astype(np.uint64) << np.uint64(8 * j)
    keys = np.empty((groups, 8), np.uint8)
    for j in range(8):
        keys[:, j] = (words >> np.uint64(nbits * j)) & np.uint64((1 << nbits) - 1)
    return keys.reshape(-1)[:count]


def _repeat_blocks(param: np.ndarray, shape) -> np.ndarray:
    """Repeats each entry of a per-block parameter over its block, to the full ``shape``."""
    for axis, (full, n) in enumerate(zip(shape, param.shape)):
        if n != full:
            param = np.repeat(param, full // n, axis=axis)
    return param


@kernel("constexpr_affine_dequantize", attrs=("axis",), raw=True, since="iOS16")
def constexpr_affine_dequantize(quantized_data, zero_point, scale, axis):
    """scale * (quantized_data - zero_point); scalar or per-``axis`` vector scale and zero point."""
    rank = quantized_data.ndim
    shape = [1] * rank
    shape[_axis(int(axis), rank)] = -1
    scale = np.asarray(scale, np.float32)
    zero_point = np.asarray(zero_point, np.float32)
    if scale.ndim == 1:
        scale = scale.reshape(shape)
    if zero_point.ndim == 1:
        zero_point = zero_point.reshape(shape)
    return (quantized_data.astype(np.float32) - zero_point) * scale


@kernel("constexpr_cast", attrs=("output_dtype",), raw=True, since="iOS16")
def constexpr_cast(source_val, output_dtype):
    return np.asarray(source_val, np.float32)


@kernel("constexpr_lut_to_dense", raw=True, since="iOS16")
def constexpr_lut_to_dense(indices, lut, shape):
    """iOS16 form: indices are log2(len(lut))-bit fields packed in bytes; lut: [NUM_PALETTES]."""
    shape = [int(s) for s in np.asarray(shape).reshape(-1)]
    nbits = int(round(math.log2(lut.size)))
    keys = _unpack_bits(indices, nbits, math.prod(shape))
    return np.asarray(lut).reshape(-1)[keys].reshape(shape)


@kernel("constexpr_lut_to_dense", raw=True, since="iOS18")
def constexpr_lut_to_dense_ios18(indices, lut, vector_axis=None):
    """iOS18 form: indices [*D] (unpacked keys); lut [*G, NUM_PALETTES, VECTOR_SIZE].

    Each block of D / G elements has its own palette (per-grouped-channel);
    with VECTOR_SIZE > 1 every key expands to a vector laid along ``vector_axis``.
    """
    indices = np.asarray(indices).astype(np.int64)
    lut = np.asarray(lut)
    rank = indices.ndim
    groups = lut.shape[:rank]
    n_pal, vsize = lut.shape[-2], lut.shape[-1]
    # Flat palette number of every element, from its block position.
    block = [d // g for d, g in zip(indices.shape, groups)]
    grids = np.meshgrid(*[np.arange(d) // b for d, b in zip(indices.shape, block)], indexing="ij", sparse=True)  # broadcast
    palette = np.ravel_multi_index(grids, groups) if rank else np.zeros((), np.int64)
    flat_lut = lut.reshape(-1, n_pal, vsize)
    values = flat_lut[palette, indices]  # [*D, VECTOR_SIZE]
    if vsize == 1:
        return values[..., 0]
    axis = _axis(int(vector_axis), rank)
    values = np.moveaxis(values, -1, axis + 1)  # [..., D_axis, VECTOR_SIZE, ...]
    out_shape = list(indices.shape)
    out_shape[axis] *= vsize
    return values.reshape(out_shape)


@kernel("constexpr_sparse_to_dense", raw=True, since="iOS16")
def constexpr_sparse_to_dense(nonzero_data, mask, shape):
    """iOS16 form: mask packs one bit per element (LSB first); set bits take nonzero_data in order."""
    shape = [int(s) for s in np.asarray(shape).reshape(-1)]
    bits = np.unpackbits(np.asarray(mask, np.uint8), bitorder="little")[: math.prod(shape)]
    dense = np.zeros(math.prod(shape), dtype=np.asarray(nonzero_data).dtype)
    dense[bits != 0] = nonzero_data
    return dense.reshape(shape)


@kernel("constexpr_sparse_to_dense", raw=True, since="iOS18")
def constexpr_sparse_to_dense_ios18(nonzero_data, mask):
    """iOS18 form: mask is a uint1 tensor of the output shape."""
    mask = np.asarray(mask)
    dense = np.zeros(mask.shape, dtype=np.asarray(nonzero_data).dtype)
    dense[mask != 0] = nonzero_data
    return dense


def _shift_scale(data, scale, offset):
    data = np.asarray(data).astype(np.float32)
    scale = np.asarray(scale, np.float32)
    if offset is not None:
        data = data - _repeat_blocks(np.asarray(offset).astype(np.float32), data.shape)
    return data * _repeat_blocks(scale, data.shape)


@kernel("constexpr_blockwise_shift_scale", raw=True, since="iOS18")
def constexpr_blockwise_shift_scale(data, scale, offset=None):
    """scale * (data - offset), scale and offset per block of data.shape / scale.shape elements."""
    return _shift_scale(data, scale, offset)


@kernel("constexpr_lut_to_sparse", raw=True, since="iOS18")
def constexpr_lut_to_sparse(indices_mask, indices_nonzero_data, lut, vector_axis=None):
    """Palettizes only the nonzero entries: returns (mask, nonzero values) for constexpr_sparse_to_dense."""
    mask = np.asarray(indices_mask)
    keys = np.zeros(mask.shape, dtype=np.int64)
    keys[mask != 0] = np.asarray(indices_nonzero_data)
    dense = constexpr_lut_to_dense_ios18(keys, lut, vector_axis)
    if np.asarray(lut).shape[-1] > 1:
        mask = np.repeat(mask, np.asarray(lut).shape[-1], axis=_axis(int(vector_axis), mask.ndim))
    return mask, dense[mask != 0].reshape(-1)


@kernel("constexpr_sparse_blockwise_shift_scale", raw=True, since="iOS18")
def constexpr_sparse_blockwise_shift_scale(data_mask, nonzero_data, scale, offset=None):
    """Dequantizes only the nonzero entries: returns (mask, nonzero values)."""
    mask = np.asarray(data_mask)
    dense = np.zeros(mask.shape, dtype=np.float32)
    dense[mask != 0] = np.asarray(nonzero_data).astype(np.float32)
    values = _shift_scale(dense, scale, offset)
    return mask, values[mask != 0].reshape(-1)
