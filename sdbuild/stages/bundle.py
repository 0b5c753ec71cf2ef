"""Bundle: lay the finished packages out as Apple's consumers expect them.

This module is the one place that knows bundle file names (CONTRACT.md).
Files are reflinked (copy-on-write) out of the cache where the filesystem can,
else copied: never symlinked, so a bundle survives ``sdbuild cache gc`` and
being zipped, and never hard-linked, so editing a bundle cannot change the
cache. Each package's spec is written anew with sdbuild's metadata and
descriptions of its inputs and outputs.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from sdbuild import __version__
from sdbuild.cache import clone_file
from sdbuild.stages.download import checkpoint_dir, vae_dir

SWIFT_NAMES = {
    "text_encoder": "TextEncoder",
    "text_encoder_2": "TextEncoder2",
    "unet": "Unet",
    "vae_decoder": "VAEDecoder",
    "vae_encoder": "VAEEncoder",
    "safety_checker": "SafetyChecker",
    "controlled_unet": "ControlledUnet",
    "multilingual_projection": "MultilingualTextEncoderProjection",
}
# Apple's Python pipeline loads no projection; its name follows that pipeline's pattern.
PYTHON_NAMES = {"controlled_unet": "control-unet", "multilingual_projection": "multilingual_text_encoder_projection"}
TOKENIZER_FILES = ("vocab.json", "merges.txt")
PIPELINE_FILE = "pipeline.json"
SPEC_PATH = Path("Data/com.apple.CoreML/model.mlmodel")

DESCRIPTIONS = {
    "input_ids": "token ids from the CLIP tokenizer, held in float32, [1, 77]",
    "last_hidden_state": "text encoder's last hidden states [1, 77, C]",
    "hidden_embeds": "text encoder's penultimate hidden states [1, 77, C] (SDXL)",
    "pooled_outputs": "pooled text embedding [1, C] (projected for the second SDXL encoder)",
    "sample": "noisy latents [B, 4, H, W] (scaled by the scheduler)",
    "timestep": "diffusion timestep per batch row [B]",
    "encoder_hidden_states": "text embeddings in the (B, C, 1, S) layout",
    "text_embeds": "pooled embedding of the second text encoder [B, C] (SDXL)",
    "time_ids": "original h, w, crop top, left, target h, w per row [B, 6] (SDXL)",
    "noise_pred": "predicted noise [B, 4, H, W]",
    "z": "latents already divided by the VAE scaling factor [1, 4, H, W]",
    "image": "decoded image in [-1, 1], [1, 3, 8H, 8W]",
    "x": "image in [-1, 1], [1, 3, 8H, 8W]",
    "latent": "mean (channels 0-3) and log-variance (4-7) of the latent, unscaled [1, 8, H, W]",
    "additional_residual": "ControlNet residual: down-block residuals in order, the mid-block residual last",
    "controlnet_cond": "control image [B, 3, 8H, 8W]",
    "nlcontextualembeddings_output": "NLContextualEmbedding token vectors, zero-padded [1, 256, 512]",
}


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
    name = PYTHON_NAMES.get(component, component)
    return f"Stable_Diffusion_version_{model_version.replace('/', '_')}_{name}.mlpackage"


def controlnet_swift_name(hub_id: str) -> str:
    """``lllyasviel/sd-controlnet-mlsd`` → ``LllyasvielSdControlnetMlsd``."""
    return "".join(w[:1].upper() + w[1:] for w in re.split(r"[^A-Za-z0-9]+", hub_id) if w)


def _link(src, dst) -> None:
    """A new, writable file: a reflink where the filesystem can, else a copy (never a hard link)."""
    clone_file(src, dst)


def _metadata(recipe, component: str) -> dict[str, str]:
    comp = recipe.compression
    kind = {"controlled_unet": "unet"}.get(component, component.split("/")[0])
    if comp is None or kind not in comp.components or (comp.mixed_bit is not None and kind != "unet"):
        compression = "float16"
    elif comp.nbits is not None:
        compression = f"{comp.nbits}-bit palettization" + (f", groups of {comp.group_size}" if comp.group_size else "")
    elif comp.linear8:
        compression = "linear 8-bit"
    else:
        compression = f"mixed-bit palettization ({comp.mixed_bit.recipe})"
    version = recipe.model.version
    card = f"https://huggingface.co/{version}" if version.count("/") == 1 and not Path(version).exists() else version
    return {
        "author": f"converted by sdbuild {__version__}; weights from {version}",
        "license": f"see the model card: {card}",
        "com.sdbuild.recipe": recipe.name,
        "com.sdbuild.version": __version__,
        "com.sdbuild.model_version": version,
        "com.sdbuild.component": component,
        "com.sdbuild.attention": recipe.attention,
        "com.sdbuild.compression": compression,
        "com.sdbuild.compute_unit": recipe.compute_unit,
    }


def place_package(src: Path, dst: Path, metadata: dict[str, str]) -> None:
    """Copy (reflink) ``src``'s files to ``dst`` and write a new spec carrying ``metadata``."""
    import coremltools as ct

    shutil.copytree(src, dst, copy_function=_link)
    spec = ct.utils.load_spec(str(src))
    meta = spec.description.metadata
    meta.author = metadata["author"]
    meta.license = metadata["license"]
    meta.shortDescription = f"{metadata['com.sdbuild.component']} of {metadata['com.sdbuild.model_version']}"
    for key, value in metadata.items():
        if key.startswith("com.sdbuild."):
            meta.userDefined[key] = value
    for feature in list(spec.description.input) + list(spec.description.output):
        known = DESCRIPTIONS.get(re.sub(r"_\d+$", "", feature.name))
        # Keep what an earlier stage wrote (the chunker describes intermediate values).
        feature.shortDescription = known or feature.shortDescription or feature.name
    target = dst / SPEC_PATH
    target.unlink()
    target.write_bytes(spec.SerializeToString(deterministic=True))  # map order fixed: the same bundle, byte for byte


def pipeline_facts(recipe, family: str, checkpoint: Path, vae_folder: Path) -> dict:
    """What a pipeline needs beyond the models: family, VAE scaling, scheduler config.

    ``vae_folder``: the VAE the bundle's VAE models come from (``download.vae_dir``).
    """
    vae = json.loads((vae_folder / "config.json").read_text())
    scheduler = json.loads((checkpoint / "scheduler" / "scheduler_config.json").read_text())
    return {
        "model_version": recipe.model.version,
        "family": family,
        "vae_scaling_factor": vae.get("scaling_factor", 0.18215),
        "vae_force_upcast": bool(vae.get("force_upcast", False)),
        "resolution": {"height": recipe.resolutions[0].height, "width": recipe.resolutions[0].width},
        "compute_unit": recipe.compute_unit,
        "scheduler": scheduler,
    }


def write_bundle(recipe, family: str, packages: dict[str, dict], download_entry: Path, dest: Path) -> list[Path]:
    """Write the bundle for ``recipe.bundle.layout`` into ``dest``; returns the package paths written.

    ``packages`` maps a component to ``{"swift": [package, …], "whole": package}``:
    the Swift layout takes the parts of a chunked component (one part when not
    chunked), the Python layout the whole package (Apple's Python pipeline
    does not use chunks).
    """
    layout = recipe.bundle.layout
    checkpoint = checkpoint_dir(download_entry)
    written = []
    if layout in ("swift", "both"):
        resources = dest / "Resources"
        resources.mkdir(parents=True)
        for component, parts in packages.items():
            chunked = len(parts["swift"]) > 1
            for i, package in enumerate(parts["swift"], start=1):
                # Compiled models (macOS) keep the metadata they were compiled with.
                target = resources / f"{swift_name(component, i if chunked else None)}{package.suffix}"
                target.parent.mkdir(parents=True, exist_ok=True)
                if package.suffix == ".mlmodelc":
                    shutil.copytree(package, target, copy_function=_link)
                else:
                    place_package(package, target, _metadata(recipe, component))
                written.append(target)
        for name in TOKENIZER_FILES:
            shutil.copyfile(checkpoint / "tokenizer" / name, resources / name)
    if layout in ("python", "both"):
        folder = dest / "python"
        folder.mkdir(parents=True)
        for component, parts in packages.items():
            target = folder / python_package_name(recipe.model.version, component)
            target.parent.mkdir(parents=True, exist_ok=True)
            place_package(parts["whole"], target, _metadata(recipe, component))
            written.append(target)
        for name in TOKENIZER_FILES:
            shutil.copyfile(checkpoint / "tokenizer" / name, folder / name)
    (dest / PIPELINE_FILE).write_text(json.dumps(pipeline_facts(recipe, family, checkpoint, vae_dir(download_entry)), indent=2))
    return written
