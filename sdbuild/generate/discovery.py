"""Bundle discovery: a bundle's models in the Swift and Python layouts, compiled or not,
its ControlNets and refiner, and the files beside them (tokenizer, scheduler config).

File names are ``sdbuild.bundle_names``'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sdbuild.bundle_names import (
    CONTROLNET_FOLDER,
    PIPELINE_FILE,
    PYTHON_FOLDER,
    PYTHON_PREFIX,
    PYTHON_UNET_SUFFIX,
    RESOURCES_FOLDER,
    SWIFT_NAMES,
    TOKENIZER_FILES,
    python_package_name,
    swift_name,
)
from sdbuild.generate.errors import GenerationError
from sdbuild.families import FAMILIES, family_of_bundle


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
        """The model family (``sdbuild.families``), told by the text encoders the bundle holds."""
        return family_of_bundle(self.models).name

    @property
    def search_folders(self) -> list[Path]:
        """Where files beside the models may lie: their folder, then the build folder."""
        return list(dict.fromkeys(f for f in (self.folder, self.build_dir, self.path) if f))

    def describe(self, component: str) -> str:
        return ", ".join(p.name for p in self.models[component])


REQUIRED = ("unet", "vae_decoder")  # besides the family's text encoders


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
    if (path / RESOURCES_FOLDER).is_dir():
        folder, layout = path / RESOURCES_FOLDER, "swift"
    elif (path / PYTHON_FOLDER).is_dir():
        folder, layout = path / PYTHON_FOLDER, "python"
    elif any(_swift_model(path, SWIFT_NAMES[c], True) for c in (*_text_encoders(), *REQUIRED)):
        folder, layout = path, "swift"
    elif list(path.glob(PYTHON_PREFIX + "*" + PYTHON_UNET_SUFFIX)):
        folder, layout = path, "python"
    else:
        raise GenerationError(
            f"--bundle {path}: no bundle here: expected Resources/, {SWIFT_NAMES['unet']}.mlpackage, "
            f"or {PYTHON_PREFIX}<version>{PYTHON_UNET_SUFFIX}"
        )
    build = _read_json(build_dir / "build.json") if build_dir else None
    facts = (_read_json(build_dir / PIPELINE_FILE) if build_dir else None) or {}
    if build:
        name = build.get("name") or build_dir.name
    else:
        name = path.name if path.name not in (RESOURCES_FOLDER, PYTHON_FOLDER) else path.parent.name
    if layout == "swift":
        models, version = _swift_models(folder, compiled_ok), None
    else:
        models, version = _python_models(folder)
    version = facts.get("model_version") or (build or {}).get("recipe", {}).get("model", {}).get("version") or version
    controlnets = _controlnet_models(folder / CONTROLNET_FOLDER, compiled_ok)
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
    """The models a bundle needs to generate: its family's text encoders (an SDXL refiner alone has only the second), a unet and a VAE decoder."""
    return (*family_of_bundle(models).text_encoders, *REQUIRED)


def _text_encoders() -> list[str]:
    """Every family's text encoders."""
    return list(dict.fromkeys(c for f in FAMILIES.values() for c in f.text_encoders))


def _python_models(folder: Path) -> tuple[dict[str, list[Path]], str]:
    unets = sorted(folder.glob(PYTHON_PREFIX + "*" + PYTHON_UNET_SUFFIX))
    if not unets:
        raise GenerationError(f"{folder}: {PYTHON_PREFIX}<version>{PYTHON_UNET_SUFFIX} is missing (the bundle needs it to generate)")
    if len(unets) > 1:
        raise GenerationError(
            f"{folder}: packages of several model versions ({', '.join(p.name for p in unets)}); keep one per folder"
        )
    version = unets[0].name[len(PYTHON_PREFIX) : -len(PYTHON_UNET_SUFFIX)]
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
    bundle's own file name for it. File names come from ``sdbuild.bundle_names``:
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
