"""CLIP text encoders, written for Core ML.

One module serves every text encoder Stable Diffusion uses, all transformers
``CLIPTextModel`` / ``CLIPTextModelWithProjection`` checkpoints: OpenAI CLIP
ViT-L (SD 1.x, SDXL's first), OpenCLIP ViT-H as SD 2.x ships it (GELU, 23
layers) and OpenCLIP ViT-bigG with its projection (SDXL's second).

The model input is float32 ``input_ids`` (1, S), as the bundle contract says;
the graph casts it to int32 before the embedding lookup (coremltools keeps a
``cast`` in float32, so ids above 2048 survive a float16 model). The
transformer runs channels-first on (1, C, 1, S), with 1×1 convolutions for
its linear layers and one of the three attention implementations. The causal
mask and the position table are constants; the pooled output is picked at the
end-of-text position with a one-hot product, so no shape depends on the data.

Parameter names follow transformers' (less the ``text_model.`` prefix), so ``TextEncoder.from_transformers``
loads a checkpoint key for key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdbuild.errors import RecipeError
from sdbuild.models.attention import attention, check_implementation
from sdbuild.models.layers import ChannelLayerNorm, conv1x1, load_weights

# Finite so that float16 holds it; far enough below any attention logit that softmax gives exactly zero.
MASKED = -1e4
ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
}


class ClipAttention(nn.Module):
    """(1, C, 1, S) → (1, C, 1, S) causal self-attention with biased projections."""

    def __init__(self, dim: int, heads: int, implementation: str):
        super().__init__()
        self.heads, self.implementation = heads, implementation
        self.q_proj = conv1x1(dim, dim)
        self.k_proj = conv1x1(dim, dim)
        self.v_proj = conv1x1(dim, dim)
        self.out_proj = conv1x1(dim, dim)

    def forward(self, h, mask):
        out = attention(self.q_proj(h), self.k_proj(h), self.v_proj(h), self.heads, self.implementation, mask)
        return self.out_proj(out)


class ClipMlp(nn.Module):
    def __init__(self, dim: int, inner: int, activation: str):
        super().__init__()
        self.fc1 = conv1x1(dim, inner)
        self.fc2 = conv1x1(inner, dim)
        self.activation = ACTIVATIONS[activation]

    def forward(self, h):
        return self.fc2(self.activation(self.fc1(h)))


class ClipLayer(nn.Module):
    """Pre-norm transformer layer: (1, C, 1, S) → (1, C, 1, S)."""

    def __init__(self, dim: int, heads: int, inner: int, activation: str, eps: float, implementation: str):
        super().__init__()
        self.layer_norm1 = ChannelLayerNorm(dim, eps)
        self.self_attn = ClipAttention(dim, heads, implementation)
        self.layer_norm2 = ChannelLayerNorm(dim, eps)
        self.mlp = ClipMlp(dim, inner, activation)

    def forward(self, h, mask):
        h = self.self_attn(self.layer_norm1(h), mask) + h
        return self.mlp(self.layer_norm2(h)) + h


class ClipEmbeddings(nn.Module):
    def __init__(self, vocab: int, positions: int, dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, dim)
        self.position_embedding = nn.Embedding(positions, dim)


class ClipEncoder(nn.Module):
    def __init__(self, layers: list[ClipLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class TextEncoder(nn.Module):
    """input_ids (1, S) float32 → (hidden (1, S, C), pooled (1, C')).

    ``hidden`` is the final layer's output after the final layer norm
    (``last_hidden_state``), or with ``penultimate`` the hidden states entering
    the last layer, as SDXL conditions on them (``hidden_embeds``). ``pooled``
    is the final-normed state at the first end-of-text token, through the
    text projection when the checkpoint has one.
    """

    def __init__(self, config: dict, implementation: str = "ORIGINAL", penultimate: bool = False,
                 projection: bool = False, sequence_length: int = 77):  # fmt: skip
        super().__init__()
        cfg = dict(config)
        if cfg["hidden_act"] not in ACTIVATIONS:
            raise RecipeError(f"text encoder config: hidden_act={cfg['hidden_act']!r} is not supported")
        if sequence_length > cfg["max_position_embeddings"]:
            raise RecipeError(f"text encoder: {sequence_length} tokens exceed its {cfg['max_position_embeddings']} positions")
        implementation = check_implementation(implementation)
        dim, eps = cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-5)
        self.embeddings = ClipEmbeddings(cfg["vocab_size"], cfg["max_position_embeddings"], dim)
        self.encoder = ClipEncoder(
            [
                ClipLayer(dim, cfg["num_attention_heads"], cfg["intermediate_size"], cfg["hidden_act"], eps, implementation)
                for _ in range(cfg["num_hidden_layers"])
            ]
        )
        self.final_layer_norm = ChannelLayerNorm(dim, eps)
        if projection:
            self.text_projection = nn.Linear(cfg["hidden_size"], cfg["projection_dim"], bias=False)
        self.projection, self.penultimate, self.sequence_length = projection, penultimate, sequence_length
        # transformers kept an old wrong eos id (2) for early CLIP configs and then pools at the largest id instead.
        self.eos_token_id = None if cfg.get("eos_token_id") == 2 else cfg.get("eos_token_id")
        causal = torch.full((sequence_length, sequence_length), MASKED).triu(1)
        self.register_buffer("causal_mask", causal[None, None], persistent=False)  # (1, 1, S, S)
        self.register_buffer("positions", torch.arange(sequence_length, dtype=torch.int32)[None], persistent=False)

    @classmethod
    def from_transformers(cls, model, implementation: str = "ORIGINAL", penultimate: bool = False,
                          sequence_length: int = 77) -> "TextEncoder":  # fmt: skip
        """Build from a transformers CLIPTextModel(WithProjection) and load its weights (float32, eval mode)."""
        projection = hasattr(model, "text_projection")
        module = cls(model.config.to_dict(), implementation, penultimate, projection, sequence_length)
        # transformers nests the weights under "text_model." in some classes and versions, not in others.
        weights = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
        return load_weights(module, weights, type(model).__name__)

    def forward(self, input_ids):
        ids = input_ids.to(torch.int32)
        positions = self.embeddings.position_embedding.weight[: self.sequence_length]
        h = self.embeddings.token_embedding(ids) + positions  # (1, S, C)
        h = h.transpose(1, 2).unsqueeze(2)  # (1, C, 1, S)
        layers = self.encoder.layers
        for layer in layers[:-1]:
            h = layer(h, self.causal_mask)
        penultimate = h
        h = self.final_layer_norm(layers[-1](h, self.causal_mask))

        # Pool at the first end-of-text token: argmax over a comparison, then a one-hot sum (no gather by data).
        hits = ids if self.eos_token_id is None else (ids == self.eos_token_id).to(torch.int32)
        eos = hits.argmax(dim=-1, keepdim=True)  # (1, 1)
        one_hot = (self.positions == eos).to(h.dtype)  # (1, S)
        pooled = (h * one_hot[:, None, None, :]).sum(dim=3).flatten(1)  # (1, C)
        if self.projection:
            pooled = self.text_projection(pooled)

        hidden = penultimate if self.penultimate else h
        return hidden.squeeze(2).transpose(1, 2), pooled
