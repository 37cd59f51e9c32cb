"""Content-addressed per-clip feature cache, shared by the three feature stages.

One entry per (clip content, encoder, result-changing params): an .npz of the
clip's arrays plus a JSON `meta` (ok or the failure reason, notes). Keys are
hashes, so

  * a stage killed halfway (Ctrl-C, kill -9, out of memory) resumes where it
    stopped: every finished clip is already on disk;
  * adding 10 clips to a large corpus extracts those 10 only;
  * local workers and (later) Dask workers on other machines can all write into
    one shared directory without coordination: the same key always holds the
    same result, and every write is temp file + os.replace, so a reader sees a
    whole entry or none.

The cache lives outside the DVC outputs (params `cache.dir`, env MSA_CACHE_DIR)
and is safe to delete at any time.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(file_object) on a temp file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@dataclass
class Entry:
    meta: dict                                   # {"ok": bool, "reason": str, ...}
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.meta.get("ok"))


class FeatureCache:
    """<root>/<stage>/<key[:2]>/<key>.npz"""

    def __init__(self, root: str | os.PathLike, stage: str):
        self.dir = Path(root) / stage

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npz"

    def __contains__(self, key: str) -> bool:
        """A readable entry exists (opening reads only the zip directory at the file's end,
        so a file cut short by a crash or a bad copy counts as missing and is recomputed)."""
        try:
            with np.load(self.path(key), allow_pickle=False) as z:
                return "__meta__" in z.files
        except (FileNotFoundError, OSError, ValueError, zipfile.BadZipFile, EOFError):
            return False

    def get(self, key: str) -> Entry | None:
        """The entry, or None when absent or unreadable (an unreadable entry is a miss)."""
        try:
            with np.load(self.path(key), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (FileNotFoundError, OSError, ValueError, zipfile.BadZipFile, EOFError):
            return None
        meta = json.loads(str(arrays.pop("__meta__")))
        return Entry(meta, arrays)

    def meta(self, key: str) -> dict | None:
        """The entry's metadata alone (its arrays are not read), or None when absent or unreadable."""
        try:
            with np.load(self.path(key), allow_pickle=False) as z:
                return json.loads(str(z["__meta__"]))
        except (FileNotFoundError, OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            return None

    def put(self, key: str, arrays: dict[str, np.ndarray], **meta) -> None:
        meta.setdefault("ok", True)
        payload = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        payload["__meta__"] = np.array(json.dumps(meta))
        atomic_write(self.path(key), lambda f: np.savez(f, **payload))

    def put_failure(self, key: str, reason: str) -> None:
        """Record a clip whose input is bad (deterministic), so re-runs do not retry it."""
        self.put(key, {}, ok=False, reason=reason)
