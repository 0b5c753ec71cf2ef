"""Bundle: lay the finished packages out as Apple's consumers expect them.

This module is the one place that knows bundle file names (CONTRACT.md).
Files are hard-linked (or copied) out of the cache, never symlinked, so a
bundle survives ``sdbuild cache gc`` and being zipped.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sdbuild.stages.download import checkpoint_dir

SWIFT_NAMES = {
    "text_encoder": "TextEncoder",
    "text_encoder_2": "TextEncoder2",
    "unet": "Unet",
    "vae_decoder": "VAEDecoder",
    "vae_encoder": "VAEEncoder",
    "safety_checker": "SafetyChecker",
}
TOKENIZER_FILES = ("vocab.json", "merges.txt")


def python_package_name(model_version: str, component: str) -> str:
    """Apple's Python pipeline name: every '/' of the model version becomes '_'."""
    return f"Stable_Diffusion_version_{model_version.replace('/', '_')}_{component}.mlpackage"


def _link_tree(src: Path, dst: Path) -> None:
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:  # another filesystem, or links not allowed
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def write_bundle(recipe, family: str, packages: dict[str, Path], download_entry: Path, dest: Path) -> list[Path]:
    """Write the bundle for ``recipe.bundle.layout`` into ``dest``; returns the package paths written."""
    layout = recipe.bundle.layout
    written = []
    if layout in ("swift", "both"):
        resources = dest / "Resources"
        resources.mkdir(parents=True)
        for component, package in packages.items():
            target = resources / f"{SWIFT_NAMES[component]}.mlpackage"
            _link_tree(package, target)
            written.append(target)
        tokenizer = checkpoint_dir(download_entry) / "tokenizer"
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer / name, resources / name)
    if layout in ("python", "both"):
        folder = dest / "python"
        folder.mkdir(parents=True)
        for component, package in packages.items():
            target = folder / python_package_name(recipe.model.version, component)
            _link_tree(package, target)
            written.append(target)
    return written
