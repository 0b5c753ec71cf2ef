"""The three attention implementations against PyTorch's own scaled dot-product attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdbuild.errors import RecipeError
from sdbuild.metrics import psnr
from sdbuild.models.attention import attention, check_implementation

from .families import ATTENTIONS


def reference(q, k, v, heads, mask=None):
    """q (B, C, 1, Sq), k, v (B, C, 1, Sk) through F.scaled_dot_product_attention on (B, h, S, d)."""

    def to_heads(x):
        return x.squeeze(2).unflatten(1, (heads, -1)).transpose(2, 3)

    out = F.scaled_dot_product_attention(to_heads(q), to_heads(k), to_heads(v), attn_mask=mask)
    return out.transpose(2, 3).flatten(1, 2).unsqueeze(2)


@pytest.mark.parametrize("implementation", ATTENTIONS)
@pytest.mark.parametrize("sq,sk,heads", [(77, 77, 4), (600, 77, 2), (1100, 1100, 1)])
def test_matches_sdpa(implementation, sq, sk, heads):
    g = torch.Generator().manual_seed(sq + heads)
    q, k, v = (torch.randn(2, 16, 1, s, generator=g) for s in (sq, sk, sk))
    out = attention(q, k, v, heads, implementation)
    assert out.shape == (2, 16, 1, sq)
    assert psnr(reference(q, k, v, heads).numpy(), out.numpy()) > 100


@pytest.mark.parametrize("implementation", ATTENTIONS)
def test_additive_mask(implementation):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 8, 1, 77, generator=g) for _ in range(3))
    mask = torch.full((77, 77), -1e4).triu(1)[None, None]
    out = attention(q, k, v, 2, implementation, mask)
    assert psnr(reference(q, k, v, 2, mask).numpy(), out.numpy()) > 100
    # The mask matters: without it the first query sees every key.
    assert psnr(reference(q, k, v, 2).numpy(), out.numpy()) < 40


def _einsums(implementation, length):
    q = torch.randn(1, 8, 1, length)
    traced = torch.jit.trace(lambda q, k, v: attention(q, k, v, 2, implementation), (q, q, q))
    return sum(node.kind() == "aten::einsum" for node in traced.graph.nodes())


def test_v2_chunks_long_queries_only():
    # Two heads × (einsum for weights + einsum for values) per query chunk.
    assert _einsums("SPLIT_EINSUM", 1100) == 4
    assert _einsums("SPLIT_EINSUM_V2", 1100) == 4 * 3  # 512 + 512 + 76
    assert _einsums("SPLIT_EINSUM_V2", 512) == 4
    assert _einsums("ORIGINAL", 1100) == 0


def test_unknown_implementation_is_a_recipe_error():
    with pytest.raises(RecipeError, match="SPLIT_EINSUM_V3"):
        check_implementation("SPLIT_EINSUM_V3")
