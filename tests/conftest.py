"""Fixtures shared by the whole suite: the tiny synthetic checkpoints, made once per run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# No test may reach a hub; a test that needs one is a bug.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

@pytest.fixture(scope="session", autouse=True)
def private_tmpdir(tmp_path_factory) -> Path:
    """TMPDIR for the whole run (and every process it starts) is a pytest folder, not the system's.

    Libraries write temporary files there (coremltools: tmp*.mlpackage); pytest
    keeps the last few runs' folders and removes older ones.
    """
    folder = tmp_path_factory.getbasetemp() / "tmp"
    folder.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = None
    return folder


@pytest.fixture(scope="session")
def tiny_sd_checkpoint(tmp_path_factory) -> Path:
    from sdbuild.synthetic import make_synthetic

    return make_synthetic("synthetic:tiny-sd", tmp_path_factory.mktemp("ckpt") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint(tmp_path_factory) -> Path:
    from sdbuild.synthetic import make_synthetic

    return make_synthetic("synthetic:tiny-sdxl", tmp_path_factory.mktemp("ckpt") / "tiny-sdxl")


@pytest.fixture(scope="session")
def warm_artifacts(tmp_path_factory) -> Path:
    """One artifacts folder shared by the modules that do not test cold builds.

    The cache is keyed by content, so what one module built (the tiny unet's
    trace and convert, say) is a hit for the next; build names differ per module.
    Modules that assert on cache misses (test_build, test_matrix, the remote
    cache) keep folders of their own. Build names must differ per module: a
    module runs on one xdist worker (``--dist loadfile``), its neighbours may
    run at the same time on another.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Under pytest-xdist (make test) every worker shares one: the cache is safe for concurrent
        # builds (one lock per key), and what one worker built is a hit for the others.
        shared = tmp_path_factory.getbasetemp().parent / "warm-artifacts"
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp("warm-artifacts")


@pytest.fixture(scope="module")
def artifacts(warm_artifacts) -> Path:
    """Where a module's bundles are built: the shared warm cache (modules testing cold builds define their own)."""
    from builds import artifacts_folder

    return artifacts_folder(warm_artifacts)
