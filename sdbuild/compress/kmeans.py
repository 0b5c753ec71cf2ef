"""Data-free 1-D k-means for weight palettization.

A palettized weight keeps ``2**nbits`` float16 values (the LUT) and, per
element, the index of its LUT entry. The best LUT for squared error is the
1-D k-means of the weight's values. Float16 weights hold at most 65,536
distinct values, so we cluster the *histogram* of distinct values (value,
count) instead of every element: a 2.4M-element conv weight becomes a few
thousand weighted points, and Lloyd's iterations on sorted 1-D points need
only a binary search and prefix sums. That is why this is fast enough to run
one layer per worker process with no compiled extension.
"""

from __future__ import annotations

import numpy as np

SUPPORTED_NBITS = (1, 2, 4, 6, 8)
MAX_ITERATIONS = 5000
KMEANS_PP_SEEDS = 4


def value_histogram(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct finite values of ``weight`` (any shape) in ascending order, and their counts.

    Returns (values float64 [n], counts float64 [n]). Float16 goes through a
    bincount of its bit patterns, O(size) with no sort of the elements.
    """
    flat = np.ascontiguousarray(weight).reshape(-1)
    if flat.dtype == np.float16:
        counts = np.bincount(flat.view(np.uint16), minlength=1 << 16)
        patterns = np.flatnonzero(counts).astype(np.uint16)
        values = patterns.view(np.float16).astype(np.float64)
        counts = counts[patterns].astype(np.float64)
        keep = np.isfinite(values)
        values, counts = values[keep], counts[keep]
        order = np.argsort(values, kind="stable")
        values, counts = values[order], counts[order]
        # +0 and -0 are two bit patterns of one value: merge them.
        same = np.flatnonzero(np.diff(values) == 0)
        if same.size:
            counts[same + 1] += counts[same]
            values, counts = np.delete(values, same), np.delete(counts, same)
        return values, counts
    values, counts = np.unique(flat[np.isfinite(flat)].astype(np.float64), return_counts=True)
    return values, counts.astype(np.float64)


def weighted_kmeans_1d(values: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    """k-means of sorted distinct points ``values`` [n] weighted by ``counts`` [n].

    Returns the ``min(k, n)`` centroids, ascending (float64). Lloyd's
    iterations from two starts, keeping the lower squared error: equal-weight
    segments, and the cube-root-density spacing that is asymptotically optimal
    for squared error (Panter-Dite), which matters at 6 and 8 bits where
    Lloyd's moves a boundary by one point per iteration. On sorted points an
    iteration costs O(k log n) (binary search and prefix sums), so thousands
    of iterations cost less than reading the weight once.
    """
    n = values.size
    if n <= k:
        return values.copy()
    sums = _prefix_sums(values, counts)
    cum_w, cum_wx, cum_wxx = sums
    best, best_sse = None, np.inf
    # Seeded k-means++ starts cost O(k n) each: a few of them where that is cheap.
    seeds = range(KMEANS_PP_SEEDS if n * k <= 1 << 22 else 1)
    starts_list = [_equal_weight_starts(cum_w, k), _cube_root_density_starts(values, counts, k)]
    starts_list += [_kmeans_plus_plus_starts(values, counts, k, seed, sums) for seed in seeds]
    for starts in starts_list:
        starts = _lloyd(values, _strictly_increasing(starts, n), cum_w, cum_wx)
        sse = _segment_sse(starts, cum_w, cum_wx, cum_wxx)
        if sse < best_sse:
            best, best_sse = starts, sse
    return _segment_means(best, cum_w, cum_wx)


def _prefix_sums(values, counts) -> np.ndarray:
    """[3, n + 1]: prefix sums of the weights, weight * x and weight * x^2, each from 0."""
    return np.stack([np.concatenate([[0.0], np.cumsum(part)]) for part in (counts, counts * values, counts * values * values)])


def _equal_weight_starts(cum_w, k):
    """Cluster boundaries (as first-point indices, with 0 and n) splitting the weight in k equal parts."""
    n = cum_w.size - 1
    targets = cum_w[-1] * np.arange(1, k) / k
    return np.concatenate([[0], np.searchsorted(cum_w[1:], targets, side="right"), [n]])


def _cube_root_density_starts(values, counts, k, bins=4096):
    """Boundaries with equal mass of density**(1/3), estimated on a ``bins``-bin histogram."""
    lo, hi = values[0], values[-1]
    edges = np.linspace(lo, hi, bins + 1)
    mass, _ = np.histogram(values, bins=edges, weights=counts)
    spread = np.cbrt(mass)
    cum = np.concatenate([[0.0], np.cumsum(spread)])
    # Centroid c sits at mass fraction (c + 0.5) / k; boundaries halfway, in mass.
    cuts = np.interp(cum[-1] * np.arange(1, k) / k, cum, edges)
    return np.concatenate([[0], np.searchsorted(values, cuts, side="right"), [values.size]])


def _kmeans_plus_plus_starts(values, counts, k, seed, sums):
    """Boundaries around greedy k-means++ seeds (as scikit-learn seeds): catches lone outliers,
    which deserve an entry of their own and which density-based starts miss.

    On sorted 1-D points a new center takes only the points between the midpoints to its
    neighbouring centers, so a trial's gain is a few prefix sums over that cell and the
    chosen center rewrites only the cell: O(n) a step for the D^2 draw, not O(trials n).
    ``sums``: ``_prefix_sums(values, counts)``; a cell's error about a center is three lookups there."""
    rng = np.random.default_rng(seed)
    trials = 2 + int(np.log(k))
    n = values.size
    cum_w = sums[0]
    first = values[np.searchsorted(cum_w[1:], rng.uniform(0, counts.sum()))]
    chosen = [first]
    # The centers so far in order, between sentinels: a trial's neighbours are at [at - 1] and [at].
    centers = np.full(k + 2, np.inf)
    centers[0], centers[1], size = -np.inf, first, 1
    dist = counts * (values - first) ** 2
    cum = np.zeros(n + 1)
    sides = np.array([[-1], [0]])
    for _ in range(1, k):
        np.cumsum(dist, out=cum[1:])
        picks = np.minimum(np.searchsorted(cum[1:], rng.uniform(0, cum[-1], trials)), n - 1)
        # Greedy: of a few D^2 draws keep the one that lowers the total error most.
        trial = values[picks]
        at = np.searchsorted(centers[: size + 2], trial)
        lo, hi = np.searchsorted(values, (centers[at + sides] + trial) / 2)
        w, wx, wxx = sums[:, hi] - sums[:, lo]
        best = int(np.argmax((cum[hi] - cum[lo]) - (wxx - 2 * trial * wx + trial * trial * w)))
        a, b, center = lo[best], hi[best], trial[best]
        dist[a:b] = np.minimum(dist[a:b], counts[a:b] * (values[a:b] - center) ** 2)
        chosen.append(center)
        place = at[best]
        centers[place + 1 : size + 2] = centers[place : size + 1].copy()
        centers[place] = center
        size += 1
    centers = np.unique(chosen)
    boundaries = (centers[:-1] + centers[1:]) / 2
    starts = np.concatenate([[0], np.searchsorted(values, boundaries, side="right"), [n]])
    if starts.size - 1 < k:  # duplicate seeds: split the widest clusters later via _strictly_increasing
        starts = np.unique(np.concatenate([starts, _equal_weight_starts(cum_w, k)]))
        starts = np.sort(np.random.default_rng(seed).choice(starts[1:-1], k - 1, replace=False))
        starts = np.concatenate([[0], starts, [n]])
    return starts


def _lloyd(values, starts, cum_w, cum_wx):
    n = values.size
    for _ in range(MAX_ITERATIONS):
        centroids = _segment_means(starts, cum_w, cum_wx)
        boundaries = (centroids[:-1] + centroids[1:]) / 2
        new_starts = np.concatenate([[0], np.searchsorted(values, boundaries, side="right"), [n]])
        new_starts = _strictly_increasing(new_starts, n)
        if np.array_equal(new_starts, starts):
            break
        starts = new_starts
    return starts


def _segment_sse(starts, cum_w, cum_wx, cum_wxx):
    lo, hi = starts[:-1], starts[1:]
    w, wx, wxx = cum_w[hi] - cum_w[lo], cum_wx[hi] - cum_wx[lo], cum_wxx[hi] - cum_wxx[lo]
    return float(np.sum(wxx - wx * wx / w))


def _strictly_increasing(starts: np.ndarray, n: int) -> np.ndarray:
    """Force every cluster to hold at least one point (an empty cluster wastes a LUT entry).

    Needs n >= number of clusters; moves boundaries forward, then back from the end. With
    ``t[c] = starts[c] - c``, "at least one past the one before" is a running maximum of ``t``
    and "at least one before the one after" a running minimum from the end: two array passes.
    """
    k = starts.size - 1
    steps = np.arange(k + 1)
    t = starts - steps
    t[1:k] = np.maximum.accumulate(t[: k])[1:]  # starts[0] and starts[k] stay
    t[1:k] = np.minimum.accumulate(t[k:0:-1])[:0:-1]
    return t + steps


def _segment_means(starts, cum_w, cum_wx):
    lo, hi = starts[:-1], starts[1:]
    return (cum_wx[hi] - cum_wx[lo]) / (cum_w[hi] - cum_w[lo])


def kmeans_lut(weight: np.ndarray, nbits: int) -> np.ndarray:
    """The k-means palette of ``weight`` (any shape): ``2**nbits`` ascending values in ``weight.dtype``.

    When the weight has fewer distinct values than entries, the palette holds
    them all and repeats its last entry (no index ever points there).
    """
    if nbits not in SUPPORTED_NBITS:
        raise ValueError(f"nbits must be one of {SUPPORTED_NBITS}, got {nbits}")
    values, counts = value_histogram(weight)
    k = 1 << nbits
    if values.size == 0:
        return np.zeros(k, dtype=weight.dtype)
    centroids = weighted_kmeans_1d(values, counts, k)
    lut = np.full(k, centroids[-1])
    lut[: centroids.size] = centroids
    # Rounding to the stored dtype keeps the order (it may tie neighbours, harmlessly).
    return lut.astype(weight.dtype)


def lut_indices(weight: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Index of the nearest ``lut`` entry (ascending [k]) for each element of ``weight``: uint8, same shape."""
    lut64 = lut.astype(np.float64)
    boundaries = (lut64[:-1] + lut64[1:]) / 2
    # side="left": a value exactly on a boundary goes to the lower entry, which is as near.
    return np.searchsorted(boundaries, weight.astype(np.float64), side="left").astype(np.uint8)


def kmeans_luts(weight: np.ndarray, nbits: tuple[int, ...]) -> dict[int, np.ndarray]:
    """``kmeans_lut`` of ``weight`` at each width of ``nbits``: {bits: palette} (a worker's job)."""
    return {b: kmeans_lut(weight, b) for b in nbits}


def lut_values(weight: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """``lut[lut_indices(weight, lut)]``: each element's nearest ``lut`` entry (same dtype and shape).

    Float16 goes through a table of all 65,536 bit patterns' entries, one
    lookup per element: no float64 copy of the weight, no binary search.
    """
    if weight.dtype != np.float16:
        return lut[lut_indices(weight, lut)]
    table = lut[lut_indices(np.arange(1 << 16, dtype=np.uint16).view(np.float16), lut)]
    return table[np.ascontiguousarray(weight).view(np.uint16)]


def palettize_array(weight: np.ndarray, nbits: int) -> np.ndarray:
    """``weight`` with every element replaced by its nearest k-means palette entry (same dtype and shape)."""
    lut = kmeans_lut(weight, nbits)
    return lut[lut_indices(weight, lut)]
