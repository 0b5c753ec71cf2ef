"""Imported first by the stage server (``executor.STAGE_SERVER_PRELOAD``), before the libraries; imports coremltools itself, where the server is to.

The server ends with the build process that started it (parent-death signal,
as every stage process has; the build starts it from its main thread, the
one the signal follows), so its stages end at once too. The server imports torch, coremltools and the rest once per run; their
import-time chatter (untested-version notices, missing macOS frameworks) would
land on the user's terminal, as none of it did when each stage imported them
with its output going to the build log. Each stage process sends its own
output to the log again.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import sys
import warnings


def _end_with_the_build() -> None:
    """End with the build process, or now if it has ended already.

    The parent-death signal comes only for a parent alive when it is asked for: a build that
    stopped at once (a user's error found in planning) can end before the server gets here,
    and the server would import every library for nobody (5-10 CPU-s) before it noticed."""
    from sdbuild.executor import SERVER_PARENT_ENV, _set_parent_death_signal

    _set_parent_death_signal()
    parent = os.environ.get(SERVER_PARENT_ENV)
    if parent is not None and os.getppid() != int(parent):
        os._exit(0)


_end_with_the_build()


# ``import diffusers`` makes torch's inductor cache folder (``torchinductor_<user>`` in TMPDIR, which for the
# server is the system's, shared with every other process of the user). The server points torch at a folder
# of its own for its imports, and ``tidy`` (run by the last preloaded module) removes it: another server
# starting at the same time can neither keep the shared folder alive nor have it removed under it. The
# build makes that folder (executor.start_stage_server) and removes it too, should the server die first.
from sdbuild.executor import SERVER_FOLDER_ENV, SERVER_PRELOAD_ENV  # noqa: E402  (imported already, by _end_with_the_build)
from sdbuild.torch_cache import ENV as _INDUCTOR  # noqa: E402

_OWN_INDUCTOR_DIR = os.environ.pop(SERVER_FOLDER_ENV, None)  # none where the user set TORCHINDUCTOR_CACHE_DIR
if _OWN_INDUCTOR_DIR is not None:
    os.environ[_INDUCTOR] = _OWN_INDUCTOR_DIR


def tidy() -> None:
    if _OWN_INDUCTOR_DIR is not None:
        os.environ.pop(_INDUCTOR, None)
        shutil.rmtree(_OWN_INDUCTOR_DIR, ignore_errors=True)


def _quiet() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    for name in ("coremltools", "transformers", "diffusers", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _import_coremltools_without_sklearn() -> None:
    """Import coremltools with scikit-learn out of its reach, then put it back in reach.

    coremltools imports scikit-learn at import time only to decide whether its scikit-learn model
    converters are usable (and turns them off for the version we pin); sdbuild converts no
    scikit-learn model. That import, with the SciPy modules it pulls in, was a third of
    coremltools' import (0.9 of 3.0 CPU-s idle), paid by every stage server.
    """
    sys.modules["sklearn"] = None  # `import sklearn` raises ImportError: coremltools notes it has none
    try:
        import coremltools  # noqa: F401
    finally:
        del sys.modules["sklearn"]  # a later `import sklearn` (coremltools' own k-means) works as usual


_quiet()
# No collections while the libraries import (their objects live as long as the server); server_ready freezes
# them and each stage turns the collector back on (executor._child_main), as Python's gc.freeze documents for
# a process that forks without exec: collections in the stages then never write to the server's pages.
gc.disable()
# What the build asked this server to import (executor.server_preload), coremltools among them or not; all where unset.
_PRELOAD = os.environ.pop(SERVER_PRELOAD_ENV, None)
if _PRELOAD is None or "coremltools" in _PRELOAD.split(","):
    _import_coremltools_without_sklearn()
