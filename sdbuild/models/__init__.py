"""Conversion-friendly PyTorch modules, one per bundle component.

The trace and convert stages call ``build_component`` and nothing else here:
it loads the checkpoint's weights into the module that is traced, and says
which named inputs (with shapes) and outputs the converted model has, as the
bundle contract (CONTRACT.md) fixes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdbuild.errors import RecipeError

TOKENS = 77
FAMILIES = ("sd", "sdxl")
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder", "safety_checker")
DEFAULT_COMPONENTS = {
    "sd": ["text_encoder", "unet", "vae_decoder"],
    "sdxl": ["text_encoder", "text_encoder_2", "unet", "vae_decoder"],
}


@dataclass(frozen=True)
class TensorSpec:
    """One named model input: its shape, and how to draw a valid random value for it.

    ``kind`` is ``normal`` (standard normal), ``tokens`` (integer ids below
    ``high``, held in float32 as the contract says), ``timestep`` (integers
    in [0, high)), or ``image`` (uniform in [-1, 1]).
    """

    name: str
    shape: tuple[int, ...]
    kind: str = "normal"
    high: int | None = None


@dataclass(frozen=True)
class BuildOptions:
    """The recipe fields that shape a component's module."""

    attention: str = "ORIGINAL"
    height: int = 512  # image pixels
    width: int = 512
    unet_batch_one: bool = False

    @property
    def latent(self) -> tuple[int, int]:
        return self.height // 8, self.width // 8

    @property
    def batch(self) -> int:
        return 1 if self.unet_batch_one else 2


@dataclass
class ComponentModel:
    """A module ready to trace: ``module(*inputs in order)`` returns the outputs in order."""

    module: object  # torch.nn.Module, float32, eval mode
    inputs: list[TensorSpec]
    outputs: list[str]
    precision: str = "float16"  # the converted model's compute precision
    info: dict = field(default_factory=dict)


def read_model_index(checkpoint: Path) -> dict:
    index = Path(checkpoint) / "model_index.json"
    if not index.is_file():
        raise RecipeError(f"{checkpoint}: no model_index.json: not a diffusers pipeline folder")
    return json.loads(index.read_text())


def model_family(checkpoint: Path) -> str:
    """``sdxl`` for SDXL pipelines (two text encoders), else ``sd``."""
    index = read_model_index(checkpoint)
    return "sdxl" if "text_encoder_2" in index or "XL" in index.get("_class_name", "") else "sd"


def build_component(component: str, checkpoint: Path, options: BuildOptions) -> ComponentModel:
    """Load ``component`` of the diffusers folder ``checkpoint`` as a module to trace."""
    from sdbuild.models import plain

    family = model_family(checkpoint)
    if component not in COMPONENTS:
        raise RecipeError(f"unknown component '{component}': choose from {', '.join(COMPONENTS)}")
    return plain.build(component, Path(checkpoint), family, options)


def sample_inputs(inputs: list[TensorSpec], seed: int) -> dict[str, np.ndarray]:
    """Seeded random float32 values for ``inputs``, each valid for its kind."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in inputs:
        if spec.kind == "tokens":
            # Start and end tokens as a tokenizer would place them, random ids between.
            ids = rng.integers(0, spec.high - 2, size=spec.shape)
            ids[..., 0] = spec.high - 2
            ids[..., -1] = spec.high - 1
            out[spec.name] = ids.astype(np.float32)
        elif spec.kind == "timestep":
            out[spec.name] = rng.integers(0, spec.high or 1000, size=spec.shape).astype(np.float32)
        elif spec.kind == "image":
            out[spec.name] = rng.uniform(-1, 1, size=spec.shape).astype(np.float32)
        else:
            out[spec.name] = rng.standard_normal(size=spec.shape).astype(np.float32)
    return out
