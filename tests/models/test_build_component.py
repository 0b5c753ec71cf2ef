"""build_component: the contract's names, shapes and precisions, on synthetic checkpoint folders."""

from __future__ import annotations

import json

import pytest
import torch

from sdbuild.errors import RecipeError
from sdbuild.metrics import psnr
from sdbuild.models import BuildOptions, build_component, sample_inputs
from sdbuild.models.text_encoder import TextEncoder
from sdbuild.models.unet import Unet
from sdbuild.models.vae import VaeDecoder, VaeEncoder

from .families import clip_text, unet_family

OPTIONS = BuildOptions(attention="SPLIT_EINSUM", height=64, width=128)


def run(model, seed=0):
    values = sample_inputs(model.inputs, seed)
    with torch.no_grad():
        out = model.module(*(torch.from_numpy(values[s.name]) for s in model.inputs))
    return values, out if isinstance(out, tuple) else (out,)


def signature(model):
    return [(s.name, s.shape, s.kind) for s in model.inputs], model.outputs, model.precision


def test_sd_components(tiny_sd_checkpoint):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_checkpoint, safety_checker=None)
    vocab = pipe.text_encoder.config.vocab_size

    te = build_component("text_encoder", tiny_sd_checkpoint, OPTIONS)
    assert isinstance(te.module, TextEncoder)
    assert signature(te) == ([("input_ids", (1, 77), "tokens")], ["last_hidden_state", "pooled_outputs"], "float16")
    assert te.inputs[0].high == vocab
    values, (hidden, pooled) = run(te)
    ref = pipe.text_encoder(torch.from_numpy(values["input_ids"]).long())
    assert psnr(ref.last_hidden_state.detach().numpy(), hidden.numpy()) >= 60
    assert psnr(ref.pooler_output.detach().numpy(), pooled.numpy()) >= 60

    unet = build_component("unet", tiny_sd_checkpoint, OPTIONS)
    assert isinstance(unet.module, Unet)
    assert signature(unet) == (
        [("sample", (2, 4, 8, 16), "normal"), ("timestep", (2,), "timestep"), ("encoder_hidden_states", (2, 32, 1, 77), "normal")],
        ["noise_pred"],
        "float16",
    )
    assert unet.info["skip_shapes"][0] == (2, 32, 8, 16)
    values, (noise,) = run(unet)
    with torch.no_grad():
        ref = pipe.unet(
            torch.from_numpy(values["sample"]),
            torch.from_numpy(values["timestep"]),
            torch.from_numpy(values["encoder_hidden_states"]).squeeze(2).transpose(1, 2),
        ).sample
    assert psnr(ref.numpy(), noise.numpy()) >= 60

    dec = build_component("vae_decoder", tiny_sd_checkpoint, OPTIONS)
    assert isinstance(dec.module, VaeDecoder)
    assert signature(dec) == ([("z", (1, 4, 8, 16), "normal")], ["image"], "float16")
    values, (image,) = run(dec)
    with torch.no_grad():
        ref = pipe.vae.decode(torch.from_numpy(values["z"])).sample
    assert psnr(ref.numpy(), image.numpy()) >= 60

    enc = build_component("vae_encoder", tiny_sd_checkpoint, OPTIONS)
    assert isinstance(enc.module, VaeEncoder)
    assert signature(enc) == ([("x", (1, 3, 64, 128), "image")], ["latent"], "float16")
    values, (latent,) = run(enc)
    assert latent.shape == (1, 8, 8, 16)


def test_sdxl_components(tiny_sdxl_checkpoint):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_checkpoint)
    for name, encoder in (("text_encoder", pipe.text_encoder), ("text_encoder_2", pipe.text_encoder_2)):
        te = build_component(name, tiny_sdxl_checkpoint, OPTIONS)
        assert te.outputs == ["hidden_embeds", "pooled_outputs"]
        values, (hidden, pooled) = run(te)
        ref = encoder(torch.from_numpy(values["input_ids"]).long(), output_hidden_states=True)
        ref_pooled = ref.text_embeds if name == "text_encoder_2" else ref.pooler_output
        assert psnr(ref.hidden_states[-2].detach().numpy(), hidden.numpy()) >= 60
        assert psnr(ref_pooled.detach().numpy(), pooled.numpy()) >= 60

    one = BuildOptions(attention="ORIGINAL", height=64, width=64, unet_batch_one=True)
    unet = build_component("unet", tiny_sdxl_checkpoint, one)
    assert [(s.name, s.shape) for s in unet.inputs] == [
        ("sample", (1, 4, 8, 8)),
        ("timestep", (1,)),
        ("encoder_hidden_states", (1, 64, 1, 77)),
        ("time_ids", (1, 6)),  # Apple's converter's order
        ("text_embeds", (1, 32)),
    ]
    values, (noise,) = run(unet)
    t = {k: torch.from_numpy(v) for k, v in values.items()}
    with torch.no_grad():
        ref = pipe.unet(
            t["sample"], t["timestep"], t["encoder_hidden_states"].squeeze(2).transpose(1, 2),
            added_cond_kwargs={"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]},
        ).sample  # fmt: skip
    assert psnr(ref.numpy(), noise.numpy()) >= 60

    # SDXL's VAE overflows in float16: converted in float32.
    assert build_component("vae_decoder", tiny_sdxl_checkpoint, OPTIONS).precision == "float32"


def test_refiner_takes_five_time_ids(tmp_path):
    unet, _ = unet_family("refiner")
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    clip_text(5, projection_dim=24).save_pretrained(tmp_path / "text_encoder_2")
    index = {"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    model = build_component("unet", tmp_path, BuildOptions(height=64, width=64))
    assert [(s.name, s.shape) for s in model.inputs][3:] == [("time_ids", (2, 5)), ("text_embeds", (2, 24))]
    run(model)


def test_refusals(tiny_sd_checkpoint, tmp_path):
    with pytest.raises(RecipeError, match="unknown component"):
        build_component("unet_chunk", tiny_sd_checkpoint, OPTIONS)
    with pytest.raises(RecipeError, match="attention implementation"):
        build_component("unet", tiny_sd_checkpoint, BuildOptions(attention="FAST"))
    with pytest.raises(RecipeError, match="divisible by 16"):
        build_component("unet", tiny_sd_checkpoint, BuildOptions(height=72, width=64))
    # The safety checker is built now; a pipeline that ships none (every SDXL one) is told so in one line.
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(RecipeError, match="ships no safety checker"):
        build_component("safety_checker", tmp_path, OPTIONS)
