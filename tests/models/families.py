"""Tiny diffusers/transformers modules of every family sdbuild converts, with fixed seeds, and test helpers.

The synthetic checkpoints (tests/conftest.py) cover SD 1.x and SDXL base as
folders; the families below are built in memory for the module tests:
SD 2.x-like (linear projections, per-block heads, upcast attention), the
9-channel inpainting unet and an SDXL-refiner-like unet (text_time with five
time ids, attention only in the middle blocks, two transformer layers).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

ATTENTIONS = ("ORIGINAL", "SPLIT_EINSUM", "SPLIT_EINSUM_V2")
TOKENS = 77


def _seeded(seed, build):
    torch.manual_seed(seed)
    return build().eval()


def _unet(seed, **config):
    from diffusers import UNet2DConditionModel

    base = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8)
    return _seeded(seed, lambda: UNet2DConditionModel(**{**base, **config}))


# Each entry: a diffusers unet and the width of its text_embeds (None: no text_time conditioning).
UNET_FAMILIES = {
    "sd1": lambda: (
        _unet(
            1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        ),
        None,
    ),
    "sd2": lambda: (
        _unet(
            2,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=48,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            upcast_attention=True,
        ),
        None,
    ),
    "inpaint": lambda: (
        _unet(
            3,
            in_channels=9,
            layers_per_block=2,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        ),
        None,
    ),
    "sdxl": lambda: (
        _unet(
            4,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=64,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
        ),
        32,
    ),
    "refiner": lambda: (
        _unet(
            5,
            block_out_channels=(16, 32, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=2,
            cross_attention_dim=24,
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24 + 5 * 8,
        ),
        24,
    ),
}


@lru_cache(maxsize=None)
def unet_family(name: str):
    """(diffusers unet, text_embeds width or None) of the family ``name``, built once per run."""
    return UNET_FAMILIES[name]()


def unet_inputs(unet, text_dim, batch=2, height=24, width=24, seed=0) -> dict[str, torch.Tensor]:
    """Seeded inputs in the contract's layout; the 24×24 latent makes a 576-long sequence, so V2 chunks."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    inputs = {
        "sample": torch.randn(batch, cfg.in_channels, height, width, generator=g),
        "timestep": torch.tensor([981.0, 17.0][:batch]),
        "encoder_hidden_states": torch.randn(batch, cfg.cross_attention_dim, 1, TOKENS, generator=g),
    }
    if text_dim:
        n_ids = (cfg.projection_class_embeddings_input_dim - text_dim) // cfg.addition_time_embed_dim
        # The module's order (Apple's): time_ids, then text_embeds.
        inputs["time_ids"] = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0][:n_ids]] * batch)
        inputs["text_embeds"] = torch.randn(batch, text_dim, generator=g)
    return inputs


def diffusers_unet_output(unet, inputs: dict, **extra) -> torch.Tensor:
    context = inputs["encoder_hidden_states"].squeeze(2).transpose(1, 2)
    added = None
    if "text_embeds" in inputs:
        added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    with torch.no_grad():
        return unet(inputs["sample"], inputs["timestep"], context, added_cond_kwargs=added, return_dict=False, **extra)[0]


def clip_text(seed, vocab=1000, hidden=32, layers=3, act="quick_gelu", projection_dim=None, eos=None):
    """A CLIP text model; ``eos=2`` reproduces the legacy configs that pool at the largest id."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=TOKENS,
        hidden_act=act,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1 if eos is None else eos,
        pad_token_id=vocab - 1,
        projection_dim=projection_dim or hidden,
    )
    cls = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return _seeded(seed, lambda: cls(config))


def token_ids(vocab, seed=0, length=12, pad=None) -> torch.Tensor:
    """(1, 77) float32 ids as a tokenizer lays them out: start, words, end, then padding (end by default)."""
    rng = np.random.default_rng(seed)
    ids = np.full((1, TOKENS), vocab - 1 if pad is None else pad)
    ids[0, 0] = vocab - 2
    ids[0, 1 : length - 1] = rng.integers(0, vocab - 2, size=length - 2)
    ids[0, length - 1] = vocab - 1
    return torch.from_numpy(ids.astype(np.float32))


def convert(module, inputs: dict, outputs: list[str], path: Path, precision: str = "float16"):
    """torch.jit.trace then ct.convert as the convert stage does; saves ``path`` and returns the MLModel.

    As in the stage, the program is checked once per pass pipeline, not after every pass
    (``sdbuild.mil.validation``: the same program, half the time)."""
    import coremltools as ct

    from sdbuild.mil.validation import validate_once_per_pipeline

    args = [torch.as_tensor(v) for v in inputs.values()]
    with torch.no_grad():
        traced = torch.jit.trace(module, args, strict=False, check_trace=False)
    with validate_once_per_pipeline():
        mlmodel = ct.convert(
            traced,
            # float32 inputs, as the contract says: left unset, a float16 program gets float16 inputs,
            # and token ids above 2048 would be rounded before the graph could cast them to integers.
            inputs=[ct.TensorType(name=k, shape=tuple(v.shape), dtype=np.float32) for k, v in inputs.items()],
            outputs=[ct.TensorType(name=n) for n in outputs],
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.macOS14,
            compute_precision=ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32,
            skip_model_load=True,
        )
    mlmodel.save(str(path))
    return mlmodel


def program_values(mlmodel):
    """(op type, value name, shape) of every value the ML program computes, nested blocks included."""
    found = []

    def visit(block):
        for op in block.operations:
            for value in op.outputs:
                found.append((op.op_type, value.name, tuple(value.shape)))
            for inner in op.blocks:
                visit(inner)

    visit(mlmodel._mil_program.functions["main"])
    return found
