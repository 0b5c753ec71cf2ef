"""The 1-D k-means behind every palette: exact structure, and quality against coremltools' own k-means."""

from __future__ import annotations

import numpy as np
import pytest

from sdbuild.compress.kmeans import kmeans_lut, lut_indices, lut_values, palettize_array, value_histogram


def _weights(kind: str) -> np.ndarray:
    rng = np.random.default_rng(3)
    if kind == "normal":
        return (rng.standard_normal((64, 64, 3, 3)) * 0.02).astype(np.float16)
    if kind == "heavy":  # heavy tails: lone outliers deserve entries of their own
        return (rng.standard_t(3, (256, 128)) * 0.02).astype(np.float16)
    return np.concatenate([rng.normal(-1, 0.1, 20000), rng.normal(2, 0.5, 8000)]).astype(np.float16)


def test_histogram_counts_every_element_once_and_merges_signed_zeros():
    w = np.array([0.0, -0.0, 1.5, 1.5, -2.0, np.inf], dtype=np.float16)
    values, counts = value_histogram(w)
    assert values.tolist() == [-2.0, 0.0, 1.5]
    assert counts.tolist() == [1, 2, 2]


@pytest.mark.parametrize("nbits", [1, 2, 4, 6, 8])
def test_palette_has_2_pow_nbits_sorted_entries_and_nearest_indices(nbits):
    w = _weights("normal")
    lut = kmeans_lut(w, nbits)
    assert lut.shape == (1 << nbits,) and lut.dtype == np.float16
    assert np.all(np.diff(lut.astype(np.float64)) >= 0)
    idx = lut_indices(w, lut)
    q = lut[idx]
    assert len(np.unique(q.astype(np.float32))) <= 1 << nbits  # (float16 np.unique is unreliable)
    # Every element sits on its nearest entry.
    nearest = np.abs(w.reshape(-1, 1).astype(np.float64) - lut.astype(np.float64)).min(axis=1)
    assert np.allclose(np.abs(q.astype(np.float64) - w.astype(np.float64)).reshape(-1), nearest)


@pytest.mark.parametrize("nbits", [1, 4, 8])
def test_lut_values_by_table_are_the_nearest_entries_bit_for_bit(nbits):
    """The float16 table lookup against the binary search, with signed zeros, subnormals, infinities, NaN
    and values on a boundary; other dtypes take the search itself."""
    w = _weights("heavy")
    lut = kmeans_lut(w, nbits)
    middle = ((lut[:-1].astype(np.float64) + lut[1:]) / 2).astype(np.float16)
    odd = np.array([0.0, -0.0, 6e-8, -6e-8, 1e-5, np.inf, -np.inf, np.nan, 65504, -65504], dtype=np.float16)
    w = np.concatenate([odd, middle, w.reshape(-1)])
    w = w[: w.size // 2 * 2].reshape(-1, 2)[:, ::-1]  # not contiguous, either
    expected = lut[lut_indices(w, lut)]
    got = lut_values(w, lut)
    assert got.dtype == np.float16 and got.shape == w.shape
    assert np.array_equal(got.view(np.uint16), expected.view(np.uint16))
    w32 = w.astype(np.float32)
    assert np.array_equal(lut_values(w32, lut), lut[lut_indices(w32, lut)])


def test_few_distinct_values_are_kept_exactly():
    w = np.array([0.5, -1.0, 0.5, 3.0] * 1000, dtype=np.float16)
    assert np.array_equal(palettize_array(w, 2), w)
    assert np.array_equal(palettize_array(w.astype(np.float32), 4), w.astype(np.float32))


def test_error_falls_as_bits_grow():
    w = _weights("normal")
    errors = [np.mean((palettize_array(w, b).astype(np.float64) - w) ** 2) for b in (1, 2, 4, 6, 8)]
    assert all(a > b for a, b in zip(errors, errors[1:]))


@pytest.mark.parametrize("kind", ["normal", "heavy", "bimodal"])
@pytest.mark.parametrize("nbits", [2, 4, 6, 8])
def test_quality_matches_coremltools_kmeans(kind, nbits):
    """Squared error within 10% of coremltools' k-means (scikit-learn) on the same weight."""
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

    w = _weights(kind)
    ours = np.mean((palettize_array(w, nbits).astype(np.float64) - w) ** 2)
    lut, idx = _get_kmeans_lookup_table_and_weight(nbits, w)
    theirs = np.mean((lut.astype(np.float16).reshape(-1)[idx].astype(np.float64) - w.reshape(-1)) ** 2)
    assert ours <= 1.10 * theirs, (ours, theirs)


def _greedy_seeds_over_every_point(values, counts, k, seed):
    """k-means++ seeding scored the straightforward way: every trial's total error over all points."""
    rng = np.random.default_rng(seed)
    trials = 2 + int(np.log(k))
    centers = [values[np.searchsorted(np.cumsum(counts), rng.uniform(0, counts.sum()))]]
    dist = counts * (values - centers[0]) ** 2
    for _ in range(1, k):
        cum = np.cumsum(dist)
        picks = np.minimum(np.searchsorted(cum, rng.uniform(0, cum[-1], trials)), values.size - 1)
        trial_dist = np.minimum(dist[None, :], counts[None, :] * (values[None, :] - values[picks, None]) ** 2)
        best = int(np.argmin(trial_dist.sum(axis=1)))
        centers.append(values[picks[best]])
        dist = trial_dist[best]
    return np.unique(centers)


@pytest.mark.parametrize("kind", ["normal", "heavy", "bimodal"])
@pytest.mark.parametrize("nbits", [2, 6, 8])
def test_seeding_scored_on_each_cell_picks_the_seeds_scored_on_every_point(kind, nbits):
    """A new center changes the error only between the midpoints to its neighbours: scoring the trials
    there picks the same seeds as summing over every point."""
    from sdbuild.compress.kmeans import _kmeans_plus_plus_starts, _prefix_sums

    values, counts = value_histogram(_weights(kind))
    k = 1 << nbits
    for seed in range(3):
        centers = _greedy_seeds_over_every_point(values, counts, k, seed)
        boundaries = (centers[:-1] + centers[1:]) / 2
        expected = np.concatenate([[0], np.searchsorted(values, boundaries, side="right"), [values.size]])
        got = _kmeans_plus_plus_starts(values, counts, k, seed, _prefix_sums(values, counts))
        if expected.size - 1 == k:  # (with duplicate seeds both go on to the same random split)
            assert np.array_equal(got, expected), (kind, nbits, seed)
        assert got.size - 1 == k
