"""The stage cache: keys, atomic publication, locks, verify and gc."""

from __future__ import annotations

import json
import threading
import time

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
