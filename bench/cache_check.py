"""What checking cache hits costs: the fast (stat) path against full sha256 hashing.

Over an artifacts folder's cache (default: build the tiny recipe's there first),
times checking every entry by the fast path and by hashing every file, and
measures sha256 throughput on a random file, extrapolated to the files an SD 1.5
build checks on a warm rebuild. Writes bench/results/cache_check.json.

    python bench/cache_check.py [--artifacts DIR] [--megabytes N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from sdbuild.cache import LocalCache, clone_file, sha256_file

RESULTS = Path(__file__).parent / "results" / "cache_check.json"
# What a warm SD 1.5 rebuild (float16, swift layout, 6-bit unet) checks: the download's safetensors
# (float32 text encoder, unet, VAE: ~4.3 GB), the traced modules (float32: ~4.3 GB), the float16
# packages (~2.1 GB), the 6-bit unet (~0.65 GB). Sizes from the public SD 1.5 checkpoint and bench/convert.py.
SD15_CHECKED_GB = 4.3 + 4.3 + 2.1 + 0.65
SD15_BUNDLE_GB = 2.5  # float16 text encoder, unet and VAE decoder, as the bundle ships them


def time_checks(cache: LocalCache, full: bool, repeats: int = 5) -> tuple[float, int, int]:
    """(seconds per pass over all entries, entries, files)."""
    entries = cache.entries()
    files = sum(len(e.manifest["files"]) for e in entries)
    for entry in entries:  # a first pass records the known-good state
        assert cache.check(entry, full=True) is None, entry.path
    start = time.perf_counter()
    for _ in range(repeats):
        for entry in entries:
            assert cache.check(entry, full=full) is None
    return (time.perf_counter() - start) / repeats, len(entries), files


def hash_and_copy_rates(megabytes: int) -> tuple[float, float, str]:
    """(sha256 MB/s, bundle copy MB/s, reflink | copy) over a random file.

    The file is in the page cache: these are the CPU's and memory's rates, upper bounds for a cold disk.
    """
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as folder:
        src = Path(folder) / "blob"
        with open(src, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(megabytes):
                f.write(block)
        start = time.perf_counter()
        sha256_file(src)
        hashing = megabytes / (time.perf_counter() - start)
        start = time.perf_counter()
        how = clone_file(src, Path(folder) / "copy")
        copying = megabytes / (time.perf_counter() - start)
        return hashing, copying, how


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--megabytes", type=int, default=1024)
    args = parser.parse_args()
    cache = LocalCache(Path(args.artifacts) / "cache")
    fast, entries, files = time_checks(cache, full=False)
    full, _, _ = time_checks(cache, full=True, repeats=2)
    rate, copy_rate, how = hash_and_copy_rates(args.megabytes)
    result = {
        "platform": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "entries": entries,
        "files": files,
        "cache_bytes": sum(e.manifest.get("bytes", 0) for e in cache.entries()),
        "fast_check_s": round(fast, 4),
        "full_hash_s": round(full, 3),
        "sha256_mb_per_s": round(rate, 1),
        "sd15_full_hash_s_estimate": round(SD15_CHECKED_GB * 1000 / rate, 1),
        "bundle_copy": how,
        "bundle_copy_mb_per_s": round(copy_rate, 1),
        "sd15_bundle_copy_s_estimate": round(SD15_BUNDLE_GB * 1000 / copy_rate, 1),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
