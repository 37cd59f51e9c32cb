"""Fault injection: what the feature stages survive. tests/test_faults.py runs a few of each fault
on tiny encoders; this command runs more, on the demo corpus and the real encoders, and prints the
figures of docs/faults.md:

    python -m tools.faults --corpus raw/demo --clips 12 --points 10 --seed 0

A project folder (params.yaml, features/manifest.parquet, its own cache) goes through each feature
stage as DVC runs it (`stage_main`, from the project folder), and every outcome is compared with a
reference run on an empty cache:

  kill -9      the stage process SIGKILLs itself right after its N-th disk event (a temp file made,
               completed or renamed into place, a lock taken or released, a Parquet row group
               written), N drawn at random from the events of the reference run; then the stage is run
               again. The disk only changes at these events, so every state a kill at any moment can
               leave is one of those sampled;
  damaged      cache entries damaged in each way of DAMAGE (a swap damages two), as many per run as
               the good entries allow, then the stage run again: each damaged entry, and nothing
               else, must be listed under `repaired`;
  ENOSPC       os.fsync raises "No space left on device" from its N-th call on: the stage must stop
               with one line (exit 2) and leave no temp file; then a normal run. (Real short writes:
               `run_on_small_disk`, a tmpfs of a few kB, which tests/test_faults.py uses);
  dead worker  acoustic on a 2-worker Dask LocalCluster whose worker process is killed in the middle
               of two clips.

"Identical" means: the same table (ids and every value), the same failures with the same reasons,
every segment a row or a failure, and nothing left behind (temp files, locks, attempt folders).

The reference itself is checked against a yardstick that does not come from the stage: for a few
segments, features computed straight from the extractor (the stage's own per-clip functions, no
cache, no runner: `extracted_directly`), and where a known-good run's checksums were stored
(`known_good`; tests/data/faults_known_good.json for the test corpus), those. A deterministic bug in
the stage (a row holding another clip's entry) therefore fails every scenario, not none.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import io
import json
import multiprocessing
import os
import random
import signal
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

STAGES = ("text", "visual", "acoustic")


# --------------------------------------------------------------------------- a project, run in-process

def make_project(folder: Path, params: dict, manifest) -> Path:
    """A folder holding params.yaml (its cache inside the folder) and features/manifest.parquet."""
    import yaml

    (folder / "features").mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump({**params, "cache": {"dir": str(folder / "cache")}}))
    manifest.to_parquet(folder / "features" / "manifest.parquet")
    return folder


def run_stage_in(project: Path, stage: str) -> tuple[int, str, str]:
    """Run a feature stage as `python -m stages.<stage>` would, in this process -> (exit code, stdout, stderr)."""
    from pipeline.features.runner import stage_main

    module = importlib.import_module(f"pipeline.features.{stage}")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(project), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = stage_main(stage, module, ["features/manifest.parquet", f"features/{stage}.parquet"])
    return rc, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------- the yardstick

EXACT = {"text": ("n_tokens", "token_ids", "truncated"), "visual": ("n_frames", "timestamps", "face_found"),
         "acoustic": ("n_frames",)}                       # columns equal on every machine (no float arithmetic)
VALUES = {"text": "hidden", "visual": "emb", "acoustic": "feats"}  # the features proper (float, machine rounding)


def extracted_directly(project: Path, stage: str, ids: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """id -> the columns of its row, computed straight from the stage's extractor for that one segment: its
    per-clip functions and encoder, no cache, no runner, no claims, no batching with other segments."""
    import pandas as pd
    import torch
    import yaml

    from pipeline import params
    from pipeline.features.encoders import load_image_encoder, load_text_encoder, resolve_image_encoder, resolve_text_encoder
    from pipeline.features import acoustic, text, visual
    from pipeline.data.media import read_audio

    raw = yaml.safe_load((project / "params.yaml").read_text())
    cfg = params.read(raw, params.SECTIONS[f"features.{stage}"])
    rows = pd.read_parquet(project / "features" / "manifest.parquet").set_index("id").loc[ids]
    out, cpu = {}, torch.device("cpu")
    if stage == "text":
        tokenizer, model = load_text_encoder(resolve_text_encoder(cfg.encoder), cpu)
        for id_, row in rows.iterrows():
            (tokens,), (full,) = text.tokenize(tokenizer, [row["text"]], cfg.max_length, cfg.lowercase)
            states = text.encode(model, torch.tensor([tokens]), torch.ones(1, len(tokens), dtype=torch.long),
                                 cfg.layers, cpu)[0].numpy()
            out[id_] = {"n_tokens": len(tokens), "token_ids": np.asarray(tokens), "truncated": full > cfg.max_length,
                        "hidden": states.astype(cfg.dtype)}
    elif stage == "visual":
        encoder = load_image_encoder(resolve_image_encoder(cfg.encoder, cfg.pretrained), cpu)
        for id_, row in rows.iterrows():
            clip = visual.decode_clip({"kind": row["media"], "settings": visual.settings_from(cfg),
                                       "path": row["image_path"] if row["media"] == "image" else row["video_path"],
                                       "duration": float(row["duration"]), "threads": 0, "image_size": encoder.image_size})
            with torch.inference_mode():
                emb = encoder(torch.from_numpy(clip["pixels"])).cpu().numpy()
            out[id_] = {"n_frames": len(emb), "timestamps": clip["timestamps"], "face_found": clip["face_found"],
                        "emb": emb.astype(cfg.dtype)}
    else:
        settings = acoustic.settings_from(cfg)
        for id_, row in rows.iterrows():
            feats = acoustic.acoustic_features(read_audio(row["audio_path"] or row["video_path"], cfg.sample_rate), settings)
            out[id_] = {"n_frames": len(feats), "feats": feats}
    return out


def _row(table, id_: str) -> dict[str, np.ndarray] | None:
    """One row of a feature table as numpy arrays (sequences flat), or None when the id has no row."""
    ids = table.column("id").to_pylist()
    if id_ not in ids:
        return None
    i = ids.index(id_)
    return {name: np.asarray(table.column(name)[i].as_py()) for name in table.column_names if name != "id"}


def exact_checksum(row: dict, stage: str) -> str:
    """sha256 of a row's EXACT columns: stored from a known-good run, compared on any machine."""
    import hashlib

    h = hashlib.sha256()
    for name in EXACT[stage]:
        value = np.asarray(row[name])
        value = value.astype(np.float64) if value.dtype.kind == "f" else value.astype(np.int64)
        h.update(f"{name}:{value.ravel().tolist()}|".encode())
    return h.hexdigest()


def known_good(table, stage: str) -> dict[str, dict]:
    """What to store of a run checked good: per row its exact checksum and its features' mean and spread."""
    out = {}
    for id_ in table.column("id").to_pylist():
        row = _row(table, id_)
        values = row[VALUES[stage]].astype(np.float64).ravel()
        out[id_] = {"exact": exact_checksum(row, stage), "mean": float(values.mean()), "std": float(values.std()),
                    "head": [round(float(v), 6) for v in values[:8]]}
    return out


def yardstick_problems(table, stage: str, truth: dict | None, known: dict | None) -> list[str]:
    """Where the table's rows differ from the segments' features extracted directly, or from the stored run."""
    problems = []
    for id_, want in (truth or {}).items():
        got = _row(table, id_)
        if got is None:
            problems.append(f"{id_}: no row")
            continue
        for name, value in want.items():
            value, have = np.asarray(value), got[name].reshape(np.shape(value)) if got[name].size == np.size(value) else None
            if name == VALUES[stage]:
                scale = float(np.abs(value).max(initial=0.0)) or 1.0
                same = have is not None and np.allclose(have.astype(np.float64), value.astype(np.float64), rtol=0,
                                                        atol=2e-2 * scale)
            else:
                same = have is not None and np.array_equal(have, value)
            if not same:
                problems.append(f"{id_}: {name} differs from the extractor's own result")
    for id_, want in (known or {}).items():
        got = _row(table, id_)
        if got is None:
            problems.append(f"{id_}: no row (the known-good run has one)")
            continue
        values = got[VALUES[stage]].astype(np.float64).ravel()
        scale = max(1.0, float(np.abs(values).max(initial=0.0)))
        if exact_checksum(got, stage) != want["exact"]:
            problems.append(f"{id_}: {', '.join(EXACT[stage])} differ from the known-good run")
        elif not (np.allclose([values.mean(), values.std()], [want["mean"], want["std"]], rtol=1e-3, atol=1e-3 * scale)
                  and np.allclose(values[:8], want["head"], rtol=0, atol=2e-2 * scale)):
            problems.append(f"{id_}: {VALUES[stage]} values differ from the known-good run")
    return problems


def outcome(project: Path, stage: str) -> dict:
    """What a run leaves that must not depend on faults: the table's data, failures and notes (with reasons)."""
    import pyarrow.parquet as pq

    path = project / "features" / f"{stage}.parquet"
    if not path.is_file():
        return {"table": None}
    table = pq.read_table(path)
    run = path.with_suffix(".run.json")  # the whole report (repairs, retries); the footer holds what is reproducible
    report = json.loads(run.read_text()) if run.is_file() else json.loads(table.schema.metadata[b"pipeline"])
    return {"table": table.replace_schema_metadata(None), "report": report,
            "failures": sorted((f["id"], f["reason"]) for f in report["failures"]),
            "notes": sorted((n["id"], n["note"]) for n in report["notes"])}


def differences(got: dict, want: dict, manifest_ids: list[str]) -> list[str]:
    """Why `got` is not the reference outcome `want` (empty when it is): the table, failures and notes as the
    reference's, and the rows as the yardstick (want["truth"], want["known"], where given) says."""
    if got["table"] is None:
        return ["no table written"]
    problems = [] if want["table"] is None or got["table"].equals(want["table"]) else ["table differs"]
    problems += [f"{k} differ: {got[k]} vs {want[k]}" for k in ("failures", "notes") if k in want and got[k] != want[k]]
    rows, listed = got["table"].column("id").to_pylist(), [i for i, _ in got["failures"]]
    if sorted(rows + listed) != sorted(manifest_ids):
        problems.append("segments neither a row nor a failure, or both")
    stage = got["report"]["stage"]
    return problems + yardstick_problems(got["table"], stage, want.get("truth"), want.get("known"))


def leftovers(project: Path) -> list[str]:
    """Temp files, lock files and attempt folders left under the project (none after a finished run)."""
    found = [*project.rglob("*.tmp"), *project.rglob("*.lock"), *project.rglob(".attempts")]
    return sorted(str(p.relative_to(project)) for p in found)


# --------------------------------------------------------------------------- kill -9 at a disk event

class DiskEvents:
    """Counts the disk events of this process under `root` (see the module doc); with kill_at N, the
    process SIGKILLs itself right after the N-th. Installed by patching os, tempfile and pyarrow."""

    def __init__(self, root: Path, kill_at: int = 0):
        self.root, self.kill_at, self.count, self._undo = str(Path(root).resolve()), kill_at, 0, []
        self.fsyncs = 0  # completed writes: where ENOSPC can strike

    def _event(self, name: str, path=None) -> None:
        if path is not None and not os.path.abspath(os.fspath(path)).startswith(self.root):
            return
        self.count += 1
        self.fsyncs += name == "fsync"
        if self.count == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def _wrap(self, owner, name: str, path_of) -> None:
        real = getattr(owner, name)

        def wrapped(*args, **kwargs):
            result = real(*args, **kwargs)
            self._event(name, path_of(args, kwargs, result))
            return result
        setattr(owner, name, wrapped)
        self._undo.append((owner, name, real))

    def __enter__(self) -> DiskEvents:
        import pyarrow.parquet as pq

        self._wrap(tempfile, "mkstemp", lambda a, k, r: r[1])
        self._wrap(os, "fsync", lambda a, k, r: None)
        for name in ("replace", "link"):
            self._wrap(os, name, lambda a, k, r: a[1])
        self._wrap(os, "unlink", lambda a, k, r: a[0])
        self._wrap(pq.ParquetWriter, "write", lambda a, k, r: None)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, real in reversed(self._undo):
            setattr(owner, name, real)


def _killed_child(project: str, stage: str, kill_at: int) -> None:
    with DiskEvents(Path(project), kill_at):
        rc = run_stage_in(Path(project), stage)[0]
    os._exit(rc)


_FORKSERVER = None


def _forkserver():
    """Children are forked from a server that has imported the libraries but run nothing (fork-safe, and
    a child starts in a fraction of a second instead of paying the imports)."""
    global _FORKSERVER
    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(["pipeline", "torch", "transformers", "open_clip", "librosa",
                                            *(f"pipeline.features.{s}" for s in STAGES)])
    return _FORKSERVER


def run_killed(project: Path, stage: str, kill_at: int) -> int:
    """Run the stage in a child process that kills itself (-9) after disk event kill_at -> its exit code."""
    target = importlib.import_module("tools.faults")._killed_child  # by that name, also under `python -m tools.faults`
    child = _forkserver().Process(target=target, args=(str(project), stage, kill_at))
    child.start()
    child.join()
    return child.exitcode


def _concurrent_child(project: str, stage: str, first: bool, first_put, second_claimed) -> None:
    """One of two stages on one cache. The first writes one entry, then waits (holding its claims) until the
    second has claimed a clip; the second starts once the first has written that entry. So the second always
    starts while the first is extracting, whatever the machine's speed."""
    from pipeline.cache import Claims, FeatureCache

    real_put, real_take, puts, claims = FeatureCache.put, Claims.take, [], []

    def put(self, *args, **kwargs):
        result = real_put(self, *args, **kwargs)
        puts.append(time.time())
        if first and len(puts) == 1:
            first_put.set()
            second_claimed.wait(30)  # in vain when the first holds every clip: then the second finds none
        return result

    def take(self, key):
        won = real_take(self, key)
        if won:
            claims.append(time.time())
            if not first:
                second_claimed.set()
        return won
    FeatureCache.put, Claims.take = put, take
    if not first:
        first_put.wait(120)
    rc = run_stage_in(Path(project), stage)[0]
    (Path(project) / "concurrent.json").write_text(json.dumps({"puts": puts, "claims": claims}))
    os._exit(rc)


def run_concurrently(projects: list[Path], stage: str) -> list[dict[str, list[float]]]:
    """The stage in two child processes on one cache, the second started while the first extracts -> for each,
    when (time.time()) it wrote each of its cache entries ("puts") and took each of its claims ("claims")."""
    ctx = _forkserver()
    first_put, second_claimed = ctx.Event(), ctx.Event()
    target = importlib.import_module("tools.faults")._concurrent_child
    children = [ctx.Process(target=target, args=(str(p), stage, i == 0, first_put, second_claimed))
                for i, p in enumerate(projects)]
    for child in children:
        child.start()
    for child in children:
        child.join()
    if any(child.exitcode for child in children):
        raise RuntimeError(f"{stage}: exit codes {[child.exitcode for child in children]}")
    return [json.loads((p / "concurrent.json").read_text()) for p in projects]


def kill_points(total_events: int, n: int, rng: random.Random) -> list[int]:
    return sorted(rng.sample(range(1, total_events + 1), min(n, total_events)))


# --------------------------------------------------------------------------- damaged entries

def _member_span(path: Path) -> tuple[int, int]:
    """(offset, size) of the largest member's data inside an .npz."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), "<u2")
    return info.header_offset + 30 + int(name_len) + int(extra_len), info.compress_size


def _flip(path: Path) -> None:
    """64 bytes flipped in the middle of the largest array (the zip index intact: its CRC catches it)."""
    start, size = _member_span(path)
    lo = start + max(0, size // 2 - 32)
    data = bytearray(path.read_bytes())
    data[lo:lo + min(64, size)] = bytes(b ^ 0xFF for b in data[lo:lo + min(64, size)])
    path.write_bytes(bytes(data))


def _rewrite(path: Path, change) -> None:
    """Re-save an entry as a plain .npz after change(arrays, meta) (valid zip, valid CRCs)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("__meta__")))
    change(arrays, meta)
    np.savez(path, **arrays, __meta__=np.array(json.dumps(meta)))


def _wrong_width(path: Path, stage: str) -> None:
    """Rewritten through the cache itself (a valid checksum) with the sequence cut to 10 wide."""
    from pipeline import schema
    from pipeline.cache import FeatureCache

    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "__meta__"}
    seq = schema.get(stage).sequence
    arrays[seq] = arrays[seq].reshape(len(arrays[seq]), -1)[:, :10]
    FeatureCache(path.parents[2], stage).put(path.stem, arrays)


def _garble_meta(path: Path) -> None:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "__meta__"}
    np.savez(path, **arrays, __meta__=np.array("{not json"))


def _bump(arrays: dict) -> None:
    name = next(k for k, v in arrays.items() if v.dtype.kind == "f" and v.size)
    arrays[name] = arrays[name] + 1


def _swap(path: Path, other: Path) -> None:
    """Two valid entries trade places (a bad sync, a restore from the wrong backup)."""
    tmp = path.with_name(path.name + ".swap")
    os.replace(path, tmp)
    os.replace(other, path)
    os.replace(tmp, other)


def _no_key(path: Path) -> None:
    """An entry as an older version of the cache wrote it: a valid checksum of its arrays, no key recorded."""
    from pipeline.cache import checksum

    def change(arrays, meta):
        meta.pop("key", None)
        meta.pop("content", None)
        meta["sha256"] = checksum(arrays)
    _rewrite(path, change)


# kind -> (damage(entry path, stage, a spare good entry's path), whether the spare is damaged too)
DAMAGE = {
    "truncated (zip index lost)": (lambda p, s, o: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), False),
    "zero-length file": (lambda p, s, o: p.write_bytes(b""), False),
    "64 bytes flipped (zip index intact)": (lambda p, s, o: _flip(p), False),
    "metadata not JSON": (lambda p, s, o: _garble_meta(p), False),
    "no checksum (hand-made entry)": (lambda p, s, o: _rewrite(p, lambda a, m: m.pop("sha256")), False),
    "values changed, CRCs valid": (lambda p, s, o: _rewrite(p, lambda a, m: _bump(a)), False),
    "10-wide sequence, valid checksum": (lambda p, s, o: _wrong_width(p, s), False),
    "swapped with another clip's valid entry": (lambda p, s, o: _swap(p, o), True),
    "another clip's valid entry copied over it": (lambda p, s, o: p.write_bytes(o.read_bytes()), False),
    "older entry: valid checksum, no key": (lambda p, s, o: _no_key(p), False),
}


def damage_entries(project: Path, stage: str, kinds: list[str]) -> dict[str, str]:
    """Damage one good cache entry per kind (two for a swap; a copy's source is another good entry, left
    whole) -> {entry key: kind}. Fewer kinds are applied when the stage has too few good entries: the
    caller runs the rest in another round."""
    from pipeline.cache import FeatureCache

    keys, cache, damaged = good_keys(project, stage), FeatureCache(project / "cache", stage), {}
    spare_source = keys.pop() if keys else None  # whole: what a copy copies
    for kind in kinds:
        damage, pair = DAMAGE[kind]
        if len(keys) < 1 + pair:
            break
        key = keys.pop(0)
        partner = keys.pop(0) if pair else spare_source
        damage(cache.path(key), stage, cache.path(partner))
        damaged[key] = kind
        if pair:
            damaged[partner] = kind
    return damaged


# --------------------------------------------------------------------------- a full disk, a dead worker

@contextlib.contextmanager
def disk_full_from(n: int):
    """os.fsync raises ENOSPC from its n-th call on (every write completes with an fsync: atomic_write)."""
    real, calls = os.fsync, [0]

    def fsync(fd):
        calls[0] += 1
        if calls[0] >= n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)
    os.fsync = fsync
    try:
        yield calls
    finally:
        os.fsync = real


SMALL_DISK = r"""m=$1; size=$2; shift 2
mount -t tmpfs -o "size=$size" tmpfs "$m" || exit 97
"$@"; rc=$?
find "$m" \( -name '*.tmp' -o -name '*.lock' \) -printf 'left behind: %P\n'
exit $rc"""


def can_mount_small_disk() -> bool:
    """Whether a tmpfs can be mounted in a private mount namespace here (root, or user namespaces allowed)."""
    import shutil
    import subprocess

    if not shutil.which("unshare"):
        return False
    with tempfile.TemporaryDirectory() as folder:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", SMALL_DISK, "sh", folder, "4k", "true"],
                               capture_output=True)
    return probe.returncode == 0


def run_on_small_disk(argv: list[str], folder: Path, size_kb: int, cwd: Path, env: dict | None = None):
    """Run argv (a stage, in a subprocess) where writing fills up -> (exit code, stdout, stderr, files left behind).

    Where a filesystem can be mounted: a tmpfs of size_kb on `folder`, in a private mount namespace (nobody
    else sees it; it goes when the command ends), so writes there really end in ENOSPC, after a short write.
    Elsewhere: the command runs with a file size limit of size_kb (RLIMIT_FSIZE), so any file growing past it
    fails mid-write (EFBIG, a real short write too; the limit holds in the worker processes it starts).
    "Files left behind" are the temp and lock files under `folder` once the command ended."""
    import resource
    import subprocess

    env = {**os.environ, **(env or {})}
    folder.mkdir(parents=True, exist_ok=True)
    if can_mount_small_disk():
        done = subprocess.run(["unshare", "-rm", "sh", "-c", SMALL_DISK, "sh", str(folder), f"{size_kb}k", *argv],
                              cwd=cwd, env=env, capture_output=True, text=True)
        lines = done.stdout.splitlines()
        left = [line.split(": ", 1)[1] for line in lines if line.startswith("left behind: ")]
        stdout = "\n".join(line for line in lines if not line.startswith("left behind: "))
        return done.returncode, stdout, done.stderr, left

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (size_kb * 1024, resource.RLIM_INFINITY))
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, preexec_fn=limit)
    left = [str(p.relative_to(folder)) for p in [*folder.rglob("*.tmp"), *folder.rglob("*.lock")]]
    return done.returncode, done.stdout, done.stderr, left


DIE_ENV = "MSA_FAULT_DIE"  # "<flag folder>|key,key": units whose worker dies on their first attempt


def extract_clip_dying(unit: dict) -> dict:
    """acoustic.extract_clip, except that the worker process is killed (-9, as the OOM killer would)
    the first time it runs one of the units named in $MSA_FAULT_DIE."""
    from pipeline.features import acoustic

    flags, _, keys = os.environ.get(DIE_ENV, "|").partition("|")
    flag = Path(flags) / unit["key"]
    if unit["key"] in keys.split(",") and not flag.exists():
        flag.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return acoustic.extract_clip(unit)


@contextlib.contextmanager
def workers_dying_on(keys: list[str], flags: Path):
    """Within the block, acoustic clips run through extract_clip_dying, killing a worker on each of `keys` once."""
    from pipeline.features import acoustic

    flags.mkdir(parents=True, exist_ok=True)
    real, saved = acoustic.extract_clip, os.environ.get(DIE_ENV)
    os.environ[DIE_ENV] = f"{flags}|{','.join(keys)}"  # before the cluster starts: its workers inherit it
    acoustic.extract_clip = extract_clip_dying
    try:
        yield
    finally:
        acoustic.extract_clip = real
        if saved is None:
            os.environ.pop(DIE_ENV, None)
        else:
            os.environ[DIE_ENV] = saved


def good_keys(project: Path, stage: str) -> list[str]:
    """Keys of the stage's cache entries holding a result (which clips a fault should hit)."""
    from pipeline.cache import FeatureCache

    cache = FeatureCache(project / "cache", stage)
    return sorted(p.stem for p in cache.dir.glob("??/*.npz") if cache.meta(p.stem).get("ok"))  # not .damaged/


# --------------------------------------------------------------------------- the scenarios

class Tally:
    """Outcomes per (stage, fault): tried, identical, and what differed."""

    def __init__(self):
        self.rows: dict[tuple[str, str], dict] = {}

    def add(self, stage: str, fault: str, problems: list[str]) -> None:
        row = self.rows.setdefault((stage, fault), {"tried": 0, "identical": 0, "problems": []})
        row["tried"] += 1
        row["identical"] += not problems
        row["problems"] += problems

    def table(self) -> str:
        lines = ["| stage | fault | tried | identical |", "|---|---|---|---|"]
        lines += [f"| {s} | {f} | {r['tried']} | {r['identical']} |" for (s, f), r in self.rows.items()]
        return "\n".join(lines)


def fresh(project: Path, folder: Path) -> Path:
    """A copy of the project's params and manifest with an empty cache and no outputs."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    (folder / "features").mkdir(parents=True)
    shutil.copy(project / "features" / "manifest.parquet", folder / "features")
    (folder / "params.yaml").write_text((project / "params.yaml").read_text().replace(
        str(project / "cache"), str(folder / "cache")))
    return folder


def reference(project: Path, stage: str, known: dict | None = None, few: int = 3) -> tuple[dict, DiskEvents]:
    """An uninterrupted run on an empty cache -> (its outcome, its disk events counted). The outcome carries the
    yardstick every later run is held to as well: `few` of its rows extracted directly ("truth") and the
    known-good checksums given (`check_reference` holds the reference itself to it)."""
    with DiskEvents(project) as events:
        rc, out, err = run_stage_in(project, stage)
    if rc != 0:
        raise RuntimeError(f"reference {stage} run failed: {err.strip()}")
    want = outcome(project, stage)
    ids = want["table"].column("id").to_pylist()
    picked = [ids[i] for i in sorted({0, len(ids) // 2, len(ids) - 1})][:few] if ids else []
    want.update(truth=extracted_directly(project, stage, picked), known=known)
    return want, events


def check_reference(want: dict, stage: str, ids: list[str], tally: Tally) -> None:
    """The uninterrupted run itself against the yardstick: a bug that every run shares shows here."""
    problems = differences(want, {**want, "table": None}, ids)
    what = "the extractor's own results" + (", the known-good run's checksums" if want.get("known") else "")
    tally.add(stage, f"uninterrupted run vs {what} ({len(want['truth'])} segments)", problems)


def try_kills(project: Path, stage: str, want: dict, points: list[int], ids: list[str], tally: Tally) -> None:
    """Kill at each point, then run again: identical to the reference, nothing left behind."""
    for point in points:
        run = fresh(project, project.parent / f"{project.name}-kill")
        code = run_killed(run, stage, point)
        killed = code == -signal.SIGKILL
        rc, _, err = run_stage_in(run, stage)
        problems = [] if killed else [f"point {point}: not killed (exit {code})"]
        problems += [f"point {point}: exit {rc} {err.strip()}"] if rc else []
        problems += [f"point {point}: {p}" for p in differences(outcome(run, stage), want, ids)]
        problems += [f"point {point}: left {leftovers(run)}"] if leftovers(run) else []
        tally.add(stage, "kill -9 at a random disk event, then re-run", problems)


def try_damage(project: Path, stage: str, want: dict, ids: list[str], tally: Tally) -> list[tuple[str, str]]:
    """Entries damaged in each way of DAMAGE (on a finished run's cache), a round of runs as the good entries
    allow: each run identical to the reference, every damaged entry listed as repaired and nothing else.
    Returns (key, kind) of every entry damaged."""
    left, everything = list(DAMAGE), []
    while left:
        damaged = damage_entries(project, stage, left)
        if not damaged:
            raise ValueError(f"{stage}: too few good cache entries for the damage kinds {left}")
        everything += damaged.items()
        left = [kind for kind in left if kind not in damaged.values()]
        rc, _, err = run_stage_in(project, stage)
        got = outcome(project, stage)
        repaired = {r["key"] for r in got["report"]["repaired"]} if got["table"] is not None else set()
        unexpected = sorted(repaired - set(damaged))
        for kind in dict.fromkeys(damaged.values()):
            keys = [key for key, k in damaged.items() if k == kind]
            problems = [f"exit {rc} {err.strip()}"] if rc else []
            problems += differences(got, want, ids)
            problems += [f"{key[:12]} not listed as repaired" for key in keys if key not in repaired]
            problems += [f"repaired entries that were not damaged: {unexpected}"] if unexpected else []
            tally.add(stage, f"damaged entry: {kind}", problems)
    return everything


def try_disk_full(project: Path, stage: str, want: dict, ids: list[str], points: list[int], tally: Tally) -> None:
    """ENOSPC from the N-th write: one line, exit 2, no temp file; then a normal run equals the reference."""
    for point in points:
        run = fresh(project, project.parent / f"{project.name}-full")
        with disk_full_from(point):
            rc, _, err = run_stage_in(run, stage)
        last = (err.strip().splitlines() or [""])[-1]  # the stage's error: one line, no traceback
        problems = [] if rc == 2 and last.startswith(f"{stage}: No space left") and "Traceback" not in err else \
            [f"write {point}: exit {rc}, stderr {err.strip()[-300:]!r}"]
        problems += [f"write {point}: left {leftovers(run)}"] if leftovers(run) else []
        rc, _, err = run_stage_in(run, stage)
        problems += [f"write {point}: re-run exit {rc}"] if rc else []
        problems += [f"write {point}: {p}" for p in differences(outcome(run, stage), want, ids)]
        tally.add(stage, "ENOSPC on a write, then re-run", problems)



def try_dead_worker(project: Path, want: dict, ids: list[str], tally: Tally, clips: int = 2) -> None:
    """acoustic on a 2-worker Dask LocalCluster; a worker dies (-9) in the middle of each of `clips` clips
    (picked among the project cache's good entries)."""
    import yaml

    run = fresh(project, project.parent / f"{project.name}-dask")
    raw = yaml.safe_load((run / "params.yaml").read_text())
    raw["compute"] = {**raw.get("compute", {}), "backend": "dask", "scheduler": "local:2"}
    (run / "params.yaml").write_text(yaml.safe_dump(raw))
    keys = good_keys(project, "acoustic")[:clips]
    with workers_dying_on(keys, run / "die-flags"):
        rc, _, err = run_stage_in(run, "acoustic")
    got = outcome(run, "acoustic")
    problems = [f"exit {rc} {err.strip()}"] if rc else []
    problems += differences(got, want, ids)
    retried = {r["key"] for r in got["report"]["retries"]} if got["table"] is not None else set()
    problems += [] if retried >= set(keys) else [f"retries {sorted(retried)} miss {sorted(set(keys) - retried)}"]
    problems += [f"left {leftovers(run)}"] if leftovers(run) else []
    tally.add("acoustic", f"Dask worker killed mid-clip ({clips} clips)", problems)


def run_all(project: Path, stages, kills: int, disk_full: int, seed: int, dask: bool = True) -> Tally:
    """Every scenario on every stage of a project -> the tally. The project's own cache ends up damaged."""
    import pandas as pd

    ids = list(pd.read_parquet(project / "features" / "manifest.parquet")["id"])
    rng, tally = random.Random(seed), Tally()
    for stage in stages:
        t0 = time.perf_counter()
        want, events = reference(project, stage)
        check_reference(want, stage, ids, tally)
        points, writes = kill_points(events.count, kills, rng), full_disk_points(events.fsyncs, disk_full, rng)
        print(f"faults: {stage}: kill -9 after disk events {points} of {events.count}; ENOSPC from writes {writes} "
              f"of {events.fsyncs}", flush=True)
        try_kills(project, stage, want, points, ids, tally)
        try_disk_full(project, stage, want, ids, writes, tally)
        if stage == "acoustic" and dask:
            try_dead_worker(project, want, ids, tally)
        try_damage(project, stage, want, ids, tally)
        print(f"faults: {stage} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return tally


def full_disk_points(writes: int, n: int, rng: random.Random) -> list[int]:
    """The first write (a cache entry), the Parquet (the second last: the JSON sidecar is last), then random ones."""
    points = [1, max(1, writes - 1)]
    points += rng.sample(range(2, max(2, writes - 1)), min(max(0, n - 2), max(0, writes - 3)))
    return sorted(set(points))[:n]


# --------------------------------------------------------------------------- the benchmark

def demo_project(folder: Path, corpus: Path, clips: int) -> Path:
    """A project over the first `clips` segments of a corpus, params.yaml's defaults with inline workers
    (so that the stage process is the one that writes, and is killed)."""
    import yaml

    from pipeline.data.prepare import build_manifest

    raw = yaml.safe_load(Path("params.yaml").read_text())
    manifest, _ = build_manifest({**raw["data"], "root": str(corpus)}, progress=False)
    params = {"features": raw["features"], "compute": {**raw["compute"], "n_jobs": 1}}
    return make_project(folder, params, manifest.head(clips))


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(prog="python -m tools.faults", description=__doc__.split("\n\n")[0])
    cli.add_argument("--corpus", default="raw/demo", help="a corpus in the MMSA layout (default raw/demo)")
    cli.add_argument("--clips", type=int, default=12, help="segments of the corpus to use (default 12)")
    cli.add_argument("--points", type=int, default=10, help="kill -9 points per stage (default 10)")
    cli.add_argument("--disk-full", type=int, default=3, help="ENOSPC points per stage (default 3)")
    cli.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--no-dask", action="store_true", help="skip the dead Dask worker")
    args = cli.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="msa-faults-") as tmp:
        project = demo_project(Path(tmp) / "project", Path(args.corpus).resolve(), args.clips)
        tally = run_all(project, args.stages, args.points, args.disk_full, args.seed, dask=not args.no_dask)
    print(f"\n{args.clips} segments of {args.corpus}, seed {args.seed}, {time.perf_counter() - t0:.0f} s\n")
    print(tally.table())
    bad = {k: r["problems"] for k, r in tally.rows.items() if r["problems"]}
    for (stage, fault), problems in bad.items():
        print(f"{stage} / {fault}: {problems[:3]}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
