"""Fixtures for compression tests: the tiny unet, converted once per run (macOS14 and iOS18 targets),
and its pre-analysis, run once: files made by the first pytest-xdist worker that asks (conftest's
``made_once``), read by every module on either worker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

# ``builds`` (made_once) is imported in the fixtures: test_mixed_bit's killed analysis imports
# tiny_unet from here in a plain interpreter, where tests/ is not on the path.

OPTIONS = dict(height=64, width=64)
ANALYSIS_SEEDS = (1, 2)


def tiny_unet(checkpoint: Path):
    from sdbuild.models import BuildOptions, build_component

    return build_component("unet", checkpoint, BuildOptions(**OPTIONS))


def convert(component, dst: Path, target: str) -> Path:
    """The float16 package of ``component`` for ``target`` (a ct.target name), as the convert stage makes it
    (its program checked once per pass pipeline, as there: ``sdbuild.mil.validation``)."""
    import coremltools as ct
    import torch

    from sdbuild.mil.validation import validate_once_per_pipeline
    from sdbuild.models import sample_inputs

    x = sample_inputs(component.inputs, 0)
    with torch.no_grad():
        traced = torch.jit.trace(component.module, [torch.from_numpy(x[s.name]) for s in component.inputs])
    with validate_once_per_pipeline():
        mlmodel = ct.convert(
            traced,
            inputs=[ct.TensorType(name=s.name, shape=s.shape) for s in component.inputs],
            outputs=[ct.TensorType(name=n) for n in component.outputs],
            convert_to="mlprogram",
            minimum_deployment_target=getattr(ct.target, target),
            compute_precision=ct.precision.FLOAT16,
            skip_model_load=True,
        )
    mlmodel.save(str(dst))
    return dst


@pytest.fixture(scope="session")
def unet_component(tiny_sd_checkpoint):
    return tiny_unet(tiny_sd_checkpoint)


@pytest.fixture(scope="session")
def unet_package(tiny_sd_checkpoint, tmp_path_factory) -> Path:
    from builds import made_once

    made = made_once(tmp_path_factory, "compress-unet-macOS14", lambda out: convert(tiny_unet(tiny_sd_checkpoint), out / "unet.mlpackage", "macOS14"))
    return made / "unet.mlpackage"


@pytest.fixture(scope="session")
def unet_package_ios18(tiny_sd_checkpoint, tmp_path_factory) -> Path:
    from builds import made_once

    made = made_once(tmp_path_factory, "compress-unet-iOS18", lambda out: convert(tiny_unet(tiny_sd_checkpoint), out / "unet.mlpackage", "iOS18"))
    return made / "unet.mlpackage"


@pytest.fixture(scope="session")
def analysis_inputs(unet_component) -> list[dict]:
    from sdbuild.models import sample_inputs

    return [sample_inputs(unet_component.inputs, seed) for seed in ANALYSIS_SEEDS]


@pytest.fixture(scope="session")
def reference_outputs(unet_component, analysis_inputs) -> list[np.ndarray]:
    """float32 PyTorch outputs for ``analysis_inputs``."""
    import torch

    with torch.no_grad():
        return [unet_component.module(**{k: torch.from_numpy(v) for k, v in x.items()}).numpy() for x in analysis_inputs]


@pytest.fixture(scope="session")
def analysis(tiny_sd_checkpoint, analysis_inputs, tmp_path_factory) -> Path:
    """The tiny unet's whole pre-analysis (analysis.json), once per run: test_mixed_bit and test_analysis_replay
    often run on different workers, and each made it (18-21 s apiece)."""
    from builds import made_once
    from sdbuild.compress.analysis import ANALYSIS_FILE

    return made_once(tmp_path_factory, "compress-analysis", lambda out: analyze_tiny_unet(tiny_sd_checkpoint, analysis_inputs, out)) / ANALYSIS_FILE


def analyze_tiny_unet(checkpoint: Path, inputs: list[dict], out: Path) -> Path:
    """The tiny unet's whole pre-analysis in ``out``, quietly, one torch thread; the path of its analysis.json."""
    from sdbuild.compress import pre_analyze

    return pre_analyze(
        lambda: tiny_unet(checkpoint).module,
        out,
        inputs=inputs,
        model_version="synthetic:tiny-sd",
        progress=lambda done, total, what: None,
        threads=1,
    )


def executor_psnr(package: Path, inputs: list[dict], references: list[np.ndarray]) -> float:
    """Mean PSNR of the package run by the reference executor (float16) against float32 PyTorch."""
    from sdbuild.metrics import psnr
    from sdbuild.mil.executor import load_program

    program = load_program(package)
    return float(np.mean([psnr(ref, program.run(x, precision="fp16")["noise_pred"]) for ref, x in zip(references, inputs)]))
