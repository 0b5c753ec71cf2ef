"""Download: bring the checkpoint's files to this machine.

Hub ids go through huggingface_hub (only configs, tokenizer, the safety
checker's image preprocessing config and weights); local folders are used in
place; synthetic models are generated; a single-file checkpoint (original
layout) becomes a diffusers folder in the entry (``sdbuild.checkpoints``).
LoRAs are fused and textual-inversion embeddings added here too, into a
diffusers folder in the entry, so every stage downstream sees plain weights.
The key holds what was resolved (hub commit, folder or file content hash,
generator, each LoRA's digest and strength, each embedding's digest and
token), so a moved hub branch or an edited file never reads as cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from sdbuild.cache import input_digest, sha256_file
from sdbuild.checkpoints import (
    PICKLED_SUFFIXES,
    Detected,
    convert_single_file,
    detect_family,
    family_configs,
    family_configs_digest,
    is_single_file,
    tensor_shapes,
)
from sdbuild.errors import SdbuildError
from sdbuild.stages import Job
from sdbuild.synthetic import CORPUS, is_synthetic, make_synthetic

SAFE_WEIGHTS = ("*.safetensors",)
PICKLED_WEIGHTS = ("*.bin", "*.ckpt", "*.pt", "*.pth")


class DownloadError(SdbuildError):
    """The checkpoint cannot be had."""


def _patterns(variant: str | None, allow_pickle: bool, single: bool) -> list[str]:
    """What to fetch: a pipeline's configs, tokenizer and weights; or one model's (a ControlNet).

    A pipeline's ``*/`` patterns take every model folder, the safety
    checker's among them; ``feature_extractor/`` holds no weights, only
    CLIP's image preprocessing config, which goes with the safety checker.
    """
    folder = "" if single else "*/"
    weights = [f"{folder}*.{variant}.safetensors"] if variant else [f"{folder}*.safetensors"]
    if allow_pickle:
        weights += [f"{folder}*{p[1:]}" for p in PICKLED_WEIGHTS]
    if single:
        return ["config.json", *weights]
    return ["model_index.json", "*/config.json", "scheduler/*", "tokenizer*/*", "feature_extractor/*", *weights]


def _folder_digest(folder: Path) -> str:
    """Content hash of a local checkpoint's files that conversion reads."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            h.update(p.relative_to(folder).as_posix().encode() + b"\0" + input_digest(p).encode() + b"\0")
    return h.hexdigest()


def check_weights_safe(folder: Path, allow_pickle: bool, origin: str) -> None:
    """Refuse a checkpoint whose weights exist only as pickles unless the recipe allows it."""
    for sub in [folder] + sorted(p for p in folder.iterdir() if p.is_dir()):
        has_safe = any(sub.glob("*.safetensors"))
        pickled = [p.name for pat in PICKLED_WEIGHTS for p in sub.glob(pat)]
        if pickled and not has_safe and not allow_pickle:
            raise DownloadError(
                f"{origin}: {sub.name}/{pickled[0]} is pickled weights, which can run code when loaded; "
                "convert it to safetensors, or set model.allow_pickle: true if you trust it"
            )


def resolve_source(
    version: str,
    revision: str,
    variant: str | None,
    allow_pickle: bool,
    *,
    key: str = "model.version",
    single: bool = False,
    prediction_type: str | None = None,
) -> dict:
    """What the checkpoint is, concretely: the ``source`` field of the download key.

    ``single`` is for one model (a ControlNet: ``config.json`` at the top)
    rather than a pipeline (``model_index.json``); ``key`` names the recipe key in errors.
    A single ``.safetensors`` file (``.ckpt`` with ``allow_pickle``) is
    resolved to its content digest and the family its tensors show
    (``prediction_type`` overrides the detected objective).
    """
    if is_synthetic(version):
        # The tokenizer is learned from a shipped corpus: a data file, so the code digest does not cover it.
        return {"kind": "synthetic", "name": version, "seed": 0, "corpus": sha256_file(CORPUS)}
    if not single and is_single_file(version):
        path = resolve_file(version, revision, allow_pickle, key)
        shapes = tensor_shapes(path)
        detected = detect_family(shapes, f"{key} {path}", prediction_type)
        family_configs(shapes, detected, f"{key} {path}")  # a file missing a needed tensor stops here, before any work
        return {
            "kind": "single_file",
            "path": str(path),
            "content": input_digest(path),
            "family": detected.family,
            "inpainting": detected.inpainting,
            "prediction_type": detected.prediction_type,
            "configs": family_configs_digest(detected.family),
        }
    folder = Path(version).expanduser()
    marker = "config.json" if single else "model_index.json"
    if folder.is_dir():
        folder = folder.resolve()
        if not (folder / marker).is_file():
            raise DownloadError(f"{key}: {folder} is not a diffusers folder (no {marker})")
        check_weights_safe(folder, allow_pickle, f"{key} {folder}")
        return {"kind": "folder", "path": str(folder), "content": _folder_digest(folder)}
    if version.startswith((".", "/", "~")) or version.count("/") != 1:
        raise DownloadError(f"{key}: '{version}' is neither a local folder nor a hub id (owner/name)")
    snapshot = _hub_snapshot(version, revision, variant, allow_pickle, key, single)
    check_weights_safe(snapshot, allow_pickle, f"{key} {version}")
    return {"kind": "hub", "repo": version, "commit": snapshot.name, "path": str(snapshot)}


def resolve_file(name: str, revision: str, allow_pickle: bool, key: str) -> Path:
    """A local file, or ``owner/repo/path/in/repo.safetensors`` from the hub (its cache first when offline)."""
    path = Path(name).expanduser()
    if path.suffix.lower() in PICKLED_SUFFIXES and not allow_pickle:
        raise DownloadError(
            f"{key}: {name} is pickled weights, which can run code when loaded; "
            "convert it to safetensors, or set model.allow_pickle: true if you trust it"
        )
    if path.is_file():
        return path.resolve()
    if name.startswith((".", "/", "~")) or name.count("/") < 2:
        raise DownloadError(f"{key}: file not found: {path.resolve()} (paths are relative to the working folder)")
    repo, filename = "/".join(name.split("/")[:2]), "/".join(name.split("/")[2:])
    from huggingface_hub import hf_hub_download

    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    for local_only in ((True,) if offline else (False, True)):
        try:
            return Path(hf_hub_download(repo, filename, revision=revision, local_files_only=local_only))
        except Exception as e:  # network errors come in many types; fall back to the local cache
            if type(e).__name__ in ("RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError", "GatedRepoError"):
                raise DownloadError(f"{key}: {repo}@{revision}: {filename}: {type(e).__name__} on the Hugging Face Hub") from None
    raise DownloadError(
        f"{key}: '{name}' is not a local file, and the Hugging Face Hub cannot be reached for {repo} "
        "nor is the file in its local cache; download it where there is network, or give a local path"
    )


def resolve_adapters(source: dict, loras: list, embeddings: list, allow_pickle: bool) -> dict:
    """``source`` with the recipe's LoRAs (digest, strength) and embeddings (digest, token) added, in order."""
    if not loras and not embeddings:
        return source
    from sdbuild.adapters import embedding_info, lora_info

    resolved = dict(source)
    if loras:
        resolved["loras"] = [
            lora_info(resolve_file(lora.path, "main", allow_pickle, f"model.loras[{i}].path"), lora.strength, f"model.loras[{i}]")
            for i, lora in enumerate(loras)
        ]
    if embeddings:
        resolved["embeddings"] = [
            embedding_info(resolve_file(e.path, "main", allow_pickle, f"model.embeddings[{i}].path"), e.token, f"model.embeddings[{i}]")
            for i, e in enumerate(embeddings)
        ]
    return resolved


def _hub_snapshot(repo: str, revision: str, variant: str | None, allow_pickle: bool, key: str, single: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = _patterns(variant, allow_pickle, single)
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=offline))
    except LocalEntryNotFoundError:
        pass
    except Exception as e:  # network errors come in many types; fall back to the local cache
        if type(e).__name__ in ("RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError"):
            raise DownloadError(f"{key}: {repo}@{revision}: {type(e).__name__} on the Hugging Face Hub") from None
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:
        raise DownloadError(
            f"{key}: cannot reach the Hugging Face Hub for '{repo}' and it is not in the local cache; "
            "download it where there is network, or set model.version to a local diffusers folder"
        ) from None


def run(job: Job, out: Path) -> dict:
    """Materialize the checkpoint: ``out/model`` for synthetic models, single files and
    checkpoints with LoRAs or embeddings, else a pointer file.

    A recipe's ``model.custom_vae`` (resolved into ``source["custom_vae"]``)
    gets a pointer file of its own, ``custom_vae.json``: the VAE components
    load from that folder instead of the checkpoint's ``vae/``.
    """
    source = job.fields["source"]
    if source.get("custom_vae"):
        (out / "custom_vae.json").write_text(json.dumps(source["custom_vae"], indent=2))
    model = out / "model"
    if source["kind"] == "synthetic":
        make_synthetic(source["name"], model, seed=source["seed"])
    elif source["kind"] == "single_file":
        detected = Detected(source["family"], source["inpainting"], source["prediction_type"])
        convert_single_file(Path(source["path"]), model, detected)
    elif source.get("loras") or source.get("embeddings"):
        _copy_checkpoint(Path(source["path"]), model)
    else:
        (out / "source.json").write_text(json.dumps(source, indent=2))
        return {"checkpoint": source["path"]}
    if source.get("loras") or source.get("embeddings"):
        from sdbuild.adapters import add_embeddings, fuse_loras

        facts = fuse_loras(model, source.get("loras", []))
        facts.update(add_embeddings(model, source.get("embeddings", [])))
        return {"checkpoint": "model", **facts}
    return {"checkpoint": "model"}


def _copy_checkpoint(folder: Path, dest: Path) -> None:
    """A diffusers folder's files, copied (hub snapshots hold links: their targets are copied)."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns(".*"))


def checkpoint_dir(entry_path: Path) -> Path:
    """The diffusers folder a download entry stands for."""
    entry_path = Path(entry_path)
    if (entry_path / "model").is_dir():
        return entry_path / "model"
    return Path(json.loads((entry_path / "source.json").read_text())["path"])


def vae_dir(entry_path: Path) -> Path:
    """The folder the VAE components load from: the recipe's ``model.custom_vae``, else the checkpoint's ``vae/``."""
    pointer = Path(entry_path) / "custom_vae.json"
    if pointer.is_file():
        return Path(json.loads(pointer.read_text())["path"])
    return checkpoint_dir(entry_path) / "vae"
