"""Plain wrappers around the diffusers/transformers modules, used until the
conversion-friendly modules of each family replace them. They give each
component the contract's input and output names and layouts, nothing more."""

from __future__ import annotations

from pathlib import Path

import torch

from sdbuild.models import TOKENS, BuildOptions, ComponentModel, TensorSpec


class TextEncoder(torch.nn.Module):
    """input_ids [1, S] float32 → (last_hidden_state or hidden_embeds [1, S, C], pooled_outputs [1, C'])."""

    def __init__(self, model, penultimate: bool, projected: bool):
        super().__init__()
        self.model, self.penultimate, self.projected = model, penultimate, projected

    def forward(self, input_ids):
        out = self.model(input_ids.to(torch.int32), output_hidden_states=self.penultimate, return_dict=True)
        hidden = out.hidden_states[-2] if self.penultimate else out.last_hidden_state
        pooled = out.text_embeds if self.projected else out.pooler_output
        return hidden, pooled


class Unet(torch.nn.Module):
    """sample [B,4,H,W], timestep [B], encoder_hidden_states [B,C,1,S] (+ SDXL text_embeds, time_ids) → noise_pred."""

    def __init__(self, unet, sdxl: bool):
        super().__init__()
        self.unet, self.sdxl = unet, sdxl

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        hidden = encoder_hidden_states.squeeze(2).transpose(1, 2)
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        return self.unet(sample, timestep, hidden, added_cond_kwargs=added, return_dict=False)[0]


class VaeDecoder(torch.nn.Module):
    """z [1,4,H,W] (already divided by the scaling factor) → image [1,3,8H,8W]."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def forward(self, z):
        return self.decoder(self.post_quant_conv(z))


class VaeEncoder(torch.nn.Module):
    """x [1,3,8H,8W] in [-1, 1] → latent [1,8,H,W]: mean and log-variance, unscaled."""

    def __init__(self, vae):
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv

    def forward(self, x):
        return self.quant_conv(self.encoder(x))


def build(component: str, checkpoint: Path, family: str, options: BuildOptions) -> ComponentModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    h, w = options.latent
    if component in ("text_encoder", "text_encoder_2"):
        projected = component == "text_encoder_2"
        cls = CLIPTextModelWithProjection if projected else CLIPTextModel
        model = cls.from_pretrained(checkpoint / component, use_safetensors=True).eval()
        sdxl = family == "sdxl"
        return ComponentModel(
            TextEncoder(model, penultimate=sdxl, projected=projected).eval(),
            [TensorSpec("input_ids", (1, TOKENS), "tokens", model.config.vocab_size)],
            ["hidden_embeds" if sdxl else "last_hidden_state", "pooled_outputs"],
        )
    if component == "unet":
        unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet", use_safetensors=True).eval()
        b, cfg = options.batch, unet.config
        inputs = [
            TensorSpec("sample", (b, cfg.in_channels, h, w)),
            TensorSpec("timestep", (b,), "timestep", 1000),
            TensorSpec("encoder_hidden_states", (b, cfg.cross_attention_dim, 1, TOKENS)),
        ]
        sdxl = cfg.addition_embed_type == "text_time"
        if sdxl:
            text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            inputs += [TensorSpec("text_embeds", (b, text_dim)), TensorSpec("time_ids", (b, 6))]
        return ComponentModel(Unet(unet, sdxl).eval(), inputs, ["noise_pred"])
    if component in ("vae_decoder", "vae_encoder"):
        vae = AutoencoderKL.from_pretrained(checkpoint / "vae", use_safetensors=True).eval()
        # SDXL's VAE overflows in float16 (its config says force_upcast).
        precision = "float32" if getattr(vae.config, "force_upcast", False) else "float16"
        if component == "vae_decoder":
            spec = TensorSpec("z", (1, vae.config.latent_channels, h, w))
            return ComponentModel(VaeDecoder(vae).eval(), [spec], ["image"], precision)
        spec = TensorSpec("x", (1, 3, options.height, options.width), "image")
        return ComponentModel(VaeEncoder(vae).eval(), [spec], ["latent"], precision)
    raise NotImplementedError(f"component {component} has no module yet")
