"""sdbuild inspect: I/O, sizes, op counts and weight storage read from packages and bundles."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli_here
from sdbuild.errors import SdbuildError
from sdbuild.inspect import inspect_path, render_inspection

warnings.filterwarnings("ignore")
logging.getLogger("coremltools").setLevel(logging.ERROR)


def _program_package(folder: Path, name: str, target: str, compress: str | None) -> Path:
    """A small float16 ML program: sample [2, 4, 8, 8] → 1×1 conv (64→… weights) → noise_pred.

    Two weights of 4096 values (above coremltools' compression threshold) and
    a 4-value bias; ``compress``: None, ``palettize4`` or ``linear8``.
    """
    import coremltools as ct
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 4, 4, 4)).astype(np.float32)  # 4096 values
    w2 = rng.standard_normal((4, 64, 4, 4)).astype(np.float32)
    bias = rng.standard_normal((4,)).astype(np.float32)
    opset = getattr(ct.target, target)

    @mb.program(input_specs=[mb.TensorSpec((2, 4, 8, 8), dtype=types.fp32)], opset_version=opset)
    def prog(sample):
        h = mb.conv(x=sample, weight=w1, pad_type="same")
        h = mb.silu(x=h)
        return mb.conv(x=h, weight=w2, bias=bias, pad_type="same", name="noise_pred")

    model = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=opset,
        compute_precision=ct.precision.FLOAT16,
        skip_model_load=True,
    )
    if compress == "palettize4":
        config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(nbits=4, mode="uniform"))
        model = cto.palettize_weights(model, config)
    elif compress == "linear8":
        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric"))
        model = cto.linear_quantize_weights(model, config)
    path = folder / f"{name}.mlpackage"
    model.save(str(path))
    return path


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("packages")
    return {
        f"{compress or 'float16'}-{target}": _program_package(folder, f"{compress or 'float16'}-{target}", target, compress)
        for target in ("iOS17", "iOS18")
        for compress in (None, "palettize4", "linear8")
    }


@pytest.mark.parametrize("target", ["iOS17", "iOS18"])
@pytest.mark.parametrize(
    "compress,kinds,average",
    [("float16", ["float16"], 16.0), ("palettize4", ["palettized 4-bit"], 4.0), ("linear8", ["linear 8-bit"], 8.0)],
)
def test_package_facts(packages, target, compress, kinds, average):
    facts = inspect_path(packages[f"{compress}-{target}"])
    assert facts["kind"] == "package"
    (p,) = facts["packages"]
    assert p["inputs"] == [{"name": "sample", "description": "", "shape": [2, 4, 8, 8], "dtype": "float32"}]
    (out,) = p["outputs"]
    assert out["name"] == "noise_pred" and out["dtype"] == "float32"
    assert p["min_target"] == {"iOS17": "iOS17/macOS14", "iOS18": "iOS18/macOS15"}[target]
    assert p["opset"] == {"iOS17": "CoreML7", "iOS18": "CoreML8"}[target]
    assert p["op_counts"]["conv"] == 2 and p["op_counts"]["silu"] == 1
    assert p["ops"] == sum(n for t, n in p["op_counts"].items() if t != "const" and not t.startswith("constexpr_"))
    weights = p["weights"]
    assert list(weights["kinds"]) == kinds
    assert weights["kinds"][kinds[0]]["weights"] == 2
    assert weights["kinds"][kinds[0]]["elements"] == 2 * 4096
    # The 4-value bias is an immediate constant in the program, not a weight of the file.
    assert weights["weight_elements"] == 2 * 4096
    assert weights["average_bits"] == average
    assert p["compression"] == " + ".join(kinds)
    assert p["bytes"] == sum(f.stat().st_size for f in packages[f"{compress}-{target}"].rglob("*") if f.is_file())
    json.dumps(facts)  # JSON-ready, as --json prints it


def test_build_folder_lists_every_package_and_file(packages, tmp_path):
    build = tmp_path / "builds" / "tiny"
    resources = build / "Resources"
    resources.mkdir(parents=True)
    shutil.copytree(packages["palettize4-iOS18"], resources / "UnetChunk1.mlpackage")
    shutil.copytree(packages["float16-iOS18"], resources / "UnetChunk2.mlpackage")
    shutil.copytree(packages["linear8-iOS17"], resources / "TextEncoder.mlpackage")
    (resources / "vocab.json").write_text('{"a": 0}')
    (resources / "merges.txt").write_text("#version: 0.2\n")
    python = build / "python"
    python.mkdir()
    shutil.copytree(packages["float16-iOS17"], python / "Stable_Diffusion_version_synthetic:tiny-sd_unet.mlpackage")
    (build / "build.json").write_text(
        json.dumps({"name": "tiny", "recipe": {"model": {"version": "synthetic:tiny-sd"}, "attention": "ORIGINAL", "target": "iOS18"},
                    "components": {"unet": {"psnr": {"psnr_db": 41.5}}}, "notes": []})
    )

    facts = inspect_path(build)
    assert facts["kind"] == "build"
    assert [p["name"] for p in facts["packages"]] == [
        "Resources/TextEncoder.mlpackage",
        "Resources/UnetChunk1.mlpackage",
        "Resources/UnetChunk2.mlpackage",
        "python/Stable_Diffusion_version_synthetic:tiny-sd_unet.mlpackage",
    ]
    assert [f["name"] for f in facts["files"]] == ["Resources/merges.txt", "Resources/vocab.json", "build.json"]
    assert facts["build"]["psnr"] == {"unet": {"psnr_db": 41.5}}
    by_name = {p["name"]: p for p in facts["packages"]}
    assert by_name["Resources/UnetChunk1.mlpackage"]["compression"].startswith("palettized 4-bit")
    assert by_name["Resources/TextEncoder.mlpackage"]["compression"].startswith("linear 8-bit")
    assert facts["total_bytes"] == sum(f.stat().st_size for f in build.rglob("*") if f.is_file())

    # Resources/ alone and the Python-layout folder alone are bundles too.
    assert inspect_path(resources)["kind"] == "folder"
    assert [p["name"] for p in inspect_path(python)["packages"]] == ["Stable_Diffusion_version_synthetic:tiny-sd_unet.mlpackage"]


def test_compiled_model_shows_its_declared_io(tmp_path):
    # The metadata.json layout Apple's coremlcompiler writes into an .mlmodelc.
    model = tmp_path / "Unet.mlmodelc"
    model.mkdir()
    (model / "metadata.json").write_text(
        json.dumps(
            [
                {
                    "inputSchema": [{"name": "sample", "type": "MultiArray", "dataType": "Float16", "shape": "[2, 4, 8, 8]", "shortDescription": "noisy latents"}],
                    "outputSchema": [{"name": "noise_pred", "type": "MultiArray", "dataType": "Float16", "shape": "[2, 4, 8, 8]"}],
                    "userDefinedMetadata": {"sdbuild.recipe": "tiny"},
                }
            ]
        )
    )
    (p,) = inspect_path(model)["packages"]
    assert p["format"] == "mlmodelc"
    assert p["inputs"] == [{"name": "sample", "shape": [2, 4, 8, 8], "dtype": "float16", "description": "noisy latents"}]
    assert p["outputs"][0]["name"] == "noise_pred"
    assert p["metadata"] == {"sdbuild.recipe": "tiny"}


def test_render_prints_the_facts(packages):
    from rich.console import Console

    console = Console(record=True, width=200)
    render_inspection(inspect_path(packages["palettize4-iOS18"]), console)
    text = console.export_text()
    for expected in ("palettize4-iOS18.mlpackage", "iOS18/macOS15", "sample", "[2, 4, 8, 8]", "noise_pred", "palettized 4-bit", "conv 2"):
        assert expected in text, expected


def test_refuses_what_is_not_a_bundle(tmp_path):
    with pytest.raises(SdbuildError, match="no such file"):
        inspect_path(tmp_path / "missing")
    with pytest.raises(SdbuildError, match="no .mlpackage or .mlmodelc inside"):
        inspect_path(tmp_path)
    broken = tmp_path / "Broken.mlpackage"
    broken.mkdir()
    with pytest.raises(SdbuildError, match="Manifest.json is missing"):
        inspect_path(broken)


def test_cli_inspect(packages, tmp_path):
    done = run_cli_here("inspect", packages["linear8-iOS17"], "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    facts = json.loads(done.stdout)
    assert facts["packages"][0]["compression"] == "linear 8-bit"
    done = run_cli_here("inspect", tmp_path / "nothing-here")
    assert done.returncode != 0
    assert "no such file or folder" in done.stderr
