"""Where per-clip work runs: a pluggable parallel map over independent work units.

Every feature stage reduces its corpus to a list of picklable work units and a
module-level function applied to each (decode a clip, or decode + extract and
write the clip's cache entry). `parallel_map` runs them

  * inline (n_jobs 1: no worker start-up, easiest to debug and to test),
  * in local joblib (loky) processes, or
  * on a Dask cluster (`compute.backend: dask`; `scheduler: local:N` starts a
    LocalCluster, or a tcp:// address of a running scheduler whose workers can
    import this repository and see the same paths and cache directory),

and yields (index, result, error, bad_input) in completion order, so the caller can feed
results to a device batch as soon as they arrive. At most 2 x workers units are running
or finished-but-unread at any time: a new unit starts when the caller takes a result, so
a slow consumer (the encoder) holds the workers back instead of letting decoded frames
pile up in memory. A unit that raises becomes an error string for that unit only; it
never aborts the map.

A worker process that dies mid-unit (out-of-memory kill, segfault in a decoder,
a lost machine) loses nothing either:

  * Dask: the scheduler re-runs the unit on another worker, up to
    `distributed.scheduler.allowed-failures` times (default 3, a scheduler setting).
    Past that it raises KilledWorker; since Dask counts a death against every unit
    the dead worker held (queued ones too), a unit that did not itself die that often
    is submitted again, and one that did fails alone. The map goes on.
  * local (loky): a dead worker breaks the whole pool (joblib's Parallel would
    raise TerminatedWorkerError and abort the map; loky stops the other workers
    too). We catch it, start a new pool and go on with the units that had not
    finished; the units that were running when it died are re-run first, one at
    a time, so a unit that kills its worker every time is found and fails alone
    after ALLOWED_FAILURES re-runs. Units already finished are kept. Should the
    pool keep dying outside any unit (a worker that cannot start), the stage
    stops with an error saying to re-run it: whatever reached the cache is kept,
    and the re-run resumes there.
  * inline: the unit runs in the stage's own process; if that dies, the stage
    dies, and re-running it resumes from the cache.

Units that fail this way are transient failures: not cached, tried again next run.
Which units were re-run is known from attempt markers: before a unit runs, its
worker writes a small file (attempt number, pid, host) into a scratch folder and
removes it when the unit returns, so a marker found by a later attempt means an
earlier attempt's process died. Inside `retry_log(folder)` (the feature runner
puts the folder in the cache, which Dask workers share) every such unit is
appended to the log, and the stage writes the log into its report as "retries".
A map's marker folder is named after the stage process (map-<pid@host>-...): it is
removed when the map ends, and a folder left by a killed stage is swept by the
next `retry_log` (cache.owner_gone).

A full disk (ENOSPC, EDQUOT) is not a unit's failure: it stops the map, and the stage.

Workers die with the stage: a local worker ends when the stage process that started it does, even
by kill -9, which runs no clean-up (Linux's parent-death signal, else a thread watching the parent),
instead of idling on for minutes holding its memory. A stage keeps its pool, or its Dask client and
LocalCluster, across the maps of one run (it extracts a few claimed clips at a time); the Dask
ones are closed when the stage ends (`close_dask`).
"""
from __future__ import annotations

import atexit
import contextvars
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..cache import DISK_FULL, STALE_S, file_mode, owner, owner_gone, share_like_parent
from ..errors import UserError
from ..params import Check, matches, one_of, param, section

ALLOWED_FAILURES = 3  # local re-runs of a unit whose worker died (Dask's allowed-failures default)


@section("compute")
@dataclass
class Compute:
    backend: str = param("local", one_of("local", "dask"), "local (joblib processes) | dask")
    n_jobs: int = param(2, Check(lambda v: v >= 1 or v == -1, "a worker count >= 1, or -1 for all cores"),
                        "local worker processes (1 = inline, -1 = all cores)")
    scheduler: str = param("local:2", matches(r"local(:[1-9]\d*)?|(tcp|tls)://\S+", "local:N | tcp://host:port | tls://host:port"),
                           "dask only: local:N starts a LocalCluster of N workers; or a running scheduler's address")

    def __post_init__(self):
        if self.n_jobs == -1:  # joblib style: all cores
            self.n_jobs = os.cpu_count() or 1

    @property
    def workers(self) -> int:
        if self.backend == "dask" and self.scheduler.startswith("local"):
            return int(self.scheduler.split(":")[1]) if ":" in self.scheduler else self.n_jobs
        return self.n_jobs


# --------------------------------------------------------------------------- retry log

# (scratch folder for attempt markers, the list retried units are appended to), set by retry_log
_RETRY_LOG: contextvars.ContextVar[tuple[Path, list] | None] = contextvars.ContextVar("retry_log", default=None)


@contextmanager
def retry_log(scratch_dir: str | os.PathLike) -> Iterator[list[dict]]:
    """Within the block, parallel_map keeps its attempt markers under scratch_dir (Dask workers
    must see it: use the shared cache) and appends one dict per unit re-run after its worker
    died to the yielded list: {"key" (the unit's "key", else its index), "deaths", "reason"}.
    Marker folders of stage processes that are gone are swept on entry; this process's own (and
    scratch_dir, if that leaves it empty) on exit."""
    retries: list[dict] = []
    _sweep_attempts(Path(scratch_dir))
    token = _RETRY_LOG.set((Path(scratch_dir), retries))
    try:
        yield retries
    finally:
        _RETRY_LOG.reset(token)
        _sweep_attempts(Path(scratch_dir), own=True)


def _sweep_attempts(scratch: Path, own: bool = False) -> None:
    """Remove map-<pid@host>-* folders whose stage process is gone (with own: this process's too)."""
    for folder in scratch.glob("map-*") if scratch.is_dir() else []:
        who = folder.name[4:].rsplit("-", 1)[0] if "@" in folder.name else ""  # older folders: no owner
        try:
            if (own and who == owner()) or owner_gone(who, folder.stat().st_mtime, STALE_S):
                shutil.rmtree(folder, ignore_errors=True)
        except FileNotFoundError:
            pass
    if own:
        try:
            scratch.rmdir()  # only when empty: another stage may be using it
        except OSError:
            pass


def _read_marker(marker: Path) -> tuple[int, str] | None:
    """(attempt number, "pid N on host") of an attempt that started and has not returned, or None."""
    try:
        attempt, where = marker.read_text().split(" ", 1)
        return int(attempt), where
    except (OSError, ValueError):
        return None


def _call(fn: Callable, index: int, item: Any, marker_dir: str | None = None) -> tuple[int, Any, str | None, bool]:
    """Run one unit -> (index, result, error, bad_input).

    An exception becomes the unit's one-line error. MediaError means the input itself
    is bad (bad_input True: the same input fails the same way, so callers may cache
    the failure); anything else may be transient (out of memory, a killed worker)
    and is reported with where it happened, to be retried on the next run.

    With a marker_dir, the attempt is marked there while it runs (see the module doc).
    A marker found on arrival is an earlier attempt whose process died: that goes into
    <index>.died at once, not into the result, because Dask may lose a result held by a
    worker that dies later and quietly compute it again.
    """
    from ..data.media import MediaError

    marker = Path(marker_dir) / str(index) if marker_dir else None
    if marker:
        try:  # best effort: a worker that cannot see the scratch folder still does the work
            died = _read_marker(marker)
            if died:
                with open(marker.with_suffix(".died"), "a") as log:
                    log.write(f"attempt {died[0]} ({died[1]})\n")
            marker.write_text(f"{died[0] + 1 if died else 1} pid {os.getpid()} on {socket.gethostname()}")
        except OSError:
            marker = None
    try:
        return index, fn(item), None, False
    except MediaError as err:
        return index, None, str(err), True
    except Exception as err:  # noqa: BLE001 - any per-clip error is recorded, never fatal
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            raise  # the disk's failure, not the clip's: every later unit would fail alike
        tb = traceback.extract_tb(err.__traceback__)
        where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
        return index, None, f"{type(err).__name__}: {err}{where}", False
    finally:
        if marker:  # only a process that dies mid-unit leaves its marker behind
            marker.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the map

def parallel_map(fn: Callable, items: Sequence, compute: Compute | None = None) -> Iterator[tuple[int, Any, str | None, bool]]:
    """Apply fn to every item; yield (index, result, error, bad_input) as units finish."""
    compute = compute or Compute(n_jobs=1)
    if not items:
        return
    if compute.backend == "local" and (compute.n_jobs <= 1 or len(items) == 1):
        for i, item in enumerate(items):  # inline: nothing can be re-run if this process dies
            yield _call(fn, i, item)
        return

    scratch, retries = _RETRY_LOG.get() or (Path(tempfile.gettempdir()) / "msa-attempts", [])
    scratch = scratch.absolute()  # workers may run in another directory (or on another machine)
    scratch.mkdir(parents=True, exist_ok=True)
    marker_dir = tempfile.mkdtemp(prefix=f"map-{owner()}-", dir=scratch)  # one folder per map: indices are its names
    os.chmod(marker_dir, file_mode(folder=True))  # mkdtemp makes 0700: workers may run as other users
    share_like_parent(marker_dir)
    try:
        backend_map = _dask_map if compute.backend == "dask" else _local_map
        for index, result, error, bad_input in backend_map(fn, items, compute, marker_dir):
            deaths = Path(marker_dir) / f"{index}.died"
            if deaths.is_file():
                lines = deaths.read_text().splitlines()
                item = items[index]
                died = f"during {lines[0]}" if len(lines) == 1 else f"{len(lines)} times (last during {lines[-1]})"
                retries.append({"key": item.get("key", index) if isinstance(item, dict) else index,
                                "deaths": len(lines),
                                "reason": f"worker process died {died}; re-run and "
                                          + ("finished" if error is None else "failed (see failures)")})
            yield index, result, error, bad_input
    finally:
        shutil.rmtree(marker_dir, ignore_errors=True)


# what joblib sets for its loky workers: each worker's thread pools get an equal share of the cores
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


_POOL: dict = {}  # {"key": (n_jobs, env), "pool": executor}: kept for the next map, as joblib keeps its own


def die_with_parent(parent: int) -> None:
    """Run in each local worker as it starts: end it when the stage process `parent` ends, however it ends.
    Linux: the kernel sends SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG); elsewhere a thread polls."""
    try:
        import ctypes

        if not sys.platform.startswith("linux") or ctypes.CDLL(None).prctl(1, signal.SIGKILL) != 0:
            raise OSError("no parent-death signal")
    except (OSError, AttributeError):
        def watch():
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)
        threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
    if os.getppid() != parent:  # it died before the signal was set
        os._exit(1)


def _local_pool(n_jobs: int, env: dict):
    """A loky process pool of n_jobs workers, reused across maps (worker start-up is paid once).
    Our own, not loky's process-wide reusable one: joblib.Parallel elsewhere in this process (the
    demo generator) expects that one to be its own kind of executor."""
    from joblib.externals.loky import ProcessPoolExecutor

    key = (n_jobs, tuple(sorted(env.items())))
    if _POOL.get("key") != key:
        _drop_local_pool()
        # idle workers exit after 5 minutes, and are started again when needed; all of them when this process dies
        _POOL.update(key=key, pool=ProcessPoolExecutor(max_workers=n_jobs, env=env, timeout=300,
                                                       initializer=die_with_parent, initargs=(os.getpid(),)))
        atexit.register(_drop_local_pool)  # before interpreter teardown, which loky's own clean-up trips over
    return _POOL["pool"]


def close_dask() -> None:
    """Close the Dask client (and LocalCluster) kept across the maps of a stage: run_stage calls it when done."""
    _drop_dask()


def _drop_local_pool(kill: bool = False) -> None:
    atexit.unregister(_drop_local_pool)
    if "pool" in _POOL:
        _POOL.pop("pool").shutdown(wait=True, kill_workers=kill)
    _POOL.clear()


def _local_map(fn: Callable, items: Sequence, compute: Compute, marker_dir: str):
    """loky worker processes. A new unit is submitted only when the caller has taken a result, so at
    most 2 x n_jobs units are running or waiting to be read, whatever the speed of the caller (joblib's
    Parallel dispatches on completion instead, so decoded frames would pile up ahead of a slow encoder)."""
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool  # loky's TerminatedWorkerError is one

    threads = str(max(1, (os.cpu_count() or 1) // compute.n_jobs))
    env = {var: os.environ.get(var, threads) for var in THREAD_VARS}
    window = 2 * compute.n_jobs
    todo = deque(range(len(items)))
    suspects: deque[int] = deque()   # running when a pool died: re-run one at a time, so a death names its cause
    deaths_alone = {i: 0 for i in todo}
    deaths_unexplained = 0
    running: dict = {}               # future -> index
    try:
        while todo or suspects or running:
            pool = _local_pool(compute.n_jobs, env)
            if suspects:
                if not running:
                    running[pool.submit(_call, fn, suspects[0], items[suspects[0]], marker_dir)] = suspects[0]
            else:
                while todo and len(running) < window:
                    i = todo.popleft()
                    running[pool.submit(_call, fn, i, items[i], marker_dir)] = i
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            if not any(isinstance(f.exception(), BrokenProcessPool) for f in finished):
                for future in finished:
                    i = running.pop(future)
                    if suspects and suspects[0] == i:
                        suspects.popleft()
                    yield future.result()
                continue

            # A worker died and took the pool with it: every running unit ends now, most with the error.
            done_or_dead = [(running.pop(f), f) for f in wait(running)[0]]
            _drop_local_pool()  # the next round starts a new one
            lost = []
            for i, future in done_or_dead:
                if isinstance(future.exception(), BrokenProcessPool):
                    lost.append(i)
                else:
                    yield future.result()
            if len(done_or_dead) == 1 and suspects and lost == [suspects[0]]:  # it died alone: its own doing
                i = suspects[0]
                deaths_alone[i] += 1
                if deaths_alone[i] > ALLOWED_FAILURES:
                    suspects.popleft()
                    yield (i, None, f"worker process died on each of {deaths_alone[i]} runs of this unit alone; "
                                    f"gave up (not cached: the next run tries again)", False)
                continue
            started = [i for i in lost if (Path(marker_dir) / str(i)).exists()]
            suspects.extend(started)
            todo.extendleft(reversed([i for i in lost if i not in started]))  # never started: back to the front
            deaths_unexplained = 0 if started else deaths_unexplained + 1
            if deaths_unexplained > ALLOWED_FAILURES:  # dies outside any unit (cannot start?): nothing to pin it on
                raise RuntimeError("the local worker pool keeps dying outside any work unit; what finished is in "
                                   "the cache: re-run the stage to resume (or use compute.n_jobs: 1 to see the error)")
    except OSError as err:
        if err.errno in DISK_FULL and running:  # the units in flight end as they will (failing alike, each
            _drop_local_pool()                  # removing its temp file) instead of being killed mid-write
            running.clear()
        raise
    finally:
        if running:  # the caller stopped early (an error, Ctrl-C): stop what is still running
            _drop_local_pool(kill=True)


_DASK: dict = {}  # {"key": (scheduler, workers), "client", "cluster"}: kept for the next map of the stage


def _dask_client(compute: Compute):
    """A Dask client for compute.scheduler (starting a LocalCluster for local:N), reused across maps."""
    from distributed import Client, LocalCluster

    key = (compute.scheduler, compute.workers)
    if _DASK.get("key") == key and _DASK["client"].status == "running":
        return _DASK["client"]
    _drop_dask()
    cluster = None
    if compute.scheduler.startswith("local"):
        cluster = LocalCluster(n_workers=compute.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    else:
        try:
            client = Client(compute.scheduler)
        except (OSError, TypeError) as err:  # refused, timed out; TypeError: tls:// with no TLS settings
            hint = "; tls:// needs Dask's TLS settings (docs/scaling.md)" if compute.scheduler.startswith("tls") else ""
            raise UserError(f"compute.scheduler {compute.scheduler}: cannot connect ({type(err).__name__}: "
                            f"{(str(err).splitlines() or [''])[0][:160]}){hint}") from None
    _DASK.update(key=key, client=client, cluster=cluster)
    atexit.register(_drop_dask)
    return client


def _drop_dask() -> None:
    atexit.unregister(_drop_dask)
    client, cluster = _DASK.pop("client", None), _DASK.pop("cluster", None)
    _DASK.clear()
    if client is not None:
        client.close()
    if cluster is not None:
        cluster.close()


def _dask_map(fn: Callable, items: Sequence, compute: Compute, marker_dir: str):
    from distributed import KilledWorker, as_completed

    client = _dask_client(compute)
    try:
        window = 2 * max(1, sum(client.nthreads().values()))  # bounded in flight, like pre_dispatch
        pending = iter(range(len(items)))
        index_of: dict[str, int] = {}
        resubmitted = {i: 0 for i in range(len(items))}
        futures = as_completed()

        def submit(i: int) -> None:
            future = client.submit(_call, fn, i, items[i], marker_dir, pure=False)
            index_of[future.key] = i
            futures.add(future)

        for i in pending:
            submit(i)
            if futures.count() >= window:
                break
        for future in futures:
            i = index_of.pop(future.key)
            try:
                out = future.result()
            except KilledWorker as err:
                # Dask counts a death against every unit the dead worker held, queued ones too. The
                # marker says how often this unit itself started and died: fewer than the scheduler
                # allows means it was (partly) collateral, so it gets another go.
                ran = _read_marker(Path(marker_dir) / str(i))
                own_deaths = ran[0] if ran else 0
                if own_deaths <= err.allowed_failures and resubmitted[i] < ALLOWED_FAILURES:
                    resubmitted[i] += 1
                    future.release()
                    submit(i)
                    continue
                out = (i, None, f"KilledWorker: the worker process died each time this unit ran ({own_deaths or '?'} "
                                f"times; Dask allowed-failures {err.allowed_failures}); not cached: the next run tries "
                                f"again", False)
            except Exception as err:  # noqa: BLE001 - e.g. the scheduler went away: this unit fails, not the map
                if isinstance(err, OSError) and err.errno in DISK_FULL:
                    raise
                message = (str(err).strip().splitlines() or [""])[0]
                out = (i, None, f"{type(err).__name__}: {message}", False)
            future.release()
            yield out
            nxt = next(pending, None)
            if nxt is not None:
                submit(nxt)
    except BaseException:
        _drop_dask()  # stopped early (an error, Ctrl-C): nothing of this map may run on
        raise
