"""Building blocks shared by the unet, VAE and text encoder modules, and weight loading.

Modules here name their parameters as diffusers and transformers name them,
so a checkpoint's state dict loads key for key; a linear layer of the
checkpoint becomes a 1×1 convolution here, and ``load_weights`` reshapes its
(out, in) weight to (out, in, 1, 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdbuild.errors import WeightMismatchError


def conv1x1(in_channels: int, out_channels: int, bias: bool = True) -> nn.Conv2d:
    """A linear layer over the channel axis of a (B, C, H, W) or (B, C, 1, S) tensor."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=bias)


class ChannelLayerNorm(nn.Module):
    """Layer norm over the channel axis of (B, C, H, W) or (B, C, 1, S).

    Written out in elementary ops: coremltools fuses the pattern into one
    ``layer_norm`` over axis 1, which the Neural Engine runs without transposes.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        centered = x - x.mean(dim=1, keepdim=True)
        variance = (centered * centered).mean(dim=1, keepdim=True)
        normed = centered * torch.rsqrt(variance + self.eps)
        return normed * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class GroupNorm(nn.Module):
    """torch's GroupNorm on (B, C, H, W), computed on a rank-4 (B, groups, C/groups, H·W) view.

    coremltools converts ``nn.GroupNorm`` through a rank-5 reshape, and the
    Neural Engine wants no tensor above rank 4. Same parameter names as
    ``nn.GroupNorm``.
    """

    def __init__(self, groups: int, channels: int, eps: float = 1e-5):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        grouped = x.flatten(2).unflatten(1, (self.groups, -1))  # (B, G, C/G, H*W)
        centered = grouped - grouped.mean(dim=(2, 3), keepdim=True)
        variance = (centered * centered).mean(dim=(2, 3), keepdim=True)
        normed = (centered * torch.rsqrt(variance + self.eps)).reshape_as(x)
        return normed * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D with the default time-embedding norm.

    x (B, in, H, W), temb (B, temb_channels) or None → (B, out, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = conv1x1(in_channels, out_channels) if in_channels != out_channels else None

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample(nn.Module):
    """Stride-2 3×3 convolution. ``padding=0`` pads right and bottom by one, as the VAE encoder does."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def load_weights(module: nn.Module, state_dict: dict, source: str) -> nn.Module:
    """Copy ``state_dict`` (a checkpoint module's) into ``module``, every key exactly once.

    A key the checkpoint has and the module lacks, one the module needs and the
    checkpoint lacks, or a shape that does not fit, raises WeightMismatchError
    naming the keys: a silently random or silently dropped layer would convert
    and run and give wrong images. (out, in) linear weights go into (out, in,
    1, 1) convolutions. Returns ``module`` in eval mode, sharing the
    checkpoint tensors' storage where dtypes agree.
    """
    ours = module.state_dict()
    missing = sorted(set(ours) - set(state_dict))
    unused = sorted(set(state_dict) - set(ours))
    misshapen = []
    for key in sorted(set(ours) & set(state_dict)):
        theirs = state_dict[key]
        target = ours[key].shape
        if theirs.shape != target and not (theirs.dim() == 2 and target == (*theirs.shape, 1, 1)):
            misshapen.append(f"{key} {tuple(theirs.shape)} vs {tuple(target)}")
    if missing or unused or misshapen:
        parts = []
        for label, keys in (("missing", missing), ("unused", unused), ("wrong shape", misshapen)):
            if keys:
                shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
                parts.append(f"{label}: {shown}")
        raise WeightMismatchError(f"{source}: checkpoint weights do not fit the module: " + "; ".join(parts))
    # Assign rather than copy: the module shares the checkpoint's storage, so a
    # full-size unet is not held twice in memory while it is traced.
    weights = {key: state_dict[key].reshape(tensor.shape).to(tensor.dtype) for key, tensor in ours.items()}
    module.load_state_dict(weights, strict=True, assign=True)
    return module.eval()
