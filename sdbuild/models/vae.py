"""The Stable Diffusion VAE (diffusers ``AutoencoderKL``), decoder and encoder, written for Core ML.

``VaeDecoder`` maps a latent already divided by the scaling factor, z (1, 4,
H, W), to an image (1, 3, 8H, 8W) in about [-1, 1], with ``post_quant_conv``
inside. ``VaeEncoder`` maps an image x (1, 3, 8H, 8W) to the latent
distribution's mean and log-variance (1, 8, H, W), unscaled, with
``quant_conv`` inside. The single-head attention of the mid block runs on
(1, C, 1, H·W) with 1×1 convolutions and one of the three attention
implementations. SDXL's VAE overflows in float16: ``needs_float32`` reads
its config's ``force_upcast``.

Parameter names follow diffusers'; each half takes only its own keys
(``decoder.*`` and ``post_quant_conv.*``, or ``encoder.*`` and ``quant_conv.*``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from sdbuild.errors import RecipeError
from sdbuild.models.attention import attention, check_implementation
from sdbuild.models.layers import Downsample, GroupNorm, ResnetBlock, Upsample, conv1x1, load_weights

EPS = 1e-6


def needs_float32(config: dict) -> bool:
    """True when the VAE must be converted in float32 (SDXL's, whose config sets ``force_upcast``)."""
    return bool(config.get("force_upcast", False))


def check_vae_config(cfg: dict) -> None:
    for kind, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        for block in cfg.get(kind, ()):
            if block != allowed:
                raise RecipeError(f"vae config: {kind} entry {block!r} is not supported (expected {allowed!r})")
    if cfg.get("act_fn", "silu") != "silu":
        raise RecipeError(f"vae config: act_fn={cfg['act_fn']!r} is not supported")


class MidAttention(nn.Module):
    """Single-head self-attention over all positions, residual: (1, C, H, W) → (1, C, H, W)."""

    def __init__(self, channels: int, groups: int, implementation: str):
        super().__init__()
        self.implementation = implementation
        self.group_norm = GroupNorm(groups, channels, eps=EPS)
        self.to_q = conv1x1(channels, channels)
        self.to_k = conv1x1(channels, channels)
        self.to_v = conv1x1(channels, channels)
        self.to_out = nn.ModuleList([conv1x1(channels, channels)])

    def forward(self, x):
        h = self.group_norm(x).flatten(2).unsqueeze(2)  # (1, C, 1, H*W)
        out = attention(self.to_q(h), self.to_k(h), self.to_v(h), 1, self.implementation)
        return self.to_out[0](out).reshape_as(x) + x


class MidBlock(nn.Module):
    """resnet, attention, resnet (or two resnets when the config has no mid-block attention)."""

    def __init__(self, channels: int, groups: int, with_attention: bool, implementation: str):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, None, groups, EPS) for _ in range(2))
        self.attentions = nn.ModuleList([MidAttention(channels, groups, implementation)] if with_attention else [])

    def forward(self, h):
        h = self.resnets[0](h)
        for attn in self.attentions:
            h = attn(h)
        return self.resnets[1](h)


class EncoderBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, None, groups, EPS) for i in range(layers))
        # The VAE pads right and bottom only before its stride-2 convolution.
        self.downsamplers = nn.ModuleList([Downsample(out_ch, padding=0)] if downsample else [])

    def forward(self, h):
        for module in [*self.resnets, *self.downsamplers]:
            h = module(h)
        return h


class DecoderBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, None, groups, EPS) for i in range(layers))
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if upsample else [])

    def forward(self, h):
        for module in [*self.resnets, *self.upsamplers]:
            h = module(h)
        return h


class Decoder(nn.Module):
    def __init__(self, cfg: dict, implementation: str):
        super().__init__()
        channels = list(reversed(cfg["block_out_channels"]))
        groups, layers = cfg["norm_num_groups"], cfg["layers_per_block"] + 1
        self.conv_in = nn.Conv2d(cfg["latent_channels"], channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups, cfg.get("mid_block_add_attention", True), implementation)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(channels[max(i - 1, 0)], channels[i], layers, groups, i < len(channels) - 1)
            for i in range(len(channels))
        )
        self.conv_norm_out = GroupNorm(groups, channels[-1], eps=EPS)
        self.conv_out = nn.Conv2d(channels[-1], cfg["out_channels"], 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: dict, implementation: str):
        super().__init__()
        channels = list(cfg["block_out_channels"])
        groups, layers = cfg["norm_num_groups"], cfg["layers_per_block"]
        self.conv_in = nn.Conv2d(cfg["in_channels"], channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(channels[max(i - 1, 0)], channels[i], layers, groups, i < len(channels) - 1)
            for i in range(len(channels))
        )
        self.mid_block = MidBlock(channels[-1], groups, cfg.get("mid_block_add_attention", True), implementation)
        self.conv_norm_out = GroupNorm(groups, channels[-1], eps=EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * cfg["latent_channels"], 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(h))))


def _half_weights(vae, half: str, quant: str) -> dict:
    """The state-dict keys of one half of an AutoencoderKL: ``half.*`` and its quant conv."""
    weights = {}
    for key, value in vae.state_dict().items():
        if key.startswith(half + ".") or key.startswith(quant + "."):
            weights[key] = value
    return weights


class VaeDecoder(nn.Module):
    """z (1, latent, H, W), already divided by the scaling factor → image (1, 3, 8H, 8W)."""

    def __init__(self, config: dict, implementation: str = "ORIGINAL"):
        super().__init__()
        cfg = dict(config)
        check_vae_config(cfg)
        self.decoder = Decoder(cfg, check_implementation(implementation))
        lc = cfg["latent_channels"]
        self.post_quant_conv = conv1x1(lc, lc) if cfg.get("use_post_quant_conv", True) else None

    @classmethod
    def from_diffusers(cls, vae, implementation: str = "ORIGINAL") -> "VaeDecoder":
        """Build from a diffusers ``AutoencoderKL`` and load its decoder weights (float32, eval mode)."""
        module = cls(dict(vae.config), implementation)
        return load_weights(module, _half_weights(vae, "decoder", "post_quant_conv"), "vae decoder")

    def forward(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


class VaeEncoder(nn.Module):
    """x (1, 3, 8H, 8W) in [-1, 1] → latent (1, 2·latent, H, W): mean then log-variance, unscaled."""

    def __init__(self, config: dict, implementation: str = "ORIGINAL"):
        super().__init__()
        cfg = dict(config)
        check_vae_config(cfg)
        if not cfg.get("double_z", True):
            raise RecipeError("vae config: double_z=False is not supported")
        self.encoder = Encoder(cfg, check_implementation(implementation))
        lc2 = 2 * cfg["latent_channels"]
        self.quant_conv = conv1x1(lc2, lc2) if cfg.get("use_quant_conv", True) else None

    @classmethod
    def from_diffusers(cls, vae, implementation: str = "ORIGINAL") -> "VaeEncoder":
        """Build from a diffusers ``AutoencoderKL`` and load its encoder weights (float32, eval mode)."""
        module = cls(dict(vae.config), implementation)
        return load_weights(module, _half_weights(vae, "encoder", "quant_conv"), "vae encoder")

    def forward(self, x):
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return h
