"""Building a recipe from a test: once per run, on the shared warm cache.

Test modules that need bundles (not cold builds) take their artifacts folder
from ``artifacts_folder`` and their bundles from ``build_once``: the cache is
keyed by content, so what one module built (the tiny unet's trace and convert,
say) is a hit for the next. Build names must differ per module (see
``warm_artifacts`` in conftest).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from helpers import write_recipe


@dataclass(frozen=True)
class Built:
    """A finished build: its folder and the diffusers folders its downloads resolved to."""

    build_dir: Path
    checkpoint: Path  # the base model's
    download_entry: Path  # the base model's download entry (source.json, the model)
    downloads: dict[str | None, Path]  # each download node's component (None: the base) → its checkpoint folder


_BUILT: dict[tuple[str, str], Built] = {}


def artifacts_folder(warm_artifacts: Path) -> Path:
    """The shared warm artifacts, or the folder ``SDBUILD_TEST_ARTIFACTS`` names (kept across runs: safe, keys are content)."""
    kept = os.environ.get("SDBUILD_TEST_ARTIFACTS")
    return Path(kept) if kept else warm_artifacts


def build_once(artifacts: Path, name: str, recipe: str) -> Built:
    """Build recipe text ``recipe`` as ``name`` in ``artifacts`` (``name: …`` is prepended), once per run."""
    from sdbuild.executor import prepare, run_build
    from sdbuild.stages.download import checkpoint_dir

    key = (str(artifacts), name)
    if key not in _BUILT:
        plan = prepare(write_recipe(artifacts, name, f"name: {name}\n" + recipe), artifacts)
        result = run_build(plan)
        downloads = {n.component: checkpoint_dir(n.entry.path) for n in plan.nodes if n.stage.name == "download"}
        _BUILT[key] = Built(result.build_dir, downloads[None], plan.nodes[0].entry.path, downloads)
    return _BUILT[key]


def copy_cache_entries(source: Path, artifacts: Path) -> None:
    """Copy every cache entry of artifacts folder ``source`` that ``artifacts`` lacks (entries are keyed by content)."""
    for manifest in sorted((source / "cache").glob("*/*/manifest.json")):
        entry = manifest.parent
        dest = artifacts / "cache" / entry.parent.name / entry.name
        if not dest.exists():
            shutil.copytree(entry, dest)


def shared_folder(tmp_path_factory, name: str) -> Path:
    """A folder of this run's that every pytest-xdist worker sees (one per session without xdist)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.getbasetemp().parent / name
        folder.mkdir(exist_ok=True)
        return folder
    return tmp_path_factory.mktemp(name)


def made_once(tmp_path_factory, name: str, make) -> Path:
    """Folder ``name`` of this run, filled by ``make(folder)`` once for every pytest-xdist worker.

    For session fixtures whose output is files that tests only read (a converted package, an
    analysis): the first worker to ask makes it, the other waits on the lock and reads the same.
    """
    folder = shared_folder(tmp_path_factory, name)
    out = folder / "made"
    with FileLock(str(folder / "make.lock")):
        if not (folder / "done").exists():
            shutil.rmtree(out, ignore_errors=True)  # a failed attempt's leftovers
            out.mkdir()
            make(out)
            (folder / "done").touch()
    return out
