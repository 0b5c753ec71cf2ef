"""Faults injected on purpose: kill -9 at every point of a build, corrupted and deleted cache and
bundle files, two builds at once, a full disk. Each must give a correct bundle, or one clear line
and a non-zero exit: never exit 0 with a wrong file.

Cheap by construction: the tiny recipe is built once (in the shared warm cache, the same keys as
test_generate's "sd6"); each test copies its entries and removes only the one it needs rebuilt.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_cli_here, write_recipe
from sdbuild.cache import LocalCache

RECIPE = "model: {version: 'synthetic:tiny-sd'}\ncompression: {nbits: 6, components: [unet]}\nresolution: {height: 64, width: 64}\nverify: {samples: 1}\n"
NAME = "faults"
LOST: list[str] = []  # faults that ended in exit 0 with a wrong file (must stay empty)


@pytest.fixture(scope="module")
def golden(warm_artifacts) -> dict:
    """The tiny recipe built once: its artifacts folder, stage keys and bundle."""
    from sdbuild.executor import prepare, run_build

    # As in test_generate: a kept folder (SDBUILD_TEST_ARTIFACTS) is safe to reuse, the cache being keyed by content.
    art = Path(os.environ.get("SDBUILD_TEST_ARTIFACTS") or warm_artifacts)
    recipe = write_recipe(art, NAME, f"name: {NAME}\n" + RECIPE)
    run_build(prepare(recipe, art))
    report = json.loads((art / "builds" / NAME / "build.json").read_text())
    keys = {(r["stage"], r["component"]): r["key"] for r in report["stages"]}
    return {"art": art, "keys": keys, "bundle": art / "builds" / NAME}


def fresh(golden: dict, tmp_path: Path, remove: tuple[tuple[str, str | None], ...] = ()) -> tuple[Path, Path]:
    """A private artifacts folder holding the golden build's cache entries, less ``remove``; (artifacts, recipe)."""
    art = tmp_path / "art"
    for (stage, component), key in golden["keys"].items():
        if (stage, component) not in remove:
            shutil.copytree(golden["art"] / "cache" / stage / key, art / "cache" / stage / key)
    assert LocalCache(art / "cache").verify() == []  # copies have new inodes: hash them once, as a first run would
    return art, write_recipe(tmp_path, NAME, f"name: {NAME}\n" + RECIPE)


def sdbuild(*args, env: dict | None = None, preexec=None, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdbuild.cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, preexec_fn=preexec,
    )


def entry_path(art: Path, golden: dict, stage: str, component: str | None) -> Path:
    return art / "cache" / stage / golden["keys"][(stage, component)]


def bundle_files(bundle: Path) -> dict[str, bytes]:
    """What ships: Resources/ and pipeline.json (build.json and the report carry timings).

    A model spec is compared as a message (its metadata map has no fixed byte order), a package's
    Manifest.json by its items' paths (coremltools names them by random UUIDs on every conversion).
    """
    from coremltools.proto import Model_pb2

    out = {}
    for p in [*(bundle / "Resources").rglob("*"), bundle / "pipeline.json"]:
        if p.is_file():
            data = p.read_bytes()
            if p.suffix == ".mlmodel":
                spec = Model_pb2.Model()
                spec.ParseFromString(data)
                data = spec.SerializeToString(deterministic=True)
            elif p.name == "Manifest.json":
                manifest = json.loads(data)
                items = manifest["itemInfoEntries"]
                root = items[manifest["rootModelIdentifier"]]["path"]
                data = json.dumps([root, sorted((v["path"], v.get("name"), v.get("author")) for v in items.values())]).encode()
            out[p.relative_to(bundle).as_posix()] = data
    return out


def assert_correct(art: Path, golden: dict, fault: str) -> None:
    """The bundle is the golden one, the cache verifies clean, and no temporary folder is left."""
    bundle = art / "builds" / NAME
    if bundle_files(bundle) != bundle_files(golden["bundle"]):
        LOST.append(fault)
        pytest.fail(f"{fault}: exit 0 with a wrong bundle")
    assert LocalCache(art / "cache").verify() == []
    assert [p.name for p in (art / "builds").iterdir() if p.name.startswith(".")] == []
    assert not (art / "cache" / ".tmp").exists() or list((art / "cache" / ".tmp").iterdir()) == []


def no_half_entry(art: Path) -> None:
    """Every entry present is whole: its files match its manifest."""
    cache = LocalCache(art / "cache")
    for stage_dir in (art / "cache").iterdir():
        if stage_dir.name.startswith("."):
            continue
        for key_dir in stage_dir.iterdir():
            entry = cache.get(stage_dir.name, key_dir.name)
            assert entry is not None and cache.check(entry, full=True) is None, key_dir


# --- kill -9 -------------------------------------------------------------------------

KILL_POINTS = ["child-start:trace", "child-write:trace", "child-end:trace", "before-publish:trace", "after-publish:trace", "bundle"]


def test_sigkill_at_every_point_leaves_no_half_entry_and_the_next_run_resumes(golden, tmp_path):
    art, recipe = fresh(golden, tmp_path, remove=(("trace", "text_encoder"),))
    trace = entry_path(art, golden, "trace", "text_encoder")
    for point in KILL_POINTS:
        done = sdbuild("run", recipe, "--artifacts", art, "--json", env={"SDBUILD_TEST_KILL": point})
        assert done.returncode == -signal.SIGKILL, (point, done.returncode, done.stderr[-2000:])
        no_half_entry(art)
        assert trace.exists() == (KILL_POINTS.index(point) >= KILL_POINTS.index("after-publish:trace")), point
        assert not (art / "builds" / NAME).exists(), point  # nothing published under the build's name
    leftovers = list((art / "cache" / ".tmp").iterdir()) + [p for p in (art / "builds").iterdir() if p.name.startswith(".")]
    assert leftovers  # the kills left work and staging folders behind…
    done = run_cli_here("run", recipe, "--artifacts", art, "--json")  # the stage server of this process: no kill armed here
    assert done.returncode == 0, done.stderr[-2000:]
    assert_correct(art, golden, "sigkill")  # …which the next run swept, then resumed to the right bundle
    hows = {(r["stage"], r["component"]): r["cache"] for r in json.loads(done.stdout)[0]["stages"]}
    assert set(hows.values()) == {"hit"}  # the trace published before the kill at after-publish was kept


# --- corrupted, truncated, deleted files -----------------------------------------------

CACHE_FILES = {
    # (stage, component): a file of that kind of entry
    ("download", None): "model/unet/diffusion_pytorch_model.safetensors",
    ("trace", "unet"): "module.pt",
    ("convert", "vae_decoder"): "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin",
    ("convert", "text_encoder"): "model.mlpackage/Data/com.apple.CoreML/model.mlmodel",
    ("compress", "unet"): "model.mlpackage/Manifest.json",
    ("verify", "unet"): "psnr.json",
}


def damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
        return
    path.chmod(0o644)
    if how == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    else:  # flip one byte in the middle
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("kind", list(CACHE_FILES), ids=lambda k: f"{k[0]}-{k[1]}")
def test_every_kind_of_cached_file_damaged_is_stale_for_plan_and_bad_for_a_hit(golden, tmp_path, kind, how):
    art, _ = fresh(golden, tmp_path)
    cache = LocalCache(art / "cache")
    entry = cache.get(kind[0], golden["keys"][kind])
    assert cache.check(entry) is None and cache.status(kind[0], entry.key) == "cached"
    damage(entry.path / CACHE_FILES[kind], how)
    assert cache.status(kind[0], entry.key) == "stale"
    problem = cache.check(entry)
    assert problem is not None and CACHE_FILES[kind] in problem


def test_damaged_entries_are_one_warning_each_then_rebuilt_and_the_bundle_is_right(golden, tmp_path):
    """The issue's cases: a flipped byte in a cached weight.bin, a deleted one, a truncated manifest."""
    from sdbuild.cache import MANIFEST

    art, recipe = fresh(golden, tmp_path)
    weights = "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    damage(entry_path(art, golden, "convert", "text_encoder") / weights, "flip")
    damage(entry_path(art, golden, "verify", "text_encoder") / "psnr.json", "delete")
    damage(entry_path(art, golden, "trace", "text_encoder") / MANIFEST, "truncate")
    plan = sdbuild("plan", recipe, "--artifacts", art, "--json")
    statuses = {(r["stage"], r["component"]): r["status"] for r in json.loads(plan.stdout) if r["key"]}
    assert {k for k, v in statuses.items() if v != "cached"} == {(s, "text_encoder") for s in ("trace", "convert", "verify")}
    assert {statuses[(s, "text_encoder")] for s in ("trace", "convert", "verify")} == {"stale"}
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    done = sdbuild("run", recipe, "--artifacts", art, "--json", env={"TMPDIR": str(system_tmp)})
    assert done.returncode == 0, done.stderr[-2000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3 and all("discarded, it will be rebuilt" in w for w in warnings), done.stderr
    assert "Traceback" not in done.stderr
    hows = {(r["stage"], r["component"]): r["cache"] for r in json.loads(done.stdout)[0]["stages"]}
    assert {k for k, v in hows.items() if v == "miss"} == {(s, "text_encoder") for s in ("trace", "convert", "verify")}
    assert_correct(art, golden, "damaged cache entries")
    # The rebuilt convert stage ran coremltools (tmp*.mlpackage): nothing of it is left in the system's temp folder.
    assert list(system_tmp.iterdir()) == []


def test_editing_the_bundle_never_changes_the_cache_and_the_next_run_restores_it(golden, tmp_path):
    from sdbuild.executor import prepare, run_build

    art, recipe = fresh(golden, tmp_path)
    run_build(prepare(recipe, art))
    bundle = art / "builds" / NAME
    cache_inodes = {(p.stat().st_dev, p.stat().st_ino) for p in (art / "cache").rglob("*") if p.is_file()}
    shipped = [p for p in bundle.rglob("*") if p.is_file()]
    assert not cache_inodes & {(p.stat().st_dev, p.stat().st_ino) for p in shipped}  # no shared inode
    resources = bundle / "Resources"
    damage(resources / "Unet.mlpackage/Data/com.apple.CoreML/weights/weight.bin", "flip")
    damage(resources / "TextEncoder.mlpackage/Data/com.apple.CoreML/weights/weight.bin", "delete")
    damage(resources / "VAEDecoder.mlpackage/Data/com.apple.CoreML/model.mlmodel", "truncate")
    damage(resources / "vocab.json", "truncate")
    assert LocalCache(art / "cache").verify() == []  # the cache did not change with the bundle
    run_build(prepare(recipe, art))
    assert_correct(art, golden, "edited bundle")


# --- two builds at once ----------------------------------------------------------------


def test_two_concurrent_builds_share_the_work_and_both_succeed(golden, tmp_path):
    art, recipe = fresh(golden, tmp_path, remove=(("trace", "text_encoder"),))
    command = [sys.executable, "-m", "sdbuild.cli", "run", str(recipe), "--artifacts", str(art), "--json"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [run.communicate(timeout=900) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outs]
    hows = [{(r["stage"], r["component"]): r["cache"] for r in json.loads(out)[0]["stages"]} for out, _ in outs]
    assert sorted(h[("trace", "text_encoder")] for h in hows) == ["hit", "miss"]  # built once, by one of them
    assert len(list((art / "cache" / "trace").iterdir())) == 3  # one entry per key
    assert_correct(art, golden, "concurrent builds")


# --- a full disk -----------------------------------------------------------------------


def file_size_limit(limit: int):
    """preexec_fn: every file the run writes stops at ``limit`` bytes (EFBIG), as a full disk stops it."""

    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write over the limit fails instead of killing

    return apply


def assert_one_line(done: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    assert done.returncode == code, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_a_full_disk_while_writing_the_bundle_is_one_line_and_publishes_nothing(golden, tmp_path):
    art, recipe = fresh(golden, tmp_path)
    done = sdbuild("run", recipe, "--artifacts", art, preexec=file_size_limit(100_000))
    assert_one_line(done, 1, str(art / "builds" / NAME), "no space left")
    assert sorted(p.name for p in (art / "builds").iterdir()) == []  # neither the bundle nor its staging folder


def test_a_full_disk_while_a_stage_writes_its_entry_is_one_line_and_publishes_nothing(golden, tmp_path):
    art, recipe = fresh(golden, tmp_path, remove=(("trace", "text_encoder"),))
    done = sdbuild("run", recipe, "--artifacts", art, preexec=file_size_limit(100_000))
    assert_one_line(done, 1, "trace text_encoder")
    assert not entry_path(art, golden, "trace", "text_encoder").exists()
    assert not (art / "cache" / ".tmp").exists() or list((art / "cache" / ".tmp").iterdir()) == []
    assert not (art / "builds" / NAME).exists()
    done = run_cli_here("run", recipe, "--artifacts", art)  # space again (and no limit in this process): the run completes
    assert done.returncode == 0, done.stderr[-2000:]
    assert_correct(art, golden, "full disk")


def test_a_real_full_filesystem(golden, tmp_path):
    """A 3 MiB tmpfs (in a user and mount namespace, where the machine allows one) holding the cache."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no unprivileged mount namespace here; the RLIMIT_FSIZE tests stand in")
    art, recipe = fresh(golden, tmp_path)
    cache_kib = sum(p.stat().st_size for p in art.rglob("*") if p.is_file()) // 1024
    mount = tmp_path / "small"
    mount.mkdir()
    script = (
        f"mount -t tmpfs -o size={cache_kib + 600}k none {mount} && cp -a {art} {mount}/art && "
        f"{sys.executable} -m sdbuild.cli run {recipe} --artifacts {mount}/art; echo rc=$?; ls -a {mount}/art/builds"
    )
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=900)
    assert "rc=1" in done.stdout, done.stdout + done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no space left" in errors[0] and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stdout.split("rc=1")[1].split() == [".", ".."]  # nothing published, no staging left


def test_no_fault_was_lost():
    assert LOST == []
