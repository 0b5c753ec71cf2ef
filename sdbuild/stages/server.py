"""Imported first by the stage server (``executor.STAGE_SERVER_PRELOAD``), before the libraries.

The server ends with the build process that started it (parent-death signal,
as every stage process has; the build starts it from its main thread, the
one the signal follows), so its stages end at once too. The server imports torch, coremltools and the rest once per run; their
import-time chatter (untested-version notices, missing macOS frameworks) would
land on the user's terminal, as none of it did when each stage imported them
with its output going to the build log. Each stage process sends its own
output to the log again.
"""

from __future__ import annotations

import logging
import os
import warnings


def _end_with_the_build() -> None:
    from sdbuild.executor import _set_parent_death_signal

    _set_parent_death_signal()


def _leftovers() -> set[str]:
    import tempfile

    try:
        return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("torchinductor_")}
    except OSError:
        return set()


# ``import diffusers`` makes torch's ``torchinductor_<user>`` folder in TMPDIR, which for the
# server is the system's; ``tidy`` (run by the last preloaded module) removes it if this server made it, empty.
_BEFORE = _leftovers()


def tidy() -> None:
    import tempfile

    for name in _leftovers() - _BEFORE:
        try:
            os.rmdir(os.path.join(tempfile.gettempdir(), name))
        except OSError:
            pass


def _quiet() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    for name in ("coremltools", "transformers", "diffusers", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


_end_with_the_build()
_quiet()
