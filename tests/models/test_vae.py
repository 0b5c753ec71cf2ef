"""sdbuild's VAE decoder and encoder against diffusers' AutoencoderKL."""

from __future__ import annotations

import pytest
import torch

from sdbuild.errors import WeightMismatchError
from sdbuild.metrics import psnr
from sdbuild.models.vae import VaeDecoder, VaeEncoder, needs_float32

from .families import ATTENTIONS

MIN_PSNR_FP32 = 60


def tiny_vae(seed=21, **config):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    base = dict(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
    )
    return AutoencoderKL(**{**base, **config}).eval()


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_decoder_matches_diffusers(attention):
    vae = tiny_vae()
    # 24×24 latent: the mid-block attention sees 576 positions, so SPLIT_EINSUM_V2 chunks them.
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = vae.decode(z).sample
        ours = VaeDecoder.from_diffusers(vae, attention)(z)
    assert ours.shape == ref.shape == (1, 3, 96, 96)
    assert psnr(ref.numpy(), ours.numpy()) >= MIN_PSNR_FP32


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_encoder_matches_diffusers(attention):
    vae = tiny_vae(layers_per_block=2)
    x = torch.rand(1, 3, 40, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        ours = VaeEncoder.from_diffusers(vae, attention)(x)
    assert ours.shape == (1, 8, 10, 8)
    assert psnr(dist.mean.numpy(), ours[:, :4].numpy()) >= MIN_PSNR_FP32
    assert psnr(dist.logvar.numpy(), ours[:, 4:].numpy()) >= MIN_PSNR_FP32


def test_without_quant_convs_or_mid_attention():
    vae = tiny_vae(use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert psnr(vae.decode(z).sample.numpy(), VaeDecoder.from_diffusers(vae)(z).numpy()) >= MIN_PSNR_FP32


def test_decoder_takes_decoder_weights_only():
    vae = tiny_vae()
    decoder = VaeDecoder.from_diffusers(vae)
    assert not any(k.startswith(("encoder.", "quant_conv.")) for k in decoder.state_dict())
    broken = tiny_vae(use_post_quant_conv=False)
    with pytest.raises(WeightMismatchError, match="missing: post_quant_conv"):
        from sdbuild.models.layers import load_weights

        load_weights(VaeDecoder(dict(vae.config)), broken.state_dict(), "vae decoder")


def test_sdxl_vae_needs_float32():
    assert needs_float32({"force_upcast": True})
    assert not needs_float32({"force_upcast": False})
    assert not needs_float32({})
