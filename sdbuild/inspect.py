"""``sdbuild inspect``: what a bundle or a single package holds, read from the files alone.

    facts = inspect_path(Path("artifacts/builds/tiny"))   # or .../Resources, a Python-layout folder, one .mlpackage
    render_inspection(facts, rich.console.Console())

Per package: inputs and outputs (names, shapes, dtypes, descriptions), size on
disk, op counts by type, how its weights are stored (palettized with n bits,
linear 8-bit, sparse, float16, float32: read from the program's ``const`` and
``constexpr_*`` ops, so the figures describe the file that ships) and its
metadata. Nothing is compiled or run; a compiled ``.mlmodelc`` shows the I/O
and metadata its ``metadata.json`` declares.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sdbuild.errors import SdbuildError, UsageError
from sdbuild.mlpackage import MANIFEST, array_dtype, iter_spec_ops, read_manifest
from sdbuild.report import human_bytes

# Bits of MIL storage dtypes that hold compressed weight data.
_STORAGE_BITS = {"UINT1": 1, "UINT2": 2, "UINT3": 3, "UINT4": 4, "INT4": 4, "UINT6": 6, "UINT8": 8, "INT8": 8}
_FLOAT_BITS = {"FLOAT16": 16, "FLOAT32": 32, "BFLOAT16": 16}
# Core ML specification version -> the oldest OS that reads it.
_SPEC_TARGETS = {4: "iOS13/macOS10.15", 5: "iOS14/macOS11", 6: "iOS15/macOS12", 7: "iOS16/macOS13", 8: "iOS17/macOS14", 9: "iOS18/macOS15"}


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _read_spec(package: Path):
    from coremltools.proto import Model_pb2

    spec_file = read_manifest(package).spec
    try:
        spec = Model_pb2.Model()
        spec.ParseFromString(spec_file.read_bytes())
    except Exception as e:  # json, key and protobuf errors alike: one line for the user
        raise SdbuildError(f"{package}: unreadable model package ({type(e).__name__}: {e})") from None
    return spec


def _features(features) -> list[dict]:
    out = []
    for f in features:
        kind = f.type.WhichOneof("Type")
        entry = {"name": f.name, "description": f.shortDescription}
        if kind == "multiArrayType":
            arr = f.type.multiArrayType
            entry["shape"] = [int(s) for s in arr.shape]
            entry["dtype"] = array_dtype(arr.dataType, str(arr.dataType))
            if arr.WhichOneof("ShapeFlexibility") == "enumeratedShapes":  # several resolutions in one program
                entry["shapes"] = [[int(s) for s in e.shape] for e in arr.enumeratedShapes.shapes]
        else:
            entry["shape"], entry["dtype"] = [], kind or "unknown"
        out.append(entry)
    return out


def _tensor_type(value_type):
    return value_type.tensorType if value_type.WhichOneof("type") == "tensorType" else None


def _elements(tensor) -> int:
    if tensor is None:
        return 0
    n = 1
    for d in tensor.dimensions:
        if d.WhichOneof("dimension") != "constant":
            return 0
        n *= int(d.constant.size)
    return n


def _weight_storage(ops: list) -> dict:
    """How the program's weights are stored: per kind, weight count, elements, bits.

    A weight is a ``constexpr_*`` op's result (compressed) or a ``const``
    held in the weight file and read by a runtime op (plain float).
    """
    from coremltools.proto import MIL_pb2

    dtype_name = MIL_pb2.DataType.Name
    producer = {o.name: op for op in ops for o in op.outputs}
    consumers: dict[str, list] = {}
    for op in ops:
        for arg in op.inputs.values():
            for b in arg.arguments:
                if b.WhichOneof("binding") == "name":
                    consumers.setdefault(b.name, []).append(op)

    def type_of(op, param: str):
        """The MIL type of ``param``: an attribute (iOS16 constexpr ops) or a const input (iOS18)."""
        if param in op.attributes:
            return op.attributes[param].type
        if param in op.inputs and op.inputs[param].arguments:
            b = op.inputs[param].arguments[0]
            if b.WhichOneof("binding") == "value":  # iOS18 binds constant inputs inline
                return b.value.type
            if b.name in producer:
                return producer[b.name].outputs[0].type
        return None

    kinds: dict[str, dict] = {}

    def add(kind: str, bits: float, elements: int) -> None:
        entry = kinds.setdefault(kind, {"weights": 0, "elements": 0, "bits": bits})
        entry["weights"] += 1
        entry["elements"] += elements

    for op in ops:
        if not op.outputs:
            continue
        out = _tensor_type(op.outputs[0].type)
        elements = _elements(out)
        if op.type.startswith("constexpr_"):
            # Only the last constexpr of a chain is a weight (e.g. a LUT dequantized by another constexpr).
            if any(c.type.startswith("constexpr_") for c in consumers.get(op.outputs[0].name, [])):
                continue
            if op.type == "constexpr_lut_to_dense":
                lut = type_of(op, "lut")
                lut_t = _tensor_type(lut) if lut is not None else None
                dims = [int(d.constant.size) for d in lut_t.dimensions] if lut_t is not None else []
                entries = dims[0] if len(dims) == 1 else dims[-2] if len(dims) >= 2 else 0
                bits = int(round(math.log2(entries))) if entries > 1 else 0
                add(f"palettized {bits}-bit", bits, elements)
            elif op.type in ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"):
                data = type_of(op, "quantized_data" if op.type == "constexpr_affine_dequantize" else "data")
                data_t = _tensor_type(data) if data is not None else None
                bits = _STORAGE_BITS.get(dtype_name(data_t.dataType), 8) if data_t is not None else 8
                add(f"linear {bits}-bit", bits, elements)
            elif op.type == "constexpr_sparse_to_dense":
                add("sparse", 16, elements)
            else:
                add(op.type.removeprefix("constexpr_"), 16, elements)
        elif op.type == "const":
            val = op.attributes.get("val")
            if val is None or val.WhichOneof("value") != "blobFileValue":
                continue  # small immediate constants are not weights
            readers = consumers.get(op.outputs[0].name, [])
            if readers and all(r.type.startswith("constexpr_") for r in readers):
                continue  # a LUT, indices or scale: part of a compressed weight
            name = dtype_name(out.dataType) if out is not None else ""
            if name in _FLOAT_BITS:
                add(name.lower(), _FLOAT_BITS[name], elements)
            else:
                add(name.lower() or "other", _STORAGE_BITS.get(name, 8), elements)
    total = sum(k["elements"] for k in kinds.values())
    average = sum(k["elements"] * k["bits"] for k in kinds.values()) / total if total else 0.0
    return {"kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1]["elements"])), "average_bits": round(average, 3), "weight_elements": total}


def _compression_label(storage: dict) -> str:
    """The storage kinds, most weight values first, e.g. ``palettized 6-bit + float16``."""
    kinds = storage["kinds"]
    if not kinds:
        return "no weights"
    return " + ".join(kinds)


def inspect_package(package: Path) -> dict:
    """Facts of one ``.mlpackage``: I/O, size, op counts, weight storage, metadata."""
    package = Path(package)
    spec = _read_spec(package)
    meta = spec.description.metadata
    facts = {
        "name": package.name,
        "path": str(package),
        "format": "mlpackage",
        "bytes": _dir_bytes(package),
        "model_type": spec.WhichOneof("Type"),
        "spec_version": int(spec.specificationVersion),
        "min_target": _SPEC_TARGETS.get(int(spec.specificationVersion), f"specification {spec.specificationVersion}"),
        "inputs": _features(spec.description.input),
        "outputs": _features(spec.description.output),
        # A multifunction package (one function per resolution): each function's I/O, the default first.
        "functions": [
            {"name": f.name, "default": f.name == spec.description.defaultFunctionName,
             "inputs": _features(f.input), "outputs": _features(f.output)}
            for f in sorted(spec.description.functions, key=lambda f: f.name != spec.description.defaultFunctionName)
        ],
        "metadata": {
            "author": meta.author,
            "license": meta.license,
            "description": meta.shortDescription,
            "version": meta.versionString,
            **dict(sorted(meta.userDefined.items())),
        },
    }
    facts["metadata"] = {k: v for k, v in facts["metadata"].items() if v}
    if facts["model_type"] == "mlProgram":
        from sdbuild.mil.executor import check_package_weights

        check_package_weights(package, spec)  # a package missing its weights is not "normal"
        name = spec.description.defaultFunctionName or "main"
        function = spec.mlProgram.functions[name]
        ops = list(iter_spec_ops(function.block_specializations[function.opset]))
        counts: dict[str, int] = {}
        for op in ops:
            counts[op.type] = counts.get(op.type, 0) + 1
        facts["opset"] = function.opset
        facts["op_counts"] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        facts["ops"] = sum(n for t, n in counts.items() if t != "const" and not t.startswith("constexpr_"))
        facts["weights"] = _weight_storage(ops)
        facts["compression"] = _compression_label(facts["weights"])
    return facts


def inspect_compiled(model: Path) -> dict:
    """Facts of a compiled ``.mlmodelc``, from the ``metadata.json`` Apple's compiler writes."""
    model = Path(model)
    facts = {"name": model.name, "path": str(model), "format": "mlmodelc", "bytes": _dir_bytes(model)}
    meta_file = model / "metadata.json"
    if not meta_file.is_file():
        facts["note"] = "no metadata.json: inputs and outputs unknown"
        return facts
    try:
        meta = json.loads(meta_file.read_text())
        meta = meta[0] if isinstance(meta, list) else meta
    except ValueError as e:
        raise SdbuildError(f"{meta_file}: not readable JSON ({e})") from None

    def schema(entries) -> list[dict]:
        out = []
        for e in entries or []:
            shape = e.get("shape", "")
            try:
                shape = json.loads(shape) if isinstance(shape, str) and shape else shape
            except ValueError:
                pass
            out.append({"name": e.get("name"), "shape": shape or [], "dtype": str(e.get("dataType", "")).lower(), "description": e.get("shortDescription", "")})
        return out

    facts["inputs"] = schema(meta.get("inputSchema"))
    facts["outputs"] = schema(meta.get("outputSchema"))
    facts["metadata"] = {k: v for k, v in (meta.get("userDefinedMetadata") or {}).items() if v}
    return facts


def _models_in(folder: Path) -> list[Path]:
    found = sorted(p for p in folder.rglob("*") if p.is_dir() and p.suffix in (".mlpackage", ".mlmodelc"))
    # A package's own folders never hold further models; skip anything nested in one.
    return [p for p in found if not any(parent.suffix in (".mlpackage", ".mlmodelc") for parent in p.relative_to(folder).parents if parent != Path("."))]


def inspect_path(path: Path) -> dict:
    """Facts of a bundle folder (build folder, ``Resources/``, Python-layout folder) or one package.

    Returns {"path", "kind": build | folder | package, "packages": [per-package
    facts, names relative to ``path``], "files": other files with sizes,
    "total_bytes"}, and for a build folder "build" (name, recipe, PSNR from
    build.json). JSON-ready.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    if path.suffix == ".mlpackage" or (path / MANIFEST).is_file():
        package = inspect_package(path)
        return {"path": str(path), "kind": "package", "packages": [package], "files": [], "total_bytes": package["bytes"]}
    if path.suffix == ".mlmodelc":
        model = inspect_compiled(path)
        return {"path": str(path), "kind": "package", "packages": [model], "files": [], "total_bytes": model["bytes"]}
    if not path.is_dir():
        raise UsageError(f"{path}: not a bundle folder nor an .mlpackage / .mlmodelc")
    models = _models_in(path)
    if not models:
        raise UsageError(f"{path}: no .mlpackage or .mlmodelc inside: not a bundle")
    packages = []
    for model in models:
        facts = inspect_package(model) if model.suffix == ".mlpackage" else inspect_compiled(model)
        facts["name"] = model.relative_to(path).as_posix()
        packages.append(facts)
    inside = set(models)
    files = [
        {"name": p.relative_to(path).as_posix(), "bytes": p.stat().st_size}
        for p in sorted(path.rglob("*"))
        if p.is_file() and not any(parent in inside for parent in p.parents)
    ]
    facts = {"path": str(path), "kind": "folder", "packages": packages, "files": files, "total_bytes": _dir_bytes(path)}
    build_json = path / "build.json"
    if build_json.is_file():
        build = json.loads(build_json.read_text())
        facts["kind"] = "build"
        facts["build"] = {
            "name": build.get("name"),
            "recipe": build.get("recipe"),
            "psnr": {c: v.get("psnr") for c, v in (build.get("components") or {}).items() if v.get("psnr")},
            "notes": build.get("notes", []),
        }
    return facts


# --------------------------------------------------------------------------- rendering


def _shape(entry: dict) -> str:
    shape = entry.get("shape")
    return "[" + ", ".join(str(s) for s in shape) + "]" if isinstance(shape, list) else str(shape)


def render_inspection(facts: dict, console) -> None:
    """Print ``inspect_path``'s facts with rich: a summary table, then each package's I/O and weights."""
    from rich.table import Table

    console.print(f"[bold]{facts['path']}[/] ({facts['kind']}, {human_bytes(facts['total_bytes'])})")
    build = facts.get("build")
    if build:
        recipe = build.get("recipe") or {}
        console.print(
            f"build [bold]{build.get('name')}[/]: {(recipe.get('model') or {}).get('version', '')}, "
            f"attention {recipe.get('attention', '')}, target {recipe.get('target', '')}"
        )
    summary = Table(title="packages")
    for col in ("package", "size", "target", "ops", "weights", "avg bits"):
        summary.add_column(col, justify="right" if col in ("size", "ops", "avg bits") else "left", no_wrap=col in ("package", "size"))
    for p in facts["packages"]:
        summary.add_row(
            p["name"],
            human_bytes(p["bytes"]),
            p.get("min_target", p["format"]),
            str(p.get("ops", "")),
            p.get("compression", ""),
            f"{p['weights']['average_bits']:.2f}" if p.get("weights") else "",
        )
    console.print(summary)
    for p in facts["packages"]:
        io = Table(title=f"{p['name']}: inputs and outputs", title_justify="left")
        for col in ("", "name", "shape", "dtype", "description"):
            io.add_column(col)
        for kind in ("inputs", "outputs"):
            for e in p.get(kind, []):
                shapes = " | ".join(_shape({"shape": x}) for x in e["shapes"]) if e.get("shapes") else _shape(e)
                io.add_row(kind[:-1], e["name"], shapes, e.get("dtype", ""), e.get("description", ""))
        for f in p.get("functions") or []:
            label = f["name"] + (" (default)" if f["default"] else "")
            for kind in ("inputs", "outputs"):
                for e in f[kind]:
                    io.add_row(f"{label} {kind[:-1]}", e["name"], _shape(e), e.get("dtype", ""), e.get("description", ""))
        console.print(io)
        if p.get("weights", {}).get("kinds"):
            parts = [f"{k}: {v['weights']} weights, {v['elements']:,} values" for k, v in p["weights"]["kinds"].items()]
            console.print("  weights  " + "; ".join(parts))
        if p.get("op_counts"):
            ops = ", ".join(f"{t} {n}" for t, n in p["op_counts"].items())
            console.print(f"  ops      {p.get('opset', '')}: {ops}", soft_wrap=False)
        if p.get("metadata"):
            console.print("  metadata " + "; ".join(f"{k}: {v}" for k, v in p["metadata"].items()))
        if p.get("note"):
            console.print(f"  note     {p['note']}")
    if facts["files"]:
        console.print("other files: " + ", ".join(f"{f['name']} ({human_bytes(f['bytes'])})" for f in facts["files"]))
    if build and build.get("psnr"):
        console.print("PSNR (dB): " + "; ".join(f"{c} " + ", ".join(f"{k} {v}" for k, v in ps.items()) for c, ps in build["psnr"].items()))
