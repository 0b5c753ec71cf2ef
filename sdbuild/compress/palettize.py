"""n-bit palettization and linear 8-bit quantization of a saved float16 package.

Palettization is coremltools' own pass (``compression::palettize_weights``)
in its ``custom`` mode, which writes the ``constexpr_lut_to_dense`` ops; what
we change is where the k-means runs. coremltools runs it layer after layer in
one process (its worker option splits only the channel groups of one layer).
``ParallelKmeansPalettizer`` first collects every weight the pass will touch,
computes all their palettes in a process pool, and then lets the pass run
with a LUT function that looks the precomputed palette up.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from sdbuild.compress import package as pkg
from sdbuild.compress.kmeans import SUPPORTED_NBITS, kmeans_lut, lut_indices
from sdbuild.errors import RecipeError
from sdbuild.workers import forkserver_or_spawn

log = logging.getLogger(__name__)


@dataclass
class CompressionStats:
    """What a compression did to one package.

    ``layer_bits`` maps each weight (by the name of its float16 const in the
    source package) to its bit width in the result (16: left float16);
    ``average_bits`` is their element-weighted mean. Byte counts are of the
    weight file (``Data/com.apple.CoreML/weights/weight.bin``).
    """

    method: str  # palettize | prune | prune+palettize | linear8 | mixed_bit
    bytes_before: int
    bytes_after: int
    layer_bits: dict[str, int]
    average_bits: float
    seconds: float
    workers: int
    nbits: int | None = None
    group_size: int | None = None
    recipe: str | None = None
    sparsity: float | str | None = None
    lut_dtype: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Weight file after / before."""
        return self.bytes_after / self.bytes_before if self.bytes_before else 0.0


def default_workers() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity call
        return os.cpu_count() or 1


def _digest(array: np.ndarray) -> str:
    """Key of a weight (or channel group) as the palettization pass will hand it to the LUT function."""
    data = np.ascontiguousarray(array)
    return hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest() + str(data.shape) + str(data.dtype)


# Workers start from a small forkserver (spawn where there is none), never forked from this process:
# a forked worker's page tables map every weight of the loaded program, so each worker's RSS
# counted the whole program again (the 6-bit stage measured 3.8x the float16 weights with 2
# workers) and a worker touching its copy-on-write pages could really double it.
# Below this many weight elements in all, the k-means runs in this process (a tiny model's
# take well under a second; a pool's start costs more).
IN_PROCESS_ELEMENTS = 4_000_000


def _kmeans_job(job: tuple[str, np.ndarray, int, bool]) -> tuple[str, np.ndarray]:
    key, weight, nbits, pruned = job
    return key, kmeans_lut(_kept_values(weight) if pruned else weight, nbits)


def _kept_values(weight: np.ndarray) -> np.ndarray:
    """The values a pruned weight stores: its zeros are the sparse mask's, never looked up in the palette.

    Clustering them too (as coremltools does) spends a palette entry on zero.
    """
    kept = weight[weight != 0]
    return kept if kept.size else weight


def _get_palettize_pass_class():
    from coremltools.optimize.coreml._quantization_passes import palettize_weights

    return palettize_weights


def make_palettizer(bits_by_const: dict[str, int] | int, group_size: int | None, workers: int, joint: bool = False):
    """A coremltools palettization pass whose k-means LUTs are computed in ``workers`` processes.

    ``bits_by_const``: one width for every weight above the threshold, or
    {const op name: width} to palettize only those (mixed-bit). ``group_size``:
    output channels per palette (iOS18 programs), None for one per tensor.
    ``joint``: palettize the nonzero values of already pruned weights
    (coremltools' joint compression: ``constexpr_lut_to_sparse``; iOS18 programs).
    """
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig

    base = _get_palettize_pass_class()

    class ParallelKmeansPalettizer(base):
        def __init__(self):
            self.luts: dict[str, np.ndarray] = {}
            self.misses = 0
            self.bits_by_key: dict[str, int] = {}
            granularity = {"granularity": "per_grouped_channel", "group_size": group_size} if group_size else {}
            op_config = OpPalettizerConfig(mode="custom", lut_function=self.lookup_lut, **granularity)
            if isinstance(bits_by_const, int):
                config = OptimizationConfig(global_config=op_config)
            else:
                config = OptimizationConfig(op_name_configs={name: op_config for name in bits_by_const})
            super().__init__(config=config)
            self.joint_compression = joint

        def nbits_of(self, op) -> int:
            return bits_by_const if isinstance(bits_by_const, int) else bits_by_const[op.name]

        def apply(self, prog):
            self.precompute(prog)
            super().apply(prog)

        def precompute(self, prog) -> None:
            """k-means of every (weight or channel group) the pass will compress, in a process pool."""
            from coremltools.optimize import _utils as optimize_utils

            jobs = []
            for function in prog.functions.values():
                with function:  # the pass's checks read the opset of the current function
                    for op in pkg.iter_ops_of(function):
                        if op.op_type != "const" or not self.is_valid_op(op):
                            continue
                        op_config = self.config._get_const_op_config(op)
                        if op_config is None or not self.need_compress_const(op, False, op_config.weight_threshold):
                            continue
                        nbits = self.nbits_of(op)
                        for group in self._groups(op, op_config, optimize_utils):
                            key = _digest(group)
                            if key in self.bits_by_key:
                                continue  # a weight another function shares (one per resolution): clustered once
                            self.bits_by_key[key] = nbits
                            jobs.append((key, group, nbits, self.joint_compression))
            # Largest first, so no big layer starts last while the other workers idle.
            jobs.sort(key=lambda job: -job[1].size)
            n_workers = max(1, min(workers, len(jobs)))
            if sum(job[1].size for job in jobs) < IN_PROCESS_ELEMENTS:
                n_workers = 1  # starting the pool would cost more than the k-means itself
            start = forkserver_or_spawn() if n_workers > 1 else "this process"
            log.info("palettize: k-means for %d weights in %d worker process(es) (%s)", len(jobs), n_workers, start)
            if n_workers == 1:
                self.luts.update(_kmeans_job(job) for job in jobs)
                return
            with get_context(start).Pool(n_workers) as pool:
                self.luts.update(pool.imap_unordered(_kmeans_job, jobs, chunksize=1))

        def _groups(self, op, op_config, optimize_utils) -> list[np.ndarray]:
            """The arrays the pass will hand the LUT function for ``op``, split as it splits them."""
            weight = op.outputs[0].val
            child = op.outputs[0].child_ops[0] if op.outputs[0].child_ops else None
            if self.joint_compression and child is not None and child.op_type == "constexpr_sparse_to_dense":
                # As the pass: a pruned weight is clustered in its dense form, zeros included.
                weight = optimize_utils.sparse_to_dense(weight, child.mask.val)
            block_sizes, channel_axis = optimize_utils.infer_block_sizes(
                op, op_config, weight, return_channel_axis=True
            )
            if block_sizes is None:
                return []
            # As the pass's blockwise_compress: one axis may be blocked; that is the channel axis.
            axis, group = 0, 0
            for dim, size in enumerate(block_sizes):
                if size not in (0, weight.shape[dim]):
                    axis, group = dim, size
            channels = weight.shape[axis]
            group = group or channels
            if channels % group:
                return []
            moved = np.swapaxes(weight, 0, axis) if axis else weight
            return np.split(moved, channels // group, axis=0)

        def lookup_lut(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """(lut [2**n] in weight's dtype, indices uint8 [weight.size]) for one weight or channel group."""
            key = _digest(weight)
            lut = self.luts.get(key)
            if lut is None:  # not foreseen by precompute: correct, only serial
                self.misses += 1
                values = _kept_values(weight) if self.joint_compression else weight
                lut = kmeans_lut(values, self.bits_by_key.get(key, _only_width(bits_by_const)))
            return lut.astype(weight.dtype), lut_indices(weight, lut).reshape(-1)

    return ParallelKmeansPalettizer()


def _only_width(bits_by_const) -> int:
    if isinstance(bits_by_const, int):
        return bits_by_const
    widths = set(bits_by_const.values())
    if len(widths) != 1:
        raise RuntimeError("palettize: a weight the pass met was not precomputed and its width is ambiguous")
    return widths.pop()


def check_nbits(nbits: int) -> None:
    if nbits not in SUPPORTED_NBITS:
        raise RecipeError(
            f"compression.nbits: {nbits} is not a palette width: choose one of "
            + ", ".join(map(str, SUPPORTED_NBITS))
        )


def _check_group_size(group_size: int | None, mlmodel, src: Path) -> None:
    if group_size is None:
        return
    if not isinstance(group_size, int) or group_size < 1:
        raise RecipeError(f"compression.group_size: {group_size!r} must be a positive number of channels")
    version = pkg.spec_version(mlmodel)
    if version < pkg.IOS18_SPEC_VERSION:
        raise RecipeError(
            f"compression.group_size needs target iOS18 or macOS15 or later: {src} was converted "
            f"for an older target (Core ML specification version {version}); drop group_size or raise target"
        )


def _finish(method, src, dst, started, workers, program=None, **extra) -> CompressionStats:
    """``program``: ``dst``'s pymil Program where the caller has it loaded already."""
    bits = pkg.weight_bits(dst if program is None else program)
    return CompressionStats(
        method=method,
        bytes_before=pkg.weight_file(src).stat().st_size,
        bytes_after=pkg.weight_file(dst).stat().st_size,
        layer_bits={name: b for name, (b, _) in bits.items()},
        average_bits=pkg.average_bits(bits),
        seconds=time.perf_counter() - started,
        workers=workers,
        **extra,
    )


def palettize_package(
    src: Path,
    dst: Path,
    nbits: int | None,
    group_size: int | None = None,
    workers: int | None = None,
    sparsity: float | str | None = None,
    lut_dtype: str | None = None,
) -> CompressionStats:
    """Palettize every weight above 2048 elements of the package ``src`` to ``nbits``, into ``dst``.

    Data-free k-means per weight (or per group of ``group_size`` output
    channels, which needs an iOS18/macOS15 package), spread over ``workers``
    processes (default: every CPU this process may use).

    ``sparsity`` first prunes each weight by magnitude (a fraction zeroed, or
    "n:m"); with ``nbits`` too, the nonzero values are then palettized as
    coremltools' joint compression does (``constexpr_lut_to_sparse`` feeding
    ``constexpr_sparse_to_dense``), with ``nbits=None`` the weights are only
    pruned. ``lut_dtype="int8"`` stores each palette as int8 with one scale
    (``constexpr_blockwise_shift_scale`` feeding the LUT op). Joint forms need
    an iOS18/macOS15 package.
    """
    started = time.perf_counter()
    if nbits is not None:
        check_nbits(nbits)
    mlmodel = pkg.load_mlmodel(src)
    _check_group_size(group_size, mlmodel, src)
    _check_joint(mlmodel, src, joint_sparse=sparsity is not None and nbits is not None, lut_dtype=lut_dtype)
    workers = workers or default_workers()
    passes = [make_pruner(sparsity)] if sparsity is not None else []
    palettizer = None
    if nbits is not None:
        palettizer = make_palettizer(nbits, group_size, workers, joint=sparsity is not None)
        passes.append(palettizer)
    if lut_dtype is not None:
        passes.append(make_palette_quantizer())
    written = pkg.apply_passes(mlmodel, passes, dst)
    notes = [f"{palettizer.misses} weight(s) clustered outside the pool"] if palettizer and palettizer.misses else []
    method = "palettize" if sparsity is None else ("prune" if nbits is None else "prune+palettize")
    return _finish(
        method, src, dst, started, workers, program=written, nbits=nbits, group_size=group_size, notes=notes,
        sparsity=sparsity, lut_dtype=lut_dtype,
    )


def _check_joint(mlmodel, src: Path, joint_sparse: bool, lut_dtype: str | None) -> None:
    """Joint compression (pruned + palettized, int8 palettes) exists from iOS18/macOS15 on."""
    wanted = [key for key, on in (("sparsity with nbits", joint_sparse), ("lut_dtype", lut_dtype is not None)) if on]
    version = pkg.spec_version(mlmodel)
    if wanted and version < pkg.IOS18_SPEC_VERSION:
        raise RecipeError(
            f"compression.{wanted[0]} needs target iOS18 or macOS15 or later (joint compression): {src} was "
            f"converted for an older target (Core ML specification version {version}); raise target or drop it"
        )


def sparsity_config(sparsity: float | str):
    """coremltools' magnitude pruning config for a fraction (0.5) or "n:m" (n of every m zeroed)."""
    from coremltools.optimize.coreml import OpMagnitudePrunerConfig

    if isinstance(sparsity, str):
        n, m = (int(part) for part in sparsity.split(":"))
        return OpMagnitudePrunerConfig(n_m_ratio=(n, m), weight_threshold=pkg.WEIGHT_THRESHOLD)
    return OpMagnitudePrunerConfig(target_sparsity=float(sparsity), weight_threshold=pkg.WEIGHT_THRESHOLD)


def make_pruner(sparsity: float | str):
    """coremltools' ``prune_weights`` pass: every weight above the threshold pruned by magnitude."""
    from coremltools.optimize.coreml import OptimizationConfig
    from coremltools.optimize.coreml._quantization_passes import prune_weights

    class MagnitudePruner(prune_weights):
        @staticmethod
        def compress_by_magnitude(val, target_sparsity, block_size=None, dim=None):
            # The threshold is ranked in float32: numpy's percentile of a float16 array above 65,504
            # elements overflows its index arithmetic (NaN), and nothing would be pruned.
            params = prune_weights.compress_by_magnitude(val.astype(np.float32), target_sparsity, block_size, dim)
            if params is None:
                return None
            return params._replace(nonzero_data=params.nonzero_data.astype(val.dtype))  # exact: float16 values

    return MagnitudePruner(config=OptimizationConfig(global_config=sparsity_config(sparsity)))


def make_palette_quantizer():
    """coremltools' joint int8 quantization (``linear_quantize_weights``), applied to palettes only.

    Left to itself the joint pass would also quantize any float weight the
    palettizer skipped; here only a const that is a LUT op's ``lut`` is taken.
    """
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights

    class PaletteQuantizer(linear_quantize_weights):
        def need_compress_const(self, op, _is_deprecated, weight_threshold):
            children = op.outputs[0].child_ops
            is_lut = (
                len(children) == 1
                and children[0].op_type in ("constexpr_lut_to_dense", "constexpr_lut_to_sparse")
                and children[0].lut is op.outputs[0]
            )
            return is_lut and super().need_compress_const(op, _is_deprecated, weight_threshold)

    # Per tensor: the only granularity coremltools allows for a palette (its axes are not the weight's).
    op_config = OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", granularity="per_tensor", weight_threshold=pkg.WEIGHT_THRESHOLD
    )
    quantizer = PaletteQuantizer(config=OptimizationConfig(global_config=op_config))
    quantizer.joint_compression = True
    return quantizer


def linear8_pass():
    """coremltools' ``linear_quantize_weights`` pass, set for symmetric int8 per output channel
    over every weight above 2048 elements (the rest stay float16)."""
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption

    config = OptimizationConfig(
        global_config=OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=pkg.WEIGHT_THRESHOLD
        )
    )
    quantizer = PASS_REGISTRY["compression::linear_quantize_weights"]
    quantizer.set_options([PassOption("config", config), PassOption("joint_compression", False)])
    return quantizer


def linear8_package(src: Path, dst: Path) -> CompressionStats:
    """Linear 8-bit weights: symmetric int8 with one scale per output channel, as the seed's baseline.

    coremltools' ``linear_quantize_weights`` does all of it; weights at or
    below 2048 elements stay float16.
    """
    started = time.perf_counter()
    mlmodel = pkg.load_mlmodel(src)
    written = pkg.apply_passes(mlmodel, [linear8_pass()], dst)
    return _finish("linear8", src, dst, started, 1, program=written, nbits=8)
