"""Fixtures for the reference executor's tests (helpers live in milcheck.py)."""

from pathlib import Path

import pytest

from . import milcheck  # noqa: F401  (quiets coremltools before any test imports it)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """One folder for every converted test model of the session."""
    return tmp_path_factory.mktemp("mil_models")
