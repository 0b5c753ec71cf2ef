"""The stage cache: keys, atomic publication, locks, verify and gc."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from sdbuild.cache import LocalCache, stage_key
from sdbuild.errors import SdbuildError


def key(**fields):
    return stage_key("convert", "1", fields, {"trace": "abc"}, {"torch": "2.13.0"})


def test_key_is_stable_and_sensitive_to_every_part():
    base = key(target="macOS14")
    assert base == key(target="macOS14")
    assert base != key(target="macOS13")
    assert base != stage_key("convert", "2", {"target": "macOS14"}, {"trace": "abc"}, {"torch": "2.13.0"})
    assert base != stage_key("convert", "1", {"target": "macOS14"}, {"trace": "abd"}, {"torch": "2.13.0"})
    assert base != stage_key("convert", "1", {"target": "macOS14"}, {"trace": "abc"}, {"torch": "2.14.0"})
    assert base != stage_key("compress", "1", {"target": "macOS14"}, {"trace": "abc"}, {"torch": "2.13.0"})


def write_files(tmp, **facts):
    (tmp / "model.bin").write_bytes(b"weights")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "x.txt").write_text("x")
    return dict(facts)


def test_build_publishes_entry_with_manifest(tmp_path):
    cache = LocalCache(tmp_path)
    entry, how = cache.build("convert", "k1", lambda t: write_files(t, peak_rss_bytes=123), {"fields": {"a": 1}})
    assert how == "miss"
    manifest = json.loads((entry.path / "manifest.json").read_text())
    assert manifest["key"] == "k1" and manifest["fields"] == {"a": 1} and manifest["peak_rss_bytes"] == 123
    assert set(manifest["files"]) == {"model.bin", "sub/x.txt"}
    assert manifest["seconds"] >= 0
    again, how_again = cache.build("convert", "k1", lambda t: pytest.fail("must not rebuild"), {})
    assert how_again == "hit" and again.path == entry.path


def test_failed_build_leaves_no_entry_and_no_temp(tmp_path):
    cache = LocalCache(tmp_path)

    def broken(tmp):
        write_files(tmp)
        raise SdbuildError("boom")

    with pytest.raises(SdbuildError):
        cache.build("convert", "k1", broken, {})
    assert cache.get("convert", "k1") is None
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_folder_without_manifest_is_not_an_entry(tmp_path):
    cache = LocalCache(tmp_path)
    (tmp_path / "convert" / "k1").mkdir(parents=True)
    (tmp_path / "convert" / "k1" / "model.bin").write_bytes(b"half")
    assert cache.get("convert", "k1") is None


def test_force_replaces_entry(tmp_path):
    cache = LocalCache(tmp_path)
    cache.build("convert", "k1", lambda t: (t / "v").write_text("1") and {}, {})
    entry, how = cache.build("convert", "k1", lambda t: (t / "v").write_text("2") and {}, {}, force=True)
    assert how == "miss" and (entry.path / "v").read_text() == "2"


def test_one_build_per_key_under_concurrency(tmp_path):
    calls = []

    def slow(tmp):
        calls.append(1)
        time.sleep(0.5)
        (tmp / "v").write_text("x")
        return {}

    results = []
    threads = [threading.Thread(target=lambda: results.append(LocalCache(tmp_path).build("s", "k", slow, {}))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(how for _, how in results) == ["hit", "hit", "miss"]


def test_verify_finds_changed_and_missing_files(tmp_path):
    cache = LocalCache(tmp_path)
    a, _ = cache.build("convert", "a", write_files, {})
    b, _ = cache.build("convert", "b", write_files, {})
    cache.build("convert", "c", write_files, {})
    (a.path / "model.bin").write_bytes(b"tampered")
    (b.path / "sub" / "x.txt").unlink()
    problems = {(e.key, what) for e, what in cache.verify()}
    assert problems == {("a", "model.bin does not match its sha256"), ("b", "sub/x.txt is missing")}


def test_gc_keeps_only_referenced(tmp_path):
    cache = LocalCache(tmp_path)
    for k in ("a", "b"):
        cache.build("convert", k, write_files, {})
    count, freed = cache.gc({("convert", "a")})
    assert count == 1 and freed > 0
    assert cache.get("convert", "a") and not cache.get("convert", "b")


# --- every hit is checked against its manifest ------------------------------------


def hashes_counted(monkeypatch) -> list:
    import sdbuild.cache as cache_module

    calls = []
    real = cache_module.sha256_file

    def counting(path, *a, **k):
        calls.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(cache_module, "sha256_file", counting)
    return calls


def test_hit_takes_the_fast_path_when_nothing_changed(tmp_path, monkeypatch):
    cache = LocalCache(tmp_path)
    cache.build("convert", "k1", write_files, {})
    calls = hashes_counted(monkeypatch)
    _, how = cache.build("convert", "k1", lambda t: pytest.fail("must not rebuild"), {})
    assert how == "hit" and calls == []  # size, mtime and inode matched: nothing hashed
    LocalCache(tmp_path, verify_hashes=True).build("convert", "k1", lambda t: pytest.fail("must not rebuild"), {})
    assert sorted(calls) == ["model.bin", "x.txt"]  # --verify-hashes hashes every file


def test_a_touched_but_unchanged_file_is_hashed_once_then_trusted(tmp_path, monkeypatch):
    cache = LocalCache(tmp_path)
    entry, _ = cache.build("convert", "k1", write_files, {})
    os.utime(entry.path / "model.bin", ns=(1, 1))
    assert cache.status("convert", "k1") == "stale"
    calls = hashes_counted(monkeypatch)
    assert cache.build("convert", "k1", lambda t: pytest.fail("content is fine"), {})[1] == "hit"
    assert calls == ["model.bin"]
    assert cache.status("convert", "k1") == "cached"


@pytest.mark.parametrize("fault", ["flip", "truncate", "delete", "extra", "manifest"])
def test_a_bad_entry_is_one_warning_then_rebuilt(tmp_path, fault):
    warnings = []
    cache = LocalCache(tmp_path, warn=warnings.append)
    entry, _ = cache.build("convert", "k1", write_files, {})
    target = entry.path / "model.bin"
    if fault == "flip":
        data = bytearray(target.read_bytes())
        data[0] ^= 0x01
        target.chmod(0o644)
        target.write_bytes(bytes(data))
    elif fault == "truncate":
        os.truncate(target, 3)
    elif fault == "delete":
        target.unlink()
    elif fault == "extra":
        (entry.path / "sub" / "stray.bin").write_bytes(b"?")
    else:
        manifest = entry.path / "manifest.json"
        manifest.chmod(0o644)
        manifest.write_text(manifest.read_text()[:40])
    assert cache.status("convert", "k1") == "stale"
    rebuilt, how = cache.build("convert", "k1", write_files, {})
    assert how == "miss" and len(warnings) == 1 and "\n" not in warnings[0]
    assert "convert/k1" in warnings[0] and "rebuilt" in warnings[0]
    assert (rebuilt.path / "model.bin").read_bytes() == b"weights"
    assert cache.check(rebuilt, full=True) is None and cache.status("convert", "k1") == "cached"


def test_a_change_that_keeps_size_and_mtime_needs_verify_hashes(tmp_path):
    cache = LocalCache(tmp_path)
    entry, _ = cache.build("convert", "k1", write_files, {})
    target = entry.path / "model.bin"
    before = target.stat()
    with open(target, "r+b") as f:  # same inode, same size
        f.write(b"W")
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert cache.check(entry) is None  # what the fast path cannot see…
    assert cache.check(entry, full=True) == "model.bin does not match its sha256"  # …--verify-hashes does


def test_published_files_are_read_only(tmp_path):
    entry, _ = LocalCache(tmp_path).build("convert", "k1", write_files, {})
    files = [p for p in entry.path.rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & 0o222 == 0 for p in files)


def test_verify_reports_unreadable_manifests_and_orphaned_temp_folders(tmp_path):
    cache = LocalCache(tmp_path)
    entry, _ = cache.build("convert", "k1", write_files, {})
    manifest = entry.path / "manifest.json"
    manifest.chmod(0o644)
    manifest.write_text('{"key": "k1", "fi')
    (tmp_path / ".tmp" / f"trace-{'a' * 24}-p999999-xyzxyzxy").mkdir()
    problems = {(str(e), what.split(" ")[0]) for e, what in cache.verify()}
    assert ("convert/k1", "manifest.json") in problems
    assert (f".tmp/trace-{'a' * 24}-p999999-xyzxyzxy", "temporary") in problems


def test_sweep_removes_only_temp_folders_of_dead_runs(tmp_path):
    import subprocess
    import sys

    cache = LocalCache(tmp_path)
    temp = tmp_path / ".tmp"
    temp.mkdir()
    dead_work = temp / f"convert-{'b' * 24}-p999999-abcdefgh"  # nobody holds its key's lock
    live_work = temp / f"convert-{'c' * 24}-p1-abcdefgh"
    dead_trash = temp / "old-p999999-abcdefgh"
    own_trash = temp / f"old-p{os.getpid()}-abcdefgh"
    for folder in (dead_work, live_work, dead_trash, own_trash):
        (folder / "entry").mkdir(parents=True)
        (folder / "entry" / "f").write_bytes(b"x" * 10)
    # Another process holds live_work's key lock, as a running build does.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; l = FileLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(60)",
         str(tmp_path / ".locks" / f"convert-{'c' * 24}.lock")],
        stdout=subprocess.PIPE, text=True,
    )
    (tmp_path / ".locks").mkdir(exist_ok=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cache.sweep() == 20
        assert sorted(p.name for p in temp.iterdir()) == sorted([live_work.name, own_trash.name])
    finally:
        holder.kill()
        holder.wait()
    assert cache.sweep() == 10 and [p.name for p in temp.iterdir()] == [own_trash.name]


def test_build_temps_of_dead_runs_are_removed(tmp_path):
    from sdbuild.cache import sweep_build_temps

    dead, live = tmp_path / ".tmp-tiny-p999999-abcdefgh", tmp_path / f".tmp-tiny-p{os.getpid()}-abcdefgh"
    old, build = tmp_path / ".old-tiny-999999", tmp_path / "tiny"
    for folder in (dead, live, old, build):
        folder.mkdir()
    sweep_build_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, build.name])


def test_gc_removes_broken_entries_and_dead_scratch(tmp_path):
    cache = LocalCache(tmp_path)
    cache.build("convert", "a", write_files, {})
    (tmp_path / "convert" / "half").mkdir()
    (tmp_path / ".scratch" / f"analyze-{'d' * 24}").mkdir(parents=True)
    count, _ = cache.gc({("convert", "a")})
    assert count == 1 and sorted(p.name for p in (tmp_path / "convert").iterdir()) == ["a"]
    assert list((tmp_path / ".scratch").iterdir()) == []


def test_a_full_disk_while_building_is_one_line_and_publishes_nothing(tmp_path):
    import errno

    from sdbuild.cache import DiskFullError

    def fills_the_disk(tmp):
        (tmp / "model.bin").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as info:
        LocalCache(tmp_path).build("convert", "k1", fills_the_disk, {})
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "convert" / "k1").exists() and list((tmp_path / ".tmp").iterdir()) == []


def test_clone_file_never_shares_an_inode(tmp_path):
    from sdbuild.cache import clone_file

    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 << 20))
    src.chmod(0o444)
    how = clone_file(src, tmp_path / "dst.bin")
    dst = tmp_path / "dst.bin"
    assert how in ("reflink", "copy") and dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_ino != src.stat().st_ino and src.stat().st_nlink == 1
    assert dst.stat().st_mode & 0o200  # the copy is the user's to edit…
    with open(dst, "r+b") as f:
        f.write(b"edited")
    assert src.read_bytes()[:6] != b"edited"  # …and editing it leaves the source alone


def test_input_digests_are_remembered_by_stat_and_redone_when_the_file_changes(tmp_path, monkeypatch):
    """A warm plan of a big checkpoint reads none of it; any change to the file is hashed again."""
    import hashlib
    import os

    from sdbuild import cache

    big = tmp_path / "model.safetensors"
    big.write_bytes(b"a" * 1000)
    cache.remember_input_digests(tmp_path / "state" / "inputs.json")
    try:
        first = cache.input_digest(big)
        assert first == hashlib.sha256(b"a" * 1000).hexdigest()
        reads = []
        monkeypatch.setattr(cache, "sha256_file", lambda p: reads.append(p) or "x")
        assert cache.input_digest(big) == first and reads == []  # remembered: not read again
        monkeypatch.undo()
        st = big.stat()
        with open(big, "r+b") as f:  # same size, and the mtime put back: ctime still moves
            f.write(b"b")
        os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert cache.input_digest(big) == hashlib.sha256(b"b" + b"a" * 999).hexdigest()
    finally:
        cache.remember_input_digests(None)
