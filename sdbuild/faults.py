"""Test hooks: kill a run with SIGKILL at a named point, as ``kill -9`` would.

Inert unless ``SDBUILD_TEST_KILL`` is set, to ``POINT`` or ``POINT:TARGET``.
Points: ``child-start`` (a stage's child process, before the stage runs),
``child-write`` (the child's first file opened for writing in its output or
temp folder), ``child-end`` (the stage finished, its result not yet sent),
``before-publish`` / ``after-publish`` (the run, around an entry's rename) and
``bundle`` (the run, bundle written in staging, not yet published). TARGET is a
stage (``trace``) or ``stage/component`` / ``stage/key``; without it the first
point of that name fires. A kill in a child kills the run first: the whole
build dies, as it does when a user kills it.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

ENV = "SDBUILD_TEST_KILL"
run_pid: int | None = None  # the build's process, set in a stage's child (its parent may be the stage server)


def _wanted(name: str, labels: tuple[str, ...]) -> bool:
    spec = os.environ.get(ENV, "")
    if not spec:
        return False
    point, _, target = spec.partition(":")
    return point == name and (not target or target in labels)


def _kill(run_too: bool) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if run_too:
        os.kill(run_pid or os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def point(name: str, *labels: str) -> None:
    """Kill this process here when ``SDBUILD_TEST_KILL`` names this point (and one of ``labels``)."""
    if _wanted(name, labels):
        _kill(run_too=name.startswith("child-"))


def watch_child_writes(out: Path, *labels: str) -> None:
    """In a stage's child: arm ``child-write``, firing at the first file opened for writing under ``out``'s work folder."""
    if not _wanted("child-write", labels):
        return
    root = str(Path(out).parent.resolve())
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def hook(event: str, args: tuple) -> None:
        if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        mode, flags = args[1], args[2]
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & writes)
        if writing and os.path.abspath(os.fsdecode(args[0])).startswith(root):
            _kill(run_too=True)

    sys.addaudithook(hook)
