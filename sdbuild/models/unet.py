"""The Stable Diffusion denoiser, written for Core ML.

Covers the diffusers ``UNet2DConditionModel`` configurations that Stable
Diffusion checkpoints use: SD 1.x, SD 2.x (linear projections, per-block head
counts, upcast attention), SDXL base and refiner (``transformer_layers_per_block``,
``text_time`` added conditioning, down blocks without attention) and the
9-channel inpainting unet. The convolutional parts are diffusers' own
arithmetic; the transformer blocks run channels-first on (B, C, 1, S)
sequences with 1×1 convolutions for linear layers and layer norm over the
channel axis, and their attention is one of ``attention.ATTENTION_IMPLEMENTATIONS``.

Parameter names follow diffusers', so ``Unet.from_diffusers`` loads a
checkpoint's unet key for key (``layers.load_weights`` checks every key).

The ControlNet seam: ``forward`` takes ``additional_residuals``, one tensor per
down-block skip (``skip_shapes`` lists them) and the mid-block residual last,
added where diffusers adds ``down_block_additional_residuals`` and
``mid_block_additional_residual``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sdbuild.errors import RecipeError
from sdbuild.models.attention import attention, check_implementation
from sdbuild.models.layers import (
    ChannelLayerNorm,
    Downsample,
    GroupNorm,
    ResnetBlock,
    Upsample,
    conv1x1,
    load_weights,
)

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


# --- embeddings ----------------------------------------------------------------


class SinusoidalEmbedding(nn.Module):
    """diffusers' ``Timesteps``: values (...) → (..., dim) sin/cos features.

    The frequencies are a constant buffer, so the graph is one multiply, sin and cos.
    """

    def __init__(self, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: int = 10000):
        super().__init__()
        if dim % 2:
            raise RecipeError(f"unet: odd sinusoidal embedding width {dim} is not supported")
        half = dim // 2
        exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - freq_shift)
        self.register_buffer("frequencies", torch.exp(exponent), persistent=False)
        self.flip_sin_to_cos = flip_sin_to_cos

    def forward(self, values):
        angles = values.unsqueeze(-1) * self.frequencies
        sin, cos = torch.sin(angles), torch.cos(angles)
        return torch.cat([cos, sin] if self.flip_sin_to_cos else [sin, cos], dim=-1)


class TimestepEmbedding(nn.Module):
    """Two linear layers with SiLU between: (B, in) → (B, out)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


# --- transformer ---------------------------------------------------------------


class Attention(nn.Module):
    """Self- or cross-attention on (B, C, 1, S): h (B, dim, 1, S), context (B, context_dim, 1, Sk) → (B, dim, 1, S)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None, implementation: str):
        super().__init__()
        self.heads, self.implementation = heads, implementation
        self.to_q = conv1x1(dim, dim, bias=False)
        self.to_k = conv1x1(context_dim or dim, dim, bias=False)
        self.to_v = conv1x1(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([conv1x1(dim, dim)])

    def forward(self, h, context=None):
        context = h if context is None else context
        out = attention(self.to_q(h), self.to_k(context), self.to_v(context), self.heads, self.implementation)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """(B, dim, 1, S) → (B, inner, 1, S): one projection to twice the width, half gating the other through GELU."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = conv1x1(dim, inner * 2)

    def forward(self, h):
        h, gate = self.proj(h).chunk(2, dim=1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU then a projection back: (B, dim, 1, S) → (B, dim, 1, S). Index 1 is diffusers' dropout slot."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), conv1x1(dim * mult, dim)])

    def forward(self, h):
        return self.net[2](self.net[0](h))


class TransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock: self-attention, cross-attention, feed-forward, each pre-normed and residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, implementation: str):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim)
        self.attn1 = Attention(dim, heads, None, implementation)
        self.norm2 = ChannelLayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, implementation)
        self.norm3 = ChannelLayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, h, context):
        h = self.attn1(self.norm1(h)) + h
        h = self.attn2(self.norm2(h), context) + h
        return self.ff(self.norm3(h)) + h


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel on image features: x (B, C, H, W), context (B, Cc, 1, S) → (B, C, H, W).

    Its projections are 1×1 convolutions whether the checkpoint stores them as
    convolutions (SD 1.x) or linear layers (SD 2.x, SDXL): over the channel axis
    the two are the same map.
    """

    def __init__(self, channels: int, heads: int, context_dim: int, layers: int, groups: int, implementation: str):
        super().__init__()
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = conv1x1(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, context_dim, implementation) for _ in range(layers)
        )
        self.proj_out = conv1x1(channels, channels)

    def forward(self, x, context):
        h = self.proj_in(self.norm(x)).flatten(2).unsqueeze(2)  # (B, C, 1, H*W)
        for block in self.transformer_blocks:
            h = block(h, context)
        return self.proj_out(h).reshape_as(x) + x


# --- blocks --------------------------------------------------------------------


class DownBlock(nn.Module):
    """Resnets (each followed by a transformer in cross-attention blocks), then an optional stride-2 downsample.

    Returns the block output and the skips it leaves for the up path, one per resnet and one after downsampling.
    """

    def __init__(self, in_ch, out_ch, temb_ch, layers, transformer_layers, heads, context_dim, downsample, cfg, impl):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, temb_ch, cfg["norm_num_groups"], cfg["norm_eps"])
            for i in range(layers)
        )
        self.attentions = nn.ModuleList(
            SpatialTransformer(out_ch, heads, context_dim, n, cfg["norm_num_groups"], impl) for n in transformer_layers
        )
        self.downsamplers = nn.ModuleList([Downsample(out_ch)] if downsample else [])

    def forward(self, h, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if len(self.attentions):
                h = self.attentions[i](h, context)
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """resnet, then (transformer, resnet) per transformer: (B, C, h, w) → (B, C, h, w)."""

    def __init__(self, channels, temb_ch, transformer_layers, heads, context_dim, cfg, impl):
        super().__init__()
        groups, eps = cfg["norm_num_groups"], cfg["norm_eps"]
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, temb_ch, groups, eps) for _ in range(2))
        self.attentions = nn.ModuleList([SpatialTransformer(channels, heads, context_dim, transformer_layers, groups, impl)])

    def forward(self, h, temb, context):
        h = self.resnets[0](h, temb)
        for transformer, resnet in zip(self.attentions, self.resnets[1:]):
            h = resnet(transformer(h, context), temb)
        return h


class UpBlock(nn.Module):
    """Resnets over the output concatenated with the matching skip (popped from the end), transformers, upsample."""

    def __init__(self, in_ch, prev_ch, out_ch, temb_ch, layers, transformer_layers, heads, context_dim, upsample, cfg, impl):
        super().__init__()
        groups, eps = cfg["norm_num_groups"], cfg["norm_eps"]
        self.resnets = nn.ModuleList()
        for i in range(layers):
            skip_ch = in_ch if i == layers - 1 else out_ch
            self.resnets.append(ResnetBlock((prev_ch if i == 0 else out_ch) + skip_ch, out_ch, temb_ch, groups, eps))
        self.attentions = nn.ModuleList(
            SpatialTransformer(out_ch, heads, context_dim, n, groups, impl) for n in transformer_layers
        )
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if upsample else [])

    def forward(self, h, skips, temb, context):
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb)
            if len(self.attentions):
                h = self.attentions[i](h, context)
        for up in self.upsamplers:
            h = up(h)
        return h


# --- the unet ------------------------------------------------------------------


def _per_block(value, blocks: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * blocks


def _per_layer(value, layers: int) -> list[int]:
    """A block's transformer depth: one int for all its resnets, or one per resnet."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * layers


def block_settings(cfg: dict) -> tuple[list, list, list]:
    """Per down block: attention heads, transformer depth (an int or one per resnet), resnets."""
    blocks = len(cfg["block_out_channels"])
    # diffusers reads attention_head_dim as the head count when num_attention_heads is unset (its own naming quirk).
    heads = _per_block(cfg.get("num_attention_heads") or cfg["attention_head_dim"], blocks)
    depth = _per_block(cfg.get("transformer_layers_per_block", 1), blocks)
    layers = _per_block(cfg["layers_per_block"], blocks)
    return heads, depth, layers


def encoder_blocks(cfg: dict, impl: str) -> tuple[nn.ModuleList, MidBlock]:
    """The down blocks and the mid block that ``cfg`` describes.

    Shared by the unet and the ControlNet, which is a trained copy of the
    unet's encoder: both name these ``down_blocks`` and ``mid_block``.
    """
    channels = list(cfg["block_out_channels"])
    blocks = len(channels)
    heads, depth, layers = block_settings(cfg)
    context_dim = cfg["cross_attention_dim"]
    temb_ch = channels[0] * 4
    down_blocks = nn.ModuleList()
    out_ch = channels[0]
    for i, kind in enumerate(cfg["down_block_types"]):
        in_ch, out_ch = out_ch, channels[i]
        cross = kind == "CrossAttnDownBlock2D"
        down_blocks.append(
            DownBlock(
                in_ch, out_ch, temb_ch, layers[i], _per_layer(depth[i], layers[i]) if cross else [],
                heads[i], context_dim, i < blocks - 1, cfg, impl,
            )
        )  # fmt: skip
    mid_depth = depth[-1] if isinstance(depth[-1], int) else depth[-1][0]
    mid_block = MidBlock(channels[-1], temb_ch, mid_depth, heads[-1], context_dim, cfg, impl)
    return down_blocks, mid_block


def skip_shapes(cfg: dict, down_blocks: nn.ModuleList, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
    """The skips ``down_blocks`` leave for a (height, width) latent, conv_in's first and the mid block's last.

    These are the ControlNet residual shapes, in order: a ControlNet emits one
    per skip and one for the mid block, and the controlled unet adds them.
    """
    shapes = [(batch, cfg["block_out_channels"][0], height, width)]
    for block in down_blocks:
        ch = block.resnets[-1].conv2.out_channels
        shapes += [(batch, ch, height, width)] * len(block.resnets)
        if len(block.downsamplers):
            height, width = (height + 1) // 2, (width + 1) // 2
            shapes.append((batch, ch, height, width))
    shapes.append((batch, cfg["block_out_channels"][-1], height, width))
    return shapes


def check_unet_config(cfg: dict) -> None:
    """Refuse configurations this module would not reproduce, naming the key."""
    expected = {
        "class_embed_type": None,
        "encoder_hid_dim_type": None,
        "time_embedding_type": "positional",
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "act_fn": "silu",
        "resnet_time_scale_shift": "default",
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False,
        "dual_cross_attention": False,
        "only_cross_attention": False,
        "mid_block_only_cross_attention": None,
        "time_cond_proj_dim": None,
        "timestep_post_act": None,
        "time_embedding_act_fn": None,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "attention_type": "default",
        "class_embeddings_concat": False,
        "time_embedding_dim": None,
        "cross_attention_norm": None,
        "mid_block_scale_factor": 1,
    }
    for key, value in expected.items():
        if key in cfg and cfg[key] != value and not (key == "mid_block_only_cross_attention" and not cfg[key]):
            raise RecipeError(f"unet config: {key}={cfg[key]!r} is not supported (expected {value!r})")
    if cfg.get("addition_embed_type") not in (None, "text_time"):
        raise RecipeError(f"unet config: addition_embed_type={cfg['addition_embed_type']!r} is not supported")
    for kind, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        for block in cfg[kind]:
            if block not in allowed:
                raise RecipeError(f"unet config: {kind} entry {block!r} is not supported (choose from {allowed})")
    cross = cfg.get("cross_attention_dim")
    if isinstance(cross, (list, tuple)):
        raise RecipeError("unet config: a cross_attention_dim per block is not supported")


class Unet(nn.Module):
    """The denoiser.

    sample (B, in_channels, H, W), timestep (B,), encoder_hidden_states (B, C, 1, 77),
    and for ``text_time`` unets time_ids (B, n) and text_embeds (B, T), in that
    order as Apple's converter declares them → noise_pred (B, out_channels, H, W).
    """

    def __init__(self, config: dict, implementation: str = "ORIGINAL"):
        super().__init__()
        cfg = dict(config)
        cfg.setdefault("norm_num_groups", 32)
        cfg.setdefault("norm_eps", 1e-5)
        check_unet_config(cfg)
        impl = check_implementation(implementation)
        self.config = cfg
        channels = list(cfg["block_out_channels"])
        blocks = len(channels)
        heads, depth, layers = block_settings(cfg)
        context_dim = cfg["cross_attention_dim"]
        temb_ch = channels[0] * 4

        self.conv_in = nn.Conv2d(cfg["in_channels"], channels[0], 3, padding=1)
        self.time_proj = SinusoidalEmbedding(channels[0], cfg["flip_sin_to_cos"], cfg["freq_shift"])
        self.time_embedding = TimestepEmbedding(channels[0], temb_ch)
        self.text_time = cfg.get("addition_embed_type") == "text_time"
        if self.text_time:
            self.add_time_proj = SinusoidalEmbedding(cfg["addition_time_embed_dim"], cfg["flip_sin_to_cos"], cfg["freq_shift"])
            self.add_embedding = TimestepEmbedding(cfg["projection_class_embeddings_input_dim"], temb_ch)

        self.down_blocks, self.mid_block = encoder_blocks(cfg, impl)

        up_depth = cfg.get("reverse_transformer_layers_per_block") or list(reversed(depth))
        up_layers = list(reversed(layers))
        up_heads = list(reversed(heads))
        reversed_channels = list(reversed(channels))
        self.up_blocks = nn.ModuleList()
        out_ch = reversed_channels[0]
        for i, kind in enumerate(cfg["up_block_types"]):
            prev_ch, out_ch = out_ch, reversed_channels[i]
            in_ch = reversed_channels[min(i + 1, blocks - 1)]
            n = up_layers[i] + 1
            cross = kind == "CrossAttnUpBlock2D"
            self.up_blocks.append(
                UpBlock(
                    in_ch, prev_ch, out_ch, temb_ch, n, _per_layer(up_depth[i], n) if cross else [],
                    up_heads[i], context_dim, i < blocks - 1, cfg, impl,
                )
            )  # fmt: skip

        self.conv_norm_out = GroupNorm(cfg["norm_num_groups"], channels[0], eps=cfg["norm_eps"])
        self.conv_out = nn.Conv2d(channels[0], cfg["out_channels"], 3, padding=1)

    @classmethod
    def from_diffusers(cls, unet, implementation: str = "ORIGINAL") -> "Unet":
        """Build from a diffusers ``UNet2DConditionModel`` and load its weights (float32, eval mode)."""
        module = cls(dict(unet.config), implementation)
        return load_weights(module, unet.state_dict(), "unet")

    def skip_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
        """Shapes of the ControlNet residuals for a (height, width) latent: each down-block skip, then the mid block."""
        return skip_shapes(self.config, self.down_blocks, batch, height, width)

    def forward(self, sample, timestep, encoder_hidden_states, time_ids=None, text_embeds=None, additional_residuals=None):
        """See the class docstring; ``additional_residuals`` (a ControlNet's outputs, in ``skip_shapes`` order) may be None."""
        temb = self.time_embedding(self.time_proj(timestep))
        if self.text_time:
            time_features = self.add_time_proj(time_ids).flatten(1)  # (B, n * addition_time_embed_dim)
            temb = temb + self.add_embedding(torch.cat([text_embeds, time_features], dim=1))

        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, encoder_hidden_states)
            skips += block_skips
        if additional_residuals is not None:
            if len(additional_residuals) != len(skips) + 1:
                raise ValueError(f"unet: expected {len(skips) + 1} additional residuals, got {len(additional_residuals)}")
            skips = [s + r for s, r in zip(skips, additional_residuals[:-1])]

        h = self.mid_block(h, temb, encoder_hidden_states)
        if additional_residuals is not None:
            h = h + additional_residuals[-1]

        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            h = block(h, block_skips, temb, encoder_hidden_states)

        return self.conv_out(F.silu(self.conv_norm_out(h)))
