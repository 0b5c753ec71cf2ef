"""Image generation over a bundle: text → image and image → image, as Apple's pipelines do it.

A ``Pipeline`` is built once from a bundle (its models load once) and then
called many times:

    pipe = Pipeline.from_bundle(Path("artifacts/builds/tiny"))
    result = pipe.generate("a photo of a cat", seed=93, steps=20, scheduler="DPM++2M")
    result.images  # float32 [N, 8H, 8W, 3] in [0, 1]

The bundle may be a build folder (``artifacts/builds/<name>``), its
``Resources/`` (Swift layout: ``TextEncoder``, ``Unet`` or ``UnetChunk1/2…``,
``VAEDecoder`` … as ``.mlpackage`` or ``.mlmodelc``), or a folder of
Python-layout packages (``Stable_Diffusion_version_<version>_<component>.mlpackage``),
including ones published by others. Models run on Core ML on macOS and on the
reference executor (float16, ``sdbuild.mil``) elsewhere.

The arithmetic around the models follows diffusers' StableDiffusionPipeline,
StableDiffusionImg2ImgPipeline and StableDiffusionXLPipeline step for step
(the schedulers are diffusers' own), so with ``rng="torch"`` a bundle's image
can be compared with diffusers' image of the same checkpoint.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdbuild.errors import SdbuildError
from sdbuild.stages.bundle import (
    PIPELINE_FILE,
    SWIFT_NAMES,
    TOKENIZER_FILES,
    controlnet_swift_name,
    python_package_name,
    swift_name,
)
from sdbuild.stages.trace import RESOLUTION_KINDS


class GenerationError(SdbuildError):
    """A generate request that cannot be met: missing bundle file, bad image, unknown scheduler… (exit status 2)."""

    exit_code = 2


# --------------------------------------------------------------------------- schedulers

# Canonical name → diffusers class. The names are those of Apple's Python pipeline, shortened.
SCHEDULERS = {
    "DDIM": "DDIMScheduler",
    "DPMSolverMultistep": "DPMSolverMultistepScheduler",
    "Euler": "EulerDiscreteScheduler",
    "EulerAncestral": "EulerAncestralDiscreteScheduler",
    "LMS": "LMSDiscreteScheduler",
    "PNDM": "PNDMScheduler",
    "DDPM": "DDPMScheduler",
}
# Other spellings people use (Apple's CLI, the Swift CLI, web UIs), compared squashed: lower case, no separators.
_SCHEDULER_ALIASES = {
    "dpm++2m": "DPMSolverMultistep",
    "dpmpp2m": "DPMSolverMultistep",
    "dpmpp": "DPMSolverMultistep",
    "dpmsolver": "DPMSolverMultistep",
    "dpmsolvermultistepscheduler": "DPMSolverMultistep",
    "eulerdiscrete": "Euler",
    "eulera": "EulerAncestral",
    "eulerancestraldiscrete": "EulerAncestral",
    "lmsdiscrete": "LMS",
}

# Scheduler configs for bundles that carry none: SD 1.5's and SDXL base's published ones.
_DEFAULT_SCHEDULER_CONFIG = {
    "sd": {
        "_class_name": "PNDMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "prediction_type": "epsilon",
    },
    "sdxl": {
        "_class_name": "EulerDiscreteScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "interpolation_type": "linear",
        "prediction_type": "epsilon",
    },
}
# CONTRACT.md: latent scaling factors when the VAE config is not at hand.
_DEFAULT_SCALING_FACTOR = {"sd": 0.18215, "sdxl": 0.13025}

# Apple's Swift package defaults (StableDiffusionPipeline.Configuration): the refiner takes over after
# 80% of the steps, conditioned on aesthetic scores 6 (prompt) and 2.5 (negative prompt), as diffusers' too.
REFINER_START = 0.8
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5
REFINER_TIME_IDS = 5
VAE_SCALE_FACTOR = 8  # image pixels per latent pixel of every released Stable Diffusion VAE
RNG_MODES = ("numpy", "torch")
COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")
SCHEDULER_CONFIG = "scheduler_config.json"


def scheduler_name(name: str) -> str:
    """The canonical name (a key of ``SCHEDULERS``) for ``name`` or one of its aliases."""
    squashed = re.sub(r"[\s_\-]", "", name).lower()
    for canonical in SCHEDULERS:
        if squashed in (canonical.lower(), SCHEDULERS[canonical].lower(), canonical.lower() + "scheduler"):
            return canonical
    if squashed in _SCHEDULER_ALIASES:
        return _SCHEDULER_ALIASES[squashed]
    raise GenerationError(f"--scheduler: unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)} (or DPM++2M)")


def make_scheduler(name: str, config: dict):
    """A fresh diffusers scheduler of kind ``name`` built from a checkpoint's scheduler ``config``."""
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[scheduler_name(name)])
    return cls.from_config(config)


# --------------------------------------------------------------------------- bundle discovery


@dataclass
class BundleFiles:
    """What a bundle folder holds, found once.

    ``models``: component (``text_encoder``, ``unet``, …) → model paths; several
    for a chunked unet, in running order. ``folder``: where the models lie;
    ``build_dir``: the build folder when there is one (with ``build.json``).
    """

    path: Path
    folder: Path
    layout: str  # swift | python
    name: str
    models: dict[str, list[Path]]
    build_dir: Path | None = None
    build: dict | None = None
    facts: dict = field(default_factory=dict)  # the bundle's pipeline.json: scheduler, VAE scaling, hints
    model_version: str | None = None  # as built, or the Python layout's <version> ('/' written as '_')
    controlnets: dict[str, Path] = field(default_factory=dict)  # file stem under controlnet/ → model path

    @property
    def family(self) -> str:
        return "sdxl" if "text_encoder_2" in self.models else "sd"

    @property
    def search_folders(self) -> list[Path]:
        """Where files beside the models may lie: their folder, then the build folder."""
        return list(dict.fromkeys(f for f in (self.folder, self.build_dir, self.path) if f))

    def describe(self, component: str) -> str:
        return ", ".join(p.name for p in self.models[component])


REQUIRED = ("text_encoder", "unet", "vae_decoder")
_PY_PREFIX = "Stable_Diffusion_version_"
_PY_UNET_SUFFIX = "_unet.mlpackage"


def find_bundle(path: Path, compiled_ok: bool = False) -> BundleFiles:
    """Find the models of the bundle at ``path`` (build folder, ``Resources/`` or Python-layout folder).

    ``compiled_ok``: accept ``.mlmodelc`` (Core ML on macOS); the reference
    executor reads ``.mlpackage`` only. Raises GenerationError, one line, when a
    required file is missing.
    """
    path = Path(path)
    if not path.is_dir():
        raise GenerationError(f"--bundle {path}: no such folder")
    build_dir = None
    for candidate in (path, path.parent):
        if (candidate / "build.json").is_file() or (candidate / PIPELINE_FILE).is_file():
            build_dir = candidate
            break
    if (path / "Resources").is_dir():
        folder, layout = path / "Resources", "swift"
    elif (path / "python").is_dir():
        folder, layout = path / "python", "python"
    elif any(_swift_model(path, SWIFT_NAMES[c], True) for c in REQUIRED):
        folder, layout = path, "swift"
    elif list(path.glob(_PY_PREFIX + "*" + _PY_UNET_SUFFIX)):
        folder, layout = path, "python"
    else:
        raise GenerationError(
            f"--bundle {path}: no bundle here: expected Resources/, {SWIFT_NAMES['unet']}.mlpackage, "
            f"or {_PY_PREFIX}<version>{_PY_UNET_SUFFIX}"
        )
    build = _read_json(build_dir / "build.json") if build_dir else None
    facts = (_read_json(build_dir / PIPELINE_FILE) if build_dir else None) or {}
    if build:
        name = build.get("name") or build_dir.name
    else:
        name = path.name if path.name not in ("Resources", "python") else path.parent.name
    if layout == "swift":
        models, version = _swift_models(folder, compiled_ok), None
    else:
        models, version = _python_models(folder)
    version = facts.get("model_version") or (build or {}).get("recipe", {}).get("model", {}).get("version") or version
    controlnets = _controlnet_models(folder / "controlnet", compiled_ok)
    return BundleFiles(path, folder, layout, name, models, build_dir, build, facts, version, controlnets)


def _controlnet_models(folder: Path, compiled_ok: bool) -> dict[str, Path]:
    """``controlnet/<Name>.mlpackage`` (or ``.mlmodelc`` for Core ML), by file stem."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for suffix in (".mlmodelc", ".mlpackage") if compiled_ok else (".mlpackage",):
        for model in sorted(folder.glob("*" + suffix)):
            found.setdefault(model.name[: -len(suffix)], model)
    return found


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise GenerationError(f"{path}: not valid JSON; rebuild the bundle") from None


def _swift_model(folder: Path, base: str, compiled_ok: bool) -> Path | None:
    # Core ML loads compiled models fastest; the executor needs the package.
    suffixes = (".mlmodelc", ".mlpackage") if compiled_ok else (".mlpackage",)
    for suffix in suffixes:
        if (folder / f"{base}{suffix}").exists():
            return folder / f"{base}{suffix}"
    return None


def _swift_models(folder: Path, compiled_ok: bool) -> dict[str, list[Path]]:
    models: dict[str, list[Path]] = {}
    for component, base in SWIFT_NAMES.items():
        found = _swift_model(folder, base, compiled_ok)
        if found:
            models[component] = [found]
    # As the Swift loader does: chunks are checked first and used when both halves exist.
    chunks = []
    while chunk := _swift_model(folder, swift_name("unet", len(chunks) + 1), compiled_ok):
        chunks.append(chunk)
    if len(chunks) >= 2:
        models["unet"] = chunks
    elif chunks and "unet" not in models:
        raise GenerationError(f"{folder}: {swift_name('unet', 2)}.mlpackage is missing ({chunks[0].name} is there; the chunked unet needs every part)")
    # The controlled unet (ControlNet bundles) is chunked alike; an incomplete one is left out
    # here, so text-to-image still runs, and named when a ControlNet asks for it.
    controlled = []
    while chunk := _swift_model(folder, swift_name("controlled_unet", len(controlled) + 1), compiled_ok):
        controlled.append(chunk)
    if len(controlled) >= 2:
        models["controlled_unet"] = controlled
    # The refiner's parts, as the Swift package loads them: both chunks, else the whole UnetRefiner.
    refiner = []
    while chunk := _swift_model(folder, swift_name("unet_refiner", len(refiner) + 1), compiled_ok):
        refiner.append(chunk)
    if len(refiner) >= 2:
        models["unet_refiner"] = refiner
    for component in _required(models):
        if component not in models:
            base = SWIFT_NAMES[component]
            if not compiled_ok and _swift_model(folder, base, True):
                raise GenerationError(
                    f"{folder}: {base}.mlmodelc is compiled; the reference executor runs .mlpackage files only "
                    "(Core ML, on macOS, runs compiled models)"
                )
            raise GenerationError(f"{folder}: {base}.mlpackage is missing (the bundle needs it to generate)")
    return models


def _required(models: dict) -> tuple[str, ...]:
    """The models a bundle needs to generate; an SDXL refiner alone has only the second text encoder."""
    if "text_encoder_2" in models and "text_encoder" not in models:
        return tuple(c for c in REQUIRED if c != "text_encoder")
    return REQUIRED


def _python_models(folder: Path) -> tuple[dict[str, list[Path]], str]:
    unets = sorted(folder.glob(_PY_PREFIX + "*" + _PY_UNET_SUFFIX))
    if not unets:
        raise GenerationError(f"{folder}: {_PY_PREFIX}<version>{_PY_UNET_SUFFIX} is missing (the bundle needs it to generate)")
    if len(unets) > 1:
        raise GenerationError(
            f"{folder}: packages of several model versions ({', '.join(p.name for p in unets)}); keep one per folder"
        )
    version = unets[0].name[len(_PY_PREFIX) : -len(_PY_UNET_SUFFIX)]
    models = {}
    for component in SWIFT_NAMES:
        package = folder / python_package_name(version, component)
        if package.exists():
            models[component] = [package]
    for component in _required(models):
        if component not in models:
            raise GenerationError(f"{folder}: {python_package_name(version, component)} is missing (the bundle needs it to generate)")
    return models, version


def _recipe_controlnets(bundle: BundleFiles) -> list[str]:
    """The ControlNet ids the bundle was built with (its recipe's ``controlnet:`` list), when known."""
    listed = (bundle.build or {}).get("recipe", {}).get("controlnet") or bundle.facts.get("controlnet") or []
    return [str(n) for n in listed]


def _same_folder(a: str, b: str) -> bool:
    try:
        pa, pb = Path(a).expanduser(), Path(b).expanduser()
        return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()
    except OSError:
        return False


def find_controlnet(bundle: BundleFiles, name: str) -> Path:
    """The bundle's model for the ControlNet ``name``.

    ``name`` is its id as in the recipe (hub id, ``synthetic:…``, or a local
    folder, which may also be spelt as another path to the same folder), or the
    bundle's own file name for it. File names come from ``sdbuild.stages.bundle``:
    ``controlnet/<UpperCamelCase>`` (Swift layout), ``controlnet/<id with / as _>`` (Python).
    """
    listed = _recipe_controlnets(bundle)
    ids = [name] + [entry for entry in listed if entry != name and _same_folder(entry, name)]
    for cn_id in ids:
        component = f"controlnet/{cn_id}"
        stems = (
            swift_name(component).split("/", 1)[1],
            python_package_name(bundle.model_version or "", component).split("/", 1)[1].removesuffix(".mlpackage"),
        )
        for stem in stems:
            if stem in bundle.controlnets:
                return bundle.controlnets[stem]
    if name in bundle.controlnets:
        return bundle.controlnets[name]
    if not bundle.controlnets:
        raise GenerationError(f"--controlnet {name}: this bundle has no ControlNets (build it with controlnet: in the recipe)")
    held = listed or sorted(bundle.controlnets)
    raise GenerationError(f"--controlnet {name}: not in this bundle; it holds {', '.join(held)}")


def _require_controlled_unet(bundle: BundleFiles) -> None:
    if "controlled_unet" not in bundle.models:
        base = SWIFT_NAMES["controlled_unet"]
        raise GenerationError(
            f"{bundle.folder}: --controlnet needs {base} (or {base}Chunk1/2) in the bundle "
            "(build with controlnet: in the recipe and unet among its components)"
        )


def _require_encoder(bundle: BundleFiles) -> None:
    if "vae_encoder" not in bundle.models:
        raise GenerationError(
            f"{bundle.folder}: image-to-image needs {SWIFT_NAMES['vae_encoder']} in the bundle "
            "(build with vae_encoder among the recipe's components)"
        )


def _checkpoint_of(bundle: BundleFiles) -> Path | None:
    """The local diffusers folder the bundle was built from, when its model version names one."""
    version = bundle.facts.get("model_version") or (bundle.build or {}).get("recipe", {}).get("model", {}).get("version")
    if version and (Path(version).expanduser() / "model_index.json").is_file():
        return Path(version).expanduser()
    return None


def _hub_cached(bundle: BundleFiles, filename: str) -> Path | None:
    """``filename`` of the bundle's hub checkpoint from the local Hugging Face cache (never the network).

    The Python layout writes the hub id with '/' as '_', so every split point is tried.
    """
    version = bundle.model_version
    if not version:
        return None
    guesses = [version] if "/" in version else [version[:i] + "/" + version[i + 1 :] for i, c in enumerate(version) if c == "_"]
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for repo in guesses:
        try:
            found = try_to_load_from_cache(repo, filename)
        except Exception:  # a malformed repo id is just a wrong guess
            continue
        if isinstance(found, str):
            return Path(found)
    return None


def _find_file(bundle: BundleFiles, checkpoint: Path | None, names: tuple[str, ...], checkpoint_name: str) -> Path | None:
    """First of ``names`` beside the models or in the build folder, else ``checkpoint_name``
    of the local checkpoint, else of the hub checkpoint in the local cache."""
    for folder in bundle.search_folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    if checkpoint and (checkpoint / checkpoint_name).is_file():
        return checkpoint / checkpoint_name
    return _hub_cached(bundle, checkpoint_name)


def load_tokenizer(bundle: BundleFiles, checkpoint: Path | None):
    """The CLIP tokenizer from ``vocab.json`` and ``merges.txt`` beside the models (Swift layout).

    For the Python layout, which carries no tokenizer, the same files are looked
    for beside the packages, in the build folder, then in the checkpoint.
    """
    from transformers import CLIPTokenizer

    for folder in bundle.search_folders:
        if all((folder / n).is_file() for n in TOKENIZER_FILES):
            # tokenizer_config.json, when present, carries the pad token (SD 2.x pads with '!').
            if (folder / "tokenizer_config.json").is_file():
                return CLIPTokenizer.from_pretrained(folder)
            return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    if checkpoint and all((checkpoint / "tokenizer" / n).is_file() for n in TOKENIZER_FILES):
        return CLIPTokenizer.from_pretrained(checkpoint / "tokenizer")
    vocab, merges = (_hub_cached(bundle, f"tokenizer/{n}") for n in TOKENIZER_FILES)
    if vocab and merges:
        return CLIPTokenizer(vocab=str(vocab), merges=str(merges))
    raise GenerationError(
        f"{bundle.folder}: no tokenizer: put the checkpoint's tokenizer files {' and '.join(TOKENIZER_FILES)} beside the models"
    )


# --------------------------------------------------------------------------- model runners


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

    def __init__(self, paths: list[Path], function: str | None = None):
        from sdbuild.mil.executor import load_program

        # ``function``: a multifunction package's function (one resolution); None: its default.
        self.programs = [load_program(p, function=function) for p in paths]
        self.name = " + ".join(p.name for p in paths)
        self.inputs = _chain_inputs([(prog.inputs, prog.outputs) for prog in self.programs])
        self.outputs = list(self.programs[-1].outputs)

    def run(self, feeds):
        from sdbuild.mil.chunk import chain_run

        feeds = _cast(feeds, self.inputs)
        if len(self.programs) == 1:
            return self.programs[0].run(feeds, precision="fp16")
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
            from sdbuild.mil.executor import _ARRAY_DTYPES

            self.model = ct.models.MLModel(str(path), compute_units=units, **named)
            spec = self.model.get_spec()
            description = next((f for f in spec.description.functions if f.name == function), spec.description)
            self.inputs = {
                i.name: (tuple(i.type.multiArrayType.shape), np.dtype(_ARRAY_DTYPES.get(i.type.multiArrayType.dataType, np.float32)))
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


INPAINT_CHANNELS = 9  # an inpainting unet's `sample` channels


def _check_inpainting(pipe, image, mask) -> None:
    """An inpainting bundle needs --image and --mask; a mask needs an inpainting bundle and the image's size."""
    if mask is not None and not pipe.inpainting:
        raise GenerationError(f"--mask: {pipe.bundle.describe('unet')} is not an inpainting unet (it takes 4 channels, not 9); drop --mask")
    if pipe.inpainting and (image is None or mask is None):
        raise GenerationError(f"{pipe.bundle.describe('unet')} is an inpainting unet: give --image and --mask (white where to repaint)")
    if mask is not None and mask.shape[:2] != image.shape[:2]:
        raise GenerationError(f"--mask is {mask.shape[1]}x{mask.shape[0]} pixels; --image is {image.shape[1]}x{image.shape[0]}: give them one size")


def load_mask(path: Path) -> np.ndarray:
    """A mask image file as float32 [height, width] in [0, 1] (grayscale, as diffusers' mask processor converts it)."""
    return load_image(path, "--mask", mode="L")


def bundle_sizes(bundle: BundleFiles) -> list[dict]:
    """The image sizes a bundle was built for ({height, width, function}), default first; [] if it does not say."""
    facts = bundle.facts
    if facts.get("resolutions"):
        return list(facts["resolutions"])
    return [dict(facts["resolution"], function=None)] if facts.get("resolution") else []


def pick_size(bundle: BundleFiles, height: int | None, width: int | None) -> dict | None:
    """The bundle's size for ``--height``/``--width`` (either may be left out); None when neither is given
    and the bundle does not say. A size it does not have is one line listing those it has."""
    sizes = bundle_sizes(bundle)
    if height is None and width is None:
        return sizes[0] if sizes else None
    if not sizes:
        raise GenerationError(
            f"--height/--width: {bundle.path} does not say which sizes it was built for (no {PIPELINE_FILE}); "
            "leave them out to use the size its models take"
        )
    match = [s for s in sizes if (height is None or s["height"] == height) and (width is None or s["width"] == width)]
    if not match:
        have = ", ".join(f"{s['height']}x{s['width']}" + (" (default)" if i == 0 else "") for i, s in enumerate(sizes))
        asked = f"{height if height is not None else '*'}x{width if width is not None else '*'}"
        raise GenerationError(f"--height/--width: the bundle has no {asked} (height x width) size; it has: {have}")
    return match[0]


def default_backend() -> str:
    return "coreml" if sys.platform == "darwin" else "executor"


# --------------------------------------------------------------------------- the pipeline


@dataclass
class Generation:
    """One call's results: ``images`` float32 [N, 8H, 8W, 3] in [0, 1] (flagged ones black),
    ``nsfw`` per image, ``latents`` [N, 4, H, W] after the last step, and what was used."""

    images: np.ndarray
    nsfw: list[bool]
    latents: np.ndarray
    settings: dict
    notes: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)


class Pipeline:
    """Stable Diffusion over a bundle's models; build once with ``from_bundle``, call ``generate`` many times."""

    def __init__(self, bundle: BundleFiles, runners: dict[str, ModelRunner], tokenizer, scheduler_config: dict,
                 scaling_factor: float, backend: str, compute_unit: str | None, notes: list[str], load_seconds: float):
        self.bundle = bundle
        self.runners = runners
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.scaling_factor = scaling_factor
        self.backend = backend
        self.compute_unit = compute_unit
        self.notes = notes  # facts about the bundle, repeated with every generation
        self.load_seconds = load_seconds
        unet = runners["unet"]
        shape = unet.inputs["sample"][0]
        self.unet_batch = int(shape[0])  # 2: both guidance halves in one call; 1: a unet_batch_one bundle
        self.latent_shape = tuple(int(s) for s in shape[1:])  # (4, H, W)
        # An inpainting unet takes latents, the mask and the masked image's latents: 4 + 1 + 4 channels.
        self.inpainting = self.latent_shape[0] == INPAINT_CHANNELS
        if self.inpainting:
            self.latent_shape = ((INPAINT_CHANNELS - 1) // 2, *self.latent_shape[1:])
        # Image pixels per latent pixel: the bundle's VAE says (pipeline.json); 8, as for every released VAE, else.
        factor = int(bundle.facts.get("vae_scale_factor") or VAE_SCALE_FACTOR)
        self.image_size = (factor * self.latent_shape[1], factor * self.latent_shape[2])  # (height, width) in pixels
        encoder = runners.get("text_encoder") or runners["text_encoder_2"]
        self.sequence_length = int(encoder.inputs["input_ids"][0][-1])
        # As Apple's Swift package tells them apart: a refiner's unet takes 5 time_ids (the base's 6).
        self.refiner_only = self.family == "sdxl" and _time_id_count(unet) == REFINER_TIME_IDS
        refiner = runners.get("unet_refiner")
        if refiner is not None and _time_id_count(refiner) != REFINER_TIME_IDS:
            raise GenerationError(f"{bundle.describe('unet_refiner')}: takes {_time_id_count(refiner)} time_ids; an SDXL refiner takes {REFINER_TIME_IDS}")

    @property
    def family(self) -> str:
        return self.bundle.family

    @property
    def has_refiner(self) -> bool:
        """Whether the bundle carries a refiner beside the base unet (``UnetRefiner``)."""
        return "unet_refiner" in self.runners

    @classmethod
    def from_bundle(cls, path: Path, compute_unit: str | None = None, backend: str | None = None,
                    height: int | None = None, width: int | None = None) -> "Pipeline":
        """Find and load the bundle at ``path``: every model, the tokenizer, the scheduler config.

        ``backend``: ``coreml`` (macOS) or ``executor``; default by platform.
        ``compute_unit``: a Core ML compute unit; default the bundle's hint, else ALL.
        ``height``, ``width``: the image size, one the bundle was built for
        (``pick_size``); default its first. A multifunction bundle's image
        models then run that size's function.
        """
        started = time.perf_counter()
        backend = backend or default_backend()
        if compute_unit is not None and compute_unit not in COMPUTE_UNITS:
            raise GenerationError(f"--compute-unit: unknown compute unit '{compute_unit}'; choose one of {', '.join(COMPUTE_UNITS)}")
        bundle = find_bundle(path, compiled_ok=backend == "coreml")
        size = pick_size(bundle, height, width)
        function = size.get("function") if size else None
        notes: list[str] = []
        if backend == "coreml":
            hint = bundle.facts.get("compute_unit") or (bundle.build or {}).get("recipe", {}).get("compute_unit")
            compute_unit = compute_unit or (hint if hint in COMPUTE_UNITS else "ALL")

            def make(paths, function=None):
                parts = [CoreMLRunner(p, compute_unit, function) for p in paths]
                return parts[0] if len(parts) == 1 else ChainedRunner(parts)
        else:
            if compute_unit is not None:
                notes.append(f"--compute-unit {compute_unit} ignored: Core ML needs macOS; the reference executor runs on the CPU")
            compute_unit = None
            make = ExecutorRunner

        def make_sized(component: str, paths: list[Path]) -> ModelRunner:
            # The image models run the chosen size's function; the text encoder has one.
            return make(paths, function) if component.split("/")[0] in RESOLUTION_KINDS else make(paths)
        checkpoint = _checkpoint_of(bundle)
        tokenizer = load_tokenizer(bundle, checkpoint)
        scheduler_config = bundle.facts.get("scheduler")
        if not scheduler_config:
            found = _find_file(bundle, checkpoint, (SCHEDULER_CONFIG,), f"scheduler/{SCHEDULER_CONFIG}")
            scheduler_config = json.loads(found.read_text()) if found else None
        if not scheduler_config:
            scheduler_config = dict(_DEFAULT_SCHEDULER_CONFIG[bundle.family])
            label = "SDXL base" if bundle.family == "sdxl" else "Stable Diffusion 1.5"
            notes.append(f"no {PIPELINE_FILE} or {SCHEDULER_CONFIG} with the bundle: using {label}'s scheduler settings")
        scaling = bundle.facts.get("vae_scaling_factor")
        if scaling is None:
            found = _find_file(bundle, checkpoint, (), "vae/config.json")
            scaling = json.loads(found.read_text()).get("scaling_factor") if found else None
        scaling = float(scaling or _DEFAULT_SCALING_FACTOR[bundle.family])
        # The controlled unet and the ControlNets load when a generation first asks for them.
        runners = {component: make_sized(component, paths) for component, paths in bundle.models.items() if component != "controlled_unet"}
        pipe = cls(bundle, runners, tokenizer, scheduler_config, scaling, backend, compute_unit, notes, time.perf_counter() - started)
        pipe._make = make_sized
        if size and bundle.facts.get("multires") == "enumerated":
            # One package takes every enumerated shape: the size asked for, not the default one.
            factor = pipe.image_size[0] // pipe.latent_shape[1]
            pipe.latent_shape = (pipe.latent_shape[0], size["height"] // factor, size["width"] // factor)
            pipe.image_size = (size["height"], size["width"])
        return pipe

    def _runner(self, key: str, paths: list[Path]) -> ModelRunner:
        """A model loaded on first use and kept (``controlled_unet``, ``controlnet/<file>``)."""
        if key not in self.runners:
            make = getattr(self, "_make", None) or (lambda component, paths: ExecutorRunner(paths))
            self.runners[key] = make(key, paths)
        return self.runners[key]

    def controlnet_runners(self, names: list[str]) -> tuple[ModelRunner, list[ModelRunner]]:
        """(the controlled unet, one runner per ControlNet ``names``), loaded once."""
        _require_controlled_unet(self.bundle)
        paths = [find_controlnet(self.bundle, n) for n in names]
        unet = self._runner("controlled_unet", self.bundle.models["controlled_unet"])
        return unet, [self._runner(f"controlnet/{p.name}", [p]) for p in paths]

    # ---- text

    def tokenize(self, text: str) -> tuple[np.ndarray, bool]:
        """Token ids [1, S] as float32 (the contract's input type), and whether the text was cut."""
        ids = self.tokenizer(text, padding="max_length", max_length=self.sequence_length, truncation=True).input_ids
        full = self.tokenizer(text, truncation=False).input_ids
        return np.asarray([ids], dtype=np.float32), len(full) > self.sequence_length

    def encode_text(self, text: str, refiner: bool = False) -> tuple[np.ndarray, np.ndarray | None, bool]:
        """(hidden states [1, S, C], pooled [1, C'] or None, truncated).

        SD: the text encoder's last hidden state. SDXL: both encoders'
        penultimate hidden states concatenated along C, and text_encoder_2's
        projected pooled output. ``refiner``: text_encoder_2's alone (what the
        SDXL refiner takes, from the base's second encoder as in Apple's Swift package).
        """
        ids, truncated = self.tokenize(text)
        if refiner:
            out2 = self.runners["text_encoder_2"].run({"input_ids": ids})
            return out2["hidden_embeds"], out2["pooled_outputs"], truncated
        out = self.runners["text_encoder"].run({"input_ids": ids})
        if self.family == "sd":
            return out["last_hidden_state"], None, truncated
        out2 = self.runners["text_encoder_2"].run({"input_ids": ids})
        hidden = np.concatenate([out["hidden_embeds"], out2["hidden_embeds"]], axis=-1)
        return hidden, out2["pooled_outputs"], truncated

    # ---- generation

    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        seed: int = 93,
        steps: int = 50,
        guidance_scale: float = 7.5,
        scheduler: str = "DDIM",
        rng: str = "numpy",
        image_count: int = 1,
        image: np.ndarray | None = None,
        strength: float = 0.75,
        progress: bool = False,
        controlnet: list[str] | None = None,
        controlnet_images: list[np.ndarray] | None = None,
        controlnet_scale: float | list[float] = 1.0,
        mask: np.ndarray | None = None,
        refiner_start: float = REFINER_START,
        aesthetic_score: float = AESTHETIC_SCORE,
        negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE,
    ) -> Generation:
        """Generate ``image_count`` images.

        ``mask``: with ``image``, inpainting (an inpainting bundle): float32
        [8H, 8W] in [0, 1], white (>= 0.5) where the image is repainted; run as
        diffusers' StableDiffusionInpaintPipeline runs a 9-channel unet.

        With a refiner in the bundle (``UnetRefiner``), the base unet runs the
        first ``int(steps run × refiner_start)`` steps and the refiner the rest,
        in one scheduler loop, as Apple's Swift package does (diffusers:
        ``denoising_end`` on the base, ``denoising_start`` on the refiner, the
        same fraction); 1 runs the base alone. The refiner is conditioned on
        text_encoder_2 alone and on ``aesthetic_score`` (``negative_aesthetic_score``
        for the negative prompt's row). A bundle whose unet is itself a refiner
        runs it throughout (image to image, as refiners are used).

        ``image``: a start image for image-to-image, float32 [8H, 8W, 3] in
        [0, 1]; ``strength`` in (0, 1] says how much of the schedule runs over it.
        ``rng``: ``numpy`` draws the initial latents as Apple's pipelines do
        (``RandomState(seed).randn``); ``torch`` as diffusers does (a CPU
        generator seeded with ``seed``, also used for ancestral noise).
        ``controlnet``: ControlNet ids (as in the recipe), with one control image
        each in ``controlnet_images`` (float32 [8H, 8W, 3] in [0, 1]); their
        residuals, times ``controlnet_scale`` (one number, or one per ControlNet),
        are summed and fed to the bundle's controlled unet, as diffusers'
        StableDiffusionControlNetPipeline (and MultiControlNetModel) do.
        """
        import torch

        name = scheduler_name(scheduler)
        if rng not in RNG_MODES:
            raise GenerationError(f"--rng: unknown mode '{rng}'; choose one of {', '.join(RNG_MODES)}")
        if steps < 1 or image_count < 1:
            raise GenerationError("--steps and --image-count must be at least 1")
        if image is not None and not 0 < strength <= 1:
            raise GenerationError(f"--strength {strength:g}: must be in (0, 1]")
        if not 0 <= refiner_start <= 1:
            raise GenerationError(f"--refiner-start {refiner_start:g}: must be in [0, 1] (the fraction of steps the base runs)")
        if image is not None:
            _require_encoder(self.bundle)
        _check_inpainting(self, image, mask)
        if image is not None and image.shape[:2] != self.image_size:
            h, w = self.image_size
            raise GenerationError(f"--image is {image.shape[1]}x{image.shape[0]} pixels; this bundle makes {w}x{h} images")
        control = self._control(controlnet or [], controlnet_images or [], controlnet_scale)
        if control is not None and self.has_refiner and refiner_start < 1:
            raise GenerationError("--controlnet with a refiner: the refiner takes no ControlNet residuals; set --refiner-start 1")
        timings = {"unet_s": 0.0}
        notes = list(self.notes)
        started = time.perf_counter()

        t0 = time.perf_counter()
        scores = (aesthetic_score, negative_aesthetic_score)
        conditioning, truncated = self._conditioning(prompt, negative_prompt, guidance_scale, self.refiner_only, scores)
        refined = None  # the refiner's conditioning, when it takes over
        if self.has_refiner and refiner_start < 1:
            refined, _ = self._conditioning(prompt, negative_prompt, guidance_scale, True, scores)
        timings["text_encoder_s"] = time.perf_counter() - t0
        if truncated:
            notes.append(f"the prompt is longer than {self.sequence_length} tokens; the rest was cut")

        sched = make_scheduler(name, self.scheduler_config)
        sched.set_timesteps(steps)
        noise = NoiseSource(seed, rng)
        shape = (image_count, *self.latent_shape)
        if image is None:
            timesteps = sched.timesteps
            latents = noise.draw(shape) * sched.init_noise_sigma
        else:
            t0 = time.perf_counter()
            if mask is not None and strength >= 1:  # diffusers: pure noise at full strength, the image only masked
                timesteps, latents = sched.timesteps, noise.draw(shape) * sched.init_noise_sigma
            else:
                timesteps, latents = self._image_latents(sched, image, strength, steps, noise.draw, image_count)
            if mask is not None:
                inpaint = self._mask_latents(image, mask, noise.draw, image_count)
            timings["vae_encoder_s"] = time.perf_counter() - t0
        # Ancestral schedulers draw noise every step; diffusers passes its generator on.
        step_kwargs = {"generator": noise.generator} if "generator" in inspect.signature(sched.step).parameters else {}

        # Apple's Swift package: the refiner takes over at this step of those that run.
        switch = int(len(timesteps) * refiner_start) if refined is not None else len(timesteps)
        bar = _progress_bar(len(timesteps)) if progress else None
        t0 = time.perf_counter()
        try:
            for step, t in enumerate(timesteps):
                model_input = sched.scale_model_input(latents, t)
                if mask is not None:
                    model_input = torch.cat([model_input, *inpaint], dim=1)
                t1 = time.perf_counter()
                if step < switch:
                    noise_pred = self._predict_noise(model_input.numpy(), float(t), conditioning, guidance_scale, control)
                else:
                    noise_pred = self._predict_noise(model_input.numpy(), float(t), refined, guidance_scale, unet="unet_refiner")
                timings["unet_s"] += time.perf_counter() - t1
                latents = sched.step(torch.from_numpy(noise_pred), t, latents, **step_kwargs).prev_sample
                if bar:
                    bar[0].advance(bar[1])
        finally:
            if bar:
                bar[0].stop()
        timings["denoise_s"] = time.perf_counter() - t0
        timings["per_step_s"] = timings["denoise_s"] / max(len(timesteps), 1)

        t0 = time.perf_counter()
        latents = latents.numpy().astype(np.float32)
        images = np.stack([self.decode(latents[i : i + 1])[0] for i in range(image_count)])
        timings["vae_decoder_s"] = time.perf_counter() - t0
        nsfw = [False] * image_count
        if "safety_checker" in self.runners:
            t0 = time.perf_counter()
            nsfw = [self.is_nsfw(img) for img in images]
            timings["safety_checker_s"] = time.perf_counter() - t0
            for i, flagged in enumerate(nsfw):
                if flagged:
                    images[i] = 0.0
                    notes.append(f"the safety checker flagged image {i + 1} of {image_count}; it was blacked out")
        timings["generate_s"] = time.perf_counter() - started
        settings = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "seed": seed,
            "steps": steps,
            "scheduler": name,
            "guidance_scale": guidance_scale,
            "rng": rng,
            "bundle": self.bundle.name,
        }
        if image is not None:
            settings["strength"] = strength
        if refined is not None or self.refiner_only:
            settings["aesthetic_score"] = aesthetic_score
            settings["negative_aesthetic_score"] = negative_aesthetic_score
        if refined is not None:
            settings["refiner_start"] = refiner_start
            settings["refiner_steps"] = len(timesteps) - switch
        if control is not None:
            settings["controlnet"] = ", ".join(controlnet)
            settings["controlnet_scale"] = ", ".join(f"{s:g}" for s in control[2])
        return Generation(images, nsfw, latents, settings, notes, {k: round(v, 4) for k, v in timings.items()})

    def initial_latents(self, seed: int, rng: str, count: int, scheduler: str) -> np.ndarray:
        """The text-to-image starting latents [count, 4, H, W] that ``generate`` uses for these settings."""
        sched = make_scheduler(scheduler, self.scheduler_config)
        sched.set_timesteps(1)
        return (NoiseSource(seed, rng).draw((count, *self.latent_shape)) * sched.init_noise_sigma).numpy()

    def _conditioning(
        self, prompt: str, negative_prompt: str, guidance_scale: float, refiner: bool = False,
        scores: tuple[float, float] = (AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE),
    ) -> tuple[dict, bool]:
        """Unet inputs other than sample and timestep, batch 2 (negative row first) under guidance, else 1.

        ``refiner``: the SDXL refiner's (text_encoder_2 alone; time_ids end with the
        aesthetic score, ``scores`` = (positive, negative), in place of the target size).
        """
        hidden, pooled, truncated = self.encode_text(prompt, refiner)
        rows = [(hidden, pooled)]
        if guidance_scale > 1:  # diffusers' do_classifier_free_guidance
            neg_hidden, neg_pooled, neg_cut = self.encode_text(negative_prompt, refiner)
            rows.insert(0, (neg_hidden, neg_pooled))
            truncated = truncated or neg_cut
        # (1, S, C) → (1, C, 1, S): the Neural Engine-friendly layout of the contract.
        cond = {"encoder_hidden_states": np.concatenate([h.transpose(0, 2, 1)[:, :, None, :] for h, _ in rows])}
        if self.family == "sdxl":
            h, w = self.image_size
            # CONTRACT: (original h, w, crop top, left, target h, w); no crop, original = target.
            time_ids = np.asarray([[h, w, 0, 0, h, w]], dtype=np.float32)
            cond["text_embeds"] = np.concatenate([p for _, p in rows])
            cond["time_ids"] = np.repeat(time_ids, len(rows), axis=0)
            if refiner:  # (original h, w, crop top, left, aesthetic score): the negative row takes the negative score
                ids = [[h, w, 0, 0, scores[0]]] + ([[h, w, 0, 0, scores[1]]] if len(rows) == 2 else [])
                cond["time_ids"] = np.asarray(ids[::-1], dtype=np.float32)
        return cond, truncated

    def _control(self, names: list[str], images: list[np.ndarray], scale) -> tuple | None:
        """(controlled unet, ControlNet runners, scales, control images [1, 3, 8H, 8W]) or None; checks first."""
        if not names and not images:
            return None
        if len(names) != len(images):
            raise GenerationError(
                f"--controlnet-inputs: {len(images)} control image{'s' if len(images) != 1 else ''} for "
                f"{len(names)} ControlNet{'s' if len(names) != 1 else ''}; give one image per ControlNet, in the same order"
            )
        scales = [float(s) for s in scale] if isinstance(scale, (list, tuple)) else [float(scale)] * len(names)
        if len(scales) != len(names):
            raise GenerationError(f"--controlnet-scale: {len(scales)} scales for {len(names)} ControlNets; give one, or one each")
        h, w = self.image_size
        for name, img in zip(names, images):
            if img.ndim != 3 or img.shape[:2] != (h, w):
                got = f"{img.shape[1]}x{img.shape[0]} pixels" if img.ndim == 3 else f"of shape {img.shape}"
                raise GenerationError(f"--controlnet-inputs: the image for {name} is {got}; this bundle makes {w}x{h} images")
        unet, runners = self.controlnet_runners(names)
        conds = [np.asarray(img, np.float32).transpose(2, 0, 1)[None] for img in images]
        return unet, runners, scales, conds

    def _controlled_unet(self, feeds: dict, control: tuple) -> np.ndarray:
        """The controlled unet's noise_pred for batch ``feeds``, with the ControlNets' residuals summed."""
        unet, runners, scales, conds = control
        batch = feeds["sample"].shape[0]
        residuals: dict[str, np.ndarray] = {}
        for runner, scale, cond in zip(runners, scales, conds):
            out = runner.run(dict(feeds, controlnet_cond=np.repeat(cond, batch, axis=0)))
            for key, value in out.items():
                if key.startswith("additional_residual_"):
                    residuals[key] = residuals.get(key, 0.0) + scale * value.astype(np.float32)
        missing = [n for n in unet.inputs if n.startswith("additional_residual_") and n not in residuals]
        if missing:
            raise GenerationError(f"{unet.name}: takes {', '.join(missing)}, which the ControlNets do not give; rebuild the bundle")
        return unet.run(dict(feeds, **residuals))["noise_pred"]

    def _predict_noise(
        self, sample: np.ndarray, t: float, cond: dict, guidance_scale: float, control: tuple | None = None, unet: str = "unet"
    ) -> np.ndarray:
        """Guided noise prediction [N, 4, H, W] for latents ``sample`` [N, 4, H, W] at timestep ``t``.

        With ``control`` (from ``_control``), the ControlNets run on the same batch
        and the controlled unet takes their summed residuals. ``unet``: the
        runner to use (``unet_refiner`` for the refiner's steps).
        """
        if control is not None:
            return self._predict_controlled(sample, t, cond, guidance_scale, control)
        unet = self.runners[unet]
        batch = int(unet.inputs["sample"][0][0])
        guided = cond["encoder_hidden_states"].shape[0] == 2
        out = []
        for x in sample:
            x = x[None]
            if guided and batch == 2:
                feeds = dict(cond, sample=np.concatenate([x, x]), timestep=np.full((2,), t, np.float32))
                uncond, text = np.split(unet.run(feeds)["noise_pred"], 2)
            elif guided:  # a batch-one unet: one call per half
                uncond, text = (
                    unet.run(dict({k: v[i : i + 1] for k, v in cond.items()}, sample=x, timestep=np.full((1,), t, np.float32)))["noise_pred"]
                    for i in (0, 1)
                )
            else:
                # No guidance: a batch-two unet still needs two rows; the first is the answer.
                feeds = {k: np.repeat(v, batch, axis=0) for k, v in dict(cond, sample=x).items()}
                feeds["timestep"] = np.full((batch,), t, np.float32)
                out.append(unet.run(feeds)["noise_pred"][:1])
                continue
            out.append(uncond + guidance_scale * (text - uncond))
        return np.concatenate(out).astype(np.float32)

    def _predict_controlled(self, sample: np.ndarray, t: float, cond: dict, guidance_scale: float, control: tuple) -> np.ndarray:
        unet = control[0]
        batch = int(unet.inputs["sample"][0][0])  # 2 (recipes refuse unet_batch_one with ControlNets)
        guided = cond["encoder_hidden_states"].shape[0] == 2
        out = []
        for x in sample:
            x = x[None]
            if guided:
                feeds = dict(cond, sample=np.concatenate([x, x]), timestep=np.full((2,), t, np.float32))
                if batch == 2:
                    uncond, text = np.split(self._controlled_unet(feeds, control), 2)
                else:
                    uncond, text = (self._controlled_unet({k: v[i : i + 1] for k, v in feeds.items()}, control) for i in (0, 1))
                out.append(uncond + guidance_scale * (text - uncond))
            else:
                feeds = {k: np.repeat(v, batch, axis=0) for k, v in dict(cond, sample=x).items()}
                feeds["timestep"] = np.full((batch,), t, np.float32)
                out.append(self._controlled_unet(feeds, control)[:1])
        return np.concatenate(out).astype(np.float32)

    def _image_latents(self, sched, image: np.ndarray, strength: float, steps: int, draw, count: int):
        """(timesteps left to run, noised latents [N, 4, H, W]) for image-to-image, as diffusers' img2img."""
        import torch

        init = min(int(steps * strength), steps)
        start = max(steps - init, 0)
        timesteps = sched.timesteps[start * sched.order :]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start * sched.order)
        if len(timesteps) == 0:
            raise GenerationError(f"--strength {strength:g} with {steps} steps leaves no step to run; raise either")
        moments = self.encode_image(image)
        mean, logvar = np.split(moments, 2, axis=1)
        # diffusers' DiagonalGaussianDistribution: clamped log-variance, one draw per latent.
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        sample = torch.from_numpy(mean) + torch.from_numpy(std) * draw(mean.shape)
        init_latents = (self.scaling_factor * sample).repeat(count, 1, 1, 1)
        noise = draw(init_latents.shape)
        return timesteps, sched.add_noise(init_latents, noise, timesteps[:1].repeat(count))

    def _mask_latents(self, image: np.ndarray, mask: np.ndarray, draw, count: int):
        """(mask [N, 1, H, W], masked-image latents [N, 4, H, W]) as diffusers' inpainting pipeline makes them:
        the mask binarized at 0.5, the image zeroed under it and encoded (one draw), the mask downsampled (nearest)."""
        import torch

        binary = torch.from_numpy((mask >= 0.5).astype(np.float32))[None, None]
        # Zero in the [-1, 1] space the VAE takes, as diffusers zeroes its normalized image under the mask.
        masked = np.where(binary[0, 0, :, :, None].numpy() >= 0.5, 0.5, image).astype(np.float32)
        moments = self.encode_image(masked)
        mean, logvar = np.split(moments, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        latents = self.scaling_factor * (torch.from_numpy(mean) + torch.from_numpy(std) * draw(mean.shape))
        small = torch.nn.functional.interpolate(binary, size=tuple(self.latent_shape[1:]))
        return small.repeat(count, 1, 1, 1), latents.repeat(count, 1, 1, 1)

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        """Image [8H, 8W, 3] in [0, 1] → the VAE encoder's latent [1, 8, H, W]: mean, then log-variance (unscaled)."""
        x = (2.0 * image.astype(np.float32) - 1.0).transpose(2, 0, 1)[None]
        return self.runners["vae_encoder"].run({"x": x})["latent"].astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents [1, 4, H, W] (scaled) → image [1, 8H, 8W, 3] in [0, 1]."""
        z = (latents / self.scaling_factor).astype(np.float32)
        image = self.runners["vae_decoder"].run({"z": z})["image"]
        return np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)

    def is_nsfw(self, image: np.ndarray) -> bool:
        """The bundle's safety checker on one image [8H, 8W, 3] in [0, 1]."""
        checker = self.runners["safety_checker"]
        feeds = {"clip_input": _clip_pixels(image), "adjustment": np.zeros((1,), np.float32)}
        if "images" in checker.inputs:
            _, height, width, _ = checker.inputs["images"][0]
            feeds["images"] = _resize(image, int(height), int(width))[None]
        flags = checker.run(feeds)["has_nsfw_concepts"]
        return bool(np.any(np.asarray(flags) > 0))


def _time_id_count(unet: ModelRunner) -> int:
    """How many ``time_ids`` an SDXL unet takes per row: 6 (base) or 5 (refiner)."""
    return int(unet.inputs["time_ids"][0][-1])


class NoiseSource:
    """Gaussian draws for one generation, in the order diffusers makes them.

    ``numpy``: NumPy's legacy ``RandomState(seed).randn``, float32, as Apple's
    Python pipeline and Swift package draw latents. ``torch``: a CPU
    ``torch.Generator`` seeded with ``seed``, as diffusers' ``randn_tensor``.
    ``generator`` is also handed to schedulers that draw noise each step
    (ancestral, DDPM): the same generator object in torch mode, as in
    diffusers, and one seeded with ``seed`` in numpy mode.
    """

    def __init__(self, seed: int, rng: str):
        import torch

        if rng not in RNG_MODES:
            raise GenerationError(f"--rng: unknown mode '{rng}'; choose numpy or torch")
        self.rng = rng
        self.generator = torch.Generator().manual_seed(seed)
        self._state = np.random.RandomState(seed) if rng == "numpy" else None

    def draw(self, shape: tuple[int, ...]):
        """A float32 tensor of standard normal draws of ``shape``."""
        import torch

        if self._state is not None:
            return torch.from_numpy(self._state.randn(*shape).astype(np.float32))
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)


# CLIP's image normalization (what the safety checker's feature extractor applies).
_CLIP_MEAN = np.asarray([0.48145466, 0.4578275, 0.40821073], np.float32)
_CLIP_STD = np.asarray([0.26862954, 0.26130258, 0.27577711], np.float32)


def _clip_pixels(image: np.ndarray, size: int = 224) -> np.ndarray:
    """CLIPImageProcessor's defaults: shortest side to ``size`` (bicubic), centre crop, normalize → [1, 3, size, size]."""
    from PIL import Image

    pil = Image.fromarray(to_uint8(image))
    scale = size / min(pil.size)
    pil = pil.resize((max(size, round(pil.width * scale)), max(size, round(pil.height * scale))), Image.BICUBIC)
    left, top = (pil.width - size) // 2, (pil.height - size) // 2
    pixels = np.asarray(pil.crop((left, top, left + size, top + size)), np.float32) / 255.0
    return ((pixels - _CLIP_MEAN) / _CLIP_STD).transpose(2, 0, 1)[None].astype(np.float32)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image.astype(np.float32)
    return np.asarray(Image.fromarray(to_uint8(image)).resize((width, height), Image.BICUBIC), np.float32) / 255.0


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[.., 3] in [0, 1] → uint8, rounded as diffusers' numpy_to_pil does."""
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _progress_bar(total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
    task = bar.add_task("denoising", total=total)
    bar.start()
    return bar, task


# --------------------------------------------------------------------------- files


def image_file_name(prompt: str, seed: int, index: int | None = None) -> str:
    """``<prompt words joined by _>[.<index>].<seed>.final.png``, as the seed's CLIs name images.

    The prompt part keeps at most 75 characters, and none that a file name cannot hold.
    """
    stem = "_".join(prompt.split())[:75]
    stem = re.sub(r"[/\\:*?\"<>|\x00-\x1f]", "_", stem) or "image"
    return f"{stem}{'' if index is None else f'.{index}'}.{seed}.final.png"


def load_image(path: Path, flag: str = "--image", mode: str = "RGB") -> np.ndarray:
    """An image file as float32 [height, width, 3] in [0, 1] (``mode`` ``L``: [height, width]); ``flag`` names it in errors."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise GenerationError(f"{flag} {path}: no such file")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert(mode), np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise GenerationError(f"{flag} {path}: not an image Pillow can read ({type(e).__name__})") from None


def save_png(image: np.ndarray, path: Path, settings: dict) -> Path:
    """Write ``image`` [H, W, 3] in [0, 1] as a PNG with ``settings`` in its text chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in settings.items():
        info.add_text(key, str(value))
    info.add_text("software", "sdbuild")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image)).save(path, pnginfo=info)
    return path


# --------------------------------------------------------------------------- the command


MAX_SEED = 2**32 - 1  # numpy's RandomState and Apple's pipelines take a uint32 seed
MAX_STEPS = 1000  # the schedulers' training timesteps
MAX_GUIDANCE = 100.0
MAX_IMAGES = 64


def check_request(*, bundle, seed, steps, guidance_scale, image_count, strength, controlnet_scale, output_dir) -> None:
    """Refuse arguments no image can come from, before any model loads (GenerationError, one line)."""

    def finite(x) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise GenerationError(f"--seed {seed}: out of range; give a whole number from 0 to {MAX_SEED}")
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise GenerationError(f"--steps {steps}: give a whole number from 1 to {MAX_STEPS}")
    if not finite(guidance_scale) or not 0 < guidance_scale <= MAX_GUIDANCE:
        raise GenerationError(f"--guidance-scale {guidance_scale}: give a finite number above 0 and at most {MAX_GUIDANCE:g} (7.5 is usual; 1 turns guidance off)")
    if not isinstance(image_count, int) or not 1 <= image_count <= MAX_IMAGES:
        raise GenerationError(f"--image-count {image_count}: give a whole number from 1 to {MAX_IMAGES}")
    if not finite(strength) or not 0 < strength <= 1:
        raise GenerationError(f"--strength {strength}: give a number above 0 and at most 1")
    if not finite(controlnet_scale) or not 0 <= controlnet_scale <= MAX_GUIDANCE:
        raise GenerationError(f"--controlnet-scale {controlnet_scale}: give a finite number from 0 to {MAX_GUIDANCE:g}")
    if not Path(bundle).is_dir():
        raise GenerationError(f"--bundle {bundle}: no such folder")
    out = Path(output_dir)
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise GenerationError(f"-o {output_dir}: {blocker} is a file, not a folder; give a folder for the images")


def run_generate(
    bundle: Path,
    prompt: str,
    negative_prompt: str = "",
    seed: int = 93,
    steps: int = 50,
    guidance_scale: float = 7.5,
    scheduler: str = "DDIM",
    rng: str = "numpy",
    image_count: int = 1,
    image: Path | None = None,
    strength: float | None = None,
    compute_unit: str | None = None,
    controlnet: list[str] | None = None,
    controlnet_inputs: list[Path] | None = None,
    controlnet_scale: float = 1.0,
    output_dir: Path = Path("."),
    progress: bool = False,
    height: int | None = None,
    width: int | None = None,
    mask: Path | None = None,
    refiner_start: float = REFINER_START,
) -> dict:
    """``sdbuild generate``: load the bundle, generate, write PNGs.

    Returns {"images": [paths], "notes": [lines], "timings": {name: seconds}}.
    Every user error is a GenerationError (one line) raised before any model runs.
    """
    if strength is None:  # diffusers' defaults: 0.75 for image-to-image, 1 for inpainting
        strength = 1.0 if mask is not None else 0.75
    controlnet, controlnet_inputs = list(controlnet or []), list(controlnet_inputs or [])
    check_request(
        bundle=bundle, seed=seed, steps=steps, guidance_scale=guidance_scale, image_count=image_count,
        strength=strength, controlnet_scale=controlnet_scale, output_dir=output_dir,
    )
    scheduler_name(scheduler)  # an unknown name fails before the models load
    if not 0 <= refiner_start <= 1:
        raise GenerationError(f"--refiner-start {refiner_start:g}: must be in [0, 1] (the fraction of steps the base runs)")
    if len(controlnet) != len(controlnet_inputs):
        raise GenerationError(
            f"--controlnet-inputs: {len(controlnet_inputs)} control image{'s' if len(controlnet_inputs) != 1 else ''} for "
            f"{len(controlnet)} ControlNet{'s' if len(controlnet) != 1 else ''}; give one image per ControlNet, in the same order"
        )
    start_image = load_image(image) if image is not None else None
    if mask is not None and start_image is None:
        raise GenerationError("--mask goes with --image: give the image to inpaint")
    mask_image = load_mask(mask) if mask is not None else None
    control_images = [load_image(p, flag="--controlnet-inputs") for p in controlnet_inputs]
    if start_image is not None or controlnet:
        # Refused before any model loads: the checks need only the file list.
        files = find_bundle(Path(bundle), compiled_ok=default_backend() == "coreml")
        if start_image is not None:
            _require_encoder(files)
        if controlnet:
            _require_controlled_unet(files)
            for name in controlnet:
                find_controlnet(files, name)
    pipe = Pipeline.from_bundle(Path(bundle), compute_unit=compute_unit, height=height, width=width)
    result = pipe.generate(
        prompt,
        negative_prompt=negative_prompt,
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        scheduler=scheduler,
        rng=rng,
        image_count=image_count,
        image=start_image,
        strength=strength,
        progress=progress,
        controlnet=controlnet,
        controlnet_images=control_images,
        controlnet_scale=controlnet_scale,
        mask=mask_image,
        refiner_start=refiner_start,
    )
    paths = []
    for i, img in enumerate(result.images):
        index = i if image_count > 1 else None
        settings = dict(result.settings, **({"image_index": i} if index is not None else {}))
        paths.append(str(save_png(img, Path(output_dir) / image_file_name(prompt, seed, index), settings)))
    timings = dict(result.timings, load_s=round(pipe.load_seconds, 4))
    return {
        "images": paths,
        "notes": result.notes,
        "timings": timings,
        "backend": pipe.backend if pipe.compute_unit is None else f"{pipe.backend} ({pipe.compute_unit})",
    }
