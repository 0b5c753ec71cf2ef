"""One test per kernel: a one-op MIL program, converted with coremltools at float32 and
float16 precision, run by the executor and compared with a reference computed here in
numpy/PyTorch from the op's documented semantics (fp32 >= 60 dB, fp16 >= 35 dB)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from coremltools.converters.mil import Builder as mb

from sdbuild.mil import kernels
from .milcheck import check_mil

T = torch.from_numpy
rng = np.random.default_rng(1)


def _f32(a):
    return np.asarray(a, dtype=np.float32)


def _np(t):
    return t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _const(shape, scale=1.0, seed=3):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _pos(shape, seed=0):
    return {"x": (np.abs(np.random.default_rng(seed).standard_normal(shape)) + 0.2).astype(np.float32)}


def _as_f(v):
    """Cast a bool/int var to fp32 so every program output is float."""
    return mb.cast(x=v, dtype="fp32")


def case(op_type, shapes, build, ref, target="iOS16", feeds=None, id=None):
    return pytest.param(op_type, shapes, build, ref, target, feeds, id=id or op_type)


X234 = {"x": (2, 3, 4)}
XY = {"x": (2, 3, 4), "y": (3, 4)}
IMG = {"x": (1, 4, 9, 9)}

W_CONV = _const((6, 4, 3, 3), 0.3)
W_CONV4 = _const((6, 4, 4, 4), 0.3, seed=4)
W_GROUP = _const((6, 2, 3, 3), 0.3, seed=5)
W_CONV1D = _const((6, 4, 3), 0.3, seed=6)
B6 = _const((6,), 0.1, seed=7)
W_T = _const((4, 3, 3, 3), 0.3, seed=8)
W_LIN = _const((6, 8), 0.3, seed=9)


def _conv_ref(x, w, b=None, stride=1, pads=((0, 0), (0, 0)), dilation=1, groups=1):
    """Reference conv: explicit zero padding (numpy), then an unpadded torch conv."""
    spatial = w.ndim - 2
    widths = [(0, 0), (0, 0)] + [tuple(p) for p in pads][:spatial]
    xp = np.pad(x, widths)
    conv = F.conv1d if spatial == 1 else F.conv2d
    return _np(conv(T(xp), T(w), None if b is None else T(b), stride, 0, dilation, groups))


def _same_pads(size, k, s, d=1, lower=False):
    out = math.ceil(size / s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    a, b = total // 2, total - total // 2
    return (b, a) if lower else (a, b)


def _grid(in_size, out_size, mode):
    """Sample points along one axis, transcribed from the resize_bilinear docstring."""
    i = np.arange(out_size, dtype=np.float64)
    if mode == "STRICT_ALIGN_CORNERS":
        g = i * (in_size - 1) / (out_size - 1)
    elif mode == "ALIGN_CORNERS":
        g = i * (in_size - 1) / (out_size - 1) if out_size > 1 else np.array([(in_size - 1) / 2])
    elif mode == "DEFAULT":
        g = i * (in_size - in_size / out_size) / (out_size - 1)
    elif mode == "OFFSET_CORNERS":
        delta = max(1, in_size - 1) / out_size
        g = 0.5 * delta + i * ((out_size - 1) * delta) / (out_size - 1)
    elif mode == "UNALIGN_CORNERS":
        sp = in_size / out_size
        g = i * sp + 0.5 * sp - 0.5
    elif mode == "ASYMMETRIC":  # upsample_bilinear with align_corners=False, half_pixel_centers=False
        g = i * in_size / out_size
    return np.clip(g, 0, in_size - 1)


def _bilinear_ref(x, out_h, out_w, mode):
    """Separable linear interpolation in numpy at the documented sample points."""

    def along(a, axis, grid):
        lo = np.floor(grid).astype(int)
        hi = np.minimum(lo + 1, a.shape[axis] - 1)
        f = (grid - lo).reshape([-1 if d == axis else 1 for d in range(a.ndim)])
        return np.take(a, lo, axis) * (1 - f) + np.take(a, hi, axis) * f

    y = along(x.astype(np.float64), x.ndim - 2, _grid(x.shape[-2], out_h, mode))
    return along(y, x.ndim - 1, _grid(x.shape[-1], out_w, mode))


def _sdpa_ref(q, k, v, mask=None):
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s + mask
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    return (p / p.sum(-1, keepdims=True)) @ v


def _gelu_exact(x):
    return _np(0.5 * T(x) * (1 + torch.erf(T(x) / math.sqrt(2))))


def _scatter_nd_ref(x, u):
    y = x.copy()
    y[0, 1] += u[0]
    y[2, 3] += u[1]
    return y


def _slice_update_ref(x, u):
    y = x.copy()
    y[1:3, 0:6:2] = u
    return y


POS = _pos((2, 3, 4))
POS_XY = {"x": POS["x"], "y": (np.abs(_const((3, 4), seed=11)) + 0.5)}

CASES = [
    # ---- elementwise binary, with broadcasting
    case("add", XY, lambda x, y: mb.add(x=x, y=y), lambda x, y: x + y),
    case("sub", XY, lambda x, y: mb.sub(x=x, y=y), lambda x, y: x - y),
    case("mul", XY, lambda x, y: mb.mul(x=x, y=y), lambda x, y: x * y),
    case("real_div", XY, lambda x, y: mb.real_div(x=x, y=y), lambda x, y: x / y, feeds=POS_XY),
    case("pow", XY, lambda x, y: mb.pow(x=x, y=y), lambda x, y: x**y, feeds=POS_XY),
    case("maximum", XY, lambda x, y: mb.maximum(x=x, y=y), np.maximum),
    case("minimum", XY, lambda x, y: mb.minimum(x=x, y=y), np.minimum),
    case("floor_div", XY, lambda x, y: mb.floor_div(x=x, y=y), lambda x, y: np.floor(x / y), feeds={"x": _const((2, 3, 4), 4), "y": POS_XY["y"]}),
    case("mod", XY, lambda x, y: mb.mod(x=x, y=y), np.mod, feeds={"x": _const((2, 3, 4), 4), "y": POS_XY["y"]}),
    case("less", XY, lambda x, y: _as_f(mb.less(x=x, y=y)), lambda x, y: _f32(x < y)),
    case("less_equal", XY, lambda x, y: _as_f(mb.less_equal(x=x, y=mb.floor(x=y))), lambda x, y: _f32(x <= np.floor(y))),
    case("greater", XY, lambda x, y: _as_f(mb.greater(x=x, y=y)), lambda x, y: _f32(x > y)),
    case("greater_equal", XY, lambda x, y: _as_f(mb.greater_equal(x=x, y=y)), lambda x, y: _f32(x >= y)),
    case(
        "equal", XY, lambda x, y: _as_f(mb.equal(x=mb.round(x=x), y=mb.round(x=y))),
        lambda x, y: _f32(np.round(x) == np.round(y)),
    ),
    case(
        "not_equal", XY, lambda x, y: _as_f(mb.not_equal(x=mb.round(x=x), y=mb.round(x=y))),
        lambda x, y: _f32(np.round(x) != np.round(y)),
    ),
    case(
        "logical_and", XY, lambda x, y: _as_f(mb.logical_and(x=mb.greater(x=x, y=0.0), y=mb.greater(x=y, y=0.0))),
        lambda x, y: _f32((x > 0) & (y > 0)),
    ),
    case(
        "logical_or", XY, lambda x, y: _as_f(mb.logical_or(x=mb.greater(x=x, y=0.0), y=mb.greater(x=y, y=0.0))),
        lambda x, y: _f32((x > 0) | (y > 0)),
    ),
    case(
        "logical_xor", XY, lambda x, y: _as_f(mb.logical_xor(x=mb.greater(x=x, y=0.0), y=mb.greater(x=y, y=0.0))),
        lambda x, y: _f32((x > 0) ^ (y > 0)),
    ),
    case("logical_not", X234, lambda x: _as_f(mb.logical_not(x=mb.greater(x=x, y=0.0))), lambda x: _f32(x <= 0)),
    case("select", XY, lambda x, y: mb.select(cond=mb.greater(x=x, y=0.0), a=x, b=y), lambda x, y: np.where(x > 0, x, y)),
    # ---- elementwise unary and activations
    case("abs", X234, lambda x: mb.abs(x=x), np.abs),
    case("exp", X234, lambda x: mb.exp(x=x), np.exp),
    case("exp2", X234, lambda x: mb.exp2(x=x), np.exp2),
    case("log", X234, lambda x: mb.log(x=x), np.log, feeds=POS),
    case("sqrt", X234, lambda x: mb.sqrt(x=x), np.sqrt, feeds=POS),
    case("rsqrt", X234, lambda x: mb.rsqrt(x=x), lambda x: 1 / np.sqrt(x + 1e-12), feeds=POS),
    case("inverse", X234, lambda x: mb.inverse(x=x), lambda x: 1 / (x + 1e-4), feeds=POS),
    case("erf", X234, lambda x: mb.erf(x=x), lambda x: _np(torch.erf(T(x)))),
    case("tanh", X234, lambda x: mb.tanh(x=x), np.tanh),
    case("atan", X234, lambda x: mb.atan(x=x), np.arctan),
    case("sin", X234, lambda x: mb.sin(x=x), np.sin),
    case("cos", X234, lambda x: mb.cos(x=x), np.cos),
    case("square", X234, lambda x: mb.square(x=x), np.square),
    case("sign", X234, lambda x: mb.sign(x=x), np.sign),
    case("floor", X234, lambda x: mb.floor(x=mb.mul(x=x, y=3.0)), lambda x: np.floor(3 * x)),
    case("ceil", X234, lambda x: mb.ceil(x=mb.mul(x=x, y=3.0)), lambda x: np.ceil(3 * x)),
    case("round", X234, lambda x: mb.round(x=mb.mul(x=x, y=3.0)), lambda x: np.round(3 * x)),
    case("sigmoid", X234, lambda x: mb.sigmoid(x=x), lambda x: 1 / (1 + np.exp(-x))),
    case("silu", X234, lambda x: mb.silu(x=x), lambda x: x / (1 + np.exp(-x))),
    case("softplus", X234, lambda x: mb.softplus(x=x), lambda x: np.log1p(np.exp(x))),
    case("softsign", X234, lambda x: mb.softsign(x=x), lambda x: x / (1 + np.abs(x))),
    case("relu", X234, lambda x: mb.relu(x=x), lambda x: np.maximum(x, 0)),
    case("relu6", X234, lambda x: mb.relu6(x=mb.mul(x=x, y=5.0)), lambda x: np.clip(5 * x, 0, 6)),
    case("gelu", X234, lambda x: mb.gelu(x=x), _gelu_exact, id="gelu-exact"),
    case(
        "gelu", X234, lambda x: mb.gelu(x=x, mode="TANH_APPROXIMATION"),
        lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))), id="gelu-tanh",
    ),
    case(
        "gelu", X234, lambda x: mb.gelu(x=x, mode="SIGMOID_APPROXIMATION"),
        lambda x: x / (1 + np.exp(-1.702 * x)), id="gelu-sigmoid",
    ),
    case("elu", X234, lambda x: mb.elu(x=x, alpha=0.7), lambda x: np.where(x > 0, x, 0.7 * (np.exp(x) - 1))),
    case("leaky_relu", X234, lambda x: mb.leaky_relu(x=x, alpha=0.2), lambda x: np.where(x >= 0, x, 0.2 * x)),
    case("clip", X234, lambda x: mb.clip(x=x, alpha=-0.5, beta=0.5), lambda x: np.clip(x, -0.5, 0.5)),
    case("threshold", X234, lambda x: mb.threshold(x=x, alpha=0.1), lambda x: np.maximum(x, 0.1)),
    case(
        "clamped_relu", X234, lambda x: mb.clamped_relu(x=x, alpha=0.1, beta=0.8),
        lambda x: np.minimum(np.where(x >= 0, x, 0.1 * x), 0.8),
    ),
    case("scaled_tanh", X234, lambda x: mb.scaled_tanh(x=x, alpha=2.0, beta=0.5), lambda x: 2 * np.tanh(0.5 * x)),
    case(
        "sigmoid_hard", X234, lambda x: mb.sigmoid_hard(x=x, alpha=0.3, beta=0.4),
        lambda x: np.clip(0.3 * x + 0.4, 0, 1),
    ),
    case("thresholded_relu", X234, lambda x: mb.thresholded_relu(x=x, alpha=0.3), lambda x: np.where(x > 0.3, x, 0)),
    case("linear_activation", X234, lambda x: mb.linear_activation(x=x, alpha=1.5, beta=0.2), lambda x: 1.5 * x + 0.2),
    case(
        "prelu", {"x": (1, 3, 4, 4)}, lambda x: mb.prelu(x=x, alpha=np.array([0.1, 0.2, 0.3], np.float32)),
        lambda x: np.where(x >= 0, x, np.array([0.1, 0.2, 0.3]).reshape(1, 3, 1, 1) * x),
    ),
    case(
        "softplus_parametric", {"x": (1, 3, 4, 4)},
        lambda x: mb.softplus_parametric(x=x, alpha=np.array([1.0, 2.0, 0.5], np.float32), beta=np.array([0.5, 1.0, 2.0], np.float32)),
        lambda x: np.array([1.0, 2.0, 0.5]).reshape(1, 3, 1, 1)
        * np.log1p(np.exp(np.array([0.5, 1.0, 2.0]).reshape(1, 3, 1, 1) * x)),
    ),
    case("softmax", X234, lambda x: mb.softmax(x=x, axis=1), lambda x: _np(torch.softmax(T(x), 1)), id="softmax-axis1"),
    case("softmax", X234, lambda x: mb.softmax(x=x), lambda x: _np(torch.softmax(T(x), -1)), id="softmax-last"),
    # ---- reductions
    case("reduce_mean", {"x": (2, 3, 4, 5)}, lambda x: mb.reduce_mean(x=x, axes=[1, 3]), lambda x: x.mean((1, 3))),
    case("reduce_sum", {"x": (2, 3, 4, 5)}, lambda x: mb.reduce_sum(x=x, axes=[-1], keep_dims=True), lambda x: x.sum(-1, keepdims=True)),
    case("reduce_max", {"x": (2, 3, 4, 5)}, lambda x: mb.reduce_max(x=x), lambda x: np.array(x.max())),
    case("reduce_min", {"x": (2, 3, 4, 5)}, lambda x: mb.reduce_min(x=x, axes=[0, 2], keep_dims=True), lambda x: x.min((0, 2), keepdims=True)),
    case(
        "reduce_prod", {"x": (2, 3, 4)}, lambda x: mb.reduce_prod(x=mb.add(x=mb.mul(x=x, y=0.1), y=1.0), axes=[1]),
        lambda x: (0.1 * x + 1).prod(1),
    ),
    case("reduce_l2_norm", {"x": (2, 3, 4)}, lambda x: mb.reduce_l2_norm(x=x, axes=[2]), lambda x: np.sqrt((x * x).sum(2))),
    case("reduce_l1_norm", {"x": (2, 3, 4)}, lambda x: mb.reduce_l1_norm(x=x, axes=[2]), lambda x: np.abs(x).sum(2)),
    case("reduce_sum_square", {"x": (2, 3, 4)}, lambda x: mb.reduce_sum_square(x=x, axes=[1]), lambda x: (x * x).sum(1)),
    case(
        "reduce_log_sum_exp", {"x": (2, 3, 4)}, lambda x: mb.reduce_log_sum_exp(x=x, axes=[2]),
        lambda x: np.log(np.exp(x).sum(2)),
    ),
    case("reduce_log_sum", {"x": (2, 3, 4)}, lambda x: mb.reduce_log_sum(x=x, axes=[2]), lambda x: np.log(x.sum(2)), feeds=POS),
    case("reduce_argmax", {"x": (2, 3, 4)}, lambda x: _as_f(mb.reduce_argmax(x=x, axis=1)), lambda x: _f32(x.argmax(1))),
    case(
        "reduce_argmin", {"x": (2, 3, 4)}, lambda x: _as_f(mb.reduce_argmin(x=x, axis=-1, keep_dims=True)),
        lambda x: _f32(x.argmin(-1)[..., None]),
    ),
    # ---- normalization
    case(
        "layer_norm", {"x": (2, 5, 8)},
        lambda x: mb.layer_norm(x=x, axes=[-1], gamma=_const((8,), seed=1), beta=_const((8,), seed=2), epsilon=1e-5),
        lambda x: _np(F.layer_norm(T(x), (8,), T(_const((8,), seed=1)), T(_const((8,), seed=2)), 1e-5)),
        id="layer_norm-last",
    ),
    case(
        "layer_norm", {"x": (2, 5, 8)},
        lambda x: mb.layer_norm(x=x, axes=[1], gamma=_const((5,), seed=1), epsilon=1e-5),
        lambda x: (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5) * _const((5,), seed=1).reshape(1, 5, 1),
        id="layer_norm-middle",
    ),
    case(
        "instance_norm", {"x": (2, 3, 4, 5)},
        lambda x: mb.instance_norm(x=x, gamma=_const((3,), seed=1), beta=_const((3,), seed=2), epsilon=1e-5),
        lambda x: _np(F.instance_norm(T(x), weight=T(_const((3,), seed=1)), bias=T(_const((3,), seed=2)), eps=1e-5)),
    ),
    case(
        "batch_norm", {"x": (2, 3, 4, 5)},
        lambda x: mb.batch_norm(
            x=x, mean=_const((3,), seed=1), variance=np.abs(_const((3,), seed=2)) + 0.5,
            gamma=_const((3,), seed=3), beta=_const((3,), seed=4), epsilon=1e-3,
        ),
        lambda x: _np(F.batch_norm(
            T(x), T(_const((3,), seed=1)), T(np.abs(_const((3,), seed=2)) + 0.5),
            T(_const((3,), seed=3)), T(_const((3,), seed=4)), False, 0.0, 1e-3,
        )),
    ),
    case(
        "l2_norm", {"x": (2, 3, 4, 5)}, lambda x: mb.l2_norm(x=x),
        lambda x: x / np.sqrt((x * x).sum((1, 2, 3), keepdims=True) + 1e-6),
    ),
    # ---- convolution and pooling
    case("conv", IMG, lambda x: mb.conv(x=x, weight=W_CONV, bias=B6), lambda x: _conv_ref(x, W_CONV, B6), id="conv-valid"),
    case(
        "conv", IMG, lambda x: mb.conv(x=x, weight=W_CONV, strides=[2, 2], pad_type="same"),
        lambda x: _conv_ref(x, W_CONV, stride=2, pads=[_same_pads(9, 3, 2)] * 2), id="conv-same-stride2",
    ),
    case(
        "conv", IMG, lambda x: mb.conv(x=x, weight=W_CONV4, pad_type="same"),
        lambda x: _conv_ref(x, W_CONV4, pads=[_same_pads(9, 4, 1)] * 2), id="conv-same-even-kernel",
    ),
    case(
        "conv", IMG, lambda x: mb.conv(x=x, weight=W_CONV4, pad_type="same_lower"),
        lambda x: _conv_ref(x, W_CONV4, pads=[_same_pads(9, 4, 1, lower=True)] * 2), id="conv-same_lower",
    ),
    case(
        "conv", IMG, lambda x: mb.conv(x=x, weight=W_CONV, pad_type="custom", pad=[1, 2, 0, 1], strides=[2, 1], dilations=[2, 2]),
        lambda x: _conv_ref(x, W_CONV, stride=(2, 1), pads=[(1, 2), (0, 1)], dilation=2), id="conv-custom-dilated",
    ),
    case(
        "conv", IMG, lambda x: mb.conv(x=x, weight=W_GROUP, bias=B6, groups=2, pad_type="custom", pad=[1, 1, 1, 1]),
        lambda x: _conv_ref(x, W_GROUP, B6, pads=[(1, 1), (1, 1)], groups=2), id="conv-groups",
    ),
    case(
        "conv", {"x": (1, 4, 9)}, lambda x: mb.conv(x=x, weight=W_CONV1D, pad_type="same"),
        lambda x: _conv_ref(x, W_CONV1D, pads=[_same_pads(9, 3, 1)]), id="conv-1d",
    ),
    case(
        "conv_transpose", {"x": (1, 4, 5, 5)}, lambda x: mb.conv_transpose(x=x, weight=W_T, strides=[2, 2]),
        lambda x: _np(F.conv_transpose2d(T(x), T(W_T), stride=2)), id="conv_transpose-valid",
    ),
    case(
        "conv_transpose", {"x": (1, 4, 5, 5)},
        lambda x: mb.conv_transpose(x=x, weight=W_T, bias=B6[:3], strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1]),
        lambda x: _np(F.conv_transpose2d(T(x), T(W_T), T(B6[:3]), stride=2, padding=1)), id="conv_transpose-custom",
    ),
    case(
        "conv_transpose", {"x": (1, 4, 5, 5)},
        lambda x: mb.conv_transpose(
            x=x, weight=W_T, strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1], output_shape=[1, 3, 10, 10]
        ),
        lambda x: _np(F.conv_transpose2d(T(x), T(W_T), stride=2, padding=1, output_padding=1)), id="conv_transpose-output_shape",
    ),
    case(
        "avg_pool", IMG, lambda x: mb.avg_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="same"),
        lambda x: _np(F.avg_pool2d(T(np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)])), 3, 2)), id="avg_pool-same",
    ),
    case(
        "avg_pool", IMG,
        lambda x: mb.avg_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1], exclude_padding_from_average=True),
        lambda x: _np(F.avg_pool2d(T(x), 3, 2, padding=1, count_include_pad=False)), id="avg_pool-exclude",
    ),
    case(
        "max_pool", IMG, lambda x: mb.max_pool(x=x, kernel_sizes=[2, 2], strides=[2, 2], pad_type="valid"),
        lambda x: _np(F.max_pool2d(T(x), 2, 2)),
    ),
    # ---- linear algebra
    case(
        "linear", {"x": (2, 5, 8)}, lambda x: mb.linear(x=x, weight=W_LIN, bias=B6),
        lambda x: x @ W_LIN.T + B6,
    ),
    case(
        "matmul", {"x": (2, 3, 4, 5), "y": (2, 3, 5, 6)}, lambda x, y: mb.matmul(x=x, y=y), lambda x, y: x @ y,
        id="matmul-batched",
    ),
    case(
        "matmul", {"x": (2, 5, 4), "y": (1, 6, 5)}, lambda x, y: mb.matmul(x=x, y=y, transpose_x=True, transpose_y=True),
        lambda x, y: np.swapaxes(x, -1, -2) @ np.swapaxes(y, -1, -2), id="matmul-transposed-broadcast",
    ),
    case(
        "einsum", {"x": (2, 3, 4, 5), "y": (2, 5, 4, 6)}, lambda x, y: mb.einsum(values=(x, y), equation="nchw,nwhu->nchu"),
        lambda x, y: np.einsum("nchw,nwhu->nchu", x, y),
    ),
    case(
        "scaled_dot_product_attention", {"q": (2, 3, 5, 8), "k": (2, 3, 7, 8), "v": (2, 3, 7, 4)},
        lambda q, k, v: mb.scaled_dot_product_attention(query=q, key=k, value=v), _sdpa_ref, target="iOS18",
    ),
    case(
        "scaled_dot_product_attention", {"q": (1, 2, 5, 8), "k": (1, 2, 5, 8), "v": (1, 2, 5, 4)},
        lambda q, k, v: mb.scaled_dot_product_attention(
            query=q, key=k, value=v, attn_mask=np.tril(np.ones((5, 5), bool))
        ),
        lambda q, k, v: _sdpa_ref(q, k, v, np.where(np.tril(np.ones((5, 5), bool)), 0.0, -np.inf)),
        target="iOS18", id="scaled_dot_product_attention-causal",
    ),
    # ---- shapes and data movement
    case("reshape", X234, lambda x: mb.reshape(x=x, shape=[6, -1]), lambda x: x.reshape(6, -1)),
    case("reshape", X234, lambda x: mb.reshape(x=x, shape=[0, 4, 3]), lambda x: x.reshape(2, 4, 3), id="reshape-zero"),
    case("transpose", X234, lambda x: mb.transpose(x=x, perm=[2, 0, 1]), lambda x: x.transpose(2, 0, 1)),
    case("expand_dims", X234, lambda x: mb.expand_dims(x=x, axes=[0, -1]), lambda x: x[None, ..., None]),
    case("squeeze", {"x": (1, 3, 1, 4)}, lambda x: mb.squeeze(x=x, axes=[2]), lambda x: x[:, :, 0]),
    case("squeeze", {"x": (1, 3, 1, 4)}, lambda x: mb.squeeze(x=x), lambda x: x.reshape(3, 4), id="squeeze-all"),
    case("concat", {"x": (2, 3, 4), "y": (2, 2, 4)}, lambda x, y: mb.concat(values=(x, y), axis=1), lambda x, y: np.concatenate([x, y], 1)),
    case(
        "concat", {"x": (2, 3, 4), "y": (2, 3, 4)}, lambda x, y: mb.concat(values=(x, y), axis=1, interleave=True),
        lambda x, y: np.stack([x, y], 2).reshape(2, 6, 4), id="concat-interleave",
    ),
    case("stack", {"x": (2, 3), "y": (2, 3)}, lambda x, y: mb.stack(values=(x, y), axis=1), lambda x, y: np.stack([x, y], 1)),
    case("split", {"x": (2, 6, 4)}, lambda x: mb.split(x=x, num_splits=3, axis=1), lambda x: tuple(np.split(x, 3, 1))),
    case(
        "split", {"x": (2, 6, 4)}, lambda x: mb.split(x=x, split_sizes=[1, 5], axis=1),
        lambda x: (x[:, :1], x[:, 1:]), id="split-sizes",
    ),
    case(
        "slice_by_index", {"x": (3, 6, 5)}, lambda x: mb.slice_by_index(x=x, begin=[0, 1, 0], end=[2, 6, 5], stride=[1, 2, 2]),
        lambda x: x[0:2, 1:6:2, 0:5:2],
    ),
    case(
        "slice_by_index", {"x": (3, 6, 5)},
        lambda x: mb.slice_by_index(
            x=x, begin=[1, -4, 3], end=[0, -1, 0], begin_mask=[False, False, False], end_mask=[True, False, True],
            squeeze_mask=[False, False, False],
        ),
        lambda x: x[1:, -4:-1, 3:], id="slice_by_index-masks-negative",
    ),
    case(
        "slice_by_index", {"x": (3, 6, 5)},
        lambda x: mb.slice_by_index(x=x, begin=[1, 0, 4], end=[2, 6, 0], stride=[1, 1, -1], squeeze_mask=[True, False, False], begin_mask=[False, True, False]),
        lambda x: x[1, :, 4:0:-1], id="slice_by_index-squeeze-reverse",
    ),
    case("slice_by_size", {"x": (3, 6, 5)}, lambda x: mb.slice_by_size(x=x, begin=[0, 1, 1], size=[2, -1, 3]), lambda x: x[0:2, 1:, 1:4]),
    case(
        "gather", {"x": (3, 6, 5)}, lambda x: mb.gather(x=x, indices=np.array([[2, 0], [-1, 4]], np.int32), axis=1),
        lambda x: x[:, [[2, 0], [5, 4]]],
    ),
    case(
        "gather", {"x": (2, 6, 5)}, lambda x: mb.gather(x=x, indices=np.array([[1, 2], [5, 0]], np.int32), axis=1, batch_dims=1),
        lambda x: np.stack([x[0, [1, 2]], x[1, [5, 0]]]), id="gather-batch_dims",
    ),
    case(
        "gather_along_axis", {"x": (3, 4)},
        lambda x: mb.gather_along_axis(x=x, indices=np.array([[0, 3], [1, 1], [2, 0]], np.int32), axis=1),
        lambda x: np.take_along_axis(x, np.array([[0, 3], [1, 1], [2, 0]]), 1),
    ),
    case(
        "gather_nd", {"x": (3, 4, 2)}, lambda x: mb.gather_nd(x=x, indices=np.array([[0, 1], [2, 3]], np.int32)),
        lambda x: np.stack([x[0, 1], x[2, 3]]),
    ),
    case("tile", X234, lambda x: mb.tile(x=x, reps=[1, 2, 3]), lambda x: np.tile(x, (1, 2, 3))),
    case(
        "pad", {"x": (1, 2, 4, 5)}, lambda x: mb.pad(x=x, pad=[1, 0, 2, 1], constant_val=0.5),
        lambda x: np.pad(x, [(0, 0), (0, 0), (1, 0), (2, 1)], constant_values=0.5),
    ),
    case(
        "pad", {"x": (1, 2, 4, 5)}, lambda x: mb.pad(x=x, pad=[1, 2, 2, 1], mode="reflect"),
        lambda x: np.pad(x, [(0, 0), (0, 0), (1, 2), (2, 1)], mode="reflect"), id="pad-reflect",
    ),
    case(
        "pad", {"x": (1, 2, 4, 5)}, lambda x: mb.pad(x=x, pad=[0, 2, 1, 1], mode="replicate"),
        lambda x: np.pad(x, [(0, 0), (0, 0), (0, 2), (1, 1)], mode="edge"), id="pad-replicate",
    ),
    case(
        "band_part", {"x": (2, 5, 5)}, lambda x: mb.band_part(x=x, lower=1, upper=0),
        lambda x: x * (np.tril(np.ones((5, 5))) - np.tril(np.ones((5, 5)), -2)),
    ),
    case(
        "cumsum", X234, lambda x: mb.cumsum(x=x, axis=1, exclusive=True, reverse=True),
        lambda x: np.flip(np.cumsum(np.flip(x, 1), 1), 1) - x,
    ),
    case("cast", X234, lambda x: _as_f(mb.cast(x=mb.mul(x=x, y=3.0), dtype="int32")), lambda x: np.trunc(3 * x)),
    case(
        "fill", {"x": (2, 3, None)}, lambda x: mb.add(x=x, y=mb.fill(shape=mb.shape(x=x), value=2.0)), lambda x: x + 2,
    ),
    case(
        "range_1d", {"x": (2, 3, None)},
        lambda x: mb.add(x=x, y=_as_f(mb.range_1d(start=0, end=mb.gather(x=mb.shape(x=x), indices=2), step=1))),
        lambda x: x + np.arange(x.shape[-1]),
    ),
    case(
        "topk", {"x": (2, 3, 6)}, lambda x: tuple(mb.topk(x=x, k=2, axis=-1)),
        lambda x: (-np.sort(-x, -1)[..., :2], np.argsort(-x, -1)[..., :2]),
    ),
    case(
        "argsort", {"x": (2, 6)}, lambda x: _as_f(mb.argsort(x=x, axis=-1, ascending=True)), lambda x: _f32(np.argsort(x, -1)),
    ),
    case(
        "depth_to_space", {"x": (1, 8, 2, 3)}, lambda x: mb.depth_to_space(x=x, block_size=2),
        # TensorFlow order: output channel c at block offset (i, j) reads channel (i*2 + j)*2 + c.
        lambda x: x.reshape(1, 2, 2, 2, 2, 3).transpose(0, 3, 4, 1, 5, 2).reshape(1, 2, 4, 6),
    ),
    case(
        "space_to_depth", {"x": (1, 2, 4, 6)}, lambda x: mb.space_to_depth(x=x, block_size=2),
        lambda x: x.reshape(1, 2, 2, 2, 3, 2).transpose(0, 3, 5, 1, 2, 4).reshape(1, 8, 2, 3),
    ),
    case(
        "pixel_shuffle", {"x": (1, 8, 2, 3)}, lambda x: mb.pixel_shuffle(x=x, upscale_factor=2),
        lambda x: _np(F.pixel_shuffle(T(x), 2)),
    ),
    case(
        "scatter", {"x": (3, 5, 2), "u": (3, 2, 2)},
        lambda x, u: mb.scatter(data=x, indices=np.array([4, 1], np.int32), updates=u, axis=1, mode="update"),
        lambda x, u: np.concatenate([x[:, :1], u[:, 1:2], x[:, 2:4], u[:, 0:1]], 1),
    ),
    case(
        "scatter", {"x": (5, 2), "u": (3, 2)},
        lambda x, u: mb.scatter(data=x, indices=np.array([0, 3, 0], np.int32), updates=u, mode="add"),
        lambda x, u: x + np.stack([u[0] + u[2], 0 * u[0], 0 * u[0], u[1], 0 * u[0]]), id="scatter-add-repeated",
    ),
    case(
        "scatter", {"x": (5, 2), "u": (3, 2)},
        lambda x, u: mb.scatter(data=x, indices=np.array([0, 3, 0], np.int32), updates=u, mode="max"),
        lambda x, u: np.stack([np.maximum(np.maximum(x[0], u[0]), u[2]), x[1], x[2], np.maximum(x[3], u[1]), x[4]]),
        id="scatter-max",
    ),
    case(
        "scatter_along_axis", {"x": (2, 4), "u": (2, 2)},
        lambda x, u: mb.scatter_along_axis(data=x, indices=np.array([[3, 0], [1, 2]], np.int32), updates=u, axis=1, mode="update"),
        lambda x, u: np.array([[u[0, 1], x[0, 1], x[0, 2], u[0, 0]], [x[1, 0], u[1, 0], u[1, 1], x[1, 3]]]),
    ),
    case(
        "scatter_nd", {"x": (3, 4, 2), "u": (2, 2)},
        lambda x, u: mb.scatter_nd(data=x, indices=np.array([[0, 1], [2, 3]], np.int32), updates=u, mode="add"),
        lambda x, u: _scatter_nd_ref(x, u),
    ),
    case(
        "slice_update", {"x": (3, 6), "u": (2, 3)},
        lambda x, u: mb.slice_update(x=x, update=u, begin=np.array([1, 0], np.int32), end=np.array([3, 6], np.int32), stride=np.array([1, 2], np.int32)),
        lambda x, u: _slice_update_ref(x, u),
        target="iOS18",
    ),
    case(
        "reverse_sequence", {"x": (3, 4)},
        lambda x: mb.reverse_sequence(x=x, lengths=np.array([1, 2, 4], np.int32), seq_axis=1, batch_axis=0),
        lambda x: np.stack([x[0], np.r_[x[1, 1::-1], x[1, 2:]], x[2, ::-1]]),
    ),
    # ---- resizing
    case(
        "upsample_nearest_neighbor", {"x": (1, 2, 3, 4)},
        lambda x: mb.upsample_nearest_neighbor(x=x, scale_factor_height=2, scale_factor_width=3),
        lambda x: x.repeat(2, 2).repeat(3, 3),
    ),
    case(
        "upsample_nearest_neighbor", {"x": (1, 2, 4, 4)},
        lambda x: mb.upsample_nearest_neighbor(x=x, scale_factor_height=1.5, scale_factor_width=2.5),
        lambda x: x[:, :, np.floor(np.arange(6) / 1.5).astype(int)][:, :, :, np.floor(np.arange(10) / 2.5).astype(int)],
        id="upsample_nearest_neighbor-fractional",
    ),
    case(
        "upsample_bilinear", {"x": (1, 2, 3, 4)},
        lambda x: mb.upsample_bilinear(x=x, scale_factor_height=2.0, scale_factor_width=2.0, align_corners=True),
        lambda x: _np(F.interpolate(T(x), scale_factor=2, mode="bilinear", align_corners=True)), id="upsample_bilinear-align",
    ),
    case(
        "upsample_bilinear", {"x": (1, 2, 3, 4)},
        lambda x: mb.upsample_bilinear(x=x, scale_factor_height=2.0, scale_factor_width=2.0, align_corners=False),
        lambda x: _np(F.interpolate(T(x), scale_factor=2, mode="bilinear", align_corners=False)),
        id="upsample_bilinear-half_pixel",
    ),
    case(
        "upsample_bilinear", {"x": (1, 2, 3, 4)},
        lambda x: mb.upsample_bilinear(x=x, scale_factor_height=2.0, scale_factor_width=3.0, align_corners=False, half_pixel_centers=False),
        lambda x: _bilinear_ref(x, 6, 12, "ASYMMETRIC"), id="upsample_bilinear-asymmetric",
    ),
    *[
        case(
            "resize_bilinear", {"x": (1, 2, 3, 4)},
            lambda x, m=mode: mb.resize_bilinear(x=x, target_size_height=5, target_size_width=7, sampling_mode=m),
            lambda x, m=mode: _bilinear_ref(x, 5, 7, m), id=f"resize_bilinear-{mode}",
        )
        for mode in ("DEFAULT", "STRICT_ALIGN_CORNERS", "ALIGN_CORNERS", "OFFSET_CORNERS", "UNALIGN_CORNERS")
    ],
    case(
        "resize_nearest_neighbor", {"x": (1, 2, 3, 4)},
        lambda x: mb.resize_nearest_neighbor(x=x, target_size_height=6, target_size_width=8),
        lambda x: x.repeat(2, 2).repeat(2, 3),
    ),
    case(
        "resize", {"x": (1, 2, 3, 4)},
        lambda x: mb.resize(x=x, shape=np.array([5, 7], np.int32), resized_dims=np.uint32(2), sampling_mode="UNALIGN_CORNERS"),
        lambda x: _bilinear_ref(x, 5, 7, "UNALIGN_CORNERS"), target="iOS17",
    ),
]


@pytest.mark.parametrize("op_type, shapes, build, ref, target, feeds", CASES)
def test_kernel_matches_reference(op_type, shapes, build, ref, target, feeds, model_dir):
    check_mil(build, shapes, ref, model_dir, target=target, op_type=op_type, feeds=feeds)


# ---- kernels checked directly against the examples in the op documentation


def test_sample_points_follow_documented_grids():
    doc = {
        ("UNALIGN_CORNERS", 5): [0.0, 0.1, 0.5, 0.9, 1.0],
        ("STRICT_ALIGN_CORNERS", 5): [0.0, 0.25, 0.5, 0.75, 1.0],
        ("DEFAULT", 5): [0.0, 0.4, 0.8, 1.0, 1.0],
        ("OFFSET_CORNERS", 5): [0.1, 0.3, 0.5, 0.7, 0.9],
        ("UNALIGN_CORNERS", 6): [0.0, 0.0, 0.33, 0.67, 1.0, 1.0],
        ("DEFAULT", 6): [0.0, 0.33, 0.67, 1.0, 1.0, 1.0],
        ("OFFSET_CORNERS", 6): [0.08, 0.25, 0.42, 0.58, 0.75, 0.92],
    }
    for (mode, out), want in doc.items():
        got = kernels._sample_points(2, out, mode).numpy()
        np.testing.assert_allclose(got, want, atol=0.005, err_msg=mode)


def test_lut_to_dense_ios16_unpacks_lsb_first():
    # Documented example: n_bits = 2, shape (5,): byte 0 holds i3 i2 i1 i0 from MSB to LSB.
    packed = np.array([0b01101100, 0b00000011], np.uint8)  # i0=0, i1=3, i2=2, i3=1, i4=3
    lut = np.array([10.0, 11.0, 12.0, 13.0], np.float16)
    k = kernels.find_kernel("constexpr_lut_to_dense", kernels.OPSETS["iOS16"])
    out = k.fn(indices=packed, lut=lut, shape=np.array([5], np.uint32))
    np.testing.assert_array_equal(out, [10.0, 13.0, 12.0, 11.0, 13.0])


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 5, 6, 7, 8, 12])
def test_unpack_bits_reads_each_field_of_the_bit_stream(nbits):
    """Field i is bits i * nbits ... of the little-endian stream, whatever the count (a part group of 8 at
    the end) and however many bytes the stream has past it, against a bit-by-bit reading."""
    rng = np.random.default_rng(nbits)
    for count in (1, 7, 8, 9, 100, 4099):
        packed = rng.integers(0, 256, -(-count * nbits // 8) + count % 3, dtype=np.uint8)
        stream = [(int(packed[b // 8]) >> (b % 8)) & 1 for b in range(count * nbits)]
        want = [sum(stream[i * nbits + j] << j for j in range(nbits)) for i in range(count)]
        np.testing.assert_array_equal(kernels._unpack_bits(packed, nbits, count), want, err_msg=f"{count} fields")


def test_lut_to_dense_ios18_per_group_and_vector():
    k = kernels.find_kernel("constexpr_lut_to_dense", kernels.OPSETS["iOS18"])
    # Documented case 1: two 2-bit palettes over axis 0 of a [6, 2] tensor.
    indices = np.array([2, 3, 3, 0, 1, 0, 3, 0, 2, 1, 0, 3], np.uint8).reshape(6, 2)
    lut = np.array([1.0, 5.0, 9.0, 13.0, 2.0, 10.0, 18.0, 26.0], np.float16).reshape(2, 1, 4, 1)
    want = [[9, 13], [13, 1], [5, 1], [26, 2], [18, 10], [2, 26]]
    np.testing.assert_array_equal(k.fn(indices=indices, lut=lut), want)
    # Documented case 2: 1-bit vector palettization, vectors of 3 laid along axis 1 and axis 2.
    indices = np.array([[[0, 0], [1, 0]], [[1, 1], [0, 0]]], np.uint8)
    a, b = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]
    lut = np.array([a, b], np.float32).reshape(1, 1, 1, 2, 3)
    axis1 = k.fn(indices=indices, lut=lut, vector_axis=1)
    assert axis1.shape == (2, 6, 2)
    np.testing.assert_array_equal(axis1[0, :, 0], a + b)
    np.testing.assert_array_equal(axis1[1, :, 1], b + a)
    axis2 = k.fn(indices=indices, lut=lut, vector_axis=2)
    assert axis2.shape == (2, 2, 6)
    np.testing.assert_array_equal(axis2[0, 1], b + a)


def test_sparse_kernels_fill_set_bits_in_order():
    k16 = kernels.find_kernel("constexpr_sparse_to_dense", kernels.OPSETS["iOS16"])
    # Documented example: shape (5,), mask bits i2 and i3 set.
    out = k16.fn(nonzero_data=np.array([7.0, 8.0], np.float32), mask=np.array([0b00001100], np.uint8), shape=np.array([5]))
    np.testing.assert_array_equal(out, [0, 0, 7, 8, 0])
    k18 = kernels.find_kernel("constexpr_sparse_blockwise_shift_scale", kernels.OPSETS["iOS18"])
    # Documented example: per-column scale and offset over a 4x4 sparse tensor.
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 0, 0]], np.uint8)
    data = np.array([10, 11, 3, 4, 5, 6, 7, 8, 9], np.int8)
    _, values = k18.fn(data_mask=mask, nonzero_data=data, scale=np.array([[0.1, 0.2, 0.3, 0.4]], np.float32), offset=np.array([[1, 2, 3, 4]], np.int8))
    np.testing.assert_allclose(values, [0.9, 1.8, 0.2, 0.4, 0.6, 0.9, 1.2, 0.7, 1.4], rtol=1e-6)


def test_registry_picks_the_form_of_the_model_opset():
    assert kernels.find_kernel("constexpr_lut_to_dense", kernels.OPSETS["iOS17"]).fn is kernels.constexpr_lut_to_dense
    assert kernels.find_kernel("constexpr_lut_to_dense", kernels.OPSETS["iOS18"]).fn is kernels.constexpr_lut_to_dense_ios18
    assert kernels.find_kernel("scaled_dot_product_attention", kernels.OPSETS["iOS17"]) is None
    assert kernels.find_kernel("no_such_op", kernels.OPSETS["iOS18"]) is None


def test_registry_refuses_a_second_kernel_for_one_op_and_opset():
    before = {op: list(forms) for op, forms in kernels.KERNELS.items()}
    try:
        with pytest.raises(ValueError, match="registered twice"):
            kernels.kernel("relu")(lambda x: x)  # relu has an iOS15 kernel already
        kernels.kernel("relu", since="iOS18")(lambda x: x)  # another opset: a form of its own
        assert kernels.find_kernel("relu", kernels.OPSETS["iOS17"]).fn is before["relu"][0].fn
        kernels.kernel("relu")(before["relu"][0].fn)  # the same function again (a reload): allowed
    finally:
        kernels.KERNELS.clear()
        kernels.KERNELS.update(before)
    assert kernels.find_kernel("relu", kernels.OPSETS["iOS18"]).fn is before["relu"][0].fn


# ---- decompression kernels against coremltools' own numpy definitions of the ops
#
# Each case: (op_type, opset, inputs) fed to our raw kernel and to the op class's
# ``decompress`` in coremltools (iOS16 constexpr_ops.py, iOS18 compression.py).


def _ct_op(op_type: str, opset: str):
    from coremltools.converters.mil.mil.ops.defs import iOS16, iOS18

    return getattr(iOS18 if opset == "iOS18" else iOS16, op_type)


def _mask(shape, density=0.5, seed=11):
    return (np.random.default_rng(seed).random(shape) < density).astype(np.uint8)


def _decompress_cases():
    r = np.random.default_rng(12)
    mask = _mask((8, 6, 2, 2))
    grouped_lut = r.standard_normal((4, 1, 1, 1, 16, 1)).astype(np.float16)  # 4 groups of 2 output channels, 4-bit
    indices = r.integers(0, 16, (8, 6, 2, 2)).astype(np.uint8)
    int8_lut = r.integers(-127, 128, (1, 1, 1, 1, 16, 1)).astype(np.int8)
    return [
        pytest.param("constexpr_lut_to_dense", "iOS18", dict(indices=indices, lut=grouped_lut, vector_axis=None), id="lut_to_dense-grouped"),
        pytest.param(
            "constexpr_lut_to_dense", "iOS18",
            dict(indices=r.integers(0, 4, (4, 3, 2)).astype(np.uint8), lut=r.standard_normal((1, 1, 1, 4, 2)).astype(np.float16), vector_axis=1),
            id="lut_to_dense-vector",
        ),
        pytest.param("constexpr_sparse_to_dense", "iOS18", dict(nonzero_data=r.standard_normal(int(mask.sum())).astype(np.float16), mask=mask), id="sparse_to_dense"),
        pytest.param(
            "constexpr_lut_to_sparse", "iOS18",
            dict(indices_mask=mask, indices_nonzero_data=indices[mask != 0], lut=grouped_lut, vector_axis=None),
            id="lut_to_sparse-grouped",
        ),
        pytest.param(
            "constexpr_blockwise_shift_scale", "iOS18",
            dict(data=int8_lut, scale=np.array(0.02, np.float16).reshape((1,) * 6), offset=None), id="shift_scale-int8-palette",
        ),
        pytest.param(
            "constexpr_blockwise_shift_scale", "iOS18",
            dict(
                data=r.integers(-8, 8, (8, 6)).astype(np.int8), scale=r.random((4, 3)).astype(np.float16),
                offset=r.integers(-2, 2, (4, 3)).astype(np.int8),
            ),
            id="shift_scale-blockwise-offset",
        ),
        pytest.param(
            "constexpr_sparse_blockwise_shift_scale", "iOS18",
            dict(data_mask=mask, nonzero_data=r.integers(-127, 128, int(mask.sum())).astype(np.int8), scale=r.random((8, 1, 1, 1)).astype(np.float16), offset=None),
            id="sparse_shift_scale",
        ),
        pytest.param(
            "constexpr_lut_to_dense", "iOS16",
            dict(lut=r.standard_normal(64).astype(np.float16), indices=np.packbits(r.integers(0, 2, 6 * 40), bitorder="little"), shape=np.array([8, 5], np.uint32)),
            id="lut_to_dense-ios16-6bit",
        ),
        pytest.param(
            "constexpr_sparse_to_dense", "iOS16",
            dict(nonzero_data=r.standard_normal(int(mask.sum())).astype(np.float16), mask=np.packbits(mask.reshape(-1), bitorder="little"), shape=np.array(mask.shape, np.uint32)),
            id="sparse_to_dense-ios16",
        ),
        pytest.param(
            "constexpr_affine_dequantize", "iOS16",
            dict(quantized_data=r.integers(0, 256, (6, 5)).astype(np.uint8), zero_point=r.integers(100, 150, 6).astype(np.uint8), scale=r.random(6).astype(np.float16), axis=0),
            id="affine_dequantize",
        ),
    ]


@pytest.mark.parametrize("op_type, opset, inputs", _decompress_cases())
def test_decompression_kernel_matches_coremltools_decompress(op_type, opset, inputs):
    ours = kernels.find_kernel(op_type, kernels.OPSETS[opset]).fn(**{k: v for k, v in inputs.items() if v is not None})
    theirs = _ct_op(op_type, opset).decompress(**inputs)
    ours, theirs = (ours if isinstance(ours, tuple) else (ours,)), (theirs if isinstance(theirs, tuple) else (theirs,))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert np.shape(a) == np.shape(b)
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-3, atol=1e-6)


def test_chained_int8_palette_of_a_sparse_weight_matches_coremltools():
    """shift_scale (int8 palette) -> lut_to_sparse -> sparse_to_dense, as joint compression writes it."""
    r = np.random.default_rng(13)
    mask = _mask((6, 8))
    lut8, scale = r.integers(-127, 128, (1, 1, 16, 1)).astype(np.int8), np.array(0.01, np.float16).reshape(1, 1, 1, 1)
    keys = r.integers(0, 16, int(mask.sum())).astype(np.uint8)
    ops = {name: kernels.find_kernel(name, kernels.OPSETS["iOS18"]).fn for name in ("constexpr_blockwise_shift_scale", "constexpr_lut_to_sparse", "constexpr_sparse_to_dense")}
    lut = ops["constexpr_blockwise_shift_scale"](data=lut8, scale=scale)
    m, nz = ops["constexpr_lut_to_sparse"](indices_mask=mask, indices_nonzero_data=keys, lut=lut)
    ours = ops["constexpr_sparse_to_dense"](nonzero_data=nz, mask=m)
    ct_lut = _ct_op("constexpr_blockwise_shift_scale", "iOS18").decompress(lut8, scale, None)
    ct_m, ct_nz = _ct_op("constexpr_lut_to_sparse", "iOS18").decompress(mask, keys, ct_lut, None)
    theirs = _ct_op("constexpr_sparse_to_dense", "iOS18").decompress(ct_nz, ct_m)
    np.testing.assert_allclose(ours, theirs.astype(np.float32), rtol=1e-3)
    assert np.count_nonzero(theirs) > 0


@pytest.mark.parametrize("dtype, zero_point, axis", [("int8", None, None), ("uint8", 128, None), ("int8", "vector", 1)])
def test_quantize_and_dequantize_match_coremltools(dtype, zero_point, axis):
    """Activation quantization (W8A8): rounding, zero point, clipping and per-axis scale as coremltools computes them."""
    from coremltools.converters.mil.mil import types
    from coremltools.optimize import _utils as optimize_utils

    r = np.random.default_rng(14)
    x = (r.standard_normal((2, 4, 3)) * 3).astype(np.float32)
    scale = np.float32(0.03) if axis is None else r.uniform(0.01, 0.05, 4).astype(np.float32)
    np_dtype = np.int8 if dtype == "int8" else np.uint8
    zp = None if zero_point is None else (np.array(zero_point, np_dtype) if zero_point != "vector" else r.integers(-3, 3, 4).astype(np_dtype))
    quant = kernels.find_kernel("quantize", kernels.OPSETS["iOS17"]).fn
    dequant = kernels.find_kernel("dequantize", kernels.OPSETS["iOS17"]).fn
    kw = {"axis": axis} if axis is not None else {}
    zp_t = {} if zp is None else {"zero_point": torch.from_numpy(zp.astype(np.int64))}
    ours_q = quant(input=torch.from_numpy(x), scale=torch.from_numpy(np.asarray(scale)), output_dtype=dtype, **zp_t, **kw).numpy()
    shape = [1, 4, 1] if axis is not None else []
    b_scale = np.asarray(scale).reshape(shape) if axis is not None else scale
    b_zp = np.zeros((), np_dtype) if zp is None else (zp.reshape(shape) if axis is not None else zp)
    theirs_q = optimize_utils.quantize_by_scale_and_zp(x, b_scale, b_zp, getattr(types, dtype))
    np.testing.assert_array_equal(ours_q, theirs_q.astype(np.int64))
    assert ours_q.max() == np.iinfo(np_dtype).max  # the case exercises clipping
    ours_d = dequant(input=torch.from_numpy(ours_q), scale=torch.from_numpy(np.asarray(scale)), **zp_t, **kw).numpy()
    theirs_d = optimize_utils.dequantize_by_scale_and_zp(theirs_q, np.asarray(scale), None if zp is None else zp, axis if axis is not None else 0)
    np.testing.assert_allclose(ours_d, theirs_d, rtol=1e-6, atol=1e-7)
