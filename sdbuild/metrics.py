"""Signal-integrity figures, with the formula of the bundle contract."""

from __future__ import annotations


def psnr(ref, out) -> float:
    """PSNR in dB of ``out`` against the float32 reference ``ref`` (any equal shapes).

    20 * log10((max|ref| + 1e-5) / (sqrt(mean((out - ref)^2)) + 1e-10)), as
    Apple's reference tooling computes it, so figures compare one to one.
    """
    import numpy as np  # here: the executor imports this module on a warm run, which computes nothing

    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"psnr: shapes differ: {ref.shape} vs {out.shape}")
    peak = np.abs(ref).max() + 1e-5
    rmse = np.sqrt(np.mean((out - ref) ** 2))
    return float(20 * np.log10(peak / (rmse + 1e-10)))
