"""Scaled dot-product attention in the (B, C, 1, S) layout, three ways.

Every transformer in sdbuild's modules keeps its sequences channels-first:
queries ``q`` are (B, C, 1, Sq), keys ``k`` and values ``v`` are (B, C, 1, Sk),
with ``C = heads * head_dim`` and the heads laid out one after the other along
C, as the checkpoints' projection weights lay them out. The three
implementations compute the same function; they differ in the graph they leave
for Core ML:

* ``ORIGINAL``: one batched matmul over all heads (a rank-4 (B, heads, Sq, Sk)
  weight tensor). Best on the GPU.
* ``SPLIT_EINSUM``: one pair of einsums per head on (B, Sk, 1, Sq) weights, so
  no value in the program has rank above 4 and the key axis sits on the
  channel axis, which is what the Neural Engine wants.
* ``SPLIT_EINSUM_V2``: ``SPLIT_EINSUM`` with the query sequence processed in
  chunks of ``QUERY_CHUNK`` when it is longer, which keeps each weight tensor
  small on mobile Neural Engines.

An optional additive ``mask`` is given as (1, 1, Sq, Sk) (query by key), the
layout of the ORIGINAL weights; the split forms transpose it themselves.
"""

from __future__ import annotations

import warnings

import torch

ATTENTION_IMPLEMENTATIONS = ("ORIGINAL", "SPLIT_EINSUM", "SPLIT_EINSUM_V2")
QUERY_CHUNK = 512


def check_implementation(implementation: str) -> str:
    from sdbuild.errors import RecipeError

    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise RecipeError(
            f"unknown attention implementation '{implementation}': choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    return implementation


def static_size(x, dim: int) -> int:
    """``x.shape[dim]`` as a Python int, so a trace holds it as a constant rather than size arithmetic.

    Shapes are static by design here; TorchScript's warning that the trace
    will not generalize to other shapes is exactly what we want, so it is muted.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return int(x.shape[dim])


def attention(q, k, v, heads: int, implementation: str, mask=None):
    """softmax(q·k / sqrt(head_dim) + mask)·v per head.

    q (B, C, 1, Sq), k and v (B, C, 1, Sk), mask (1, 1, Sq, Sk) or None
    → (B, C, 1, Sq).
    """
    head_dim = static_size(q, 1) // heads
    # Scale the queries rather than the weights: one multiply on the smaller tensor.
    q = q * head_dim**-0.5
    if implementation == "ORIGINAL":
        return original_attention(q, k, v, heads, mask)
    if implementation == "SPLIT_EINSUM":
        return split_einsum_attention(q, k, v, heads, mask)
    if implementation == "SPLIT_EINSUM_V2":
        return split_einsum_v2_attention(q, k, v, heads, mask)
    raise ValueError(f"unknown attention implementation {implementation!r}")


def original_attention(q, k, v, heads: int, mask=None):
    """Batched matmul over (B, heads, head_dim, S) views. q is already scaled."""
    q = q.squeeze(2).unflatten(1, (heads, -1))  # (B, h, d, Sq)
    k = k.squeeze(2).unflatten(1, (heads, -1))  # (B, h, d, Sk)
    v = v.squeeze(2).unflatten(1, (heads, -1))  # (B, h, d, Sk)
    weights = torch.matmul(q.transpose(2, 3), k)  # (B, h, Sq, Sk)
    if mask is not None:
        weights = weights + mask
    weights = weights.softmax(dim=-1)
    out = torch.matmul(v, weights.transpose(2, 3))  # (B, h, d, Sq)
    return out.flatten(1, 2).unsqueeze(2)


def _split_heads(q, k, v, heads: int):
    """Per-head slices: queries (B, d, 1, Sq), keys (B, Sk, 1, d), values (B, d, 1, Sk)."""
    # Keys go channels-last once, so each head's weights come out as (B, Sk, 1, Sq).
    k_t = k.transpose(1, 3)
    d = static_size(q, 1) // heads
    # Slices rather than torch.chunk: coremltools cannot convert a one-way chunk (single-head attention).
    heads_at = [slice(i * d, (i + 1) * d) for i in range(heads)]
    return [q[:, s] for s in heads_at], [k_t[..., s] for s in heads_at], [v[:, s] for s in heads_at]


def _head_attention(q_h, k_h, v_h, mask_t):
    """One head: q_h (B, d, 1, Sq), k_h (B, Sk, 1, d), v_h (B, d, 1, Sk), mask_t (1, Sk, 1, Sq) → (B, d, 1, Sq)."""
    weights = torch.einsum("bchq,bkhc->bkhq", q_h, k_h)  # (B, Sk, 1, Sq)
    if mask_t is not None:
        weights = weights + mask_t
    weights = weights.softmax(dim=1)
    return torch.einsum("bkhq,bchk->bchq", weights, v_h)


def split_einsum_attention(q, k, v, heads: int, mask=None):
    """Per-head einsums, every value rank ≤ 4. q is already scaled."""
    mask_t = None if mask is None else mask.permute(0, 3, 1, 2)  # (1, Sk, 1, Sq)
    qs, ks, vs = _split_heads(q, k, v, heads)
    return torch.cat([_head_attention(q_h, k_h, v_h, mask_t) for q_h, k_h, v_h in zip(qs, ks, vs)], dim=1)


def split_einsum_v2_attention(q, k, v, heads: int, mask=None, chunk: int = QUERY_CHUNK):
    """``split_einsum_attention`` with the queries taken ``chunk`` positions at a time (the last chunk shorter)."""
    length = static_size(q, 3)
    if length <= chunk:
        return split_einsum_attention(q, k, v, heads, mask)
    mask_t = None if mask is None else mask.permute(0, 3, 1, 2)  # (1, Sk, 1, Sq)
    spans = [slice(start, min(start + chunk, length)) for start in range(0, length, chunk)]
    qs, ks, vs = _split_heads(q, k, v, heads)
    out = []
    for q_h, k_h, v_h in zip(qs, ks, vs):
        pieces = [_head_attention(q_h[..., s], k_h, v_h, None if mask_t is None else mask_t[..., s]) for s in spans]
        out.append(torch.cat(pieces, dim=3))
    return torch.cat(out, dim=1)
