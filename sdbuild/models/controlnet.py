"""ControlNet and the controlled unet, written for Core ML.

A ControlNet (diffusers' ``ControlNetModel``, SD 1.x and 2.x) is a trained
copy of the unet's encoder: the same time embedding, ``conv_in``, down blocks
and mid block, plus a small convolutional embedding of the control image
(an edge map, depth map, pose…) added after ``conv_in``, and one 1×1 "zero
convolution" per encoder skip and one for the mid block. Its outputs are the
residuals the controlled unet adds to its own skips and mid-block output.

The encoder blocks are the unet's (``unet.encoder_blocks``), so everything the
unet module does for Core ML (channels-first transformers, the three attention
implementations, rank-4 group norm) holds here too. Parameter names follow
diffusers', so ``ControlNet.from_diffusers`` loads a checkpoint key for key.

SDXL ControlNets are refused (``NotBuiltYet``): Apple's Swift
``StableDiffusionXLPipeline`` takes no ControlNet, and the bundle contract
defines no SDXL ControlNet inputs, so a converted one would have no consumer.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from sdbuild.errors import NotBuiltYet, RecipeError
from sdbuild.models.attention import check_implementation
from sdbuild.models.layers import conv1x1, load_weights
from sdbuild.models.unet import (
    DOWN_BLOCKS,
    SinusoidalEmbedding,
    TimestepEmbedding,
    Unet,
    encoder_blocks,
    skip_shapes,
)

# The control image is at pixel resolution and the residuals at latent resolution (1/8).
CONTROL_DOWNSCALE = 8
CHANNEL_ORDERS = ("rgb", "bgr")
# Keys that decide the residual shapes and the shared inputs: a ControlNet fits a unet when these agree.
FIT_KEYS = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim")
SDXL_REFUSAL = "SDXL ControlNets are not supported yet (Apple's SDXL pipeline takes no ControlNet)"


def is_sdxl_controlnet(cfg: dict) -> bool:
    """SDXL ControlNets condition on pooled text and time ids, as the SDXL unet does."""
    return cfg.get("addition_embed_type") == "text_time"


def check_controlnet_config(cfg: dict) -> None:
    """Refuse configurations ``ControlNet`` would not reproduce, naming the key.

    SDXL ControlNets raise ``NotBuiltYet``; anything else unsupported raises ``RecipeError``.
    """
    if is_sdxl_controlnet(cfg):
        raise NotBuiltYet(f"controlnet: {SDXL_REFUSAL}")
    expected = {
        "class_embed_type": None,
        "num_class_embeds": None,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "addition_embed_type": None,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "act_fn": "silu",
        "resnet_time_scale_shift": "default",
        "only_cross_attention": False,
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        # Pooled conditions go with diffusers' guess mode (no ControlNet on the unconditional half),
        # which Apple's pipelines do not run; converting one would give other images than diffusers.
        "global_pool_conditions": False,
    }
    for key, value in expected.items():
        if key in cfg and cfg[key] != value:
            raise RecipeError(f"controlnet config: {key}={cfg[key]!r} is not supported (expected {value!r})")
    order = cfg.get("controlnet_conditioning_channel_order", "rgb")
    if order not in CHANNEL_ORDERS:
        raise RecipeError(f"controlnet config: controlnet_conditioning_channel_order={order!r} is not rgb or bgr")
    for block in cfg["down_block_types"]:
        if block not in DOWN_BLOCKS:
            raise RecipeError(
                f"controlnet config: down_block_types entry {block!r} is not supported (choose from {DOWN_BLOCKS})"
            )
    if isinstance(cfg.get("cross_attention_dim"), (list, tuple)):
        raise RecipeError("controlnet config: a cross_attention_dim per block is not supported")
    embedding = cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
    if 2 ** (len(embedding) - 1) != CONTROL_DOWNSCALE:
        raise RecipeError(
            f"controlnet config: conditioning_embedding_out_channels {list(embedding)} downsamples the control image"
            f" {2 ** (len(embedding) - 1)}×, not {CONTROL_DOWNSCALE}× to the latent size"
        )


def check_fits_unet(controlnet_cfg: dict, unet_cfg: dict, name: str = "controlnet") -> None:
    """Raise ``RecipeError`` unless the ControlNet's residuals fit the unet's skips.

    Reads configs only (no weights), so a recipe can be checked before
    anything is downloaded in full: e.g. an SD 1.5 ControlNet (768-wide text
    context) against an SD 2.1 unet (1024) fails on ``cross_attention_dim``.
    """
    def plain(value):  # JSON configs hold lists, in-memory ones tuples
        return list(value) if isinstance(value, (list, tuple)) else value

    for key in FIT_KEYS:
        ours, theirs = plain(controlnet_cfg.get(key)), plain(unet_cfg.get(key))
        if ours != theirs:
            raise RecipeError(f"{name}: {key}={ours!r} does not fit the unet's {key}={theirs!r}")


class ConditioningEmbedding(nn.Module):
    """The control image to latent-size features: (B, 3, 8h, 8w) → (B, block_out_channels[0], h, w).

    A 3×3 convolution, then per level a 3×3 convolution and a stride-2 one,
    SiLU after each, and a last 3×3 convolution (zero-initialized in training).
    """

    def __init__(self, in_channels: int, channels: list[int], out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for ch_in, ch_out in zip(channels, channels[1:]):
            self.blocks.append(nn.Conv2d(ch_in, ch_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(ch_in, ch_out, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, image):
        h = F.silu(self.conv_in(image))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


class ControlNet(nn.Module):
    """A ControlNet for SD 1.x/2.x unets.

    sample (B, in_channels, h, w), timestep (B,), encoder_hidden_states (B, C, 1, 77),
    controlnet_cond (B, 3, 8h, 8w) → the residuals, a tuple in ``residual_shapes``
    order: one per down-block skip (conv_in's first), the mid block's last.
    Unscaled: a pipeline multiplies them by its conditioning scale.
    """

    def __init__(self, config: dict, implementation: str = "ORIGINAL"):
        super().__init__()
        cfg = dict(config)
        cfg.setdefault("norm_num_groups", 32)
        cfg.setdefault("norm_eps", 1e-5)
        check_controlnet_config(cfg)
        impl = check_implementation(implementation)
        self.config = cfg
        channels = list(cfg["block_out_channels"])
        temb_ch = channels[0] * 4

        self.conv_in = nn.Conv2d(cfg["in_channels"], channels[0], 3, padding=1)
        self.time_proj = SinusoidalEmbedding(channels[0], cfg["flip_sin_to_cos"], cfg["freq_shift"])
        self.time_embedding = TimestepEmbedding(channels[0], temb_ch)
        self.controlnet_cond_embedding = ConditioningEmbedding(
            cfg.get("conditioning_channels", 3),
            list(cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)),
            channels[0],
        )
        self.down_blocks, self.mid_block = encoder_blocks(cfg, impl)
        # One zero convolution per skip, in skip order: conv_in's, then each block's resnets and downsampler.
        zero_convs = [channels[0]]
        for block in self.down_blocks:
            ch = block.resnets[-1].conv2.out_channels
            zero_convs += [ch] * (len(block.resnets) + len(block.downsamplers))
        self.controlnet_down_blocks = nn.ModuleList(conv1x1(ch, ch) for ch in zero_convs)
        self.controlnet_mid_block = conv1x1(channels[-1], channels[-1])

    @classmethod
    def from_diffusers(cls, controlnet, implementation: str = "ORIGINAL") -> "ControlNet":
        """Build from a diffusers ``ControlNetModel`` and load its weights (float32, eval mode).

        A ``bgr`` ControlNet gets its first convolution's input channels
        reversed, so the module always takes RGB and the graph has no flip.
        """
        module = load_weights(cls(dict(controlnet.config), implementation), controlnet.state_dict(), "controlnet")
        if module.config.get("controlnet_conditioning_channel_order", "rgb") == "bgr":
            conv = module.controlnet_cond_embedding.conv_in
            conv.weight = nn.Parameter(conv.weight.detach().flip(1))
        return module

    def residual_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
        """Output shapes for a (height, width) latent: the unet's ``skip_shapes`` when the ControlNet fits it."""
        return skip_shapes(self.config, self.down_blocks, batch, height, width)

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond):
        """See the class docstring."""
        temb = self.time_embedding(self.time_proj(timestep))
        h = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, encoder_hidden_states)
            skips += block_skips
        h = self.mid_block(h, temb, encoder_hidden_states)
        residuals = [conv(skip) for conv, skip in zip(self.controlnet_down_blocks, skips)]
        return (*residuals, self.controlnet_mid_block(h))


class ControlledUnet(Unet):
    """The unet that takes ControlNet residuals as inputs (SD 1.x/2.x).

    sample (B, in_channels, H, W), timestep (B,), encoder_hidden_states (B, C, 1, 77),
    then the residuals as separate tensors in ``skip_shapes`` order → noise_pred.
    A subclass rather than a wrapper, so its parameter names are the unet's.
    """

    def __init__(self, config: dict, implementation: str = "ORIGINAL"):
        super().__init__(config, implementation)
        if self.text_time:
            raise NotBuiltYet(f"controlled unet: {SDXL_REFUSAL}")

    def forward(self, sample, timestep, encoder_hidden_states, *additional_residuals):
        """See the class docstring."""
        return super().forward(sample, timestep, encoder_hidden_states, additional_residuals=list(additional_residuals))


def residual_names(count: int) -> list[str]:
    """``additional_residual_0`` … ``additional_residual_{count-1}``, as the bundle contract names them."""
    return [f"additional_residual_{i}" for i in range(count)]
