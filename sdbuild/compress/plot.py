"""The pre-analysis picture: PSNR against size, one curve per palette width, linear 8-bit and mixed-bit."""

from __future__ import annotations

from pathlib import Path

_COLORS = {"1": "tab:red", "2": "tab:orange", "4": "tab:olive", "6": "tab:green", "8": "tab:blue"}


def plot_analysis(analysis: dict, path: Path) -> Path:
    """Draw ``analysis["curves"]`` (lists of [size % of float16, PSNR dB]) to the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on build machines
    import matplotlib.pyplot as plt

    curves = analysis["curves"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for bits in analysis["nbits"]:
        pts = curves[str(bits)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=_COLORS.get(str(bits)), label=f"{bits}-bit palette")
    mixed = curves.get("mixed_bit", [])
    if mixed:
        ax.plot([p[0] for p in mixed], [p[1] for p in mixed], "k-o", markersize=3, label="mixed-bit (MBP)")
    for size, value in curves.get("linear_8bit", []):
        ax.plot([size], [value], "D", color="tab:purple", label="linear 8-bit")
    original = analysis["baselines"].get("original")
    if original is not None:
        ax.axhline(original, color="gray", linestyle=":", label="float16")
    ax.set_xlim(100, 0)  # smaller to the right: compression grows left to right
    ax.set_xlabel("size (% of float16)")
    ax.set_ylabel("PSNR (dB) vs float32")
    ax.set_title(f"{analysis['model_version']}: signal vs size")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
