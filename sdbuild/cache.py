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
import re
import shutil
import sys
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

    def __init__(self, root: Path, remote: "RemoteCache | None" = None):
        self.root = Path(root)
        self.remote = remote

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

    def build(self, stage: str, key: str, produce: Callable[[Path], dict], record: dict, force: bool = False) -> tuple[Entry, str]:
        """Return the entry for (stage, key), building it with ``produce(tmp_dir)`` if absent.

        ``produce`` writes the stage's files into ``tmp_dir`` and returns facts
        for the manifest (it may include ``seconds`` and ``peak_rss_bytes``).
        ``record`` is what the key was made of (fields, upstream, versions).
        Returns (entry, how): ``hit`` (local cache), ``remote`` (downloaded from
        the remote cache) or ``miss`` (built here, then uploaded to the remote).
        """
        with self._lock(stage, key):
            existing = self.get(stage, key)
            if existing and not force:
                return existing, "hit"
            (self.root / ".tmp").mkdir(parents=True, exist_ok=True)
            if self.remote is not None and not force:
                tmp = Path(tempfile.mkdtemp(prefix=f"{stage}-{key}-", dir=self.root / ".tmp"))
                try:
                    if self.remote.fetch(stage, key, tmp):
                        self._publish(tmp, stage, key)
                        return self.get(stage, key), "remote"
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
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
                self._publish(tmp, stage, key)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            entry = Entry(stage, key, self.entry_path(stage, key), manifest)
            if self.remote is not None:
                self.remote.upload(entry)
        return entry, "miss"

    def _publish(self, tmp: Path, stage: str, key: str) -> None:
        """Make the finished folder ``tmp`` the entry, in one rename."""
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
    """The cache is not usable (e.g. not writable, or a required remote is down)."""


def redact_url(url: str) -> str:
    """The URL without any credentials it carries (``s3://key:secret@bucket`` → ``s3://***@bucket``)."""
    return re.sub(r"(?<=://)[^/@]+@", "***@", url)


class RemoteCache:
    """A shared cache behind the local one, on any fsspec filesystem.

    Layout: ``<url>/blobs/<sha[:2]>/<sha256>`` holds file contents by hash;
    ``<url>/<stage>/<key>/manifest.json`` lists an entry's files by hash and
    is uploaded last. Blobs never change, so any manifest a reader sees is
    consistent with what it points to, and two writers of one key both leave
    a valid entry. A remote that fails degrades to local-only with one
    warning, unless ``require`` is set.
    """

    def __init__(self, url: str, *, require: bool = False, warn: Callable[[str], None] | None = None):
        import fsspec

        self.url, self.require = url.rstrip("/"), require
        self.warn = warn or (lambda line: print(f"warning: {line}", file=sys.stderr))
        self.disabled = False
        self.fetched = self.uploaded = 0
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as e:
            raise CacheError(f"--cache-url {redact_url(url)}: {e}") from None
        # Object stores have no folders; a local or mounted filesystem needs them made.
        if hasattr(self.fs, "auto_mkdir"):
            self.fs.auto_mkdir = True

    def _failed(self, what: str, error: Exception) -> None:
        line = f"remote cache {redact_url(self.url)} {what} failed ({type(error).__name__}); continuing with the local cache only"
        if self.require:
            raise CacheError(line.split(";")[0] + "; --require-remote-cache is set") from None
        if not self.disabled:
            self.warn(line)
        self.disabled = True

    def _blob(self, sha: str) -> str:
        return f"{self.root}/blobs/{sha[:2]}/{sha}"

    def _manifest(self, stage: str, key: str) -> str:
        return f"{self.root}/{stage}/{key}/{MANIFEST}"

    def fetch(self, stage: str, key: str, dest: Path) -> bool:
        """Download the entry into ``dest`` with every file's hash checked; False when absent or bad.

        An entry whose file does not match its manifest's hash is deleted from
        the remote, so that the rebuilt one replaces it.
        """
        if self.disabled:
            return False
        try:
            try:
                manifest = json.loads(self.fs.cat_file(self._manifest(stage, key)))
            except FileNotFoundError:
                return False
            for rel, sha in manifest.get("files", {}).items():
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.fs.get_file(self._blob(sha), str(target))
                except FileNotFoundError:
                    return self._discard(stage, key, f"{rel} is missing")
                if sha256_file(target) != sha:
                    return self._discard(stage, key, f"{rel} does not match its sha256", sha)
        except Exception as e:  # a remote that is down must not fail the build
            self._failed("download", e)
            return False
        _write_json(dest / MANIFEST, manifest)
        self.fetched += 1
        return True

    def _discard(self, stage: str, key: str, why: str, bad_blob: str | None = None) -> bool:
        self.warn(f"remote cache entry {stage}/{key}: {why}; discarded, it will be rebuilt")
        for path in [self._manifest(stage, key)] + ([self._blob(bad_blob)] if bad_blob else []):
            try:
                self.fs.rm(path)
            except FileNotFoundError:
                pass
        return False

    def upload(self, entry: Entry) -> None:
        """Upload the entry's files (as blobs), then its manifest."""
        if self.disabled:
            return
        try:
            for rel, sha in entry.manifest["files"].items():
                blob = self._blob(sha)
                if not self.fs.exists(blob):
                    self.fs.put_file(str(entry.path / rel), blob)
            self.fs.pipe_file(self._manifest(entry.stage, entry.key), (entry.path / MANIFEST).read_bytes())
            self.uploaded += 1
        except Exception as e:
            self._failed("upload", e)
