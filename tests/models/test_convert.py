"""Converted packages: no value above rank 4 in SPLIT_EINSUM programs, and float16 runs of the
ML program (sdbuild's reference executor) against float32 diffusers/transformers at ≥ 40 dB."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdbuild.metrics import psnr
from sdbuild.models import BuildOptions, build_component, sample_inputs
from sdbuild.models.text_encoder import TextEncoder
from sdbuild.models.unet import Unet

from .families import clip_text, convert, diffusers_unet_output, program_values, token_ids, unet_family, unet_inputs

MIN_PSNR_FP16 = 40


def execute(path, inputs: dict) -> dict[str, np.ndarray]:
    from sdbuild.mil.executor import load_program

    return load_program(path).run({k: np.asarray(v) for k, v in inputs.items()}, precision="fp16")


def over_rank_four(mlmodel):
    return [v for v in program_values(mlmodel) if len(v[2]) > 4]


def test_split_einsum_sdxl_unet(tiny_sdxl_checkpoint, tmp_path):
    from diffusers import UNet2DConditionModel

    model = build_component("unet", tiny_sdxl_checkpoint, BuildOptions(attention="SPLIT_EINSUM", height=64, width=64))
    values = sample_inputs(model.inputs, seed=1)
    mlmodel = convert(model.module, values, model.outputs, tmp_path / "unet.mlpackage")
    assert over_rank_four(mlmodel) == []
    assert {"einsum", "layer_norm"} <= {op for op, _, _ in program_values(mlmodel)}

    reference = UNet2DConditionModel.from_pretrained(tiny_sdxl_checkpoint / "unet").eval()
    ref = diffusers_unet_output(reference, {k: torch.from_numpy(v) for k, v in values.items()})
    out = execute(tmp_path / "unet.mlpackage", values)["noise_pred"]
    assert psnr(ref.numpy(), out) >= MIN_PSNR_FP16


@pytest.mark.parametrize("family,attention", [("sd2", "SPLIT_EINSUM_V2"), ("inpaint", "ORIGINAL")])
def test_unet_package(family, attention, tmp_path):
    unet, text_dim = unet_family(family)
    # 24×24 makes a 576-long sequence, so the V2 program holds query chunks; ORIGINAL needs no such size.
    size = 24 if attention == "SPLIT_EINSUM_V2" else 16
    inputs = unet_inputs(unet, text_dim, height=size, width=size)
    path = tmp_path / "unet.mlpackage"
    mlmodel = convert(Unet.from_diffusers(unet, attention), inputs, ["noise_pred"], path)
    if attention != "ORIGINAL":
        assert over_rank_four(mlmodel) == []
    out = execute(path, inputs)["noise_pred"]
    assert psnr(diffusers_unet_output(unet, inputs).numpy(), out) >= MIN_PSNR_FP16


def test_text_encoder_package_keeps_large_ids_exact(tmp_path):
    from coremltools.converters.mil.mil import types

    # Ids above 2048 are not all representable in float16: the float32 input must reach int32 uncast.
    model = clip_text(31, vocab=5000, act="gelu", projection_dim=16)
    ids = token_ids(5000, seed=2, length=30, pad=0)
    assert (ids > 2048).sum() > 10
    path = tmp_path / "te.mlpackage"
    module = TextEncoder.from_transformers(model, "SPLIT_EINSUM", penultimate=True)
    mlmodel = convert(module, {"input_ids": ids.numpy()}, ["hidden_embeds", "pooled_outputs"], path)
    first_ops = mlmodel._mil_program.functions["main"].inputs["input_ids"].child_ops
    assert {op.op_type for op in first_ops} == {"cast"}
    # int32, or int16 where coremltools narrows gather indices into a table under 32768 rows.
    assert {types.builtin_to_string(op.outputs[0].dtype) for op in first_ops} <= {"int32", "int16"}
    assert over_rank_four(mlmodel) == []

    out = execute(path, {"input_ids": ids.numpy()})
    with torch.no_grad():
        ref = model(ids.long(), output_hidden_states=True)
    assert psnr(ref.hidden_states[-2].numpy(), out["hidden_embeds"]) >= MIN_PSNR_FP16
    assert psnr(ref.text_embeds.numpy(), out["pooled_outputs"]) >= MIN_PSNR_FP16


@pytest.mark.parametrize("component", ["vae_decoder", "vae_encoder"])
def test_vae_package(component, tiny_sd_checkpoint, tmp_path):
    from diffusers import AutoencoderKL

    model = build_component(component, tiny_sd_checkpoint, BuildOptions(attention="SPLIT_EINSUM", height=64, width=64))
    values = sample_inputs(model.inputs, seed=3)
    path = tmp_path / f"{component}.mlpackage"
    assert over_rank_four(convert(model.module, values, model.outputs, path)) == []
    vae = AutoencoderKL.from_pretrained(tiny_sd_checkpoint / "vae").eval()
    with torch.no_grad():
        if component == "vae_decoder":
            ref = vae.decode(torch.from_numpy(values["z"])).sample
        else:
            dist = vae.encode(torch.from_numpy(values["x"])).latent_dist
            ref = torch.cat([dist.mean, dist.logvar], dim=1)
    out = execute(path, values)[model.outputs[0]]
    assert psnr(ref.numpy(), out) >= MIN_PSNR_FP16
