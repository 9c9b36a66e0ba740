"""Prefect flows and the command line: wiring only; the logic lives in :mod:`audit`."""

import os

# Before Prefect is imported: no telemetry (this machine and many users' servers are offline), a startup timeout
# long enough for the temporary server's first database migration on a loaded 2-core machine, and the audit's
# own log lines forwarded into Prefect's logs. See ../shared/notes/prefect-duckdb-dask.md, section 1.
for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "audit",
    # The same stage functions also run outside a flow (--no-prefect, tests): no warning for their log lines.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}.items():
    os.environ.setdefault(_key, _value)
