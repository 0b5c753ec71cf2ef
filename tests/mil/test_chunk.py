"""Unet chunking: chained parts equal the whole program, weights move byte for byte.

The tiny SD unet (SPLIT_EINSUM, the demo build's), the tiny SDXL unet
(ORIGINAL) and the tiny SD unet palettized to 6 bits (the demo build's) are cut into 2 and 3
parts; the parts run in sequence by the reference executor must match the
whole package (PSNR >= 60 dB in fp32; in practice they are bit-identical).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from . import milcheck  # noqa: F401  (quiets coremltools, skips ct.convert's gc)

from sdbuild.errors import SdbuildError
from sdbuild.metrics import psnr
from sdbuild.mil.chunk import ChunkError, chain_run, chunk_program
from sdbuild.mil.executor import load_program

MIN_DB = 60.0


def _convert_unet(checkpoint: Path, attention: str, dst: Path) -> Path:
    """Trace and convert the checkpoint's unet as the trace and convert stages do (64×64 image, float16 inputs)."""
    import coremltools as ct
    import torch

    from sdbuild.mil.validation import validate_once_per_pipeline
    from sdbuild.models import BuildOptions, build_component, sample_inputs

    model = build_component("unet", checkpoint, BuildOptions(attention=attention, height=64, width=64))
    example = sample_inputs(model.inputs, seed=0)
    with torch.no_grad():
        traced = torch.jit.trace(
            model.module, [torch.from_numpy(example[s.name]) for s in model.inputs], strict=False, check_trace=False
        )
    with validate_once_per_pipeline():  # as the convert stage checks its program: once per pass pipeline
        mlmodel = ct.convert(
            traced,
            # Inputs in their declared dtypes (float16) as the convert stage writes them, float32 output.
            inputs=[ct.TensorType(name=s.name, shape=s.shape, dtype=np.dtype(s.dtype)) for s in model.inputs],
            outputs=[ct.TensorType(name="noise_pred", dtype=np.float32)],
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.macOS14,
            compute_precision=ct.precision.FLOAT16,
            skip_model_load=True,
        )
    mlmodel.save(str(dst))
    return dst


@pytest.fixture(scope="module")
def unets(tiny_cold_build, tiny_sdxl_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The SD unet and its 6-bit palettization are the demo build's own (conftest's ``tiny_cold_build``,
    made once per run by the convert and compress stages; read only); the SDXL unet is converted here."""
    folder = tmp_path_factory.mktemp("unets")
    report = json.loads((tiny_cold_build / "builds" / "tiny" / "build.json").read_text())
    keys = {(r["stage"], r["component"]): r["key"] for r in report["stages"]}
    entry = lambda stage: tiny_cold_build / "cache" / stage / keys[(stage, "unet")] / "model.mlpackage"
    assert report["recipe"]["attention"] == "SPLIT_EINSUM" and report["recipe"]["compression"]["nbits"] == 6
    sdxl = _convert_unet(tiny_sdxl_checkpoint, "ORIGINAL", folder / "sdxl.mlpackage")
    return {"sd": entry("convert"), "sdxl": sdxl, "sd-6bit": entry("compress")}


def _feeds(program, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, (shape, _dtype) in program.inputs.items()}
    feeds["timestep"] = rng.integers(0, 1000, size=program.inputs["timestep"][0]).astype(np.float32)
    return feeds


def _read_spec(package: Path):
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString((package / "Data" / "com.apple.CoreML" / "model.mlmodel").read_bytes())
    return spec


def _weight_bytes_by_value(package: Path) -> dict[tuple[str, str], bytes]:
    """(op output name, attribute) -> the blob's data bytes, for every weight blob of the program."""
    spec = _read_spec(package)
    raw = (package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").read_bytes()
    function = spec.mlProgram.functions["main"]
    found = {}
    for op in function.block_specializations[function.opset].operations:
        # iOS16 ops hold weights in attributes; iOS18 constexpr ops bind them inline to inputs.
        values = list(op.attributes.items())
        values += [(param, b.value) for param, arg in op.inputs.items() for b in arg.arguments if b.WhichOneof("binding") == "value"]
        for attr, value in values:
            if value.WhichOneof("value") == "blobFileValue":
                offset = value.blobFileValue.offset
                dtype, nbytes, data_offset = struct.unpack_from("<IQQ", raw, offset + 4)
                found[(op.outputs[0].name, attr)] = (dtype, raw[data_offset : data_offset + nbytes])
    return found


CASES = [(m, n) for m in ("sd", "sdxl", "sd-6bit") for n in (2, 3)]


@pytest.fixture(scope="module")
def whole(unets) -> dict:
    """The unchunked programs, loaded once (loading dominates a tiny unet's run)."""
    return {name: load_program(path) for name, path in unets.items()}


@pytest.fixture(scope="module")
def chunked(unets, tmp_path_factory):
    """``chunked(model, n)`` -> (ChunkResult, loaded parts), each made once per module."""
    made = {}

    def make(model: str, n: int):
        if (model, n) not in made:
            result = chunk_program(unets[model], n, tmp_path_factory.mktemp(f"{model}-{n}"))
            made[model, n] = (result, [load_program(p) for p in result.paths])
        return made[model, n]

    return make


@pytest.mark.parametrize("model,n", CASES)
def test_chained_chunks_equal_the_whole_unet(whole, chunked, model, n):
    result, parts = chunked(model, n)
    assert [p.path.name for p in result.parts] == [f"chunk{k}.mlpackage" for k in range(1, n + 1)]
    feeds = _feeds(whole[model])
    # fp16 rounds every intermediate as a device would: the chain must match that too.
    for precision in ("fp32", "fp16") if n == 2 else ("fp32",):
        expected = whole[model].run(feeds, precision=precision)["noise_pred"]
        got = chain_run(parts, feeds, precision=precision)
        assert list(got) == ["noise_pred"]
        assert psnr(expected, got["noise_pred"]) >= MIN_DB, precision

    # Parts are balanced in weight bytes and hold all of the weights, each once.
    sizes = [p.weight_bytes for p in result.parts]
    print(f"\n{model} in {n}: weight bytes {sizes} of {result.weight_bytes}; crossing bytes {[c.crossing_bytes for c in result.cuts]}")
    assert sum(sizes) == result.weight_bytes
    assert max(sizes) <= 1.25 * result.weight_bytes / n, sizes
    assert min(sizes) >= 0.75 * result.weight_bytes / n, sizes


@pytest.mark.parametrize("model,n", [("sd", 3), ("sdxl", 2)])
def test_chunk_io_passes_every_crossing_value(unets, whole, chunked, model, n):
    src = unets[model]
    result, parts = chunked(model, n)
    available = {name: (tuple(shape), np.dtype(dtype).name) for name, (shape, dtype) in whole[model].inputs.items()}
    read_later: set[str] = set()
    for part, program in zip(result.parts, parts):
        # The saved package declares exactly the I/O the result reports.
        assert [(t.name, t.shape, t.dtype) for t in part.inputs] == [
            (name, tuple(shape), np.dtype(dtype).name) for name, (shape, dtype) in program.inputs.items()
        ]
        assert [t.name for t in part.outputs] == program.outputs
        assert [np.dtype(t.dtype) for t in part.outputs] == [program.output_dtypes[o] for o in program.outputs]
        for t in part.inputs:
            assert available[t.name] == (t.shape, t.dtype), t.name  # model input or an earlier part's output
            read_later.add(t.name)
        for t in part.outputs:
            assert t.name not in available, t.name
            available[t.name] = (t.shape, t.dtype)
    # The first part takes original inputs only; the last one ends in noise_pred only.
    assert {t.name for t in result.parts[0].inputs} <= set(whole[model].inputs)
    assert [(t.name, t.shape) for t in result.parts[-1].outputs] == [("noise_pred", whole[model].inputs["sample"][0])]
    # Every intermediate output is read by a later part; nothing is computed for nobody.
    for part in result.parts[:-1]:
        assert {t.name for t in part.outputs} <= read_later
    # The crossing tensors of cut k: outputs of parts <= k that parts > k read.
    for k, cut in enumerate(result.cuts, start=1):
        before = {t.name for p in result.parts[:k] for t in p.outputs}
        after = {t.name for p in result.parts[k:] for t in p.inputs}
        assert {t.name for t in cut.crossing_tensors} == before & after
        # float16 values cross as float32, as coremltools' bisect_model passes them.
        assert all(t.dtype == "float32" and t.name.endswith("_fp32") for t in cut.crossing_tensors)
    # Same specification version and opset as the source.
    source_spec = _read_spec(src)
    for part in result.parts:
        spec = _read_spec(part.path)
        assert spec.specificationVersion == source_spec.specificationVersion
        assert spec.mlProgram.functions["main"].opset == source_spec.mlProgram.functions["main"].opset
    report = json.loads(json.dumps(result.to_dict()))
    assert [p["weight_bytes"] for p in report["parts"]] == [p.weight_bytes for p in result.parts]


def test_palettized_weights_move_byte_for_byte(unets, chunked):
    src = unets["sd-6bit"]
    result, _parts = chunked("sd-6bit", 3)
    source = _weight_bytes_by_value(src)
    seen: dict = {}
    for part in result.parts:
        for key, blob in _weight_bytes_by_value(part.path).items():
            assert blob == source[key], key  # same dtype code and same bytes
            seen[key] = blob
    assert set(seen) == set(source)
    luts = [op for op, attr in source if attr == "lut"]
    assert luts, "the 6-bit unet has no palettized weights"
    assert sum(1 for _op, attr in seen if attr == "indices") == len(luts)


def test_one_part_is_the_whole_program(whole, chunked):
    result, (part,) = chunked("sdxl", 1)
    assert result.cuts == []
    assert part.inputs == whole["sdxl"].inputs and part.outputs == ["noise_pred"]
    assert part.op_counts() == whole["sdxl"].op_counts()


@pytest.mark.parametrize("target,palettized", [("iOS17", False), ("iOS18", True)])
def test_cut_goes_where_the_smallest_tensor_crosses(tmp_path, target, palettized):
    """Between equally balanced cut points, the one passing an [1, 8, 1, 1] vector wins over [1, 8, 16, 16] maps.

    The iOS18 variant is palettized: its constexpr ops bind LUT and indices
    inline to their inputs (not as attributes), which the parts must carry too.
    """
    import coremltools as ct
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    rng = np.random.default_rng(0)
    w = [rng.standard_normal((8, 8, 1, 1)).astype(np.float16) for _ in range(3)]
    opset = getattr(ct.target, target)

    @mb.program(input_specs=[mb.TensorSpec((1, 8, 16, 16), dtype=types.fp16)], opset_version=opset)
    def prog(x):
        h = mb.conv(x=x, weight=w[0], name="conv1")
        h = mb.relu(x=h, name="relu1")
        g = mb.reduce_mean(x=h, axes=[2, 3], keep_dims=True, name="pool")
        g = mb.conv(x=g, weight=w[1], name="conv2")
        g = mb.sigmoid(x=g, name="gate")
        h = mb.mul(x=x, y=g, name="scaled")
        return mb.conv(x=h, weight=w[2], name="noise_pred")

    model = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=opset,
        compute_precision=ct.precision.FLOAT16,
        pass_pipeline=ct.PassPipeline.EMPTY,
        skip_model_load=True,
    )
    if palettized:
        config = cto.OpPalettizerConfig(nbits=4, mode="uniform", weight_threshold=0)
        model = cto.palettize_weights(model, cto.OptimizationConfig(global_config=config))
    src = tmp_path / "gate.mlpackage"
    model.save(str(src))
    result = chunk_program(src, 2, tmp_path / "parts")
    (cut,) = result.cuts
    assert [t.shape for t in cut.crossing_tensors] == [(1, 8, 1, 1)]
    assert cut.after_op in ("pool", "conv2", "gate")
    x = rng.standard_normal((1, 8, 16, 16)).astype(np.float32)
    whole = load_program(src).run({"x": x}, precision="fp32")
    chained = chain_run(result.paths, {"x": x}, precision="fp32")
    assert psnr(whole["noise_pred"], chained["noise_pred"]) >= MIN_DB
    assert [t.name for t in result.parts[1].inputs] == ["x", cut.crossing_tensors[0].name]
    source = _weight_bytes_by_value(src)
    moved = {k: v for part in result.parts for k, v in _weight_bytes_by_value(part.path).items()}
    assert moved == source
    if palettized:
        assert sum(1 for _op, param in source if param == "indices") == 3


def test_refuses_what_cannot_be_cut(unets, tmp_path):
    with pytest.raises(ChunkError, match="cannot be cut into 100000 parts"):
        chunk_program(unets["sd"], 100000, tmp_path)
    with pytest.raises(ChunkError, match="at least 1"):
        chunk_program(unets["sd"], 0, tmp_path)
    with pytest.raises(SdbuildError, match="not an .mlpackage"):
        chunk_program(tmp_path, 2, tmp_path / "out")


def test_chain_run_names_a_missing_input(whole, chunked):
    _result, parts = chunked("sd", 2)
    feeds = _feeds(whole["sd"])
    del feeds["encoder_hidden_states"]
    with pytest.raises(SdbuildError, match="encoder_hidden_states"):
        chain_run(parts, feeds, precision="fp32")
