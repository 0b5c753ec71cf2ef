"""The stage cache: keys, the local store, locks and manifests.

An entry is ``<root>/<stage>/<key>/`` holding the stage's files and a
``manifest.json`` (key, inputs, fields, versions, sha256 of every file,
seconds, peak RSS). It is written in a temporary folder and published by one
atomic rename, so a crash never leaves a half entry that looks whole; a file
lock per key stops two runs from building the same entry twice. Published
files are read-only.

Every hit is checked against its manifest before anything uses it: a fast
path compares each file's size, mtime and inode with the state recorded when
its sha256 last matched (``<root>/.state/<stage>/<key>.json``, as DVC keeps a
state of known-good files); a file whose stat changed is hashed again. An entry
that fails is discarded with one warning and rebuilt.

Temporary folders (``<root>/.tmp/<stage>-<key>-p<pid>-*``) belong to the run
holding the key's lock; those of runs no longer alive are swept away.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock, Timeout

from sdbuild.errors import SdbuildError

MANIFEST = "manifest.json"
KEY_LENGTH = 24
STATE = ".state"
TEMP = ".tmp"
SCRATCH = ".scratch"
# Errors that mean "the disk (or the file size limit) is full", not a bug.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# ``<stage>-<key>-p<pid>-<random>``: a build's work folder, owned by the run holding the key's lock.
_WORK_NAME = re.compile(r"^(?P<stage>[a-z_]+)-(?P<key>[0-9a-f]{6,64})(?:-|$)")
# Other temporary folders end in ``-p<pid>-<8 random>`` (tempfile.mkdtemp's suffix).
_PID_NAME = re.compile(r"-p(?P<pid>\d+)-[a-z0-9_]{8}$|^\.old-.*-(?P<oldpid>\d+)$")


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


# Where input_digest remembers the digests of the user's input files (set per run by ``prepare``).
_input_state: Path | None = None


def remember_input_digests(state_file: Path | None) -> None:
    """Keep ``input_digest``'s results in ``state_file`` (normally ``cache/.state/inputs.json``); None: don't."""
    global _input_state
    _input_state = Path(state_file) if state_file else None


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def input_digest(path: Path) -> str:
    """sha256 of a user's input file (checkpoint, LoRA, embedding…) that enters a cache key.

    Remembered by the file's size, mtime, ctime and inode, as the cache's own
    files are: a warm plan of a 7 GB checkpoint reads none of it, and a file
    changed in any way (a write always moves ctime) is hashed again.
    """
    path = Path(path).resolve()
    if _input_state is None:
        return sha256_file(path)
    try:
        known = json.loads(_input_state.read_text())
    except (OSError, ValueError):
        known = {}
    stat_key = _stat_key(path)
    seen = known.get(str(path))
    if isinstance(seen, dict) and seen.get("stat") == stat_key and isinstance(seen.get("sha256"), str):
        return seen["sha256"]
    digest = sha256_file(path)
    if _stat_key(path) == stat_key:  # unchanged while it was read
        known[str(path)] = {"stat": stat_key, "sha256": digest}
        try:
            write_json_atomic(_input_state, known)
        except OSError:
            pass  # a read-only cache only costs the next run a hash
    return digest


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


def file_stat(path: Path) -> list[int]:
    """What the fast check compares: size, mtime (ns) and inode."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()} - {MANIFEST}


def _seal(root: Path) -> None:
    """Make every file under ``root`` read-only: a published entry is never edited in place."""
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            p.chmod(stat.S_IMODE(p.stat().st_mode) & ~0o222)


FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


def clone_file(src, dst) -> str:
    """Copy ``src`` to a new, writable file ``dst``; returns how: ``reflink`` or ``copy``.

    A reflink (copy-on-write: instant, no space used until one side changes)
    where the filesystem can (btrfs, XFS, APFS via ``cp -c``…), else a byte
    copy (``copy_file_range`` in the kernel where it can). Never a hard link:
    a bundle must not share a writable inode with the cache.
    """
    # A full disk leaves as DiskFullError, not OSError: shutil.copytree would fold it into a list of strings.
    with disk_full_as_error(dst), open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            import fcntl

            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
            return "reflink"
        except (OSError, ImportError):
            pass
        try:
            while os.copy_file_range(fin.fileno(), fout.fileno(), 1 << 30):
                pass
        except (OSError, AttributeError) as e:
            if isinstance(e, OSError) and e.errno in DISK_FULL:
                raise
            fin.seek(0)
            fout.seek(0)
            fout.truncate()
            shutil.copyfileobj(fin, fout, 1 << 22)
    return "copy"


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def pid_alive(pid: int, since: float | None = None) -> bool:
    """Whether process ``pid`` runs and (given ``since``, a file time) started before then."""
    import psutil

    if pid == os.getpid():
        return True
    try:
        proc = psutil.Process(pid)
        # A process that started after the folder was last written cannot own it (pid reuse).
        return proc.status() != psutil.STATUS_ZOMBIE and (since is None or proc.create_time() <= since + 1)
    except psutil.Error:
        return False


class DiskFullError(SdbuildError):
    """No space left on a device (or over the file size limit): ``oserror`` is what the system said."""

    def __init__(self, message: str, oserror: OSError | None = None):
        super().__init__(message)
        self.oserror = oserror


def disk_full_line(error: OSError, path: Path | str) -> str:
    """One line for a full disk: what was being written (``path``, the file if known) and how to go on."""
    file = f" (writing {error.filename})" if error.filename and str(error.filename) != str(path) else ""
    return f"{path}: no space left on the device: {os.strerror(error.errno)}{file}; nothing was published: free some space and run again"


def as_disk_full(error: BaseException) -> OSError | None:
    """The OSError saying the disk is full behind ``error``, if that is what it is."""
    if isinstance(error, DiskFullError):
        return error.oserror
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        return error
    return None


@contextmanager
def disk_full_as_error(path: Path | str):
    """Turn a full disk met inside the block into one DiskFullError line naming ``path``."""
    try:
        yield
    except (OSError, DiskFullError) as e:
        full = as_disk_full(e)
        if full is None:
            raise
        raise DiskFullError(disk_full_line(full, path), full) from None


def stage_tmpdir(out: Path) -> Path | None:
    """The TMPDIR for a stage writing ``out`` (a work folder's ``entry/``): beside it, removed with it."""
    tmp = Path(out).parent / "tmp"
    return tmp if Path(out).name == "entry" and tmp.is_dir() else None


class LocalCache:
    """The cache under ``root`` (normally ``artifacts/cache``).

    ``verify_hashes`` makes every hit hash all its files (no fast path);
    ``warn`` prints one line (default: ``warning: …`` on stderr).
    """

    def __init__(self, root: Path, remote: "RemoteCache | None" = None, *, verify_hashes: bool = False, warn: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.remote = remote
        self.verify_hashes = verify_hashes
        self.warn = warn or (lambda line: print(f"warning: {line}", file=sys.stderr, flush=True))

    def entry_path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def _lock(self, stage: str, key: str) -> FileLock:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        return FileLock(str(locks / f"{stage}-{key}.lock"))

    def _state_path(self, stage: str, key: str) -> Path:
        return self.root / STATE / stage / f"{key}.json"

    def get(self, stage: str, key: str) -> Entry | None:
        """The published entry, or None. An entry without a readable manifest does not exist."""
        path = self.entry_path(stage, key)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        except OSError:
            return None
        if not isinstance(manifest, dict) or manifest.get("key") != key or not isinstance(manifest.get("files"), dict):
            return None
        return Entry(stage, key, path, manifest)

    # --- checking an entry against its manifest ---------------------------------

    def _known_good(self, entry: Entry) -> dict:
        try:
            state = json.loads(self._state_path(entry.stage, entry.key).read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def _record_good(self, entry: Entry) -> None:
        """Remember each file's stat as known good (its sha256 matched just now)."""
        try:
            state = {rel: file_stat(entry.path / rel) for rel in entry.manifest["files"]}
            write_json_atomic(self._state_path(entry.stage, entry.key), state)
        except OSError:
            pass  # no state only means the next hit hashes again

    def stale_files(self, entry: Entry) -> list[str]:
        """Files of ``entry`` whose size, mtime or inode differ from when they last matched (or that are missing)."""
        state = self._known_good(entry)
        out = []
        for rel in entry.manifest["files"]:
            try:
                if state.get(rel) != file_stat(entry.path / rel):
                    out.append(rel)
            except OSError:
                out.append(rel)
        return out

    def check(self, entry: Entry, full: bool = False) -> str | None:
        """None when ``entry`` matches its manifest, else what is wrong (one phrase).

        Files whose stat matches the known-good state are trusted (the fast
        path); the others, or all with ``full``, are hashed.
        """
        want = entry.manifest["files"]
        have = _files_under(entry.path)
        for rel in sorted(set(want) - have):
            return f"{rel} is missing"
        for rel in sorted(have - set(want)):
            return f"{rel} is not in its manifest"
        suspects = list(want) if full else self.stale_files(entry)
        for rel in suspects:
            try:
                if sha256_file(entry.path / rel) != want[rel]:
                    return f"{rel} does not match its sha256"
            except OSError as e:
                return f"{rel} cannot be read ({e.strerror})"
        if suspects:
            self._record_good(entry)
        return None

    def status(self, stage: str, key: str) -> str:
        """``cached`` (passes the fast check), ``stale`` (a run will re-hash it, and rebuild it if bad) or ``to build``."""
        entry = self.get(stage, key)
        if entry is None:
            return "stale" if self.entry_path(stage, key).exists() else "to build"
        if _files_under(entry.path) != set(entry.manifest["files"]) or self.stale_files(entry):
            return "stale"
        return "cached"

    def _discard(self, stage: str, key: str) -> None:
        """Move the entry out of the way (one rename), then delete it. Hold the key's lock."""
        final = self.entry_path(stage, key)
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f"old-p{os.getpid()}-", dir=_mkdirs(self.root / TEMP)))
            final.rename(trash / "entry")
            _remove_tree(trash)
        self._state_path(stage, key).unlink(missing_ok=True)

    # --- building ------------------------------------------------------------------

    def work_dir(self, stage: str, key: str) -> Path:
        """A fresh folder in the cache's temp area: ``entry/`` becomes the entry, ``tmp/`` is the stage's TMPDIR."""
        work = Path(tempfile.mkdtemp(prefix=f"{stage}-{key}-p{os.getpid()}-", dir=_mkdirs(self.root / TEMP)))
        (work / "entry").mkdir()
        (work / "tmp").mkdir()
        return work

    def build(self, stage: str, key: str, produce: Callable[[Path], dict], record: dict, force: bool = False) -> tuple[Entry, str]:
        """Return the entry for (stage, key), building it with ``produce(tmp_dir)`` if absent.

        ``produce`` writes the stage's files into ``tmp_dir`` and returns facts
        for the manifest (it may include ``seconds`` and ``peak_rss_bytes``).
        ``record`` is what the key was made of (fields, upstream, versions).
        Returns (entry, how): ``hit`` (local cache, checked against its
        manifest), ``remote`` (downloaded from the remote cache, every file
        hashed) or ``miss`` (built here, then uploaded to the remote). A local
        entry that fails its check is discarded with one warning and rebuilt.
        A full disk is one DiskFullError line; nothing is published.
        """
        from sdbuild import faults

        with self._lock(stage, key), disk_full_as_error(self.root):
            existing = self.get(stage, key)
            if not force:
                problem = self.check(existing, full=self.verify_hashes) if existing else None
                if existing and problem is None:
                    return existing, "hit"
                if existing or self.entry_path(stage, key).exists():
                    why = problem or f"{MANIFEST} is missing or unreadable"
                    self.warn(f"cache entry {stage}/{key}: {why}; discarded, it will be rebuilt")
                    self._discard(stage, key)
            if self.remote is not None and not force:
                work = self.work_dir(stage, key)
                try:
                    if self.remote.fetch(stage, key, work / "entry"):
                        _seal(work / "entry")
                        self._publish(work / "entry", stage, key)
                        entry = self.get(stage, key)
                        self._record_good(entry)  # fetch hashed every file
                        return entry, "remote"
                finally:
                    _remove_tree(work)
            work = self.work_dir(stage, key)
            tmp = work / "entry"
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
                _seal(tmp)
                faults.point("before-publish", stage, key)
                self._publish(tmp, stage, key)
            finally:
                _remove_tree(work)
            entry = Entry(stage, key, self.entry_path(stage, key), manifest)
            self._record_good(entry)
            faults.point("after-publish", stage, key)
            if self.remote is not None:
                self.remote.upload(entry)
        return entry, "miss"

    def _publish(self, tmp: Path, stage: str, key: str) -> None:
        """Make the finished folder ``tmp`` the entry, in one rename."""
        final = self.entry_path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        self._state_path(stage, key).unlink(missing_ok=True)
        if final.exists():
            # --force: move the old entry aside first; the new one replaces it in one rename.
            trash = Path(tempfile.mkdtemp(prefix=f"old-p{os.getpid()}-", dir=self.root / TEMP))
            final.rename(trash / "entry")
            tmp.rename(final)
            _remove_tree(trash)
        else:
            tmp.rename(final)

    # --- listing, verifying, collecting --------------------------------------------

    def _entry_dirs(self) -> list[tuple[str, Path]]:
        if not self.root.is_dir():
            return []
        return [
            (stage_dir.name, key_dir)
            for stage_dir in sorted(self.root.iterdir())
            if not stage_dir.name.startswith(".") and stage_dir.is_dir()
            for key_dir in sorted(stage_dir.iterdir())
        ]

    def entries(self) -> list[Entry]:
        return [e for stage, path in self._entry_dirs() if (e := self.get(stage, path.name))]

    def verify(self) -> list[tuple[Entry | str, str]]:
        """Re-hash every entry: (entry, problem) for each that does not match its manifest,
        (``stage/key``, problem) for a folder whose manifest is missing or unreadable, and
        (``.tmp/name``, problem) for a temporary folder of a run that is no longer alive."""
        problems: list[tuple[Entry | str, str]] = []
        for stage, path in self._entry_dirs():
            entry = self.get(stage, path.name)
            if entry is None:
                problems.append((f"{stage}/{path.name}", f"{MANIFEST} is missing, truncated or unreadable"))
                continue
            problem = self.check(entry, full=True)
            if problem:
                problems.append((entry, problem))
        for leftover in self.dead_temps():
            problems.append((leftover.relative_to(self.root).as_posix(), "temporary folder of a run that is no longer alive (cache gc removes it)"))
        return problems

    def dead_temps(self, scratch: bool = False) -> list[Path]:
        """Temporary folders of runs no longer alive: ``.tmp/*`` (and ``.scratch/*`` with ``scratch``).

        A build's work folder is alive while its key's lock is held; other
        folders carry their run's pid. A folder that names neither is dead once a day old.
        """
        out = []
        folders = [(TEMP, p) for p in _children(self.root / TEMP)]
        if scratch:
            folders += [(SCRATCH, p) for p in _children(self.root / SCRATCH)]
        for kind, path in folders:
            work = _WORK_NAME.match(path.name)
            owner = _PID_NAME.search(path.name)
            if work and self._lock_free(work["stage"], work["key"]):
                out.append(path)
            elif not work and owner:
                pid = int(owner["pid"] or owner["oldpid"])
                if not pid_alive(pid, _mtime(path)):
                    out.append(path)
            elif not work and not owner and time.time() - _mtime(path) > 86400:
                out.append(path)
        return out

    def _lock_free(self, stage: str, key: str) -> bool:
        lock = self._lock(stage, key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        lock.release()
        return True

    def sweep(self, scratch: bool = False) -> int:
        """Remove the temporary folders of runs no longer alive; returns the bytes freed.

        The resumable stages' ``.scratch`` folders are kept unless ``scratch``:
        the next run of their key resumes from them.
        """
        freed = 0
        for leftover in self.dead_temps(scratch):
            freed += tree_bytes(leftover)
            _remove_tree(leftover)
        return freed

    def gc(self, keep: set[tuple[str, str]]) -> tuple[int, int]:
        """Delete entries not in ``keep`` and temporary folders of dead runs; returns (entries, bytes) freed."""
        count = freed = 0
        for stage, path in self._entry_dirs():
            if (stage, path.name) not in keep:
                with self._lock(stage, path.name):
                    freed += tree_bytes(path)
                    self._discard(stage, path.name)
                    count += 1
        freed += self.sweep(scratch=True)
        return count, freed


def sweep_build_temps(builds: Path) -> int:
    """Remove staging folders (``.tmp-<name>-p<pid>-*``, ``.old-<name>-<pid>``) of runs no longer alive; bytes freed."""
    freed = 0
    for path in _children(Path(builds)):
        if not path.name.startswith((".tmp-", ".old-")):
            continue
        owner = _PID_NAME.search(path.name)
        dead = not pid_alive(int(owner["pid"] or owner["oldpid"]), _mtime(path)) if owner else time.time() - _mtime(path) > 86400
        if dead:
            freed += tree_bytes(path)
            _remove_tree(path)
    return freed


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(Path(folder).iterdir())
    except OSError:
        return []


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def _mkdirs(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


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
