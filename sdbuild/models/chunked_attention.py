"""Attention a block of queries at a time, for an eager float32 reference: the full scores never exist.

SD 1.5's first transformer at 512×512 holds (2, 8, 4096, 4096) float32
scores, 1 GiB, and as large a softmax. ``chunked_scores`` makes every
attention of sdbuild's modules (ORIGINAL, SPLIT_EINSUM, SPLIT_EINSUM_V2:
the same function) compute softmax(q·k)·v over blocks of query rows whose
scores hold at most ``SCORE_ELEMENTS`` values. Each query row's result is
computed from the same numbers as before; only the matmuls' blocking, and so
float rounding, differs. For the eager module only: a trace is never taken
inside, so the converted graph is ``attention.py``'s, unchanged.
"""

from __future__ import annotations

import contextlib

import torch

from sdbuild.models import attention as _attention

SCORE_ELEMENTS = 1 << 22  # 16 MiB of float32 scores per block, as the reference executor's fused attention


def chunked_attention(q, k, v, heads: int, mask=None, elements: int | None = None):
    """``original_attention``'s arithmetic, a block of query rows at a time, each block's scores at most
    ``elements`` values (``SCORE_ELEMENTS``). q (B, C, 1, Sq) already scaled, k and v (B, C, 1, Sk),
    mask (1, 1, Sq, Sk) or None → (B, C, 1, Sq)."""
    q = q.squeeze(2).unflatten(1, (heads, -1))  # (B, h, d, Sq)
    k = k.squeeze(2).unflatten(1, (heads, -1))  # (B, h, d, Sk)
    v = v.squeeze(2).unflatten(1, (heads, -1))  # (B, h, d, Sk)
    batch, _, _, length = q.shape
    rows = max(1, (elements or SCORE_ELEMENTS) // (batch * heads * k.shape[3]))
    out = []
    for start in range(0, length, rows):
        span = slice(start, start + rows)
        weights = torch.matmul(q[..., span].transpose(2, 3), k)  # (B, h, rows, Sk)
        if mask is not None:
            weights = weights + mask[:, :, span]
        out.append(torch.matmul(v, weights.softmax(dim=-1).transpose(2, 3)))  # (B, h, d, rows)
        del weights
    return torch.cat(out, dim=3).flatten(1, 2).unsqueeze(2)


@contextlib.contextmanager
def chunked_scores(elements: int | None = None):
    """Within: ``attention.attention`` computes every implementation with ``chunked_attention``,
    blocks of at most ``elements`` scores (``SCORE_ELEMENTS``)."""

    def any_chunk(q, k, v, heads, mask=None, chunk=None):
        return chunked_attention(q, k, v, heads, mask, elements)

    names = ("original_attention", "split_einsum_attention", "split_einsum_v2_attention")
    saved = {name: getattr(_attention, name) for name in names}
    try:
        for name in names:
            setattr(_attention, name, any_chunk)
        yield
    finally:
        for name, function in saved.items():
            setattr(_attention, name, function)
