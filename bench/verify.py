"""Benchmark: the verify stage on a full-size unet, this tree against an earlier commit, side by side.

    .venv/bin/python bench/convert.py --model sd15 --keep --json     # prints "kept": <folder>
    .venv/bin/python bench/verify.py --entries <folder> --before 432bbae

``--entries`` is a folder with the stage outputs ``trace`` and ``convert``
(and ``compress``, ``chunk`` when there) that ``bench/convert.py --keep``
leaves, and the ``download`` they came from (the reference binds the
checkpoint's weights from it; a tree that does not read it ignores it). Each tree runs the verify stage function on them (one sample, as
``bench/convert.py --verify``) in a fresh process, in turn, so both see the
same machine; seconds, peak RSS of that process and the PSNR figures are
recorded with the load average, and the peak RSS of each phase (sampled every
20 ms from /proc): ``imports``, ``reference`` (the float32 PyTorch module's
build and runs), ``package`` (loading and running the packages). Writes
``bench/results/verify-<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def checkout(commit: str, into: Path) -> Path:
    """The sdbuild package as of ``commit``, in a folder to put first on PYTHONPATH."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "sdbuild"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


class PhaseMemory:
    """The peak RSS of this process per phase, sampled by a thread (Linux: /proc/self/statm)."""

    def __init__(self, first: str):
        import threading

        self.phase, self.peaks = first, {}
        self._page = os.sysconf("SC_PAGE_SIZE")
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * self._page
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            time.sleep(0.02)

    def enter(self, phase: str) -> None:
        time.sleep(0.05)  # a last sample of the phase before
        self.phase = phase

    def wrap(self, module, name: str, phase: str) -> None:
        """Count ``module.name``'s calls as ``phase``."""
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            self.enter(phase)
            return original(*args, **kwargs)

        setattr(module, name, wrapped)

    def gib(self) -> dict:
        return {phase: round(peak / 2**30, 2) for phase, peak in self.peaks.items()}


def run_verify(entries: Path) -> dict:
    """In this process: the verify stage on ``entries``; seconds, peak RSS (whole and per phase), PSNR."""
    phases = PhaseMemory("imports") if Path("/proc/self/statm").is_file() else None
    from sdbuild.stages import Job
    from sdbuild.stages import verify

    if phases is not None:
        # Both trees name them so: the reference's outputs, then each package's (loaded and run).
        phases.wrap(verify, "_reference_outputs", "reference")
        for name in ("_package_outputs", "_chain_outputs"):
            phases.wrap(verify, name, "package")
    upstream = {name: entries / name for name in ("download", "trace", "convert", "compress", "chunk") if (entries / name).is_dir()}
    job = Job("verify", "unet", {"verify.samples": 1, "verify.seed": 0, "compute_unit": "CPU_AND_NE"}, upstream)
    out = Path(tempfile.mkdtemp(prefix="bench-verify-"))
    started = time.perf_counter()
    verify.run(job, out)
    seconds = time.perf_counter() - started
    psnr = json.loads((out / "psnr.json").read_text())
    (out / "psnr.json").unlink()
    out.rmdir()
    result = {
        "seconds": round(seconds, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),  # Linux: KiB
        "psnr": {k: v for k, v in psnr.items() if k.endswith("psnr_db")},
    }
    if phases is not None:
        phases.enter("done")
        result["phase_peak_rss_gib"] = phases.gib()
    return result


def measure(entries: Path, tree: Path | None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree or ROOT))
    load_before = [round(x, 2) for x in os.getloadavg()]
    proc = subprocess.run(
        [sys.executable, __file__, "--run", str(entries)], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(proc.stdout.splitlines()[-1])
    result["load_before"] = load_before
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=Path)
    parser.add_argument("--before", default="8ec6e5c", help="the commit to compare with (default: before this change)")
    parser.add_argument("--name", default="sd15-unet")
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_verify(args.run)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-verify-before-") as tmp:
        before = checkout(args.before, Path(tmp) / "tree")
        result = {"entries": sorted(p.name for p in args.entries.iterdir() if p.is_dir()), "cpus": len(os.sched_getaffinity(0))}
        print(f"verify as of {args.before} ...", file=sys.stderr, flush=True)
        result["before"] = {"commit": args.before, **measure(args.entries, before)}
        print("verify, this tree ...", file=sys.stderr, flush=True)
        result["after"] = measure(args.entries, None)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"verify-{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
