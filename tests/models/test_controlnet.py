"""sdbuild's ControlNet and controlled unet against diffusers' ControlNetModel and
UNet2DConditionModel (with down_block_additional_residuals / mid_block_additional_residual)
on the same weights and inputs: float32 modules at ≥ 60 dB, converted packages run in
float16 by the reference executor at ≥ 40 dB."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sdbuild.errors import NotBuiltYet, RecipeError
from sdbuild.metrics import psnr
from sdbuild.models import BuildOptions, build_component
from sdbuild.models.controlnet import ControlNet, check_fits_unet
from sdbuild.synthetic import liven_controlnet

from .families import ATTENTIONS, TOKENS, convert, program_values, unet_family

MIN_PSNR_FP32 = 60
MIN_PSNR_FP16 = 40
# A 24×24 latent makes a 576-long sequence in the first block, so SPLIT_EINSUM_V2 chunks its queries.
IMAGE = 192


def image_size(attention: str) -> int:
    """The V2 size where V2 is tested, a smaller (faster) one elsewhere."""
    return IMAGE if attention == "SPLIT_EINSUM_V2" else 64


@pytest.fixture(scope="module")
def tiny_controlnet(tmp_path_factory):
    from sdbuild.synthetic import make_synthetic

    return make_synthetic("synthetic:tiny-controlnet", tmp_path_factory.mktemp("cn") / "tiny-controlnet")


@pytest.fixture(scope="module")
def diffusers_controlnet(tiny_controlnet):
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(tiny_controlnet).eval()


@pytest.fixture(scope="module")
def diffusers_unet(tiny_sd_checkpoint):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sd_checkpoint / "unet").eval()


def controlnet_inputs(cfg, batch=2, size=IMAGE, seed=0) -> dict[str, torch.Tensor]:
    """Contract-layout inputs; the control image in [0, 1] as pipelines feed it."""
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, cfg["in_channels"], size // 8, size // 8, generator=g),
        "timestep": torch.tensor([981.0, 17.0][:batch]),
        "encoder_hidden_states": torch.randn(batch, cfg["cross_attention_dim"], 1, TOKENS, generator=g),
        "controlnet_cond": torch.rand(batch, 3, size, size, generator=g),
    }


def diffusers_residuals(controlnet, inputs: dict) -> list[torch.Tensor]:
    """diffusers' down-block residuals then the mid-block one, at conditioning scale 1."""
    context = inputs["encoder_hidden_states"].squeeze(2).transpose(1, 2)
    with torch.no_grad():
        down, mid = controlnet(
            inputs["sample"], inputs["timestep"], context, inputs["controlnet_cond"], return_dict=False
        )
    return [*down, mid]


def diffusers_controlled_unet(unet, inputs: dict, residuals: list | None) -> torch.Tensor:
    context = inputs["encoder_hidden_states"].squeeze(2).transpose(1, 2)
    extra = {}
    if residuals is not None:
        extra = {"down_block_additional_residuals": tuple(residuals[:-1]), "mid_block_additional_residual": residuals[-1]}
    with torch.no_grad():
        return unet(inputs["sample"], inputs["timestep"], context, return_dict=False, **extra)[0]


def run(module, args) -> tuple:
    with torch.no_grad():
        out = module(*args)
    return out if isinstance(out, tuple) else (out,)


def min_psnr(refs, outs) -> float:
    assert len(refs) == len(outs)
    return min(psnr(np.asarray(r), np.asarray(o)) for r, o in zip(refs, outs))


def execute(path, inputs: dict) -> dict[str, np.ndarray]:
    from sdbuild.mil.executor import load_program

    return load_program(path).run({k: np.asarray(v) for k, v in inputs.items()}, precision="fp16")


# --- float32 modules ---------------------------------------------------------


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_controlnet_matches_diffusers(attention, tiny_controlnet, diffusers_controlnet):
    model = build_component("controlnet", tiny_controlnet, BuildOptions(attention=attention, height=IMAGE, width=IMAGE))
    assert [s.name for s in model.inputs] == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond"]
    inputs = controlnet_inputs(model.module.config)
    assert {s.name: s.shape for s in model.inputs} == {k: tuple(v.shape) for k, v in inputs.items()}

    ours = run(model.module, inputs.values())
    ref = diffusers_residuals(diffusers_controlnet, inputs)
    assert model.outputs == [f"additional_residual_{i}" for i in range(len(ref))]
    shapes = [tuple(s) for s in model.info["residual_shapes"]]
    assert [tuple(t.shape) for t in ours] == [tuple(t.shape) for t in ref] == shapes
    assert min_psnr(ref, ours) >= MIN_PSNR_FP32
    # Guards the comparison: every residual carries signal, and the control image reaches all of them.
    assert all(t.abs().max() > 0.1 for t in ref)
    other = run(model.module, dict(inputs, controlnet_cond=1 - inputs["controlnet_cond"]).values())
    assert max(psnr(r.numpy(), o.numpy()) for r, o in zip(ours, other)) < 40


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_controlled_unet_matches_diffusers(attention, tiny_sd_checkpoint, diffusers_unet, diffusers_controlnet):
    size = image_size(attention)
    options = BuildOptions(attention=attention, height=size, width=size)
    model = build_component("controlled_unet", tiny_sd_checkpoint, options)
    inputs = controlnet_inputs(dict(diffusers_unet.config), size=size)
    residuals = diffusers_residuals(diffusers_controlnet, inputs)
    del inputs["controlnet_cond"]
    names = [s.name for s in model.inputs]
    assert names == [*inputs, *(f"additional_residual_{i}" for i in range(len(residuals)))]
    assert [s.shape for s in model.inputs[3:]] == [tuple(r.shape) for r in residuals]
    assert model.outputs == ["noise_pred"]

    (ours,) = run(model.module, [*inputs.values(), *residuals])
    ref = diffusers_controlled_unet(diffusers_unet, inputs, residuals)
    assert psnr(ref.numpy(), ours.numpy()) >= MIN_PSNR_FP32
    assert psnr(ref.numpy(), diffusers_controlled_unet(diffusers_unet, inputs, None).numpy()) < 40


def test_sd2_controlnet_with_bgr_control_image():
    # SD 2.x shapes: linear projections, a head count per block, upcast attention; and a BGR-trained ControlNet.
    from diffusers import ControlNetModel

    unet, _ = unet_family("sd2")
    reference = ControlNetModel.from_unet(
        unet, controlnet_conditioning_channel_order="bgr", conditioning_embedding_out_channels=(8, 8, 16, 16)
    )
    reference = liven_controlnet(reference, 11).eval()
    check_fits_unet(dict(reference.config), dict(unet.config))
    module = ControlNet.from_diffusers(reference, "SPLIT_EINSUM")
    inputs = controlnet_inputs(dict(reference.config), size=128, seed=3)
    ref = diffusers_residuals(reference, inputs)
    assert min_psnr(ref, run(module, inputs.values())) >= MIN_PSNR_FP32
    # The channel flip lives in the weights: the checkpoint's own tensor is left as it was.
    theirs, ours = reference.controlnet_cond_embedding.conv_in.weight, module.controlnet_cond_embedding.conv_in.weight
    assert torch.equal(theirs.flip(1), ours)


# --- converted packages ------------------------------------------------------


@pytest.mark.parametrize("attention", ["SPLIT_EINSUM_V2", "ORIGINAL"])
def test_controlnet_package(attention, tiny_controlnet, diffusers_controlnet, tmp_path):
    size = image_size(attention)
    model = build_component("controlnet", tiny_controlnet, BuildOptions(attention=attention, height=size, width=size))
    inputs = controlnet_inputs(model.module.config, size=size, seed=5)
    path = tmp_path / "controlnet.mlpackage"
    mlmodel = convert(model.module, inputs, model.outputs, path)
    if attention != "ORIGINAL":
        assert [v for v in program_values(mlmodel) if len(v[2]) > 4] == []
    out = execute(path, inputs)
    ref = diffusers_residuals(diffusers_controlnet, inputs)
    assert min_psnr(ref, [out[name] for name in model.outputs]) >= MIN_PSNR_FP16


def test_controlled_unet_package(tiny_sd_checkpoint, diffusers_unet, diffusers_controlnet, tmp_path):
    options = BuildOptions(attention="SPLIT_EINSUM", height=64, width=64)
    model = build_component("controlled_unet", tiny_sd_checkpoint, options)
    inputs = controlnet_inputs(dict(diffusers_unet.config), size=64, seed=6)
    residuals = diffusers_residuals(diffusers_controlnet, inputs)
    del inputs["controlnet_cond"]
    values = {**inputs, **dict(zip([s.name for s in model.inputs[3:]], residuals))}
    path = tmp_path / "controlled_unet.mlpackage"
    mlmodel = convert(model.module, values, model.outputs, path)
    assert [v for v in program_values(mlmodel) if len(v[2]) > 4] == []
    out = execute(path, values)["noise_pred"]
    assert psnr(diffusers_controlled_unet(diffusers_unet, inputs, residuals).numpy(), out) >= MIN_PSNR_FP16


# --- what is refused ---------------------------------------------------------


def write_config(folder, **config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_sdxl_controlnet_is_refused_before_loading(tiny_controlnet, tmp_path):
    # No weights in the folder: the refusal must come from the config alone.
    config = json.loads((tiny_controlnet / "config.json").read_text())
    folder = write_config(tmp_path / "xl", **{**config, "addition_embed_type": "text_time"})
    with pytest.raises(NotBuiltYet, match="SDXL ControlNets are not supported"):
        build_component("controlnet", folder, BuildOptions())
    sdxl = write_config(tmp_path / "sdxl-pipe")
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": []}))
    with pytest.raises(NotBuiltYet, match="SDXL ControlNets are not supported"):
        build_component("controlled_unet", sdxl, BuildOptions())


@pytest.mark.parametrize(
    "change,message",
    [
        ({"global_pool_conditions": True}, "global_pool_conditions"),
        ({"controlnet_conditioning_channel_order": "gbr"}, "channel_order"),
        ({"conditioning_embedding_out_channels": [16, 32, 96]}, "downsamples the control image 4×"),
        ({"_class_name": "UNet2DConditionModel"}, "not a ControlNetModel"),
    ],
)
def test_unsupported_controlnet_config_is_named(change, message, tiny_controlnet, tmp_path):
    config = json.loads((tiny_controlnet / "config.json").read_text())
    folder = write_config(tmp_path / "cn", **{**config, **change})
    with pytest.raises(RecipeError, match=message):
        build_component("controlnet", folder, BuildOptions())


def test_pipeline_folder_is_not_a_controlnet(tiny_sd_checkpoint):
    with pytest.raises(RecipeError, match="not a diffusers ControlNet folder"):
        build_component("controlnet", tiny_sd_checkpoint, BuildOptions())


def test_resolution_must_fit_the_levels(tiny_controlnet):
    with pytest.raises(RecipeError, match="divisible by 16"):
        build_component("controlnet", tiny_controlnet, BuildOptions(height=72, width=64))


def test_fit_check_names_the_key(tiny_controlnet, tiny_sd_checkpoint):
    controlnet = json.loads((tiny_controlnet / "config.json").read_text())
    unet = json.loads((tiny_sd_checkpoint / "unet" / "config.json").read_text())
    check_fits_unet(controlnet, unet)
    with pytest.raises(RecipeError, match="cross_attention_dim=32 does not fit the unet's cross_attention_dim=48"):
        check_fits_unet(controlnet, dict(unet_family("sd2")[0].config))
    with pytest.raises(RecipeError, match="layers_per_block"):
        check_fits_unet(controlnet, {**unet, "layers_per_block": 2})


# --- the synthetic ControlNet ------------------------------------------------


def test_synthetic_controlnet_is_deterministic_with_live_zero_convs(tiny_controlnet, diffusers_controlnet, tmp_path):
    from sdbuild.synthetic import make_synthetic

    again = make_synthetic("synthetic:tiny-controlnet", tmp_path / "again")
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert (again / name).read_bytes() == (tiny_controlnet / name).read_bytes()
    other = make_synthetic("synthetic:tiny-controlnet", tmp_path / "other", seed=1)
    weights = "diffusion_pytorch_model.safetensors"
    assert (other / weights).read_bytes() != (again / weights).read_bytes()
    zero_convs = [*diffusers_controlnet.controlnet_down_blocks, diffusers_controlnet.controlnet_mid_block]
    assert all(conv.weight.abs().max() > 0 for conv in zero_convs)
    # The control image reaches the latent-size features at about the scale of conv_in's (about 0.45 mean |x|).
    with torch.no_grad():
        image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        features = diffusers_controlnet.controlnet_cond_embedding(image)
    assert features.abs().mean() > 0.1
