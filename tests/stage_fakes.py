"""Stage functions for executor tests: called as ``stage_fakes:NAME`` in a stage process."""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path


def report(job, out: Path) -> dict:
    """What the stage process looked like when the stage began."""
    (out / "done").write_text("ok")
    return {
        "preloaded": sorted(m for m in ("torch", "coremltools", "diffusers", "transformers") if m in sys.modules),
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "rss_bytes": _rss(),
        "tmpdir": tempfile.gettempdir(),
        "inductor_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        "frozen_objects": gc.get_freeze_count(),
        "gc_enabled": gc.isenabled(),
        "sklearn_imported": "sklearn" in sys.modules,
        "sklearn_importable": importlib.util.find_spec("sklearn") is not None,
    }


def allocate(job, out: Path) -> dict:
    """Hold ``job.fields['mib']`` MiB of touched memory for a moment."""
    block = bytearray(b"\1") * (job.fields["mib"] << 20)
    time.sleep(0.3)
    del block
    return {"rss_bytes": _rss()}


def sleep_forever(job, out: Path) -> dict:
    """Write this process's pid to ``job.fields['pid_file']``, then wait to be killed."""
    Path(job.fields["pid_file"]).write_text(str(os.getpid()))
    time.sleep(600)
    return {}


def crash(job, out: Path) -> dict:
    os._exit(3)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def pool(job, out: Path) -> dict:
    """Square numbers in a pool of workers started from a forkserver of this stage's own, as k-means does."""
    from multiprocessing import get_context

    from sdbuild.workers import forkserver_or_spawn

    with get_context(forkserver_or_spawn()).Pool(2) as workers:
        pids = set(workers.map(_worker_pid, range(8)))
        squares = workers.map(_square, range(5))
    return {"squares": squares, "worker_pids": len(pids - {os.getpid()})}


def _square(x: int) -> int:
    return x * x


def _worker_pid(_: int) -> int:
    time.sleep(0.05)
    return os.getpid()
