"""The audit as a Prefect flow: each stage a task, shards mapped over a task runner, I/O errors retried.

The shard tasks run on a thread pool in this process (``runner = "threads"``, the default) or on a Dask cluster
(``runner = "dask"``): a local cluster of ``workers`` processes created for the run, or an existing scheduler
(``dask_address``). The other stages (plan, probe training, sanity check, summary) always run in this process.

Without ``PREFECT_API_URL`` Prefect 3 starts a temporary local API server for the run (12–35 s here) and records
the run in ``PREFECT_HOME``; with it, the run is recorded on that server and shows in its UI. A Dask run starts
that temporary server itself (:func:`flows.prefect_api.ensure_api`), so all worker processes report to it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel

from audit.config import AuditConfig
from audit.pipeline import run_pipeline

log = logging.getLogger("audit.flows")

# Before distributed is imported (here and in the local cluster's workers): the scheduler's and nannies' start/stop
# lines at WARNING, not INFO; Prefect still logs the cluster it creates or connects to.
os.environ.setdefault("DASK_DISTRIBUTED__LOGGING__DISTRIBUTED", "warning")


def only_io_errors(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry a task only for transient input/output errors, never for a bug or bad data."""
    try:
        state.result()
    except OSError:
        return True
    except Exception:
        return False
    return False


class PrefectRunner:
    """Runs each stage as a Prefect task; ``map`` submits one task per shard to the flow's task runner."""

    def _task(self, fn: Callable[..., Any]) -> Any:
        # Our own store makes the stages idempotent; Prefect's input hashing of large arguments is not needed.
        return task(
            fn,
            name=fn.__name__,
            cache_policy=NO_CACHE,
            retries=2,
            retry_delay_seconds=1,
            retry_condition_fn=only_io_errors,
        )

    def map(
        self, fn: Callable[..., Any], items: Sequence[tuple], on_result: Callable[[Any], None] | None = None
    ) -> list[Any]:
        from prefect.futures import as_completed

        t = self._task(fn)
        futures = [t.submit(*args) for args in items]
        if on_result is not None:
            for future in as_completed(futures):
                on_result(future.result())  # raises the first failure, so a failed shard fails the flow
        return [f.result() for f in futures]

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._task(fn)(*args)


@flow(name="shortcut-audit", log_prints=True)
def audit_flow(config: AuditConfig, progress: bool = False) -> dict:
    """Audit one dataset (and model) for shortcut learning; returns the summary written to ``OUT/summary.json``.

    ``progress``: draw the progress bar on this process's terminal (the command line sets it).
    """
    return run_pipeline(config, PrefectRunner(), progress=progress)


def local_cluster_kwargs(config: AuditConfig) -> dict[str, Any]:
    """``distributed.LocalCluster`` settings: ``workers`` single-threaded worker processes.

    Worker processes inherit this process's environment; ``OMP_WAIT_POLICY`` is also passed explicitly because it
    must be in place before torch is imported there (spin-waiting OpenMP threads starve shared CPUs). Dask's nanny
    itself sets ``OMP_NUM_THREADS=1`` (``distributed.nanny.pre-spawn-environ``): one core per worker.
    """
    return {
        "n_workers": config.workers,
        "threads_per_worker": 1,
        "processes": True,
        "env": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")},
    }


def task_runner(config: AuditConfig) -> TaskRunner:
    """The task runner of the shard tasks: a thread pool, a new local Dask cluster, or an existing Dask cluster."""
    if config.runner == "threads":
        if config.dask_address:
            log.warning("dask_address %s is ignored: runner is 'threads' (set runner = 'dask')", config.dask_address)
        return ThreadPoolTaskRunner(max_workers=config.workers)
    from prefect_dask import DaskTaskRunner  # imports distributed: only when asked for

    if config.dask_address:
        return DaskTaskRunner(address=config.dask_address)
    return DaskTaskRunner(cluster_kwargs=local_cluster_kwargs(config))


def run_flow(config: AuditConfig, progress: bool = False) -> dict:
    """Run :func:`audit_flow` with the task runner of ``config`` (see :func:`task_runner`)."""
    configured = audit_flow.with_options(task_runner=task_runner(config))
    if config.runner != "dask":
        return configured(config, progress)  # one process: Prefect's own temporary server (if any) is shared anyway
    from flows.prefect_api import ensure_api

    # Dask workers run in their own working directory (another machine's, for an existing cluster).
    config = absolute_paths(config)
    with ensure_api() as api_url, _environ_restored():
        _warn_if_unreachable(config.dask_address, api_url)
        return configured(config, progress)


def _warn_if_unreachable(dask_address: str | None, api_url: str | None) -> None:
    """Workers on other machines cannot reach an API on this machine's loopback address: say so before the run."""
    loopback = {"127.0.0.1", "localhost", "::1"}
    if dask_address and api_url and urlparse(api_url).hostname in loopback:
        if (urlparse(dask_address).hostname or "127.0.0.1") not in loopback:
            log.warning(
                "the Prefect API %s is only reachable from this machine, but the Dask scheduler %s may have workers "
                "elsewhere: run `prefect server start --host 0.0.0.0` and set PREFECT_API_URL to an address the "
                "workers can reach",
                api_url,
                dask_address,
            )


Settings = TypeVar("Settings", bound=BaseModel)


def absolute_paths(settings: Settings) -> Settings:
    """``settings`` with every path (nested settings included) made absolute against this working directory."""
    update: dict[str, Any] = {}
    for name, value in settings:
        if isinstance(value, Path):
            update[name] = value.expanduser().absolute()
        elif isinstance(value, BaseModel):
            update[name] = absolute_paths(value)
    return settings.model_copy(update=update)


@contextmanager
def _environ_restored() -> Iterator[None]:
    """Undo the environment variables a local cluster sets in this process.

    Dask's nanny puts ``distributed.nanny.pre-spawn-environ`` (``OMP_NUM_THREADS=1``, ``PYTHONHASHSEED``, ...) into
    ``os.environ`` of the process that starts the workers; later subprocesses of the caller must not inherit them.
    """
    before = dict(os.environ)
    try:
        yield
    finally:
        for key in [k for k in os.environ if k not in before]:
            del os.environ[key]
        for key, value in before.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
