"""The Stable Diffusion safety checker, written for Core ML.

diffusers' ``StableDiffusionSafetyChecker`` is a CLIP vision tower (ViT-L/14
in the released checkpoint) and a visual projection, whose image embedding is
compared by cosine similarity with 17 concept embeddings and 3 "special care"
embeddings, each with its own threshold. An image is flagged when any
concept score passes its threshold; a special-care hit first lowers every
concept threshold by 0.01.

Here the vision tower runs channels-first on (1, C, 1, S), S = 1 + patches,
with the text encoder's layers (``ClipLayer``: 1×1 convolutions,
``ChannelLayerNorm``, one of the three attention implementations, no mask).
The class token is the first position, so pooling is a static slice. The
decision is made in the graph, as diffusers' ``forward_onnx`` and Apple's
converter make it, with no rounding of scores and no data-dependent shape:

    special = cos(image, special_care_embeds) - special_care_embeds_weights + adjustment
    concept = cos(image, concept_embeds) - concept_embeds_weights + 0.01 · any(special > 0)
    has_nsfw_concepts = any(concept > 0)          (float32 1.0 / 0.0 per image)

``adjustment`` is the constant 0.0 of diffusers made an input, as Apple's
converter exposes it (raising it makes the filter stricter). The outputs are
those of Apple's converter, by name: Apple's Swift package reads
``has_nsfw_concepts``; its Python pipeline also reads ``filtered_images``
(the images, black where flagged) and ``concept_scores``.

A decision is a comparison: within float16 noise of a threshold the
converted model may decide otherwise than the float32 reference;
``unit_rows`` keeps the scores themselves as close as float16 allows, and
``concept_scores`` lets verify measure them. For the 0/1 output verify's
PSNR is an exact comparison: equal decisions score 100 dB (zeros) or
200 dB (ones), a flipped one 0 dB or less, which stops the build.

Parameter names follow diffusers' (``vision_model.`` as transformers nests it
once), so ``SafetyChecker.from_diffusers`` loads a checkpoint key for key.
"""

from __future__ import annotations

import torch
from torch import nn

from sdbuild.errors import RecipeError
from sdbuild.models.attention import check_implementation, static_size
from sdbuild.models.layers import ChannelLayerNorm, conv1x1, load_weights
from sdbuild.models.text_encoder import ACTIVATIONS, ClipEncoder, ClipLayer

# What a special-care hit adds to every concept score (diffusers' and Apple's constant).
SPECIAL_CARE_BOOST = 0.01


def unit_rows(x):
    """Rows of x (N, D) scaled to unit length, safely in float16.

    Each row is first divided by its largest magnitude, so its squares sum to
    at most D and never overflow float16 (largest value 65504; an unscaled
    CLIP embedding of norm above 256 would). The floors only matter for an
    all-zero row, which comes out as zeros (cosine 0), as torch's
    ``F.normalize`` gives.
    """
    x = x / x.abs().amax(dim=1, keepdim=True).clamp_min(1e-4)
    return x * torch.rsqrt((x * x).sum(dim=1, keepdim=True).clamp_min(1e-4))


class ClipVisionEmbeddings(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int, positions: int):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.patch_embedding = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch, bias=False)
        self.position_embedding = nn.Embedding(positions, dim)

    def forward(self, pixels):
        """pixels (B, 3, size, size) → (B, C, 1, S): the class token first, then the patches row by row."""
        batch = static_size(pixels, 0)
        patches = self.patch_embedding(pixels).flatten(2).unsqueeze(2)  # (B, C, 1, patches)
        cls = self.class_embedding.view(1, -1, 1, 1).expand(batch, -1, -1, -1)
        positions = self.position_embedding.weight.t()[None, :, None, :]  # (1, C, 1, S)
        return torch.cat([cls, patches], dim=3) + positions


class ClipVisionTransformer(nn.Module):
    """transformers' CLIPVisionTransformer: pixels (B, 3, size, size) → pooled (B, C, 1, 1).

    ``pre_layrnorm`` is transformers' spelling.
    """

    def __init__(self, cfg: dict, implementation: str):
        super().__init__()
        dim, eps = cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-5)
        grid = cfg["image_size"] // cfg["patch_size"]
        self.embeddings = ClipVisionEmbeddings(cfg.get("num_channels", 3), dim, cfg["patch_size"], grid * grid + 1)
        self.pre_layrnorm = ChannelLayerNorm(dim, eps)
        self.encoder = ClipEncoder(
            [
                ClipLayer(dim, cfg["num_attention_heads"], cfg["intermediate_size"], cfg["hidden_act"], eps, implementation)
                for _ in range(cfg["num_hidden_layers"])
            ]
        )
        self.post_layernorm = ChannelLayerNorm(dim, eps)

    def forward(self, pixels):
        h = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            h = layer(h, None)  # every patch sees every other: no mask
        return self.post_layernorm(h[..., :1])  # the class token


class SafetyChecker(nn.Module):
    """clip_input (B, 3, size, size), images (B, H, W, 3), adjustment (1,)
    → filtered_images (B, H, W, 3), has_nsfw_concepts (B, 1, 1, 1) in {0., 1.}, concept_scores (B, 17).

    ``images`` enters ``filtered_images`` only, never the decision: Apple's
    Swift package feeds it an uninitialized [1, 512, 512, 3] array (it reads
    only ``has_nsfw_concepts``), whose values may be anything, NaN included.
    """

    def __init__(self, config: dict, projection_dim: int, concepts: int = 17, special_care: int = 3,
                 implementation: str = "ORIGINAL"):  # fmt: skip
        super().__init__()
        cfg = dict(config)
        if cfg["hidden_act"] not in ACTIVATIONS:
            raise RecipeError(f"safety checker config: hidden_act={cfg['hidden_act']!r} is not supported")
        if cfg["image_size"] % cfg["patch_size"]:
            raise RecipeError(
                f"safety checker config: image_size {cfg['image_size']} is not a multiple of patch_size {cfg['patch_size']}"
            )
        implementation = check_implementation(implementation)
        self.image_size = cfg["image_size"]
        self.vision_model = ClipVisionTransformer(cfg, implementation)
        self.visual_projection = conv1x1(cfg["hidden_size"], projection_dim, bias=False)
        self.concept_embeds = nn.Parameter(torch.zeros(concepts, projection_dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.zeros(special_care, projection_dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.zeros(concepts), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.zeros(special_care), requires_grad=False)

    @classmethod
    def from_diffusers(cls, model, implementation: str = "ORIGINAL") -> "SafetyChecker":
        """Build from a diffusers StableDiffusionSafetyChecker and load its weights (float32, eval mode)."""
        module = cls(
            model.config.vision_config.to_dict(),
            model.config.projection_dim,
            model.concept_embeds.shape[0],
            model.special_care_embeds.shape[0],
            implementation,
        )
        # Older transformers nest the vision tower twice (vision_model.vision_model.…), newer once.
        weights = {k.replace("vision_model.vision_model.", "vision_model.", 1): v for k, v in model.state_dict().items()}
        return load_weights(module, weights, type(model).__name__)

    def image_embeds(self, clip_input):
        """clip_input (B, 3, size, size) → the projected image embedding (B, projection_dim)."""
        return self.visual_projection(self.vision_model(clip_input)).flatten(1)

    def scores(self, clip_input, adjustment):
        """(special-care scores (B, 3), concept scores (B, 17)): above 0 is a hit, as defined in the module docstring."""
        image = unit_rows(self.image_embeds(clip_input))
        special = image @ unit_rows(self.special_care_embeds).t() - self.special_care_embeds_weights
        special = special + adjustment.reshape(-1, 1)
        special_care = (special > 0).to(special.dtype).amax(dim=1, keepdim=True)  # (B, 1): any hit
        concept = image @ unit_rows(self.concept_embeds).t() - self.concept_embeds_weights
        return special, concept + SPECIAL_CARE_BOOST * special_care

    def forward(self, clip_input, images, adjustment):
        """→ (filtered_images, has_nsfw_concepts (B, 1, 1, 1), concept_scores): Apple's converter's order and shapes."""
        _, concept = self.scores(clip_input, adjustment)
        flagged = (concept > 0).to(concept.dtype).amax(dim=1).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        filtered = images * (1 - flagged)  # black where flagged
        return filtered, flagged, concept
