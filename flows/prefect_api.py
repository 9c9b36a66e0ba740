"""One Prefect API for every process of a run.

Without ``PREFECT_API_URL``, Prefect 3 starts a temporary API server on the first client call, and only the process
that started it knows its URL. Worker *processes* (a Dask cluster) then each start a server of their own on the same
SQLite database (3 servers and 68 s for 6 trivial tasks in ../shared/notes/prefect-duckdb-dask.md, section 3).
:func:`ensure_api` starts the temporary server itself and publishes its URL in the settings context, which
``prefect-dask`` sends to the workers with each task, the same way ``prefect_test_harness`` does.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_EPHEMERAL_ENABLED,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)

log = logging.getLogger("audit.flows")


@contextmanager
def ensure_api() -> Iterator[str | None]:
    """Yield the API URL of the run: ``PREFECT_API_URL`` when set, else a temporary server started here.

    A server started here is stopped on exit (after the run's queued logs and events are sent to it). A temporary
    server that was already running in this process is reused and left running. With no URL and the temporary
    server disabled (``PREFECT_SERVER_EPHEMERAL_ENABLED=false``) this yields None and Prefect reports the error.
    """
    url = PREFECT_API_URL.value()
    if url or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield url
        return
    from prefect.server.api.server import SubprocessASGIServer

    # The default instance: the one this process's own clients would start, so they all use the same server.
    server = SubprocessASGIServer()
    started_here = not server.running
    server.start(timeout=PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
            _drain()
    finally:
        if started_here:
            server.stop()


def _drain() -> None:
    """Send the logs and events still queued in this process, while the server is up (as the test harness does)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:  # no log worker was started
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    try:
        run_coro_as_sync(drain())
    except Exception as exc:  # losing a late log line must not fail a finished audit
        log.warning("could not send the last Prefect logs: %s", exc)
