"""The stage cache: keys, the local store, locks and manifests.

An entry is ``<root>/<stage>/<key>/`` holding the stage's files and a
``manifest.json`` (key, inputs, fields, versions, sha256 of every file,
seconds, peak RSS). It is written in a temporary folder and published by one
atomic rename, so a crash never leaves a half entry that looks whole; a file
lock per key stops two runs from building the same entry twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from sdbuild.errors import SdbuildError

MANIFEST = "manifest.json"
KEY_LENGTH = 24


def stage_key(stage: str, version: str, fields: dict[str, Any], upstream: dict[str, str], versions: dict[str, str]) -> str:
    """The cache key of one stage output: a hash of everything it is a function of."""
    doc = {"stage": stage, "version": version, "fields": fields, "upstream": upstream, "versions": versions}
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_LENGTH]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by path relative to it (the manifest excluded)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not (p.parent == root and p.name == MANIFEST):
            out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


@dataclass
class Entry:
    """A published cache entry."""

    stage: str
    key: str
    path: Path
    manifest: dict

    @property
    def seconds(self) -> float:
        return self.manifest.get("seconds", 0.0)


class LocalCache:
    """The cache under ``root`` (normally ``artifacts/cache``)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def entry_path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def _lock(self, stage: str, key: str) -> FileLock:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        return FileLock(str(locks / f"{stage}-{key}.lock"))

    def get(self, stage: str, key: str) -> Entry | None:
        """The published entry, or None. An entry without a readable manifest does not exist."""
        path = self.entry_path(stage, key)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None
        if manifest.get("key") != key:
            return None
        return Entry(stage, key, path, manifest)

    def build(self, stage: str, key: str, produce: Callable[[Path], dict], record: dict, force: bool = False) -> tuple[Entry, bool]:
        """Return the entry for (stage, key), building it with ``produce(tmp_dir)`` if absent.

        ``produce`` writes the stage's files into ``tmp_dir`` and returns facts
        for the manifest (it may include ``seconds`` and ``peak_rss_bytes``).
        ``record`` is what the key was made of (fields, upstream, versions).
        Returns (entry, built): built is False on a cache hit.
        """
        with self._lock(stage, key):
            existing = self.get(stage, key)
            if existing and not force:
                return existing, False
            (self.root / ".tmp").mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"{stage}-{key}-", dir=self.root / ".tmp"))
            try:
                start = time.time()
                facts = produce(tmp) or {}
                facts.setdefault("seconds", round(time.time() - start, 3))
                files = hash_tree(tmp)
                manifest = {
                    "stage": stage,
                    "key": key,
                    **record,
                    **facts,
                    "files": files,
                    "bytes": tree_bytes(tmp),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                _write_json(tmp / MANIFEST, manifest)
                final = self.entry_path(stage, key)
                final.parent.mkdir(parents=True, exist_ok=True)
                if final.exists():
                    # --force: move the old entry aside first; the new one replaces it in one rename.
                    trash = Path(tempfile.mkdtemp(prefix="old-", dir=self.root / ".tmp"))
                    final.rename(trash / "entry")
                    tmp.rename(final)
                    shutil.rmtree(trash, ignore_errors=True)
                else:
                    tmp.rename(final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return Entry(stage, key, final, manifest), True

    def entries(self) -> list[Entry]:
        out = []
        if not self.root.is_dir():
            return out
        for stage_dir in sorted(self.root.iterdir()):
            if stage_dir.name.startswith(".") or not stage_dir.is_dir():
                continue
            for key_dir in sorted(stage_dir.iterdir()):
                entry = self.get(stage_dir.name, key_dir.name)
                if entry:
                    out.append(entry)
        return out

    def verify(self) -> list[tuple[Entry, str]]:
        """Re-hash every entry; returns (entry, problem) for each that does not match its manifest."""
        problems = []
        for entry in self.entries():
            want = entry.manifest.get("files", {})
            have = hash_tree(entry.path)
            for name in sorted(set(want) | set(have)):
                if want.get(name) != have.get(name):
                    what = "missing" if name not in have else "unexpected" if name not in want else "changed"
                    problems.append((entry, f"{name} {what}"))
                    break
        return problems

    def gc(self, keep: set[tuple[str, str]]) -> tuple[int, int]:
        """Delete entries not in ``keep`` and leftover temporary folders; returns (entries, bytes) freed."""
        count = freed = 0
        for entry in self.entries():
            if (entry.stage, entry.key) not in keep:
                with self._lock(entry.stage, entry.key):
                    freed += tree_bytes(entry.path)
                    shutil.rmtree(entry.path)
                    count += 1
        tmp = self.root / ".tmp"
        if tmp.is_dir():
            for leftover in tmp.iterdir():
                # A live build holds its key's lock; only folders older than a day are surely dead.
                if time.time() - leftover.stat().st_mtime > 86400:
                    freed += tree_bytes(leftover)
                    shutil.rmtree(leftover, ignore_errors=True)
        return count, freed


def _write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")


def write_json_atomic(path: Path, doc: dict) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


class CacheError(SdbuildError):
    """The cache is not usable (e.g. not writable)."""
