"""Small checkpoints of every family, as diffusers folders and as single files in the original layout.

Sizes are small but the family's fixed hyperparameters are kept, as a
single-file loader must assume them: 32 norm groups, SD 1.x's eight heads,
64-wide heads for SD 2.x/SDXL and CLIP, quick_gelu for OpenAI CLIP and gelu
for OpenCLIP, CLIP's 49408-id vocabulary, SDXL's 256-wide time-id
embeddings. ``write_single_file`` writes a diffusers folder back in the
CompVis/SGM layout (our own inverse of the names diffusers' loader maps).
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 49408
UNETS = {
    "sd1": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
    ),
    "sd2": dict(
        block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(1, 2),
        use_linear_projection=True,
        upcast_attention=True,
    ),
    "sdxl": dict(
        block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=64 + 128,
        attention_head_dim=(1, 1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=128 + 6 * 256,
    ),
    "sdxl-refiner": dict(
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=2,
        cross_attention_dim=64,
        attention_head_dim=(1, 1, 1, 1),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=64 + 5 * 256,
    ),
}
# component → (activation, width); SDXL's two encoders differ in width, as 768 and 1280 do
# (diffusers' own loader tells them apart by it).
TEXT_ENCODERS = {
    "sd1": {"text_encoder": ("quick_gelu", 64)},
    "sd2": {"text_encoder": ("gelu", 64)},
    "sdxl": {"text_encoder": ("quick_gelu", 64), "text_encoder_2": ("gelu", 128)},
    "sdxl-refiner": {"text_encoder_2": ("gelu", 64)},
}


def _seeded(seed, build):
    torch.manual_seed(seed)
    return build().eval()


def make_family(family: str, dest: Path, seed: int = 0, inpainting: bool = False, layers: int = 2) -> Path:
    """A small diffusers folder of ``family`` (sd1, sd2, sdxl, sdxl-refiner) at ``dest``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdbuild.checkpoints import FAMILY_CONFIGS
    from sdbuild.clip_vocab import write_clip_vocabulary

    dest = Path(dest)
    unet_args = dict(sample_size=8, in_channels=9 if inpainting else 4, out_channels=4, layers_per_block=1, **UNETS[family])
    _seeded(seed + 1, lambda: UNet2DConditionModel(**unet_args)).save_pretrained(dest / "unet")
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        scaling_factor=0.13025 if family.startswith("sdxl") else 0.18215,
    )
    _seeded(seed + 2, lambda: vae).save_pretrained(dest / "vae")
    for i, (component, (act, width)) in enumerate(TEXT_ENCODERS[family].items()):
        projected = component == "text_encoder_2"
        config = CLIPTextConfig(
            vocab_size=VOCAB, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
            num_attention_heads=width // 64, max_position_embeddings=77, hidden_act=act, projection_dim=width,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        )  # fmt: skip
        cls = CLIPTextModelWithProjection if projected else CLIPTextModel
        _seeded(seed + 3 + i, lambda: cls(config)).save_pretrained(dest / component)
        write_clip_vocabulary(dest / ("tokenizer_2" if projected else "tokenizer"))
    for name in ("model_index.json", "scheduler/scheduler_config.json"):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_text((FAMILY_CONFIGS / family / name).read_text())
    return dest


# --- diffusers → original layout ---------------------------------------------

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "conv_in": "input_blocks.0.0",
            "conv_norm_out": "out.0", "conv_out": "out.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}  # fmt: skip


def _unet_prefixes(config: dict) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, original prefix, is a resnet) pairs."""
    per = config["layers_per_block"] + 1
    n = len(config["block_out_channels"])
    pairs = []
    for i in range(n):
        for j in range(per - 1):
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{per * i + j + 1}.0.", True)]
            pairs += [(f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{per * i + j + 1}.1.", False)]
        if i < n - 1:
            pairs += [(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{per * (i + 1)}.0.op.", False)]
        for j in range(per):
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{per * i + j}.0.", True)]
            pairs += [(f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{per * i + j}.1.", False)]
        if i < n - 1:
            sub = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1
            pairs += [(f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{per * i + per - 1}.{sub}.", False)]
    pairs += [("mid_block.attentions.0.", "middle_block.1.", False)]
    pairs += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", True) for j in range(2)]
    return pairs


def unet_to_original(state: dict, config: dict) -> dict:
    out = {}
    pairs = _unet_prefixes(config)
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if module in UNET_TOP:
            out[f"{UNET_TOP[module]}.{leaf}"] = value
            continue
        new = next((o + key[len(d):] for d, o, res in pairs if key.startswith(d)), None)
        assert new is not None, key
        if next(res for d, o, res in pairs if key.startswith(d)):
            head, _, leaf = new.rpartition(".")
            head, _, part = head.rpartition(".")
            new = f"{head}.{RESNET[part]}.{leaf}"
        out[new] = value
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def vae_to_original(state: dict, config: dict) -> dict:
    n = len(config["block_out_channels"])
    out = {}
    for key, value in state.items():
        new = key
        for side in ("encoder", "decoder"):
            for i in range(n):
                j = i if side == "encoder" else n - 1 - i
                blocks = "down_blocks" if side == "encoder" else "up_blocks"
                level = "down" if side == "encoder" else "up"
                sampler = "downsample" if side == "encoder" else "upsample"
                new = new.replace(f"{side}.{blocks}.{i}.resnets.", f"{side}.{level}.{j}.block.")
                new = new.replace(f"{side}.{blocks}.{i}.{sampler}rs.0.", f"{side}.{level}.{j}.{sampler}.")
            for j in range(2):
                new = new.replace(f"{side}.mid_block.resnets.{j}.", f"{side}.mid.block_{j + 1}.")
        new = new.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if ".mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for d, o in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
                new = new.replace(f".{d}.", f".{o}.")
            if value.ndim == 2:
                value = value[:, :, None, None]  # the original's 1×1 convolutions
        out["first_stage_model." + new] = value
    return out


def clip_to_original(state: dict, prefix: str) -> dict:
    """OpenAI CLIP as SD 1.x / SDXL's first encoder: the transformers names under ``prefix``."""
    return {prefix + ("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in state.items()
            if not k.startswith("text_projection")}  # fmt: skip


def open_clip_to_original(state: dict, prefix: str, extra_layer: bool = False) -> dict:
    """OpenCLIP (SD 2.x, SDXL's second encoder): fused q/k/v, ``resblocks``; ``extra_layer`` adds SD 2.x's unused last one."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        "token_embedding.weight": state["embeddings.token_embedding.weight"],
        "positional_embedding": state["embeddings.position_embedding.weight"],
        "ln_final.weight": state["final_layer_norm.weight"],
        "ln_final.bias": state["final_layer_norm.bias"],
    }
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].T.contiguous()
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        p, q = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[q + f"attn.in_proj_{kind}"] = torch.cat([state[p + f"self_attn.{n}_proj.{kind}"] for n in "qkv"])
            out[q + f"attn.out_proj.{kind}"] = state[p + f"self_attn.out_proj.{kind}"]
            out[q + f"ln_1.{kind}"] = state[p + f"layer_norm1.{kind}"]
            out[q + f"ln_2.{kind}"] = state[p + f"layer_norm2.{kind}"]
            out[q + f"mlp.c_fc.{kind}"] = state[p + f"mlp.fc1.{kind}"]
            out[q + f"mlp.c_proj.{kind}"] = state[p + f"mlp.fc2.{kind}"]
    if extra_layer:  # SD 2.x files hold all 24 OpenCLIP layers; diffusers' text encoder drops the last
        last = len(layers)
        g = torch.Generator().manual_seed(last)
        for k in [k for k in out if k.startswith(f"transformer.resblocks.{last - 1}.")]:
            out[k.replace(f"resblocks.{last - 1}.", f"resblocks.{last}.")] = torch.randn(out[k].shape, generator=g)
    return {prefix + k: v for k, v in out.items()}


ORIGINAL_TEXT = {
    "sd1": {"text_encoder": ("clip", "cond_stage_model.transformer.")},
    "sd2": {"text_encoder": ("open_clip", "cond_stage_model.model.")},
    "sdxl": {"text_encoder": ("clip", "conditioner.embedders.0.transformer."), "text_encoder_2": ("open_clip", "conditioner.embedders.1.model.")},
    "sdxl-refiner": {"text_encoder_2": ("open_clip", "conditioner.embedders.0.model.")},
}


def write_single_file(folder: Path, family: str, path: Path, dtype=torch.float16, extra: dict | None = None) -> Path:
    """Write the diffusers folder ``folder`` of ``family`` as one ``.safetensors`` file in the original layout."""
    import json

    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    config = lambda c: json.loads((folder / c / "config.json").read_text())  # noqa: E731
    state = unet_to_original(load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"), config("unet"))
    state.update(vae_to_original(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"), config("vae")))
    for component, (kind, prefix) in ORIGINAL_TEXT[family].items():
        weights = load_file(folder / component / "model.safetensors")
        if kind == "clip":
            state.update(clip_to_original(weights, prefix))
        else:
            state.update(open_clip_to_original(weights, prefix, extra_layer=family == "sd2"))
    state.update(extra or {})
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(path))
    return Path(path)


def make_single_file(family: str, path: Path, seed: int = 0, inpainting: bool = False, dtype=torch.float16) -> tuple[Path, Path]:
    """(single file, the diffusers folder it was written from) of a small ``family`` model."""
    path = Path(path)
    folder = make_family(family, path.with_suffix(".diffusers"), seed, inpainting)
    return write_single_file(folder, family, path, dtype), folder
