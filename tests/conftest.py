"""Fixtures shared by the whole suite: the tiny synthetic checkpoints, made once per run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from filelock import FileLock

from builds import copy_cache_entries, shared_folder
from helpers import REPO, run_cli_watching_imports
from sdbuild.cache import LocalCache
from sdbuild.torch_cache import private_torch_cache

# No test may reach a hub; a test that needs one is a bug.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Idle OpenMP threads sleep instead of spinning, as in the stage server (executor.start_stage_server):
# `make test` runs a worker per core, each with torch's threads (one per core) and its stages'
# processes besides, and a thread spinning at a barrier burns the core its siblings need
# (tests/models/test_unet.py alone: 57-79 CPU-s spinning, 21 s passive). Read when torch loads,
# so set here, before any test module imports it; a user's own setting stands.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Test modules import diffusers as they are collected, before private_tmpdir points TMPDIR at pytest's
# folder, and diffusers makes torch's cache folder in the system's TMPDIR then: this process's torch
# gets one of its own, removed when the run ends (pytest_unconfigure).
_TORCH_CACHE = contextlib.ExitStack()
_TORCH_CACHE.enter_context(private_torch_cache())

# Modules by what they cost (make test's --durations=0), heaviest first. `make test` hands whole
# modules to its workers in this order (--dist loadfile --no-loadscope-reorder), so no long module
# starts last while the other worker has nothing left; modules not named follow in collection order.
HEAVIEST_FIRST = [
    "test_build.py",  # the first asks for the run's cold tiny build (tiny_cold_build)
    "test_convert_lowmem.py",  # needs no build: keeps the other worker busy meanwhile
    "test_faults.py",
    "compress/test_mixed_bit.py",
    "test_multires.py",
    "test_single_file.py",
    "test_refiner.py",
    "compress/test_palettize.py",
    "compress/test_analysis_replay.py",
    "compress/test_joint.py",
    "test_remote_cache.py",
    "models/test_convert.py",
    "test_compress_stage.py",
    "test_generate.py",
    "test_matrix.py",
    "test_scheduler.py",
    "test_generate_controlnet.py",
    "test_lora.py",
    "test_reproducible.py",
    "test_inpaint.py",
    "models/test_controlnet.py",
    "mil/test_executor.py",
    "mil/test_chunk.py",
    "models/test_lazy_weights.py",
    "test_interface.py",
    "compress/test_activations.py",
    "test_swift_bundle.py",
    "test_compare.py",
    "mil/test_kernels.py",
]


def pytest_collection_modifyitems(items):
    """Order the modules heaviest first (HEAVIEST_FIRST), keeping each module's own test order."""
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    tests = Path(__file__).parent

    def module_rank(item) -> int:
        try:
            return rank.get(Path(item.fspath).relative_to(tests).as_posix(), len(rank))
        except ValueError:
            return len(rank)

    items.sort(key=module_rank)  # stable: collection order within a module and among the unnamed


def pytest_unconfigure(config):
    _TORCH_CACHE.close()


def pytest_collection_finish(session):
    """In a `make test` worker: import the libraries now and set their objects aside from the garbage collector.

    Nearly every module imports torch, coremltools, diffusers or transformers as its tests run, and
    from then on every full collection in the worker walks their half a million objects again: 34 of
    the 307 s that test_convert_lowmem and compress/test_joint took in one process, 14 s with them
    frozen (``gc.freeze``, as the stage server does: ``sdbuild.stages.server_ready``). A run of a few
    tests without workers imports only what they need.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    import gc
    import importlib

    from sdbuild.executor import STAGE_SERVER_PRELOAD

    for name in STAGE_SERVER_PRELOAD:
        if not name.startswith("sdbuild.stages.server"):  # the server's own: they quiet and end a server
            importlib.import_module(name)
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def tiny_cold_build(tmp_path_factory) -> Path:
    """`make demo`'s build, once per run: recipes/tiny.yaml by the command line into an empty artifacts folder.

    Read-only: modules copy it (test_build's cold-build tests, test_reproducible's first
    clean build, the warm cache's seed) rather than each building the same stages again.
    The first worker to ask builds it; the other waits on the lock.
    """
    folder = shared_folder(tmp_path_factory, "tiny-cold")
    art = folder / "artifacts"
    with FileLock(str(folder / "build.lock")):
        if not (folder / "built").exists():
            shutil.rmtree(art, ignore_errors=True)  # a failed attempt's leftovers
            done, heavy = run_cli_watching_imports("run", REPO / "recipes" / "tiny.yaml", "--artifacts", art)
            assert done.returncode == 0, done.stderr[-3000:]
            (folder / "heavy_imports.json").write_text(json.dumps(heavy))  # test_build reads it
            (folder / "built").touch()
    return art


@pytest.fixture(scope="session", autouse=True)
def private_tmpdir(tmp_path_factory) -> Path:
    """TMPDIR for the whole run (and every process it starts) is a pytest folder, not the system's.

    Libraries write temporary files there (coremltools: tmp*.mlpackage); pytest
    keeps the last few runs' folders and removes older ones.
    """
    import multiprocessing.util

    # multiprocessing's own folder (its stage server's socket) stays in the system's TMPDIR: it removes
    # that folder at exit, after pytest has removed this one (from here, its exit printed a traceback).
    multiprocessing.util.get_temp_dir()
    folder = tmp_path_factory.getbasetemp() / "tmp"
    folder.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = None
    return folder


@pytest.fixture(scope="session", autouse=True)
def stage_server(private_tmpdir) -> None:
    """In a `make test` worker: its stage server, with every stage's libraries, from the start.

    A worker runs builds of every kind one after the other. Its first build's server would import
    only what that build's stages use, and be replaced by a larger one at the first build needing
    more (``executor.start_stage_server``): a full import again, each time.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        from sdbuild.executor import start_stage_server

        start_stage_server()


@pytest.fixture(scope="session")
def tiny_sd_checkpoint(tmp_path_factory) -> Path:
    from sdbuild.synthetic import make_synthetic

    return make_synthetic("synthetic:tiny-sd", tmp_path_factory.mktemp("ckpt") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint(tmp_path_factory) -> Path:
    from sdbuild.synthetic import make_synthetic

    return make_synthetic("synthetic:tiny-sdxl", tmp_path_factory.mktemp("ckpt") / "tiny-sdxl")


@pytest.fixture(scope="session")
def warm_artifacts(tmp_path_factory, request) -> Path:
    """One artifacts folder shared by the modules that do not test cold builds.

    The cache is keyed by content, so what one module built (the tiny unet's
    trace and convert, say) is a hit for the next; build names differ per module.
    Modules that assert on cache misses (test_build, test_matrix, the remote
    cache) keep folders of their own. Build names must differ per module: a
    module runs on one xdist worker (``--dist loadfile``), its neighbours may
    run at the same time on another.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return tmp_path_factory.mktemp("warm-artifacts")
    # Under pytest-xdist (make test) every worker shares one: the cache is safe for concurrent
    # builds (one lock per key), and what one worker built is a hit for the others. The whole
    # suite runs there, so it is seeded with the run's cold tiny build (tiny_cold_build, built
    # anyway for test_build): the tiny SD model's download, traces, converts and 6-bit unet are
    # hits from the start instead of being built a second time.
    shared = shared_folder(tmp_path_factory, "warm-artifacts")
    seeded = Path(f"{shared}.seeded")
    with FileLock(f"{shared}.lock"):
        if not seeded.exists():  # before any build: the first worker here seeds it
            copy_cache_entries(request.getfixturevalue("tiny_cold_build"), shared)
            assert LocalCache(shared / "cache").verify() == []  # copies have new inodes: hash them once, as a first hit would
            seeded.touch()
    return shared


@pytest.fixture(scope="module")
def artifacts(warm_artifacts) -> Path:
    """Where a module's bundles are built: the shared warm cache (modules testing cold builds define their own)."""
    from builds import artifacts_folder

    return artifacts_folder(warm_artifacts)
