"""sdbuild's unet against diffusers' UNet2DConditionModel on the same weights and inputs."""

from __future__ import annotations

import pytest
import torch

from sdbuild.errors import RecipeError, WeightMismatchError
from sdbuild.metrics import psnr
from sdbuild.models.layers import load_weights
from sdbuild.models.unet import Unet

from .families import ATTENTIONS, UNET_FAMILIES, diffusers_unet_output, unet_family, unet_inputs

MIN_PSNR_FP32 = 60


def run_ours(module, inputs, **extra):
    with torch.no_grad():
        return module(*inputs.values(), **extra)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("family", sorted(UNET_FAMILIES))
def test_matches_diffusers(family, attention):
    unet, text_dim = unet_family(family)
    inputs = unet_inputs(unet, text_dim)
    ours = run_ours(Unet.from_diffusers(unet, attention), inputs)
    ref = diffusers_unet_output(unet, inputs)
    assert ours.shape == ref.shape == (2, 4, 24, 24)
    assert psnr(ref.numpy(), ours.numpy()) >= MIN_PSNR_FP32


def test_batch_one():
    unet, text_dim = unet_family("sdxl")
    inputs = unet_inputs(unet, text_dim, batch=1, height=16, width=8)
    ours = run_ours(Unet.from_diffusers(unet, "SPLIT_EINSUM"), inputs)
    assert ours.shape == (1, 4, 16, 8)
    assert psnr(diffusers_unet_output(unet, inputs).numpy(), ours.numpy()) >= MIN_PSNR_FP32


def test_conditioning_reaches_the_output():
    # Guards the comparison itself: different text or time ids must change the prediction.
    unet, text_dim = unet_family("refiner")
    module = Unet.from_diffusers(unet)
    inputs = unet_inputs(unet, text_dim)
    base = run_ours(module, inputs)
    for name in ("encoder_hidden_states", "text_embeds", "time_ids"):
        changed = dict(inputs, **{name: inputs[name] + 1.0})
        assert psnr(base.numpy(), run_ours(module, changed).numpy()) < 50, name


def test_controlnet_residuals_match_diffusers():
    unet, text_dim = unet_family("sd2")
    module = Unet.from_diffusers(unet, "SPLIT_EINSUM")
    inputs = unet_inputs(unet, text_dim, height=16, width=16)
    shapes = module.skip_shapes(2, 16, 16)
    g = torch.Generator().manual_seed(7)
    residuals = [torch.randn(s, generator=g) for s in shapes]
    ours = run_ours(module, inputs, additional_residuals=residuals)
    ref = diffusers_unet_output(
        unet, inputs, down_block_additional_residuals=tuple(residuals[:-1]), mid_block_additional_residual=residuals[-1]
    )
    assert psnr(ref.numpy(), ours.numpy()) >= MIN_PSNR_FP32
    assert psnr(ref.numpy(), run_ours(module, inputs).numpy()) < 40  # the residuals did something
    with pytest.raises(ValueError, match="additional residuals"):
        run_ours(module, inputs, additional_residuals=residuals[:-1])


def test_skip_shapes_are_diffusers_skips():
    unet, text_dim = unet_family("refiner")
    module = Unet.from_diffusers(unet)
    seen = []
    for block in unet.down_blocks:
        block.register_forward_hook(lambda mod, args, out: seen.extend(t.shape for t in out[1]))
    hook = unet.mid_block.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    diffusers_unet_output(unet, unet_inputs(unet, text_dim, height=16, width=8))
    hook.remove()
    for block in unet.down_blocks:
        block._forward_hooks.clear()
    conv_in = (2, unet.config.block_out_channels[0], 16, 8)
    assert [tuple(s) for s in [conv_in, *seen]] == module.skip_shapes(2, 16, 8)


def test_missing_and_unused_weights_are_named():
    unet, _ = unet_family("sd1")
    weights = dict(unet.state_dict())
    dropped = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    del weights[dropped]
    weights["down_blocks.0.attentions.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightMismatchError) as err:
        load_weights(Unet(dict(unet.config)), weights, "unet")
    assert dropped in str(err.value) and "extra.weight" in str(err.value)


def test_wrong_shape_is_named():
    unet, _ = unet_family("sd1")
    weights = dict(unet.state_dict())
    weights["conv_in.weight"] = weights["conv_in.weight"][:, :2]
    with pytest.raises(WeightMismatchError, match="conv_in.weight"):
        load_weights(Unet(dict(unet.config)), weights, "unet")


def test_unsupported_config_is_refused():
    unet, _ = unet_family("sd1")
    with pytest.raises(RecipeError, match="class_embed_type"):
        Unet({**unet.config, "class_embed_type": "timestep"})
