"""What runs a package: Core ML on macOS, the reference executor (``sdbuild.mil``) elsewhere."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def default_backend() -> str:
    return "coreml" if sys.platform == "darwin" else "executor"


class ModelRunner:
    """One model, run on named arrays.

    ``inputs``: name → (shape, numpy dtype) as declared; ``outputs``: names in order.
    ``run(feeds)`` casts float feeds to the declared dtype and returns float32 outputs.
    """

    name: str
    inputs: dict[str, tuple[tuple[int, ...], np.dtype]]
    outputs: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class ExecutorRunner(ModelRunner):
    """A ``.mlpackage`` on the reference executor, float16 as a device holds it; or the parts
    of a chunked one, run in sequence by ``sdbuild.mil.chunk.chain_run``."""

    def __init__(self, paths: list[Path], function: str | None = None, decompress_at_load: bool = False):
        from sdbuild.mil.executor import load_program

        # ``function``: a multifunction package's function (one resolution); None: its default.
        # ``decompress_at_load``: compressed weights decompressed once and kept (``load_program``).
        self.programs = [load_program(p, function=function, decompress_at_load=decompress_at_load) for p in paths]
        self.observer = None  # a RangeObserver shown every run of a one-package model (calibration)
        self.name = " + ".join(p.name for p in paths)
        self.inputs = _chain_inputs([(prog.inputs, prog.outputs) for prog in self.programs])
        self.outputs = list(self.programs[-1].outputs)

    def run(self, feeds):
        from sdbuild.mil.chunk import chain_run

        feeds = _cast(feeds, self.inputs)
        if len(self.programs) == 1:
            return self.programs[0].run(feeds, precision="fp16", observer=self.observer)
        return chain_run(self.programs, feeds, precision="fp16")


class CoreMLRunner(ModelRunner):
    """A ``.mlpackage`` or ``.mlmodelc`` on Core ML (macOS only)."""

    _DTYPES = {"Float16": np.float16, "Float32": np.float32, "Double": np.float64, "Int32": np.int32}

    def __init__(self, path: Path, compute_unit: str, function: str | None = None):
        import coremltools as ct

        self.name = path.name
        units = ct.ComputeUnit[compute_unit]
        named = {"function_name": function} if function else {}  # one resolution of a multifunction package
        if path.suffix == ".mlmodelc":
            self.model = ct.models.CompiledMLModel(str(path), compute_units=units, **named)
            # A compiled model keeps its interface in metadata.json (as the Swift package reads it).
            meta = json.loads((path / "metadata.json").read_text())
            meta = meta[0] if isinstance(meta, list) else meta
            self.inputs = {
                i["name"]: (tuple(json.loads(i["shape"])), np.dtype(self._DTYPES.get(i.get("dataType"), np.float32)))
                for i in meta["inputSchema"]
            }
            self.outputs = [o["name"] for o in meta["outputSchema"]]
        else:
            from sdbuild.mlpackage import array_dtype

            self.model = ct.models.MLModel(str(path), compute_units=units, **named)
            spec = self.model.get_spec()
            description = next((f for f in spec.description.functions if f.name == function), spec.description)
            self.inputs = {
                i.name: (tuple(i.type.multiArrayType.shape), np.dtype(array_dtype(i.type.multiArrayType.dataType)))
                for i in description.input
            }
            self.outputs = [o.name for o in description.output]

    def run(self, feeds):
        out = self.model.predict(_cast(feeds, self.inputs, exact=True))
        return {k: np.asarray(v, dtype=np.float32) if np.asarray(v).dtype.kind == "f" else np.asarray(v) for k, v in out.items()}


class ChainedRunner(ModelRunner):
    """Model parts run in sequence (a chunked unet on Core ML): each part takes, by name,
    the inputs it declares from the original feeds and the earlier parts' outputs."""

    def __init__(self, parts: list[ModelRunner]):
        self.parts = parts
        self.name = " + ".join(p.name for p in parts)
        self.inputs = _chain_inputs([(part.inputs, part.outputs) for part in parts])
        self.outputs = list(parts[-1].outputs)

    def run(self, feeds):
        values = dict(feeds)
        for part in self.parts:
            values.update(part.run({n: values[n] for n in part.inputs}))
        return {n: values[n] for n in self.outputs}


def _chain_inputs(parts: list[tuple[dict, list[str]]]) -> dict:
    """The inputs of parts run in sequence: those no earlier part produces, in first-use order."""
    produced: set[str] = set()
    inputs: dict = {}
    for declared, outputs in parts:
        for name, decl in declared.items():
            if name not in produced and name not in inputs:
                inputs[name] = decl
        produced.update(outputs)
    return inputs


def _cast(feeds: dict, declared: dict, exact: bool = False) -> dict:
    """Feeds as the declared dtypes take them: ints as ints; floats as float32, or exact for Core ML."""
    out = {}
    for name, value in feeds.items():
        dtype = declared[name][1] if name in declared else np.dtype(np.float32)
        value = np.asarray(value)
        if dtype.kind in "iu":
            out[name] = value.astype(dtype)
        elif exact:
            out[name] = value.astype(dtype)
        else:
            out[name] = value.astype(np.float32, copy=False)
    return out
