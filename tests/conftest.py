"""Fixtures shared by the whole suite: the tiny synthetic checkpoints, made once per run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test may reach a hub; a test that needs one is a bug.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

@pytest.fixture(scope="session")
def tiny_sd_checkpoint(tmp_path_factory) -> Path:
    from sdbuild.synthetic import make_synthetic

    return make_synthetic("synthetic:tiny-sd", tmp_path_factory.mktemp("ckpt") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint(tmp_path_factory) -> Path:
    from sdbuild.synthetic import make_synthetic

    return make_synthetic("synthetic:tiny-sdxl", tmp_path_factory.mktemp("ckpt") / "tiny-sdxl")
