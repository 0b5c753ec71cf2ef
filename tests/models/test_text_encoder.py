"""sdbuild's CLIP text encoder against transformers' CLIPTextModel(WithProjection)."""

from __future__ import annotations

import pytest
import torch

from sdbuild.errors import WeightMismatchError
from sdbuild.metrics import psnr
from sdbuild.models.layers import load_weights
from sdbuild.models.text_encoder import TextEncoder

from .families import ATTENTIONS, clip_text, token_ids

MIN_PSNR_FP32 = 60

# name: (model, pad id, penultimate?) — the families' shapes of use.
ENCODERS = {
    # SD 1.x: OpenAI CLIP, quick GELU, the legacy eos id 2 (pool at the largest id), padded with end tokens.
    "sd1": lambda: (clip_text(11, eos=2), None, False),
    # SD 2.x: OpenCLIP ViT-H as a CLIPTextModel with GELU, padded with id 0 ("!").
    "sd2": lambda: (clip_text(12, act="gelu", layers=4, eos=2), 0, False),
    # SDXL: both encoders give the penultimate layer; the second pools through its projection.
    "sdxl-1": lambda: (clip_text(13), None, True),
    "sdxl-2": lambda: (clip_text(14, act="gelu", projection_dim=24), 0, True),
}


def reference(model, ids, penultimate):
    with torch.no_grad():
        out = model(ids.long(), output_hidden_states=True)
    hidden = out.hidden_states[-2] if penultimate else out.last_hidden_state
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return hidden, pooled


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("family", sorted(ENCODERS))
def test_matches_transformers(family, attention):
    model, pad, penultimate = ENCODERS[family]()
    ids = token_ids(model.config.vocab_size, seed=3, length=20, pad=pad)
    module = TextEncoder.from_transformers(model, attention, penultimate=penultimate)
    with torch.no_grad():
        hidden, pooled = module(ids)
    ref_hidden, ref_pooled = reference(model, ids, penultimate)
    assert hidden.shape == ref_hidden.shape == (1, 77, model.config.hidden_size)
    assert pooled.shape == ref_pooled.shape
    assert psnr(ref_hidden.numpy(), hidden.numpy()) >= MIN_PSNR_FP32
    assert psnr(ref_pooled.numpy(), pooled.numpy()) >= MIN_PSNR_FP32


@pytest.mark.parametrize("family", ["sd1", "sdxl-2"])
def test_pooled_follows_the_end_token(family):
    # A prompt of another length pools at another position; the mask keeps padding out of earlier positions.
    model, pad, penultimate = ENCODERS[family]()
    module = TextEncoder.from_transformers(model, "SPLIT_EINSUM", penultimate=penultimate)
    short = token_ids(model.config.vocab_size, seed=3, length=5, pad=pad)
    long = token_ids(model.config.vocab_size, seed=3, length=40, pad=pad)
    with torch.no_grad():
        (h_short, p_short), (h_long, p_long) = module(short), module(long)
    assert psnr(reference(model, long, penultimate)[1].numpy(), p_long.numpy()) >= MIN_PSNR_FP32
    assert psnr(p_short.numpy(), p_long.numpy()) < 40
    # Causal: the first four positions hold the same tokens, so the same states.
    assert torch.allclose(h_short[:, :4], h_long[:, :4], atol=1e-5)


def test_missing_projection_is_named():
    model, _, _ = ENCODERS["sdxl-2"]()
    weights = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    del weights["text_projection.weight"]
    module = TextEncoder(model.config.to_dict(), projection=True)
    with pytest.raises(WeightMismatchError, match="missing: text_projection.weight"):
        load_weights(module, weights, "text_encoder_2")
