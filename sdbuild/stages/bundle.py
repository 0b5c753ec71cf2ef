"""Bundle: lay the finished packages out as Apple's consumers expect them.

The bundle file names are ``sdbuild.bundle_names``'s (CONTRACT.md).
Files are reflinked (copy-on-write) out of the cache where the filesystem can,
else copied: never symlinked, so a bundle survives ``sdbuild cache gc`` and
being zipped, and never hard-linked, so editing a bundle cannot change the
cache. Each package's spec is written anew with sdbuild's metadata and
descriptions of its inputs and outputs, byte-reproducibly
(``sdbuild.mlpackage``): the same recipe and stage outputs give the same bundle
bytes.

The safety checker comes in two variants where the layouts' clients differ
(docs/interface.md): the Swift layout's takes the 512x512 ``images``
placeholder Apple's Swift package feeds, the Python layout's the generated
image itself, as Apple's Python pipeline feeds it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

from sdbuild import __version__
# Re-exported too: other modules import these names from here.
from sdbuild.bundle_names import (  # noqa: F401
    PIPELINE_FILE,
    PYTHON_FOLDER,
    PYTHON_NAMES,
    RESOURCES_FOLDER,
    SWIFT_NAMES,
    TOKENIZER_FILES,
    controlnet_swift_name,
    python_package_name,
    swift_name,
)
from sdbuild.cache import clone_file
from sdbuild.models import SAFETY_CHECKER_IMAGE_SIZED, SAFETY_CHECKER_IMAGES
from sdbuild.stages import component_kind, weights_kind
from sdbuild.stages.download import DownloadError, checkpoint_dir, vae_dir

SPEC_PATH = Path("Data/com.apple.CoreML/model.mlmodel")

# Short descriptions of every input and output, saying what Apple's converter's descriptions say, in our words.
DESCRIPTIONS = {
    "input_ids": "token ids from the CLIP tokenizer, held in float32, [1, 77]",
    "last_hidden_state": "text encoder's last hidden states [1, 77, C]",
    "hidden_embeds": "text encoder's penultimate hidden states [1, 77, C] (SDXL)",
    "pooled_outputs": "pooled text embedding [1, C] (projected for the second SDXL encoder)",
    "sample": "noisy latents [B, 4, H, W] (scaled by the scheduler)",
    "timestep": "diffusion timestep per batch row [B]",
    "encoder_hidden_states": "text embeddings in the (B, C, 1, S) layout",
    "text_embeds": "pooled embedding of the second text encoder [B, C] (SDXL)",
    "time_ids": "original h, w, crop top, left, then target h, w [B, 6] (SDXL base) or the aesthetic score [B, 5] (refiner)",
    "noise_pred": "predicted noise [B, 4, H, W]",
    "z": "latents already divided by the VAE scaling factor [1, 4, H, W]",
    "image": "decoded image in [-1, 1], [1, 3, 8H, 8W]",
    "x": "image in [-1, 1], [1, 3, 8H, 8W]",
    "latent": "mean (channels 0-3) and log-variance (4-7) of the latent, unscaled [1, 8, H, W]",
    "additional_residual": "ControlNet residual: down-block residuals in order, the mid-block residual last",
    "controlnet_cond": "control image [B, 3, 8H, 8W]",
    "nlcontextualembeddings_output": "NLContextualEmbedding token vectors, zero-padded [1, 256, 512]",
    "clip_input": "image to judge, resized to the checker's size and CLIP-normalized, channels first [1, 3, 224, 224]",
    "images": "image(s) to pass through, channels last [1, H, W, 3]; blacked out when flagged",
    "adjustment": "added to the concept scores before thresholding at 0 (0: the default threshold) [1]",
    "filtered_images": "the images input, or zeros where sensitive content was found",
    "has_nsfw_concepts": "1 where any concept score is above 0 (sensitive content found), else 0",
    "concept_scores": "per-concept scores before thresholding at 0; what adjustment shifts",
}


def layout_components(components: list[str], layout: str, height: int, width: int) -> list[str]:
    """``components`` with the safety checker variants the bundle ``layout`` needs.

    ``safety_checker`` takes the Swift package's 512x512 ``images``;
    ``SAFETY_CHECKER_IMAGE_SIZED`` the generated image (height x width), for
    Apple's Python pipeline. One serves both when the image is 512x512.
    """
    if "safety_checker" not in components:
        return list(components)
    placeholder = (height, width) == (SAFETY_CHECKER_IMAGES, SAFETY_CHECKER_IMAGES)
    variants = []
    if layout in ("swift", "both") or placeholder:
        variants.append("safety_checker")
    if layout in ("python", "both") and not placeholder:
        variants.append(SAFETY_CHECKER_IMAGE_SIZED)
    out = list(components)
    at = out.index("safety_checker")
    out[at : at + 1] = variants
    return out


def _link(src, dst) -> None:
    """A new, writable file: a reflink where the filesystem can, else a copy (never a hard link)."""
    clone_file(src, dst)


def recipe_key(recipe) -> str:
    """sha256 (first 16 hex digits) of the recipe as validated (every key, defaults filled in)."""
    text = json.dumps(recipe.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _metadata(recipe, component: str, family: str = "") -> dict[str, str]:
    comp = recipe.compression
    kind = weights_kind(component)  # the controlled unet and the refiner's are compressed as the unet
    if comp is None or kind not in comp.components or (comp.mixed_bit is not None and kind != "unet"):
        compression = "float16"
    elif comp.nbits is not None:
        compression = f"{comp.nbits}-bit palettization" + (f", groups of {comp.group_size}" if comp.group_size else "")
    elif comp.linear8:
        compression = "linear 8-bit" + (" weights, int8 activations (W8A8)" if comp.activations else "")
    else:
        compression = f"mixed-bit palettization ({comp.mixed_bit.recipe})"
    # The refiner's weights are its own (Apple's converter gives its package the refiner's version).
    version = recipe.model.refiner if component == "unet_refiner" and recipe.model.refiner else recipe.model.version
    card = f"https://huggingface.co/{version}" if version.count("/") == 1 and not Path(version).exists() else version
    return {
        "author": f"converted by sdbuild {__version__}; weights from {version}",
        "license": f"see the model card: {card}",
        "com.sdbuild.recipe": recipe.name,
        "com.sdbuild.recipe_key": recipe_key(recipe),
        "com.sdbuild.version": __version__,
        "com.sdbuild.model_version": version,
        "com.sdbuild.family": family,
        "com.sdbuild.component": component_kind(component) if kind == "safety_checker" else component,
        "com.sdbuild.attention": recipe.attention,
        "com.sdbuild.resolution": ", ".join(f"{r.height}x{r.width}" for r in recipe.resolutions),
        "com.sdbuild.compression": compression,
        "com.sdbuild.compute_unit": recipe.compute_unit,
    }


def place_package(src: Path, dst: Path, metadata: dict[str, str]) -> None:
    """Copy (reflink) ``src``'s files to ``dst`` and write a new spec carrying ``metadata``.

    The spec and the manifest are written to fresh files, never through the
    cache's, so the cache entry's own are left untouched; both are the same
    bytes for the same package and metadata (``sdbuild.mlpackage.write_spec``).
    """
    from sdbuild.mlpackage import load_spec, write_spec

    shutil.copytree(src, dst, copy_function=_link)
    spec = load_spec(src)
    meta = spec.description.metadata
    meta.author = metadata["author"]
    meta.license = metadata["license"]
    meta.versionString = metadata["com.sdbuild.model_version"]  # as Apple's converter sets the model's version
    meta.shortDescription = f"{metadata['com.sdbuild.component']} of {metadata['com.sdbuild.model_version']}"
    for key, value in metadata.items():
        if key.startswith("com.sdbuild."):
            meta.userDefined[key] = value
    features = list(spec.description.input) + list(spec.description.output)
    for function in spec.description.functions:  # a multifunction package's, one per resolution
        features += list(function.input) + list(function.output)
    for feature in features:
        known = DESCRIPTIONS.get(re.sub(r"_\d+$", "", feature.name))
        # Keep what an earlier stage wrote (the chunker describes intermediate values).
        feature.shortDescription = known or feature.shortDescription or feature.name
    write_spec(dst, spec)


def pipeline_facts(recipe, family: str, checkpoint: Path, vae_folder: Path) -> dict:
    """What a pipeline needs beyond the models: family, VAE scaling, scheduler config.

    ``vae_folder``: the VAE the bundle's VAE models come from (``download.vae_dir``).
    """
    from sdbuild.models import vae_scale_factor
    from sdbuild.recipe import function_name

    vae = json.loads((vae_folder / "config.json").read_text())
    scheduler = json.loads((checkpoint / "scheduler" / "scheduler_config.json").read_text())
    return {
        "model_version": recipe.model.version,
        "family": family,
        "vae_scaling_factor": vae.get("scaling_factor", 0.18215),
        "vae_scale_factor": vae_scale_factor(vae),  # image pixels per latent pixel
        "vae_force_upcast": bool(vae.get("force_upcast", False)),
        "resolution": {"height": recipe.resolutions[0].height, "width": recipe.resolutions[0].width},
        # Every size the image models were built for, the default (first) first; how, when several.
        "resolutions": [
            {"height": r.height, "width": r.width, "function": function_name(r.height, r.width) if recipe.multires_kind == "functions" else None}
            for r in recipe.resolutions
        ],
        "multires": recipe.multires_kind,
        "compute_unit": recipe.compute_unit,
        "scheduler": scheduler,
    }


def tokenizer_dir(checkpoint: Path) -> Path:
    """The checkpoint's CLIP tokenizer: ``tokenizer/``, or ``tokenizer_2/`` for a refiner (which has only that one).

    SDXL's two tokenizers share vocabulary and merges (Apple's Swift package reads one pair for both).
    """
    for folder in (checkpoint / "tokenizer", checkpoint / "tokenizer_2"):
        if all((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    raise DownloadError(
        f"{checkpoint}: no CLIP tokenizer (tokenizer/ or tokenizer_2/ with {' and '.join(TOKENIZER_FILES)}), which the "
        "bundle ships; copy the tokenizer folder from the model's repository into the checkpoint folder"
    )


def write_bundle(recipe, family: str, packages: dict[str, dict], download_entry: Path, dest: Path) -> list[Path]:
    """Write the bundle for ``recipe.bundle.layout`` into ``dest``; returns the package paths written.

    ``packages`` maps a component to ``{"swift": [package, …], "whole": package}``:
    the Swift layout takes the parts of a chunked component (one part when not
    chunked), the Python layout the whole package (Apple's Python pipeline
    does not use chunks). Of the safety checker's variants (``layout_components``),
    each layout takes its own.
    """
    layout = recipe.bundle.layout
    checkpoint = checkpoint_dir(download_entry)
    written = []
    if layout in ("swift", "both"):
        resources = dest / RESOURCES_FOLDER
        resources.mkdir(parents=True)
        for component, parts in packages.items():
            if component == SAFETY_CHECKER_IMAGE_SIZED:
                continue  # the Python pipeline's variant
            chunked = len(parts["swift"]) > 1
            for i, package in enumerate(parts["swift"], start=1):
                # Compiled models (macOS) keep the metadata they were compiled with.
                target = resources / f"{swift_name(component, i if chunked else None)}{package.suffix}"
                target.parent.mkdir(parents=True, exist_ok=True)
                if package.suffix == ".mlmodelc":
                    shutil.copytree(package, target, copy_function=_link)
                else:
                    place_package(package, target, _metadata(recipe, component, family))
                written.append(target)
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer_dir(checkpoint) / name, resources / name)
    if layout in ("python", "both"):
        folder = dest / PYTHON_FOLDER
        folder.mkdir(parents=True)
        for component, parts in packages.items():
            if component == "safety_checker" and SAFETY_CHECKER_IMAGE_SIZED in packages:
                continue  # the Swift package's variant
            target = folder / python_package_name(recipe.model.version, component)
            target.parent.mkdir(parents=True, exist_ok=True)
            place_package(parts["whole"], target, _metadata(recipe, component, family))
            written.append(target)
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer_dir(checkpoint) / name, folder / name)
    (dest / PIPELINE_FILE).write_text(json.dumps(pipeline_facts(recipe, family, checkpoint, vae_dir(download_entry)), indent=2))
    return written


def run(job, out: Path) -> dict:
    """The bundle stage's function (its declaration's ``run``): ``write_bundle`` with the fields as its arguments,
    in a stage process or the build's own (``executor._write_bundle``)."""
    fields = job.fields
    write_bundle(fields["recipe"], fields["family"], fields["packages"], Path(fields["download"]), out)
    return {}
