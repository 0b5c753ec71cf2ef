"""Mixed-bit palettization (MBP) pre-analysis, on the PyTorch unet.

What it measures, as the seed describes it:

1. each eligible layer's *isolated* impact: palettize that one layer's weight
   at 1, 2, 4, 6 and 8 bits (the same k-means the package palettizer uses),
   everything else float16-rounded, and take the end-to-end PSNR of the unet
   output against float32 over a fixed set of seeded inputs;
2. per bit width, a cumulative curve: layers ordered by ascending isolated
   impact, palettize more and more of them, PSNR against size (% of float16);
3. mixed-bit recipes: for a sweep of PSNR thresholds, give each layer the
   fewest bits whose isolated PSNR stays above the threshold (float16 if
   none), then measure the whole recipe end to end. A recipe is named by its
   element-weighted average width: ``recipe_4.50_bit_mixedpalette``.

Eligible layers are convolution and linear weights above 2048 elements, the
line coremltools' compression uses, so they are the package's compressible
consts. Each layer is written with its execution order, shape and a
fingerprint of its float16 values: ``mixed_bit.map_layers`` uses these to find
the const op each layer became (see there).

Computation is float32 with float16-rounded weights: the analysis sees the
weights the package stores; float16 *activations* are left to verify (the
reference executor), which is why ``original`` here scores above what a
float16 package scores.

Every result is appended to ``analysis.partial.jsonl`` as it comes; a rerun
after a kill reads it back and skips what is done.

Memory: the float32 unet is the only copy of the weights. A measurement
swaps its layers' weights in place, one layer at a time (each replacement
made when it is swapped in), and keeps only the swapped layers' float16
originals to put back; attention runs in blocks of at most
``ATTENTION_BLOCK`` scores. Besides the unet, what is held is bounded:
``REPLAY_BYTES`` of baseline activations, and each layer's k-means palette
per width (2**bits values: the k-means runs once per layer and width, and a
palettized weight is made from its palette each time it is swapped in; SD
1.5: bench/results/analysis-sd15*.json).

Every (layer, width) is measured; none is skipped by a bound. The recipes
sweep thresholds between the lowest and the highest isolated PSNR of all
layers and widths, and each width's cumulative curve orders *all* layers by
their PSNR at that width, so every entry moves a result: a width left
unmeasured would change the thresholds, a layer's width in a recipe, or a
curve's order.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sdbuild.compress.kmeans import SUPPORTED_NBITS, kmeans_lut, kmeans_luts, lut_indices, lut_values
from sdbuild.compress.package import WEIGHT_THRESHOLD, weight_fingerprint
from sdbuild.metrics import psnr

ANALYSIS_FILE = "analysis.json"
PARTIAL_FILE = "analysis.partial.jsonl"
PLOT_FILE = "analysis.png"
ANALYSIS_VERSION = 1
FLOAT16_BITS = 16
REPLAY_BYTES = 2 << 30  # baseline activations kept to replay (see _Replay)
# Attention a block of query rows at a time, each block's scores at most this many float32 values
# (256 MiB): SD 1.5's first self-attention at 512x512 would otherwise hold 1 GiB of scores and as
# large a softmax. Blocks this large keep the matmuls large: SD 1.5's 4,096-token attention took
# 3.8 s in blocks of 2**24 scores, 6.4 s in blocks of 2**22, 3.3 s whole (2 threads, load 7-8).
ATTENTION_BLOCK = 1 << 26
# The isolated layers' palettes are computed this many layers ahead in a worker process, for models
# whose weights hold at least WORKER_ELEMENTS (below, starting the worker costs more than it saves).
PALETTES_AHEAD = 3
WORKER_ELEMENTS = 50_000_000


def recipe_name(average_bits: float) -> str:
    return f"recipe_{average_bits:.2f}_bit_mixedpalette"


@dataclass
class Layer:
    """One eligible weight: module name, shape, elements, order of first use in forward."""

    name: str
    module: object
    shape: tuple[int, ...]
    numel: int
    order: int
    fingerprint: str


# --------------------------------------------------------------------------- weights


def fake_palettize(weight16: np.ndarray, nbits: int) -> np.ndarray:
    """Float16 weight → its k-means palettized value (float16, same shape), as the package gets it."""
    lut = kmeans_lut(weight16, nbits)
    return lut[lut_indices(weight16, lut)]


def fake_linear8(weight16: np.ndarray) -> np.ndarray:
    """Symmetric int8 with one scale per output channel (axis 0), back to float16."""
    w = weight16.astype(np.float32)
    flat = w.reshape(w.shape[0], -1)
    scale = np.abs(flat).max(axis=1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.round(flat / scale), -127, 127)
    return (q * scale).astype(np.float16).reshape(w.shape)


def recipe_bits(recipe: dict[str, int], layers: list[Layer]) -> float:
    """Element-weighted average width of ``recipe`` ({layer: bits}, 16 when absent)."""
    total = sum(layer.numel for layer in layers)
    return sum(recipe.get(layer.name, FLOAT16_BITS) * layer.numel for layer in layers) / total


def size_percent(recipe: dict[str, int], layers: list[Layer]) -> float:
    """Weight size as % of float16 (palette storage not counted)."""
    return 100.0 * recipe_bits(recipe, layers) / FLOAT16_BITS


# --------------------------------------------------------------------------- the model side


class _Model:
    """The unet with float16-rounded weights and a way to swap one layer's weight in and out."""

    def __init__(self, module, inputs: list[dict], replay: bool = True):
        import torch

        self.torch = torch
        self.module = module.float().eval()
        self.replay: _Replay | None = None
        self.inputs = [{k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in x.items()} for x in inputs]
        self.reference = self.outputs()  # float32 weights
        self.layers = self._eligible_layers()
        with torch.no_grad():
            for p in self.module.parameters():  # the float16 package's weights
                p.copy_(p.half().float())
        self.by_name = {l.name: l for l in self.layers}
        self.luts: dict[tuple[str, int], np.ndarray] = {}  # (layer, bits) → its k-means palette
        if replay:
            recording = _Replay(self.module, {l.name for l in self.layers}, len(self.inputs))
            self.outputs(around=recording.recording)  # the baseline forwards (float16-rounded weights)
            recording.recorded()
            self.replay = recording

    def outputs(self, replaced: tuple[str, ...] = (), around=None) -> list[np.ndarray]:
        """The unet's output per input. With a replay, calls that end before any ``replaced`` layer
        is used are replayed; ``around(i)``: a context each input's forward runs in instead."""
        import contextlib

        if around is None and self.replay is not None:
            around = lambda i: self.replay.replaying(i, replaced)  # noqa: E731
        from sdbuild.models.chunked_attention import chunked_scores

        outs = []
        with self.torch.no_grad(), chunked_scores(ATTENTION_BLOCK):
            for i, x in enumerate(self.inputs):
                with around(i) if around else contextlib.nullcontext():
                    outs.append(_first_tensor(self.module(**x)).numpy().copy())
        return outs

    def _eligible_layers(self) -> list[Layer]:
        """Conv/linear weights above the threshold, in the order forward first uses them."""
        nn = self.torch.nn
        candidates = {
            name: m
            for name, m in self.module.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and m.weight.numel() > WEIGHT_THRESHOLD
        }
        order: list[str] = []
        hooks = [
            m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name) if name not in order else None)
            for name, m in candidates.items()
        ]
        from sdbuild.models.chunked_attention import chunked_scores

        try:
            with self.torch.no_grad(), chunked_scores(ATTENTION_BLOCK):
                self.module(**self.inputs[0])
        finally:
            for h in hooks:
                h.remove()
        return [
            Layer(
                name,
                candidates[name],
                tuple(candidates[name].weight.shape),
                candidates[name].weight.numel(),
                i,
                weight_fingerprint(candidates[name].weight.detach().numpy()),
            )
            for i, name in enumerate(order)
        ]

    def weight16(self, name: str) -> np.ndarray:
        """A layer's float16 weight, as the package stores it (a fresh array: none is kept)."""
        return self.by_name[name].module.weight.detach().numpy().astype(np.float16)

    def psnr_with(self, replaced: Mapping[str, np.ndarray]) -> float:
        """Mean end-to-end PSNR over the inputs with ``replaced`` weights ({layer: float16 array}) swapped in.

        The weights are swapped in place one layer at a time (``replaced`` may
        compute its values as they are asked for, see ``_Lazy``), each layer's
        own kept in float16 meanwhile (exact: the module's weights are
        float16-rounded) and put back after: a swap of every layer holds half
        the model's float32 size, nothing more.
        """
        torch = self.torch
        saved: dict[str, np.ndarray] = {}
        try:
            with torch.no_grad():
                for name, w in replaced.items():
                    saved[name] = self.weight16(name)
                    self.by_name[name].module.weight.copy_(torch.from_numpy(np.asarray(w, dtype=np.float32)))
            outs = self.outputs(tuple(saved))
        finally:
            with torch.no_grad():
                for name, w in saved.items():
                    self.by_name[name].module.weight.copy_(torch.from_numpy(w.astype(np.float32)))
        return float(np.mean([psnr(ref, out) for ref, out in zip(self.reference, outs)]))

    def palettized_layer(self, name: str, bits: int) -> np.ndarray:
        """``fake_palettize`` of one layer: its palette computed the first time and kept, the weight made from
        it each time (the curves and recipes swap in every layer again: SD 1.5's weights at one width are
        1.7 GB, and the k-means costs more than the forward of a small input)."""
        weight = self.weight16(name)
        key = (name, bits)
        if key not in self.luts:
            self.luts[key] = kmeans_lut(weight, bits)
        return lut_values(weight, self.luts[key])

    def palettized(self, recipe: dict[str, int]) -> Mapping[str, np.ndarray]:
        """The layers ``recipe`` palettizes → their palettized weights, each computed when asked for."""
        names = [name for name, bits in recipe.items() if bits < FLOAT16_BITS]
        return _Lazy(names, lambda name: self.palettized_layer(name, recipe[name]))


class _Palettes:
    """The isolated layers' k-means palettes, made ``PALETTES_AHEAD`` layers ahead in a worker process.

    The k-means of a layer's five widths costs about what its five
    measurements' forwards cost on a small input (SD 1.5: 2.3 s against 1.9 s
    each, bench/results/analysis-sd15-*.json), and it does not depend on
    them: a worker makes the next layers' palettes while this process runs
    the forwards. The same palettes (``kmeans_lut`` is deterministic), so
    the same analysis. Each job carries one layer's float16 weight; at most
    ``PALETTES_AHEAD`` are in flight.
    """

    def __init__(self, model: _Model, names: list[str], nbits: tuple[int, ...]):
        self.model, self.nbits, self.waiting = model, nbits, list(names)
        self.running: dict[str, object] = {}
        self.pool = None
        if names and sum(model.by_name[n].numel for n in names) >= WORKER_ELEMENTS:
            from multiprocessing import get_context

            from sdbuild.workers import forkserver_or_spawn

            self.pool = get_context(forkserver_or_spawn()).Pool(1)
        self._start()

    def _start(self) -> None:
        while self.pool is not None and self.waiting and len(self.running) < PALETTES_AHEAD:
            name = self.waiting.pop(0)  # its weight is the float16 original: no measurement is swapped in now
            self.running[name] = self.pool.apply_async(kmeans_luts, (self.model.weight16(name), self.nbits))

    def take(self, name: str) -> None:
        """Before ``name`` is measured: its palettes into the model's (waiting for the worker), the next started."""
        job = self.running.pop(name, None)
        if job is not None:
            self.model.luts.update(((name, b), lut) for b, lut in job.get().items())
        self._start()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


class _Lazy(Mapping):
    """{name: value(name)} for ``names``, each value computed when asked for and not kept:
    a swap of every layer never holds every replacement weight at once."""

    def __init__(self, names, value: Callable[[str], np.ndarray]):
        self.names, self.value = list(names), value

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(name)
        return self.value(name)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class _Replay:
    """The baseline forward's module calls, replayed where a measurement cannot change them.

    A measurement swaps a few layers' weights and runs the whole unet; every
    module call that *finished* before the first swapped layer was first used
    computes exactly what it computed with the baseline weights. The baseline
    forward (one per input) records those calls' outputs; a measurement then
    returns a copy of the recorded output instead of running such a call, so
    only the unet from the first swapped layer on is computed again. Exact:
    the calls that do run are the same operations on the same values.

    A call is kept only where replaying it cannot change anything else: its
    arguments are tensors or plain values (a list argument may be changed by
    the call: the up blocks pop their skips), it modifies no tensor argument
    in place, and its output is a tensor or a tuple or list of tensors
    (a fresh copy is returned each time). Calls are
    numbered in the order they start (the modules holding a measured layer,
    and the layers); the numbering must come out the same in every forward,
    which is checked: where it does not, nothing is replayed from then on.
    What is kept is bounded by ``REPLAY_BYTES``, outermost modules first.
    """

    def __init__(self, root, layers: set[str], inputs: int):
        self.modules = {
            name: module
            for name, module in root.named_modules()
            if name and any(layer == name or layer.startswith(name + ".") for layer in layers)
        }
        self.layers = layers
        self.names: list[list[str]] = [[] for _ in range(inputs)]  # per input, the module of each call
        self.kept: list[dict[int, tuple[int, object]]] = [{} for _ in range(inputs)]  # call → (its last call, output)
        self.first_use: dict[str, int] = {}
        self.broken = False
        self._recording, self._input, self._next, self._until = False, 0, 0, 0

    def recording(self, index: int):
        """Context: the baseline forward of input ``index``, its calls recorded; ``recorded()`` after the last input."""
        self._begin(index)
        return self._patched(recording=True)

    def recorded(self) -> None:
        """After every input's baseline forward: number the layers' first uses, bound what is kept."""
        if any(names != self.names[0] for names in self.names):
            self.broken = True  # the inputs take different paths: the numbering cannot be shared
        for index, name in enumerate(self.names[0]):
            if name in self.layers:
                self.first_use.setdefault(name, index)
        self._bound()

    def _bound(self) -> None:
        entries = [(name.count("."), i, index) for i, kept in enumerate(self.kept) for index in kept for name in [self.names[i][index]]]
        total = 0
        for _depth, i, index in sorted(entries):
            total += _nbytes(self.kept[i][index][1])
            if total > REPLAY_BYTES:
                del self.kept[i][index]

    def _begin(self, index: int) -> None:
        self._input, self._next = index, 0

    def replaying(self, index: int, replaced):
        """Context: replay input ``index``'s calls that end before the first of ``replaced`` is used (all, for none)."""
        import contextlib

        if self.broken:
            return contextlib.nullcontext()
        self._begin(index)
        self._until = min((self.first_use[n] for n in replaced), default=len(self.names[index]))
        return self._patched()

    def _patched(self, recording: bool = False):
        import contextlib

        @contextlib.contextmanager
        def patch():
            saved = {name: module.__dict__.get("forward") for name, module in self.modules.items()}
            for name, module in self.modules.items():
                module.__dict__["forward"] = self._wrap(name, module.forward)
            self._recording = recording
            try:
                yield
            finally:
                self._recording = False
                for name, module in self.modules.items():
                    if saved[name] is None:
                        del module.__dict__["forward"]
                    else:
                        module.__dict__["forward"] = saved[name]

        return patch()

    def _wrap(self, name: str, forward):
        def call(*args, **kwargs):
            return (self._record if self._recording else self._replay)(name, forward, args, kwargs)

        return call

    def _record(self, name, forward, args, kwargs):
        index = self._next
        self._next += 1
        self.names[self._input].append(name)
        tensors = _tensor_arguments(args, kwargs)
        versions = None if tensors is None else [t._version for t in tensors]
        out = forward(*args, **kwargs)
        unchanged = versions is not None and versions == [t._version for t in tensors]
        if name not in self.layers and unchanged and _is_tensors(out):
            self.kept[self._input][index] = (self._next - 1, out)
        return out

    def _replay(self, name, forward, args, kwargs):
        index = self._next
        names = self.names[self._input]
        if self.broken or index >= len(names) or names[index] != name:
            self.broken = True  # another path than the baseline's: run everything from here on
            return forward(*args, **kwargs)
        self._next += 1
        kept = self.kept[self._input].get(index)
        if kept is not None and kept[0] < self._until:
            self._next = kept[0] + 1
            return _clone(kept[1])
        return forward(*args, **kwargs)


def _tensor_arguments(args, kwargs):
    """The tensors among a call's arguments, or None when one is neither a tensor nor a plain value."""
    import torch

    tensors = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif not (value is None or isinstance(value, (bool, int, float, str))):
            return None
    return tensors


def _is_tensors(out) -> bool:
    import torch

    if isinstance(out, torch.Tensor):
        return True
    return isinstance(out, (tuple, list)) and bool(out) and all(_is_tensors(o) for o in out)


def _clone(out):
    """A fresh copy: tensors and lists alike may be changed by the code that takes them (the skips list is)."""
    return type(out)(_clone(o) for o in out) if isinstance(out, (tuple, list)) else out.clone()


def _nbytes(out) -> int:
    return sum(_nbytes(o) for o in out) if isinstance(out, (tuple, list)) else out.numel() * out.element_size()


def _first_tensor(out):
    if isinstance(out, (tuple, list)):
        return out[0]
    return getattr(out, "sample", out)


# --------------------------------------------------------------------------- resumable results


class _Journal:
    """Results appended one JSON line each, keyed, so a rerun after a kill skips them.

    The first line is a signature of what is analysed; a journal of anything
    else is started over.
    """

    def __init__(self, path: Path, signature: str):
        self.path, self.run = path, uuid.uuid4().hex[:12]
        self.done: dict[str, dict] = {}
        if path.is_file():
            lines = path.read_text().splitlines()
            header = _loads(lines[0]) if lines else None
            if header and header.get("signature") == signature:
                for line in lines[1:]:
                    record = _loads(line)  # a kill may cut the last line short: skip it
                    if record and "key" in record:
                        self.done[record["key"]] = record
            else:
                path.unlink()
        if not path.is_file():
            self._append({"signature": signature})

    def get(self, key: str):
        record = self.done.get(key)
        return None if record is None else record["value"]

    def put(self, key: str, value) -> None:
        record = {"key": key, "value": value, "run": self.run}
        self._append(record)
        self.done[key] = record

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _loads(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


# --------------------------------------------------------------------------- progress


class _Progress:
    """Calls ``callback(done, total, what)``, or shows a rich progress bar when there is none."""

    def __init__(self, callback: Callable | None, total: int):
        self.callback, self.total, self.done = callback, total, 0
        self.bar = None
        if callback is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("pre-analysis {task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
            )
            self.task = self.bar.add_task("", total=total)
            self.bar.start()

    def step(self, what: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, description=what)
        else:
            self.callback(self.done, self.total, what)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# --------------------------------------------------------------------------- the analysis


def _curve_counts(n_layers: int, points: int) -> list[int]:
    """How many layers each cumulative-curve point palettizes: up to ``points`` values in 1..n, n included."""
    return sorted({int(round(x)) for x in np.linspace(1, n_layers, min(points, n_layers))})


def _signature(model_version: str, layers: list[Layer], inputs: list[dict], nbits, curve_points: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([ANALYSIS_VERSION, model_version, list(nbits), curve_points]).encode())
    for layer in layers:
        h.update(f"{layer.name}:{layer.shape}:{layer.fingerprint}".encode())
    for x in inputs:
        for k in sorted(x):
            h.update(k.encode() + np.ascontiguousarray(np.asarray(x[k], dtype=np.float32)).tobytes())
    return h.hexdigest()


def mixed_bit_recipes(isolated: dict[str, dict[int, float]], layers: list[Layer], count: int) -> list[dict[str, int]]:
    """Recipes of the threshold sweep: each layer gets the fewest bits whose isolated PSNR passes the threshold.

    ``isolated``: {layer: {bits: PSNR}}. Thresholds run evenly between the
    lowest and highest isolated PSNR; distinct recipes only, most bits first.
    """
    values = [p for per in isolated.values() for p in per.values()]
    recipes, seen = [], set()
    for threshold in np.linspace(min(values), max(values), 4 * count):
        recipe = {}
        for layer in layers:
            passing = [b for b, p in sorted(isolated[layer.name].items()) if p >= threshold]
            recipe[layer.name] = passing[0] if passing else FLOAT16_BITS
        name = recipe_name(recipe_bits(recipe, layers))
        if name not in seen and any(b < FLOAT16_BITS for b in recipe.values()):
            seen.add(name)
            recipes.append(recipe)
    recipes.sort(key=lambda r: -recipe_bits(r, layers))
    if len(recipes) > count:  # keep an even spread of widths
        keep = np.unique(np.round(np.linspace(0, len(recipes) - 1, count)).astype(int))
        recipes = [recipes[i] for i in keep]
    return recipes


def pre_analyze(
    unet_factory: Callable,
    out_dir: Path,
    *,
    inputs: list[dict],
    model_version: str,
    progress: Callable[[int, int, str], None] | None = None,
    nbits: tuple[int, ...] = SUPPORTED_NBITS,
    curve_points: int = 16,
    recipes: int = 12,
    threads: int | None = None,
) -> Path:
    """Run the MBP pre-analysis of a unet; write ``out_dir/analysis.json`` and its plot; return the JSON path.

    ``unet_factory()`` returns a fresh float32 torch module; ``module(**x)``
    for each dict ``x`` of ``inputs`` (name → array or tensor) returns the
    noise prediction. ``progress(done, total, what)`` is called per step; with
    None a rich progress bar is shown. Resumable: rerunning after a kill skips
    every result already in ``out_dir/analysis.partial.jsonl``. ``threads``:
    torch threads for the forwards (default: torch's own; 1 is far faster for
    tiny models on a busy machine, where waiting threads spin).
    """
    import torch

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _pre_analyze(unet_factory, Path(out_dir), inputs, model_version, progress, nbits, curve_points, recipes)
    finally:
        torch.set_num_threads(previous_threads)


def _pre_analyze(unet_factory, out_dir, inputs, model_version, progress, nbits, curve_points, recipes) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _Model(unet_factory(), inputs)
    layers = model.layers
    if not layers:
        raise ValueError("pre-analysis: the model has no convolution or linear weight above 2048 elements")
    signature = _signature(model_version, layers, inputs, nbits, curve_points)
    final = out_dir / ANALYSIS_FILE
    if final.is_file() and _loads(final.read_text() or "{}").get("signature") == signature:
        return final
    journal = _Journal(out_dir / PARTIAL_FILE, signature)
    counts = _curve_counts(len(layers), curve_points)
    bar = _Progress(progress, total=2 + len(layers) + len(nbits) * len(counts) + recipes)

    def measured(key: str, compute: Callable[[], float], what: str) -> float:
        value = journal.get(key)
        if value is None:
            value = compute()
            journal.put(key, value)
        bar.step(what)
        return value

    try:
        original = measured("baseline/original", lambda: model.psnr_with({}), "float16 weights")
        linear8 = measured(
            "baseline/linear_8bit",
            lambda: model.psnr_with(_Lazy([l.name for l in layers], lambda name: fake_linear8(model.weight16(name)))),
            "linear 8-bit",
        )
        isolated: dict[str, dict[int, float]] = {}
        palettes = _Palettes(model, [l.name for l in layers if journal.get(f"layer/{l.name}") is None], nbits)
        try:
            for layer in layers:
                palettes.take(layer.name)
                per = measured(
                    f"layer/{layer.name}",
                    lambda layer=layer: {str(b): model.psnr_with(model.palettized({layer.name: b})) for b in nbits},
                    layer.name,
                )
                isolated[layer.name] = {int(b): p for b, p in per.items()}
        finally:
            palettes.close()

        curves: dict[str, list[list[float]]] = {}
        for b in nbits:
            ordered = sorted(layers, key=lambda l: -isolated[l.name][b])  # least impact first
            points = []
            for count in counts:
                recipe = {l.name: b for l in ordered[:count]}
                p = measured(f"curve/{b}/{count}", lambda recipe=recipe: model.psnr_with(model.palettized(recipe)), f"{b}-bit curve")
                points.append([size_percent(recipe, layers), p])
            curves[str(b)] = points

        baselines = {"original": original, "linear_8bit": linear8}
        recipe_table: dict[str, dict[str, int]] = {}
        mixed = []
        sweep = mixed_bit_recipes(isolated, layers, recipes)
        for recipe in sweep:
            name = recipe_name(recipe_bits(recipe, layers))
            p = measured(f"recipe/{name}", lambda recipe=recipe: model.psnr_with(model.palettized(recipe)), name)
            baselines[name], recipe_table[name] = p, recipe
            mixed.append([size_percent(recipe, layers), p])
        for _ in range(recipes - len(sweep)):  # fewer distinct recipes than asked: close the bar
            bar.step("recipes")
        curves["mixed_bit"] = sorted(mixed)
        curves["linear_8bit"] = [[50.0, linear8]]
    finally:
        bar.close()

    analysis = {
        "model_version": model_version,
        "baselines": baselines,
        "recipes": recipe_table,
        "layers": [
            {
                "name": l.name,
                "shape": list(l.shape),
                "numel": l.numel,
                "order": l.order,
                "fingerprint": l.fingerprint,
                "psnr": {str(b): p for b, p in isolated[l.name].items()},
                "run": journal.done[f"layer/{l.name}"]["run"],  # which run measured it (resumption)
            }
            for l in layers
        ],
        "curves": curves,
        "nbits": list(nbits),
        "inputs": len(inputs),
        "input_shapes": {k: list(np.shape(v)) for k, v in inputs[0].items()},  # each input's, seeded apart
        "signature": signature,
        "version": ANALYSIS_VERSION,
        "runs": sorted({r["run"] for r in journal.done.values()}),
    }
    from sdbuild.compress.plot import plot_analysis

    plot_analysis(analysis, out_dir / PLOT_FILE)
    tmp = final.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(analysis, indent=1))
    tmp.replace(final)
    journal.path.unlink(missing_ok=True)
    return final

