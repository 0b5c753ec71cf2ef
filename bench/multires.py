"""Benchmark: one, two and three resolutions of SD 1.5's unet in one multifunction package.

    .venv/bin/python bench/multires.py                      # full size: bench/results/multires-sd15-unet.json
    .venv/bin/python bench/multires.py --model tiny         # a small unet, to try it (no result file)

Runs ``bench/convert.py`` (trace + convert as the stages do it, random
weights, target macOS15, ``multires: functions``) once per size list, one
process each: 512x512; 512x512,512x768; 512x512,512x768,768x512. Records
package bytes, weight.bin bytes (shared weights: the same for every count),
trace and convert seconds and peak RSS, and for the three-size package the
reference executor's load and float16 run per function, each in a fresh
process (seconds, peak RSS). ``--executor-functions N`` limits the executor
to the first N functions where a run takes too long.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SIZES = {"sd15": ["512x512", "512x768", "768x512"], "tiny": ["64x64", "64x96", "96x64"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(SIZES), default="sd15")
    parser.add_argument("--attention", default="SPLIT_EINSUM", help="the recipe's default, as the multires tests build")
    parser.add_argument("--counts", default="1,2,3", help="how many of the sizes, per run")
    parser.add_argument("--executor-functions", type=int, help="run the executor on the first N functions (default all)")
    parser.add_argument("--executor-deadline", type=float, help="unix time: stop the executor runs there")
    parser.add_argument("--cache", type=Path, default=Path("/work/bench-cache"))
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    out = RESULTS / f"multires-{args.model}-unet.json"
    rows = json.loads(out.read_text())["runs"] if out.is_file() and args.model != "tiny" else {}
    for count in counts:
        sizes = ",".join(SIZES[args.model][:count])
        cmd = [sys.executable, str(ROOT / "bench" / "convert.py"), "--model", args.model, "--component", "unet",
               "--attention", args.attention, "--sizes", sizes, "--target", "macOS15", "--cache", str(args.cache), "--json"]  # fmt: skip
        # The executor runs on the package with every size only.
        limit = args.executor_functions if count == max(counts) else 0
        cmd += ["--executor-functions", str(limit)] if limit is not None else []
        cmd += ["--executor-deadline", str(args.executor_deadline)] if args.executor_deadline and limit != 0 else []
        print(" ".join(cmd[1:]), file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        rows[str(count)] = json.loads(proc.stdout)
        if args.model != "tiny":  # after each run: a later one that fails keeps the earlier figures
            out.write_text(json.dumps({"model": args.model, "attention": args.attention, "runs": rows}, indent=2) + "\n")
    one = rows.get("1", {}).get("weight_bytes")
    print(f"{'sizes':>5} {'package MiB':>11} {'weight.bin MiB':>14} {'x one':>6} {'trace s':>8} {'convert s':>9} {'peak GiB':>8} {'load':>5}")
    for count, r in sorted(rows.items()):
        ratio = f"{r['weight_bytes'] / one:.3f}" if one else "-"
        print(
            f"{count:>5} {r['package_bytes'] / 2**20:>11.1f} {r['weight_bytes'] / 2**20:>14.1f} {ratio:>6} "
            f"{r['stages']['trace']['seconds']:>8.1f} {r['stages']['convert']['seconds']:>9.1f} {r['peak_rss_gib']:>8.2f} {r['load_before'][0]:>5.2f}"
        )
        for name, e in (r.get("executor") or {}).items():
            if "run_s" not in e:
                print(f"      executor {name}: {e}")
                continue
            print(f"      executor {name}: load {e['load_s']} s, run {e['run_s']} s (fp16), peak {e['peak_rss_gib']} GiB")


if __name__ == "__main__":
    main()
