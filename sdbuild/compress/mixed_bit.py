"""Mixed-bit palettization (MBP) apply: each layer of a float16 package at its recipe's width.

The pre-analysis names layers as PyTorch modules; the package has const ops.
``map_layers`` joins them in two steps:

1. by value: a layer's fingerprint (hash of its float16 values, sorted, so
   blind to reshapes and transposes) equals the const's. This holds whenever
   the package was converted from the analysed checkpoint and no pass
   rewrote the weight.
2. by position, for what is left (a pass that folded a scale into a weight,
   or a fine-tune of the analysed base model): among weights of the same
   element count, the k-th left-over layer in forward order is the k-th
   left-over const in program order.

A layer that finds no const, or a count that does not add up, is an error:
a recipe silently applied to the wrong weights would look like success.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

from sdbuild.compress import package as pkg
from sdbuild.compress.palettize import CompressionStats, _finish, check_nbits, default_workers, make_palettizer
from sdbuild.errors import PackageError, RecipeError


def read_analysis(analysis: Path | dict) -> dict:
    """The pre-analysis JSON (path or already loaded)."""
    if isinstance(analysis, dict):
        return analysis
    path = Path(analysis)
    if not path.is_file():
        raise RecipeError(f"compression.mixed_bit.pre_analysis: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecipeError(f"compression.mixed_bit.pre_analysis: {path} is not JSON ({e.msg}, line {e.lineno})") from e


def recipe_of(analysis: dict, recipe: str) -> dict[str, int]:
    """{layer name: bits} of ``recipe``; RecipeError naming the available recipes when unknown."""
    recipes = analysis.get("recipes", {})
    if recipe not in recipes:
        available = ", ".join(sorted(recipes, key=lambda r: -float(r.split("_")[1]))) or "none"
        raise RecipeError(f"compression.mixed_bit.recipe: unknown recipe '{recipe}': available: {available}")
    return recipes[recipe]


def map_layers(layers: list[dict], prog) -> dict[str, str]:
    """{analysis layer name: const op name of ``prog``} (see the module docstring for how)."""
    consts = [op for op in pkg.iter_ops(prog) if pkg.is_weight_const(op)]
    by_fingerprint = defaultdict(list)
    for op in consts:
        by_fingerprint[pkg.weight_fingerprint(op.outputs[0].val)].append(op.name)
    mapping, used = {}, set()
    for layer in layers:
        names = [n for n in by_fingerprint.get(layer["fingerprint"], []) if n not in used]
        if len(by_fingerprint.get(layer["fingerprint"], [])) == 1 and names:
            mapping[layer["name"]] = names[0]
            used.add(names[0])
    # Position within the same element count, for what values could not settle.
    left_layers, left_consts = defaultdict(list), defaultdict(list)
    for layer in sorted(layers, key=lambda l: l["order"]):
        if layer["name"] not in mapping:
            left_layers[layer["numel"]].append(layer["name"])
    for op in consts:
        if op.name not in used:
            left_consts[int(op.outputs[0].val.size)].append(op.name)
    for numel, names in left_layers.items():
        candidates = left_consts.get(numel, [])
        if len(candidates) < len(names):
            raise PackageError(
                f"mixed-bit: {len(names)} analysed layer(s) of {numel} elements ({names[0]}, ...) have "
                f"{len(candidates)} matching weight(s) in the package: was it converted from another model?"
            )
        mapping.update(zip(names, candidates))
    return mapping


def mixed_bit_package(src: Path, dst: Path, analysis: Path | dict, recipe: str, workers: int | None = None) -> CompressionStats:
    """Palettize each weight of the float16 package ``src`` at the width ``recipe`` gives its layer, into ``dst``.

    ``analysis``: the pre-analysis JSON (path or dict). Layers the recipe keeps
    at 16 bits stay float16; package weights the analysis does not cover are
    left float16 and counted in ``notes``.
    """
    started = time.perf_counter()
    data = read_analysis(analysis)
    widths = recipe_of(data, recipe)
    for bits in set(widths.values()) - {16}:
        check_nbits(bits)
    mlmodel = pkg.load_mlmodel(src)
    prog = pkg.load_pymil(mlmodel)
    mapping = map_layers(data["layers"], prog)
    del prog
    bits_by_const = {mapping[name]: bits for name, bits in widths.items() if bits < 16}
    workers = workers or default_workers()
    palettizer = make_palettizer(bits_by_const, None, workers)
    written = pkg.apply_passes(mlmodel, [palettizer], dst)
    stats = _finish("mixed_bit", src, dst, started, workers, program=written, recipe=recipe)
    uncovered = set(stats.layer_bits) - set(mapping.values())
    if uncovered:
        stats.notes.append(f"{len(uncovered)} weight(s) not in the analysis left float16")
    if palettizer.misses:
        stats.notes.append(f"{palettizer.misses} weight(s) clustered outside the pool")
    return stats
