"""The audit as a Prefect flow: each stage a task, shards mapped over a thread pool, I/O errors retried.

Without ``PREFECT_API_URL`` Prefect 3 starts a temporary local API server for the run (12–35 s here) and records
the run in ``PREFECT_HOME``; with it, the run is recorded on that server and shows in its UI.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from audit.config import AuditConfig
from audit.pipeline import run_pipeline


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

    def map(self, fn: Callable[..., Any], items: Sequence[tuple]) -> list[Any]:
        t = self._task(fn)
        futures = [t.submit(*args) for args in items]
        return [f.result() for f in futures]  # raises the first failure, so a failed shard fails the flow

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._task(fn)(*args)


@flow(name="shortcut-audit", log_prints=True)
def audit_flow(config: AuditConfig) -> dict:
    """Audit one dataset (and model) for shortcut learning; returns the summary written to ``OUT/summary.json``."""
    return run_pipeline(config, PrefectRunner())


def run_flow(config: AuditConfig) -> dict:
    """Run :func:`audit_flow` with a thread pool of ``config.workers`` shard tasks."""
    configured = audit_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=config.workers))
    return configured(config)
