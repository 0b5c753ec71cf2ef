"""n-bit palettization and linear 8-bit of the tiny unet package: sizes, weights, end-to-end PSNR."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from sdbuild.compress import linear8_package, palettize_package
from sdbuild.compress import package as pkg
from sdbuild.errors import PackageError, RecipeError
from tests.compress.conftest import executor_psnr

NBITS = (2, 4, 6, 8)


@pytest.fixture(scope="module")
def palettized(unet_package, tmp_path_factory):
    out = tmp_path_factory.mktemp("palettized")
    return {b: (out / f"p{b}.mlpackage", palettize_package(unet_package, out / f"p{b}.mlpackage", b)) for b in NBITS}


@pytest.fixture(scope="module")
def linear8(unet_package, tmp_path_factory):
    dst = tmp_path_factory.mktemp("linear8") / "l8.mlpackage"
    return dst, linear8_package(unet_package, dst)


def test_weight_file_shrinks_as_the_bit_width_says(unet_package, palettized):
    float16 = pkg.weight_bits(unet_package)
    compressible = sum(n for _, n in float16.values()) * 2  # bytes of the weights above the threshold
    for b, (path, stats) in palettized.items():
        assert stats.bytes_before == pkg.weight_file(unet_package).stat().st_size
        assert stats.bytes_after == pkg.weight_file(path).stat().st_size
        saved = stats.bytes_before - stats.bytes_after
        # Index bits replace 16 bits per element; palettes and blob alignment cost a little.
        expected = compressible * (1 - b / 16)
        assert 0.9 * expected < saved <= expected, (b, saved, expected)
        assert set(stats.layer_bits) == set(float16)
        assert set(stats.layer_bits.values()) == {b}
        assert stats.average_bits == pytest.approx(b)
    sizes = [palettized[b][1].bytes_after for b in NBITS]
    assert sizes == sorted(sizes)


def test_decompressed_weights_are_near_the_originals_with_at_most_2_pow_n_values(unet_package, palettized):
    original = pkg.dense_weights(unet_package)
    previous = None
    for b in NBITS:
        dense = pkg.dense_weights(palettized[b][0])
        rel = []
        for name, w in original.items():
            assert dense[name].shape == w.shape
            assert len(np.unique(dense[name].astype(np.float32))) <= 1 << b
            rel.append(np.mean((dense[name].astype(np.float64) - w) ** 2) / np.mean(w.astype(np.float64) ** 2))
        error = float(np.mean(rel))
        assert error < {2: 0.15, 4: 0.01, 6: 1e-3, 8: 1e-4}[b]
        assert previous is None or error < previous
        previous = error


def test_psnr_order_follows_bits(palettized, linear8, unet_package, analysis_inputs, reference_outputs):
    scores = {b: executor_psnr(palettized[b][0], analysis_inputs, reference_outputs) for b in NBITS}
    float16 = executor_psnr(unet_package, analysis_inputs, reference_outputs)
    lin8 = executor_psnr(linear8[0], analysis_inputs, reference_outputs)
    print("PSNR dB float16", float16, "palettized", scores, "linear8", lin8)
    assert float16 > scores[8] > scores[6] > scores[4] > scores[2]
    assert float16 > lin8 > scores[4]


def test_as_good_as_coremltools_kmeans_end_to_end(unet_package, palettized, analysis_inputs, reference_outputs, tmp_path):
    import coremltools as ct
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

    theirs = tmp_path / "ct4.mlpackage"
    model = ct.models.MLModel(str(unet_package), skip_model_load=True)
    palettize_weights(model, OptimizationConfig(global_config=OpPalettizerConfig(mode="kmeans", nbits=4))).save(
        str(theirs)
    )
    ours = executor_psnr(palettized[4][0], analysis_inputs, reference_outputs)
    reference = executor_psnr(theirs, analysis_inputs, reference_outputs)
    assert ours > reference - 0.5, (ours, reference)


def test_workers_are_logged_and_do_not_change_the_result(unet_package, palettized, tmp_path, caplog, monkeypatch):
    from sdbuild.compress import palettize

    monkeypatch.setattr(palettize, "IN_PROCESS_ELEMENTS", 0)  # a pool even for the tiny unet
    with caplog.at_level(logging.INFO, logger="sdbuild.compress.palettize"):
        stats = palettize_package(unet_package, tmp_path / "two.mlpackage", 6, workers=2)
    assert stats.workers == 2 and stats.notes == []
    assert any("2 worker process" in r.getMessage() for r in caplog.records)
    pooled = pkg.dense_weights(tmp_path / "two.mlpackage")
    here = pkg.dense_weights(palettized[6][0])
    assert set(pooled) == set(here) and all(np.array_equal(pooled[n], here[n]) for n in here)


def test_a_small_model_is_clustered_in_this_process(unet_package, tmp_path, caplog):
    # Starting a pool costs more than the k-means of a few million weights.
    with caplog.at_level(logging.INFO, logger="sdbuild.compress.palettize"):
        palettize_package(unet_package, tmp_path / "p.mlpackage", 4, workers=2)
    lines = [r.getMessage() for r in caplog.records if "k-means for" in r.getMessage()]
    assert lines and "1 worker process(es) (this process)" in lines[0], lines


def test_kmeans_workers_are_not_forked_from_the_stage(unet_package, tmp_path, caplog, monkeypatch):
    """A forked worker maps every weight of the loaded program: the stage's tree RSS counted it once per worker."""
    from sdbuild.compress import palettize

    monkeypatch.setattr(palettize, "IN_PROCESS_ELEMENTS", 0)
    with caplog.at_level(logging.INFO, logger="sdbuild.compress.palettize"):
        palettize_package(unet_package, tmp_path / "two.mlpackage", 4, workers=2)
    started = [r.getMessage() for r in caplog.records if "2 worker process" in r.getMessage()]
    assert started and ("(forkserver)" in started[0] or "(spawn)" in started[0]), started


def test_linear8_is_8_bits_per_weight_and_close(unet_package, linear8):
    path, stats = linear8
    assert set(stats.layer_bits.values()) == {8}
    assert stats.bytes_after < 0.56 * stats.bytes_before
    original, dense = pkg.dense_weights(unet_package), pkg.dense_weights(path)
    for name, w in original.items():
        scale = np.abs(w.astype(np.float64)).max(axis=tuple(range(1, w.ndim)), keepdims=True) / 127
        assert np.all(np.abs(dense[name].astype(np.float64) - w) <= scale * 0.51 + 1e-3)


def test_grouped_palettes_need_an_ios18_package(unet_package, tmp_path):
    with pytest.raises(RecipeError, match="iOS18 or macOS15"):
        palettize_package(unet_package, tmp_path / "g.mlpackage", 4, group_size=16)


def test_grouped_palettes_on_ios18(unet_package_ios18, tmp_path):
    stats = palettize_package(unet_package_ios18, tmp_path / "g.mlpackage", 4, group_size=16)
    assert set(stats.layer_bits.values()) == {4} and stats.notes == []
    prog = pkg.load_pymil(tmp_path / "g.mlpackage")
    luts = [op for op in pkg.iter_ops(prog) if op.op_type == "constexpr_lut_to_dense"]
    assert luts
    for op in luts:
        lut = op.lut.val  # [.., groups on the output-channel axis, .., 16, 1]
        groups = max(lut.shape[:-2])
        assert lut.shape[-2] == 16 and groups == op.indices.val.shape[int(np.argmax(lut.shape[:-2]))] // 16


def test_bad_requests_are_user_errors(unet_package, tmp_path):
    with pytest.raises(RecipeError, match="choose one of 1, 2, 4, 6, 8"):
        palettize_package(unet_package, tmp_path / "x.mlpackage", 3)
    with pytest.raises(PackageError):
        palettize_package(tmp_path / "missing.mlpackage", tmp_path / "x.mlpackage", 4)


def test_compressing_leaves_every_file_of_the_source_package_as_it_was(unet_package, tmp_path):
    # The source is a cache entry in a build: coremltools opening it in place rewrites its
    # Manifest.json (a new mtime), and the cache's fast check then calls the entry stale.
    import os

    def stats():
        return {p: (os.stat(p).st_mtime_ns, os.stat(p).st_ino, p.read_bytes()) for p in sorted(unet_package.rglob("*")) if p.is_file()}

    before = stats()
    palettize_package(unet_package, tmp_path / "p4.mlpackage", 4)
    assert stats() == before
    import gc
    import tempfile
    from pathlib import Path

    gc.collect()
    assert not list(Path(tempfile.gettempdir()).glob("view-*"))  # the private view is gone with the model


def test_the_program_the_passes_leave_is_the_package_saved(unet_package, tmp_path):
    """Stats read the program ``apply_passes`` returns, not the package read back: the same ops and widths."""
    from sdbuild.compress.palettize import linear8_pass, make_palettizer

    def ops(prog):  # but consts: the reader makes its own of a dequantizer's inline zero point, in its own order
        return [(op.op_type, [o.name for o in op.outputs], [str(o.dtype) for o in op.outputs]) for op in pkg.iter_ops(prog) if op.op_type != "const"]

    for name, passes in {"p6": [make_palettizer(6, None, 1)], "l8": [linear8_pass()]}.items():
        dst = tmp_path / f"{name}.mlpackage"
        kept = pkg.apply_passes(pkg.load_mlmodel(unet_package), passes, dst)
        saved = pkg.load_pymil(dst)
        assert pkg.weight_bits(kept) == pkg.weight_bits(saved)
        assert ops(kept) == ops(saved)
