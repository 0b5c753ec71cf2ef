"""The stages of a build, each declared once: what it reads, what it is.

A stage function gets a ``Job`` holding only the recipe fields the stage
declares and its upstream entries' folders, and writes its files into ``out``.
The executor derives every cache key from these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Stage:
    """A stage's declaration.

    fields: recipe fields (dotted) it reads, for every component;
    component_fields: more fields read for one component only;
    libraries: distributions whose versions enter the key;
    code: sdbuild modules whose source enters the key besides ``run``'s module; the
    executor adds every sdbuild module these import, transitively (read, not imported);
    run: ``module:function`` called as ``function(job, out) -> dict``, always in a
    child process (memory goes back when it ends, a crash loses nothing else).
    """

    name: str
    version: str
    run: str
    fields: tuple[str, ...] = ()
    component_fields: dict[str, tuple[str, ...]] = field(default_factory=dict)
    libraries: tuple[str, ...] = ()
    code: tuple[str, ...] = ()
    resumable: bool = False  # gets a scratch folder that survives a kill, removed once published

    def fields_for(self, component: str | None) -> tuple[str, ...]:
        return self.fields + self.component_fields.get(component_kind(component), ())


REFINER = "unet_refiner"  # the SDXL refiner's unet, built from model.refiner's own download


def component_kind(component: str | None) -> str:
    """``controlnet/lllyasviel/sd-controlnet-mlsd`` → ``controlnet``; other names are their own kind."""
    return (component or "").split("/")[0]


@dataclass
class Job:
    """What a stage function may read: its declared fields and upstream folders."""

    stage: str
    component: str | None
    fields: dict[str, Any]
    upstream: dict[str, Path]
    build_name: str = ""
    scratch: Path | None = None  # kept across a killed run of this key: for resumable stages


TORCH_LIBS = ("torch", "diffusers", "transformers", "safetensors")
COREML_LIBS = ("coremltools", "numpy")

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "download",
            "1",
            "sdbuild.stages.download:run",
            fields=("model.version", "model.revision", "model.variant", "model.allow_pickle", "source"),
            libraries=("huggingface_hub", "peft", "open-clip-torch", *TORCH_LIBS),
        ),
        Stage(
            "trace",
            "2",
            "sdbuild.stages.trace:run",
            component_fields={
                "unet": ("attention", "resolution", "multires", "unet_batch_one", "encoder_sequence_length"),
                "controlled_unet": ("attention", "resolution", "multires", "unet_batch_one", "encoder_sequence_length"),
                "unet_refiner": ("attention", "resolution", "multires", "unet_batch_one", "encoder_sequence_length"),
                "controlnet": ("attention", "resolution", "multires", "unet_batch_one", "encoder_sequence_length"),
                "vae_decoder": ("resolution", "multires"),
                "vae_encoder": ("resolution", "multires"),
                "text_encoder": ("attention",),
                "text_encoder_2": ("attention",),
                "safety_checker": ("attention", "resolution"),  # resolution: the Python variant's images
                # The user's TorchScript file, by its content (its path and time are not in the key).
                "multilingual_projection": ("multilingual_projection_sha256",),
            },
            libraries=TORCH_LIBS,
        ),
        Stage(
            "convert",
            "2",
            "sdbuild.stages.convert:run",
            fields=("target",),
            # How several resolutions become one package (functions | enumerated), and which.
            component_fields={k: ("resolution", "multires") for k in ("unet", "controlled_unet", "controlnet", "vae_decoder", "vae_encoder")},
            libraries=(*TORCH_LIBS, *COREML_LIBS),
        ),
        Stage(
            "analyze",
            "1",
            "sdbuild.stages.analyze:run",
            fields=("model.version", "attention", "resolution", "unet_batch_one"),
            libraries=TORCH_LIBS + ("numpy", "scikit-learn"),
            resumable=True,
        ),
        Stage(
            "calibrate",
            "1",
            "sdbuild.stages.calibrate:run",
            # compression.calibration with its defaults filled in (the build graph reads them);
            # the float16 text encoder and unet it runs enter the key as upstream entries.
            fields=("calibration",),
            libraries=(*TORCH_LIBS, *COREML_LIBS),
        ),
        Stage(
            "compress",
            "1",
            "sdbuild.stages.compress:run",
            fields=("compression",),
            libraries=(*COREML_LIBS, "scikit-learn"),
        ),
        Stage(
            "chunk",
            "1",
            "sdbuild.stages.chunk:run",
            fields=("chunk",),
            libraries=COREML_LIBS,
        ),
        Stage(
            "verify",
            "1",
            "sdbuild.stages.verify:run",
            fields=("verify.samples", "verify.seed", "compute_unit"),
            libraries=(*TORCH_LIBS, *COREML_LIBS),
        ),
        Stage(
            "sample",
            "1",
            "sdbuild.stages.sample:run",
            fields=("verify.seed",),
            libraries=(*TORCH_LIBS, *COREML_LIBS),
        ),
        Stage(
            "compile",
            "1",
            "sdbuild.stages.compile:run",
            fields=("coremlcompiler",),  # the compiler's version, read at plan time
            libraries=("coremltools",),
        ),
    )
}

# Stages in build order, including those the executor runs itself (bundle) or
# that are not built yet; plan and summary tables follow this order.
ORDER = ("download", "trace", "convert", "analyze", "calibrate", "compress", "chunk", "compile", "bundle", "verify")
