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
results to a device batch as soon as they arrive. A unit that raises becomes an
error string for that unit only; it never aborts the map.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence


@dataclass
class Compute:
    backend: str = "local"      # local | dask
    n_jobs: int = 1             # local worker processes (1 = inline)
    scheduler: str = "local:2"  # dask: local:N or tcp://host:port

    @classmethod
    def from_params(cls, params: dict) -> "Compute":
        c = params.get("compute", {}) or {}
        n_jobs = int(c.get("n_jobs", 1) or 1)
        if n_jobs < 0:  # joblib style: -1 = all cores
            n_jobs = max(1, (os.cpu_count() or 1) + 1 + n_jobs)
        return cls(backend=str(c.get("backend", "local")), n_jobs=n_jobs, scheduler=str(c.get("scheduler", "local:2")))

    @property
    def workers(self) -> int:
        if self.backend == "dask" and self.scheduler.startswith("local"):
            return int(self.scheduler.split(":")[1]) if ":" in self.scheduler else self.n_jobs
        return self.n_jobs


def _call(fn: Callable, index: int, item: Any) -> tuple[int, Any, str | None, bool]:
    """Run one unit -> (index, result, error, bad_input).

    An exception becomes the unit's one-line error. MediaError means the input itself
    is bad (bad_input True: the same input fails the same way, so callers may cache
    the failure); anything else may be transient (out of memory, a killed worker)
    and is reported with where it happened, to be retried on the next run.
    """
    from .media import MediaError

    try:
        return index, fn(item), None, False
    except MediaError as err:
        return index, None, str(err), True
    except Exception as err:  # noqa: BLE001 - any per-clip error is recorded, never fatal
        tb = traceback.extract_tb(err.__traceback__)
        where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
        return index, None, f"{type(err).__name__}: {err}{where}", False


def parallel_map(fn: Callable, items: Sequence, compute: Compute | None = None) -> Iterator[tuple[int, Any, str | None, bool]]:
    """Apply fn to every item; yield (index, result, error, bad_input) as units finish."""
    compute = compute or Compute()
    if not items:
        return
    if compute.backend == "dask":
        yield from _dask_map(fn, items, compute)
    elif compute.backend == "local":
        if compute.n_jobs <= 1 or len(items) == 1:
            for i, item in enumerate(items):
                yield _call(fn, i, item)
            return
        from joblib import Parallel, delayed

        # generator_unordered: results as they finish; pre_dispatch bounds what is in flight
        # (and so the memory held by decoded frames waiting for the encoder)
        parallel = Parallel(n_jobs=compute.n_jobs, return_as="generator_unordered", batch_size=1,
                            pre_dispatch="2*n_jobs")
        yield from parallel(delayed(_call)(fn, i, item) for i, item in enumerate(items))
    else:
        raise ValueError(f"compute.backend must be local or dask, not {compute.backend!r}")


def _dask_map(fn: Callable, items: Sequence, compute: Compute) -> Iterator[tuple[int, Any, str | None, bool]]:
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if compute.scheduler.startswith("local"):
        cluster = LocalCluster(n_workers=compute.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    else:
        client = Client(compute.scheduler)
    try:
        window = 2 * max(1, sum(client.nthreads().values()))  # bounded in flight, like pre_dispatch
        pending = iter(enumerate(items))
        futures = as_completed()
        for i, item in pending:
            futures.add(client.submit(_call, fn, i, item, pure=False))
            if futures.count() >= window:
                break
        for future in futures:
            yield future.result()
            future.release()
            nxt = next(pending, None)
            if nxt is not None:
                futures.add(client.submit(_call, fn, nxt[0], nxt[1], pure=False))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
