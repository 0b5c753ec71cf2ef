"""Bundle file names: the one place that knows what a bundle's files are called (CONTRACT.md).

The bundle stage (``sdbuild.stages.bundle``) writes by these names, and
``sdbuild.generate`` finds models by them. Swift layout: ``Resources/`` holds
``TextEncoder``, ``Unet`` or ``UnetChunk1/2``, ``VAEDecoder`` … and
``controlnet/<UpperCamelCase>``; Python layout: ``python/`` holds
``Stable_Diffusion_version_<version>_<component>.mlpackage`` and
``controlnet/<id with / as _>.mlpackage``. Beside them: the tokenizer files and
``pipeline.json``.
"""

from __future__ import annotations

import re

SWIFT_NAMES = {
    "text_encoder": "TextEncoder",
    "text_encoder_2": "TextEncoder2",
    "unet": "Unet",
    "unet_refiner": "UnetRefiner",
    "vae_decoder": "VAEDecoder",
    "vae_encoder": "VAEEncoder",
    "safety_checker": "SafetyChecker",
    "controlled_unet": "ControlledUnet",
    "multilingual_projection": "MultilingualTextEncoderProjection",
}
# Apple's Python pipeline loads no projection; its name follows that pipeline's pattern.
PYTHON_NAMES = {"controlled_unet": "control-unet", "unet_refiner": "refiner", "multilingual_projection": "multilingual_text_encoder_projection"}
PYTHON_PREFIX = "Stable_Diffusion_version_"  # Apple's Python pipeline: <prefix><version>_<component>.mlpackage
PYTHON_UNET_SUFFIX = "_unet.mlpackage"
RESOURCES_FOLDER = "Resources"  # the Swift layout's models
PYTHON_FOLDER = "python"  # the Python layout's packages
CONTROLNET_FOLDER = "controlnet"  # a layout's ControlNets, in a folder of its own
TOKENIZER_FILES = ("vocab.json", "merges.txt")
PIPELINE_FILE = "pipeline.json"


def swift_name(component: str, part: int | None = None) -> str:
    """``Unet``; ``UnetChunk1`` for part 1 of a chunked unet; ``controlnet/<Name>`` for a ControlNet."""
    if component.startswith("controlnet/"):
        return f"controlnet/{controlnet_swift_name(component.split('/', 1)[1])}"
    base = SWIFT_NAMES[component]
    return f"{base}Chunk{part}" if part else base


def python_package_name(model_version: str, component: str) -> str:
    """Apple's Python pipeline name: every '/' of the model version becomes '_'.

    A ControlNet is ``controlnet/<its version with / as _>.mlpackage``.
    """
    if component.startswith("controlnet/"):
        return f"controlnet/{component.split('/', 1)[1].replace('/', '_')}.mlpackage"
    name = PYTHON_NAMES.get(component, component.split("/")[0])
    return f"{PYTHON_PREFIX}{model_version.replace('/', '_')}_{name}.mlpackage"


def controlnet_swift_name(hub_id: str) -> str:
    """``lllyasviel/sd-controlnet-mlsd`` → ``LllyasvielSdControlnetMlsd``."""
    return "".join(w[:1].upper() + w[1:] for w in re.split(r"[^A-Za-z0-9]+", hub_id) if w)
