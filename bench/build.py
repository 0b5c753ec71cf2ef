"""Benchmark: the tiny recipe cold and warm, and a three-variant matrix, before and after warm workers.

    .venv/bin/python bench/build.py [--before COMMIT] [--repeat-warm N]

"before" is sdbuild as of ``--before`` (default: the commit before issue 16,
taken with ``git archive``): every stage a freshly spawned interpreter, one
stage at a time, and a warm run that imports coremltools and torch. "after" is
this tree: stages fork from a server that imported the libraries once, ready
stages run side by side (``--jobs`` = the cores), and a warm run imports
nothing heavy. ``SDBUILD_WORKERS=spawn --jobs 1`` gives this tree's own
sequential, spawned path (``--also-spawn`` adds it). Each case runs in a fresh
artifacts folder, before and after in turn, so both see the same machine
load; the load average is recorded beside each figure, and each cold build's
stage timeline (build.json's ``ran_s``) beside its time. Writes
``bench/results/build.json`` (``--out`` names another file there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny.yaml"
BEFORE = "9fdaa8e"  # the last commit before warm workers and parallel stages


def checkout(commit: str, into: Path) -> Path:
    """The sdbuild package as of ``commit``, in a folder to put first on PYTHONPATH."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "sdbuild"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def sdbuild(side: dict, *args) -> float:
    """Run the command line of one side; its wall seconds."""
    env = {**os.environ, "PYTHONPATH": side["path"], **side.get("env", {})}
    started = time.perf_counter()
    # Run from a neutral folder: ``-m`` puts the working folder first on the path, before PYTHONPATH.
    done = subprocess.run(
        [sys.executable, "-m", "sdbuild.cli", *map(str, args), *side.get("args", [])], capture_output=True, text=True, env=env, cwd=side["cwd"]
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{side['name']}: sdbuild {' '.join(map(str, args))} failed: {done.stderr.strip().splitlines()[-3:]}")
    return seconds


def timed(side: dict, *args) -> dict:
    """Wall seconds, the 1-minute load before, and CPU seconds of the processes the command waited for
    (all of a warm run; a cold run's stage server and its stages are not waited for, so not counted)."""
    import resource

    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = sdbuild(side, *args)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"s": round(seconds, 2), "load_1min": round(load, 2), "cpu_s": round(cpu, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default=BEFORE)
    ap.add_argument("--repeat-warm", type=int, default=3)
    ap.add_argument("--also-spawn", action="store_true", help="also this tree with SDBUILD_WORKERS=spawn --jobs 1")
    ap.add_argument("--no-matrix", action="store_true")
    ap.add_argument("--out", default="build.json", help="file name under bench/results/")
    opts = ap.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sides = [
            {"name": f"before ({opts.before})", "path": str(checkout(opts.before, tmp / "before"))},
            {"name": "after", "path": str(ROOT)},
        ]
        for side in sides:
            side["cwd"] = str(tmp)
        if opts.also_spawn:
            sides.append(
                {"name": "after, spawn, --jobs 1", "path": str(ROOT), "cwd": str(tmp), "env": {"SDBUILD_WORKERS": "spawn"}, "args": ["--jobs", "1"]}
            )
        matrix = tmp / "tiny-matrix.yaml"
        # A 4-bit random-weight unet scores below the tiny recipe's 35 dB gate: lower it for all three.
        matrix.write_text(f"extends: {TINY}\nname: tiny-matrix\nverify: {{psnr_min_db: 20}}\nmatrix:\n  compression.nbits: [4, 6, 8]\n")
        results = {side["name"]: {} for side in sides}
        out = ROOT / "bench" / "results" / opts.out
        save = lambda: out.write_text(json.dumps(document(results, load), indent=2) + "\n")  # after each figure
        for i, side in enumerate(sides):
            results[side["name"]]["tiny_cold"] = timed(side, "run", TINY, "--artifacts", tmp / f"art{i}")
            results[side["name"]]["tiny_cold_timeline"] = timeline(tmp / f"art{i}" / "builds" / "tiny" / "build.json")
            print(side["name"], "tiny cold", results[side["name"]]["tiny_cold"], flush=True)
            save()
        for i, side in enumerate(sides):
            runs = [timed(side, "run", TINY, "--artifacts", tmp / f"art{i}") for _ in range(opts.repeat_warm)]
            results[side["name"]]["tiny_warm"] = min(runs, key=lambda r: r["s"])
            results[side["name"]]["tiny_warm_all_s"] = [r["s"] for r in runs]
            print(side["name"], "tiny warm", runs, flush=True)
            save()
        for i, side in enumerate(sides if not opts.no_matrix else []):
            results[side["name"]]["matrix3_cold"] = timed(side, "run", matrix, "--artifacts", tmp / f"matrix{i}")
            print(side["name"], "matrix", results[side["name"]]["matrix3_cold"], flush=True)
            save()
    print(out.read_text())


def timeline(build_json: Path) -> dict[str, list[float]]:
    """Each stage's [start, end] in seconds from the build's start (build.json's ``ran_s``), by start."""
    stages = json.loads(build_json.read_text())["stages"]
    rows = sorted((s["ran_s"], f"{s['stage']} {s['component'] or ''}".strip()) for s in stages if s.get("ran_s"))
    return {label: ran for ran, label in rows}


def document(results: dict, load_at_start: tuple) -> dict:
    return {
        "what": "wall seconds of `sdbuild run`: tiny cold (fresh artifacts), tiny warm (every stage cached; best of N), "
        "three-variant matrix cold (tiny, compression.nbits 4/6/8, one run)",
        "results": results,
        "cpus": os.cpu_count(),
        "load_at_start": [round(x, 2) for x in load_at_start],
        "load_1min_now": round(os.getloadavg()[0], 2),
    }


if __name__ == "__main__":
    main()
