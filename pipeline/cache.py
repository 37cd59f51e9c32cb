"""Content-addressed per-clip feature cache, shared by the three feature stages.

One entry per (clip content, encoder, result-changing params): an .npz of the
clip's arrays plus a JSON `meta` (ok or the failure reason, notes, the key it was
written for, the clip's content hash, and the entry's sha256 and array shapes).
Keys are hashes, so

  * a stage killed halfway (Ctrl-C, kill -9, out of memory) resumes where it
    stopped: every finished clip is already on disk;
  * adding 10 clips to a large corpus extracts those 10 only;
  * stage processes, local workers and Dask workers on other machines can all
    write into one shared directory: the same key always holds the same result,
    every write is temp file + os.replace (a reader sees a whole entry or none),
    and a stage claims the clips it is about to extract (`Claims`, lock files)
    so that concurrent stages extract each clip once.

Nothing read back is trusted: `meta` checks that the entry was written for the
key it lies under (a valid entry copied or renamed over another clip's is not that
clip's result), `get` also checks the arrays against the entry's checksum (which
covers the key) and recorded shapes; either raises DamagedEntry (a flipped bit, a
file cut short by a bad copy, a hand-made file, two entries swapped); the runner
moves such an entry aside (`<stage>/.damaged/`, safe to delete), extracts the clip
again and lists it in its report.

Sharing: files are created as the umask allows (group-readable with umask 022).
A folder made inside a setgid folder (one set up for a group: `chgrp team DIR;
chmod 2775 DIR`) takes that folder's group permissions, whatever the umask, so
every member of the group can add clips to a cache one of them started. Temp
files, locks and attempt folders name their owner (pid@host); those whose owner
is gone are swept at the next start.

The cache lives outside the DVC outputs (params `cache.dir`, env MSA_CACHE_DIR)
and is safe to delete at any time.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import errors
from .params import param, section


@section("cache")
@dataclass
class CacheParams:
    dir: str = param(".cache/features", doc="content-addressed per-clip feature cache (env MSA_CACHE_DIR overrides)")

    def root(self) -> Path:
        """The cache folder: the MSA_CACHE_DIR environment variable wins over params."""
        return Path(os.environ.get("MSA_CACHE_DIR") or self.dir)


def make_key(*parts) -> str:
    """sha256 of the JSON form of `parts` (content hashes, encoder id/revision, params)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# OSErrors that are the disk's, not the clip's: the stage stops with one line (runner.stage_main)
DISK_FULL = errors.DISK_FULL
HEARTBEAT_S = 30.0     # a stage refreshes the lock files of the clips it is extracting this often, so
LOCK_STALE_S = 120.0   # a lock untouched this long is abandoned (its holder died or hangs);
STALE_S = 3600.0       # a temp file or attempt folder of another host untouched this long, likewise


def owner() -> str:
    """pid@host of this process: put into temp file names, lock files and attempt folders."""
    return f"{os.getpid()}@{socket.gethostname()}"


def owner_gone(who: str, mtime: float, max_age: float) -> bool:
    """Whether the owner (pid@host) of a file touched at `mtime` is gone: a dead process on this
    host, or (another host, no owner recorded, or a pid that may have been reused) untouched for max_age s."""
    pid, _, host = who.partition("@")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            pass
    return time.time() - mtime > max_age


def file_mode(folder: bool = False) -> int:
    """0o666 (folders 0o777) less the umask: what open() and mkdir() give, and mkstemp/mkdtemp (0600) do not."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):  # no /proc: read it by setting it (not thread-safe)
        umask = os.umask(0o022)
        os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def share_like_parent(folder: str | os.PathLike) -> None:
    """Give a new folder its parent's group permissions (and setgid) when the parent is setgid: a folder
    set up for a group stays writable by the group below it, whatever the umask of whoever adds to it."""
    parent = os.stat(Path(folder).parent).st_mode
    if parent & stat.S_ISGID:
        mode = stat.S_IMODE(os.stat(folder).st_mode)
        os.chmod(folder, mode | (parent & 0o070) | stat.S_ISGID)


def make_dirs(path: str | os.PathLike) -> None:
    """mkdir -p, each new folder shared like its parent (share_like_parent)."""
    path, missing = Path(path), []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:  # made by another process just now
            continue
        share_like_parent(folder)


def _file_mode_in(folder: Path) -> int:
    """file_mode(), plus group read in a setgid folder (one set up for a group)."""
    parent = os.stat(folder).st_mode
    return file_mode() | (parent & 0o040 if parent & stat.S_ISGID else 0)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(file_object) on a temp file beside `path` (named after its owner, so a later run can
    sweep it if this process dies), then rename it into place with the umask's permissions. On any
    failure the temp file is removed; an OSError (a full disk, no permission) names `path`."""
    path = Path(path)
    make_dirs(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{owner()}.", suffix=".tmp")
    except OSError as err:
        raise _naming(err, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _file_mode_in(path.parent))
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError) and err.filename in (None, tmp):
            raise _naming(err, path) from None
        raise


def _naming(err: OSError, path: Path) -> OSError:
    """The same error (same class, errno and message) naming the file meant, not its temp file."""
    return type(err)(err.errno, err.strerror or str(err), str(path)) if err.errno else err


# .<target>.<pid@host>.<random>.tmp, as atomic_write and Claims name them (older: .<target>.<random>.tmp)
_TEMP = re.compile(r"\.(?P<target>.+)\.(?P<owner>\d+@.+)\.\w+\.tmp")


def sweep_temp_files(folder: str | os.PathLike, recursive: bool = False) -> int:
    """Remove the temp files in `folder` whose writer is gone (a kill -9 mid-write); returns how many."""
    folder, removed = Path(folder), 0
    if not folder.is_dir():
        return 0
    for tmp in folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp"):
        match = _TEMP.fullmatch(tmp.name)
        try:
            if owner_gone(match["owner"] if match else "", tmp.stat().st_mtime, STALE_S):
                tmp.unlink()
                removed += 1
        except FileNotFoundError:  # swept by another process
            pass
    return removed


def checksum(arrays: dict[str, np.ndarray], key: str = "") -> str:
    """sha256 over the key and the names, dtypes, shapes and bytes of an entry's arrays."""
    h = hashlib.sha256(f"{key}|".encode())
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class DamagedEntry(Exception):
    """A cache entry that exists but cannot be trusted; the message says why."""


@dataclass
class Entry:
    meta: dict                                   # {"ok": bool, "reason", "key", "content", "sha256", "shapes", ...}
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.meta.get("ok"))


def _why(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")


class FeatureCache:
    """<root>/<stage>/<key[:2]>/<key>.npz (+ <key>.lock while a stage extracts it)"""

    def __init__(self, root: str | os.PathLike, stage: str):
        self.dir = Path(root) / stage

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npz"

    def has(self, key: str) -> bool:
        """An entry file exists (whether it can be trusted is checked when it is read)."""
        return self.path(key).exists()

    def _read(self, key: str, arrays: bool) -> tuple[dict, dict] | None:
        try:
            with np.load(self.path(key), allow_pickle=False) as z:
                data = {k: z[k] for k in z.files} if arrays else {"__meta__": z["__meta__"]}
            meta = json.loads(str(data.pop("__meta__")))
        except FileNotFoundError:
            return None
        except Exception as err:  # noqa: BLE001 - whatever stops the read (bad zip, CRC, JSON, not an npz)
            raise DamagedEntry(f"{'unreadable' if arrays else 'metadata unreadable'} ({_why(err)})") from None
        if not isinstance(meta, dict) or "sha256" not in meta or not isinstance(meta.get("shapes"), dict):
            raise DamagedEntry("no checksum (not written by this cache)")
        if meta.get("key") != key:  # a valid entry, but another clip's (swapped, copied over, renamed)
            raise DamagedEntry(f"written for another key ({str(meta['key'])[:16]}...)" if meta.get("key")
                               else "records no key (written by an older version of the cache)")
        return meta, data

    def meta(self, key: str) -> dict | None:
        """The entry's metadata alone (its arrays are not read); None when there is no entry.
        Raises DamagedEntry when the metadata cannot be read, carries no checksum or another key."""
        found = self._read(key, arrays=False)
        return found[0] if found else None

    def get(self, key: str) -> Entry | None:
        """The entry, its arrays checked against the recorded shapes and checksum; None when there is
        no entry. Raises DamagedEntry when it cannot be read or fails a check."""
        found = self._read(key, arrays=True)
        if found is None:
            return None
        meta, arrays = found
        shapes = {k: list(v.shape) for k, v in arrays.items()}
        if shapes != meta["shapes"]:
            raise DamagedEntry(f"arrays {shapes} differ from the recorded shapes {meta['shapes']}")
        if checksum(arrays, key) != meta["sha256"]:
            raise DamagedEntry("checksum mismatch")
        return Entry(meta, arrays)

    def put(self, key: str, arrays: dict[str, np.ndarray], content: str = "", **meta) -> None:
        """Write the entry of `key`; `content` is the clip's content hash (what the key was made from)."""
        meta.setdefault("ok", True)
        payload = {k: np.asarray(v) for k, v in arrays.items()}
        meta.update(key=key, content=content, shapes={k: list(v.shape) for k, v in payload.items()},
                    sha256=checksum(payload, key))
        payload["__meta__"] = np.array(json.dumps(meta))
        atomic_write(self.path(key), lambda f: np.savez(f, **payload))

    def put_failure(self, key: str, reason: str, content: str = "") -> None:
        """Record a clip whose input is bad (deterministic), so re-runs do not retry it."""
        self.put(key, {}, content=content, ok=False, reason=reason)

    def move_aside(self, key: str) -> Path:
        """Move a damaged entry into <stage>/.damaged/ (kept for a look; safe to delete)."""
        dest = self.dir / ".damaged" / f"{key}.npz"
        make_dirs(dest.parent)
        try:
            os.replace(self.path(key), dest)
        except FileNotFoundError:  # another process moved or replaced it first
            pass
        return dest

    def sweep(self) -> None:
        """Remove temp files and lock files left by processes that are gone."""
        sweep_temp_files(self.dir, recursive=True)
        self.sweep_locks()

    def sweep_locks(self) -> None:
        """Remove the lock files whose holder is gone."""
        for lock in self.dir.glob("*/*.lock") if self.dir.is_dir() else []:
            Claims.remove_if_stale(lock)


def _holder(lock: Path) -> str:
    try:
        return lock.read_text().strip()
    except FileNotFoundError:
        return ""


class Claims:
    """Lock files saying "this process is extracting that clip": <key>.lock next to the entry, holding pid@host.

    `take(key)` wins the lock, or breaks it when stale (its holder is a dead process on this host, or has
    not refreshed it for LOCK_STALE_S: a thread touches every held lock each HEARTBEAT_S, so a busy holder
    on another machine is never taken for dead). A lock is made complete, then hard-linked into place, so
    it is never seen empty. Two processes breaking one stale lock at the same moment may both extract that
    clip: the same result, written atomically; only the work is doubled. Breaking a lock sweeps the cache's
    other stale locks too: a dead holder's claims go when the first of them is taken over, not at the next run.
    """

    def __init__(self, cache: FeatureCache):
        self.cache, self.held, self._broken = cache, set(), set()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="cache-claims", daemon=True)

    def lock(self, key: str) -> Path:
        return self.cache.path(key).with_suffix(".lock")

    def take(self, key: str) -> bool:
        lock = self.lock(key)
        make_dirs(lock.parent)
        mine = lock.with_name(f".{lock.name}.{owner()}.link.tmp")
        try:
            mine.write_text(owner())
            for _ in range(2):
                try:
                    os.link(mine, lock)
                except FileExistsError:
                    holder = _holder(lock)
                    if not self.remove_if_stale(lock):
                        return False
                    if holder not in self._broken:  # its other claims are as dead as this one
                        self._broken.add(holder)
                        self.cache.sweep_locks()
                    continue
                self.held.add(key)
                return True
            return False
        finally:
            mine.unlink(missing_ok=True)

    @staticmethod
    def remove_if_stale(lock: Path) -> bool:
        """Remove a lock whose holder is gone; True when it is gone now."""
        try:
            if not owner_gone(lock.read_text().strip(), lock.stat().st_mtime, LOCK_STALE_S):
                return False
            lock.unlink()
        except FileNotFoundError:
            pass
        return True

    def release(self, keys) -> None:
        for key in list(keys):
            if key in self.held:
                self.lock(key).unlink(missing_ok=True)
                self.held.discard(key)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            for key in list(self.held):
                try:
                    os.utime(self.lock(key))
                except FileNotFoundError:
                    pass

    def __enter__(self) -> Claims:
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._beat.join()
        self.release(self.held)
