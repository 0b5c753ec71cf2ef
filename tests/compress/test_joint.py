"""Pruning, joint sparse + palettized weights and int8 palette entries of the tiny unet package:
sizes, what the file holds, and the reference executor against coremltools' own decompression."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from sdbuild.compress import palettize_package
from sdbuild.compress import package as pkg
from sdbuild.errors import RecipeError

VARIANTS = {
    "p4": dict(nbits=4),
    "s50": dict(nbits=None, sparsity=0.5),
    "s50p4": dict(nbits=4, sparsity=0.5),
    "p4i8": dict(nbits=4, group_size=16, lut_dtype="int8"),
    "s24p4i8": dict(nbits=4, sparsity="2:4", lut_dtype="int8"),
}


@pytest.fixture(scope="module")
def variants(unet_package_ios18, tmp_path_factory):
    out = tmp_path_factory.mktemp("joint")
    return {
        name: (out / f"{name}.mlpackage", palettize_package(unet_package_ios18, out / f"{name}.mlpackage", workers=1, **kw))
        for name, kw in VARIANTS.items()
    }


def op_counts(path) -> collections.Counter:
    return collections.Counter(op.op_type for op in pkg.iter_ops(pkg.load_pymil(path)))


def test_joint_sparse_palettized_is_smaller_than_either_alone(variants):
    size = {name: stats.bytes_after for name, (_, stats) in variants.items()}
    assert size["s50p4"] < size["p4"] and size["s50p4"] < size["s50"], size
    assert size["s50"] < 0.7 * variants["s50"][1].bytes_before  # half the values, plus a 1-bit mask
    assert variants["s50p4"][1].method == "prune+palettize" and variants["s50"][1].method == "prune"


def test_packages_hold_coremltools_joint_ops(variants):
    assert op_counts(variants["s50"][0])["constexpr_sparse_to_dense"] > 0
    joint = op_counts(variants["s50p4"][0])
    assert joint["constexpr_lut_to_sparse"] == joint["constexpr_sparse_to_dense"] > 0
    assert "constexpr_lut_to_dense" not in joint
    prog = pkg.load_pymil(variants["p4i8"][0])
    luts = [op for op in pkg.iter_ops(prog) if op.op_type == "constexpr_lut_to_dense"]
    assert luts and all(op.lut.op.op_type == "constexpr_blockwise_shift_scale" for op in luts)
    assert all(str(op.lut.op.data.val.dtype) == "int8" for op in luts)


def test_bits_and_sparsity_are_read_back_from_the_file(variants, unet_package_ios18):
    float16 = pkg.weight_bits(unet_package_ios18)
    for name, (path, stats) in variants.items():
        bits = pkg.weight_bits(path)
        assert set(bits) == set(float16), name  # every weight found once, chains counted as one
        assert set(stats.layer_bits.values()) == ({16} if name == "s50" else {4}), name
    assert pkg.weight_sparsity(unet_package_ios18) < 0.01
    for name in ("s50", "s50p4", "s24p4i8"):
        # Weights at or below the threshold stay dense (a little under a half); a palette entry may round to 0.
        assert 0.45 < pkg.weight_sparsity(variants[name][0]) <= 0.52, name


def test_joint_palettes_are_spent_on_the_kept_values_only(variants):
    """The pruned zeros live in the mask: no palette entry of a sparse weight is wasted on zero."""
    prog = pkg.load_pymil(variants["s50p4"][0])
    luts = [op.lut.val for op in pkg.iter_ops(prog) if op.op_type == "constexpr_lut_to_sparse"]
    assert luts and all(np.abs(lut.astype(np.float32)).min() > 0 for lut in luts)


def test_n_of_m_pruning_zeroes_n_of_every_m_along_the_input_channels(variants):
    dense = pkg.dense_weights(variants["s24p4i8"][0])
    checked = 0
    for w in dense.values():
        if w.ndim >= 2 and w.shape[1] % 4 == 0 and w.size > pkg.WEIGHT_THRESHOLD:
            groups = np.moveaxis(w, 1, -1).reshape(-1, 4)
            assert np.all(np.count_nonzero(groups == 0, axis=1) >= 2)
            checked += 1
    assert checked > 10


def test_int8_palette_entries_stay_close_to_the_float16_palette(variants, unet_package_ios18, tmp_path):
    grouped = palettize_package(unet_package_ios18, tmp_path / "g.mlpackage", 4, group_size=16, workers=1)
    float_lut, int8_lut = pkg.dense_weights(tmp_path / "g.mlpackage"), pkg.dense_weights(variants["p4i8"][0])
    for name, w in float_lut.items():
        scale = np.abs(w.astype(np.float32)).max() / 127  # one scale per palette tensor
        assert np.abs(int8_lut[name].astype(np.float32) - w.astype(np.float32)).max() <= scale * 0.51 + 1e-3, name
    assert grouped.bytes_after >= variants["p4i8"][1].bytes_after


@pytest.mark.parametrize("name", ["s50", "s50p4", "p4i8", "s24p4i8"])
def test_executor_runs_each_variant_as_coremltools_decompresses_it(name, variants, unet_component, tmp_path):
    """The executor's kernels against coremltools' own decompression of the same package."""
    import coremltools.optimize.coreml as cto

    from sdbuild.metrics import psnr
    from sdbuild.mil.executor import load_program
    from sdbuild.models import sample_inputs

    path = variants[name][0]
    dense_path = tmp_path / "dense.mlpackage"
    cto.decompress_weights(pkg.load_mlmodel(path)).save(str(dense_path))
    assert not [t for t in op_counts(dense_path) if t.startswith("constexpr_")]
    x = sample_inputs(unet_component.inputs, 1)
    ours = load_program(path).run(x, precision="fp32")["noise_pred"]
    theirs = load_program(dense_path).run(x, precision="fp32")["noise_pred"]
    assert psnr(theirs, ours) >= 60


def test_magnitude_pruning_of_a_weight_above_65504_elements(tmp_path):
    """numpy's float16 percentile overflows past 65,504 elements; the pruner ranks in float32."""
    from sdbuild.compress.palettize import make_pruner

    rng = np.random.default_rng(0)
    val = rng.standard_normal((320, 320)).astype(np.float16)
    params = type(make_pruner(0.5)).compress_by_magnitude(val, 0.5)
    assert params.nonzero_data.dtype == np.float16
    assert abs(params.nonzero_data.size / val.size - 0.5) < 0.01


def test_joint_forms_need_an_ios18_package(unet_package, tmp_path):
    with pytest.raises(RecipeError, match="compression.sparsity with nbits needs target iOS18 or macOS15"):
        palettize_package(unet_package, tmp_path / "j.mlpackage", 4, sparsity=0.5)
    with pytest.raises(RecipeError, match="compression.lut_dtype needs target iOS18 or macOS15"):
        palettize_package(unet_package, tmp_path / "j.mlpackage", 4, lut_dtype="int8")
    # Pruning alone has an iOS16 form.
    stats = palettize_package(unet_package, tmp_path / "s.mlpackage", None, sparsity=0.25)
    assert stats.bytes_after < stats.bytes_before
