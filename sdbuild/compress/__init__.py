"""Weight compression of converted packages: n-bit palettization, linear 8-bit,
and mixed-bit palettization (MBP) with its pre-analysis on the PyTorch model.

The compress stage calls these; each takes a saved float16 ``.mlpackage`` and
writes a new one:

    palettize_package(src, dst, nbits=6)          # k-means LUTs, all cores
    linear8_package(src, dst)                     # int8, per output channel
    w8a8_package(src, dst, ranges)                # linear8 + int8 activations (compress.activations)
    pre_analyze(unet_factory, out_dir, inputs=..., model_version=...)  # -> analysis.json (+ .png)
    mixed_bit_package(src, dst, analysis_json, "recipe_4.50_bit_mixedpalette")
"""

from sdbuild.compress.palettize import CompressionStats, linear8_package, palettize_package

__all__ = ["CompressionStats", "linear8_package", "mixed_bit_package", "palettize_package", "pre_analyze"]


def __getattr__(name):
    # The analysis pulls in torch; load it only when asked for.
    if name == "pre_analyze":
        from sdbuild.compress.analysis import pre_analyze

        return pre_analyze
    if name == "mixed_bit_package":
        from sdbuild.compress.mixed_bit import mixed_bit_package

        return mixed_bit_package
    raise AttributeError(name)
