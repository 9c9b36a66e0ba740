"""Recurring audits: the audit flow served as a Prefect deployment with a schedule (``audit serve``).

Every scheduled run audits ``config.out`` again, the same folder each time, so images already audited are skipped
and only new or changed files cost time. Each finished run is kept under ``OUT/runs/<UTC time>/`` with
``OUT/runs/latest`` pointing at it, and its report compares it with the previous run (:mod:`audit.history`).

Schedules need a real Prefect server: Prefect's temporary server has no scheduler ("Cannot schedule flows on an
ephemeral server"), so :func:`serve` refuses to start without ``PREFECT_API_URL``. This process polls the server for
due runs and executes each in a child process; stop it with SIGTERM (or Ctrl-C), which also pauses the schedule
until the next ``audit serve`` (see ../shared/notes/prefect-duckdb-dask.md, section 4).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from audit.config import AuditConfig
from audit.errors import ConfigError

log = logging.getLogger("audit.flows")

NO_SERVER = (
    "schedules need a Prefect server: run `prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api"
)
# Only one run of the deployment at a time: two runs writing into the same output folder would race.
CONCURRENT_RUNS = 1


def _absolute(config: AuditConfig) -> AuditConfig:
    """``config`` with every relative path made absolute against this process's working directory.

    The deployment's parameters outlive this process: a run triggered from the UI, or after a restart from another
    folder, must still find the data and write into the same output folder.
    """

    def fix(model: Any) -> Any:
        updates = {}
        for field in type(model).model_fields:
            value = getattr(model, field)
            if isinstance(value, Path) and not value.is_absolute():
                updates[field] = value.absolute()
            elif hasattr(type(value), "model_fields"):
                fixed = fix(value)
                if fixed is not value:
                    updates[field] = fixed
        return model.model_copy(update=updates) if updates else model

    return fix(config)


def api_url() -> str:
    """The Prefect server this process talks to; ConfigError when none is set or none answers there."""
    import httpx
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url  # PREFECT_API_URL from the environment or the active Prefect profile
    if not url:
        raise ConfigError(NO_SERVER)
    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=10)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise ConfigError(
            f"no Prefect server answers at PREFECT_API_URL={url} ({exc}); start it with `prefect server start` "
            "(it takes 10-30 s to become ready) or fix the URL"
        ) from None
    return url


def deployment_parameters(config: AuditConfig) -> dict[str, Any]:
    """The flow's parameters as JSON (paths as absolute strings); the flow validates them back into AuditConfig."""
    return {"config": _absolute(config).model_dump(mode="json")}


def build_deployment(
    config: AuditConfig,
    *,
    cron: str | None,
    interval: float | None,
    name: str,
    timezone: str | None = None,
) -> Any:
    """The audit flow as a :class:`prefect.deployments.runner.RunnerDeployment` with one schedule.

    Raises:
        ConfigError: neither or both of ``cron`` and ``interval``, a bad cron expression, interval or time zone.
    """
    from prefect.client.schemas.schedules import construct_schedule
    from prefect.schedules import Cron, Interval
    from pydantic import ValidationError

    from flows.audit_flow import audit_flow, task_runner

    if (cron is None) == (interval is None):
        raise ConfigError("give exactly one schedule: a cron expression (e.g. '0 2 * * *') or an interval in seconds")
    if interval is not None and not interval > 0:
        raise ConfigError(f"interval must be a positive number of seconds, found {interval}")
    if not name.strip():
        raise ConfigError("the deployment name must not be empty")
    try:
        # construct_schedule validates the cron expression and the time zone at once (Cron/Interval do not).
        construct_schedule(cron=cron, interval=interval, timezone=timezone)
        if cron is not None:
            schedule = Cron(cron, timezone=timezone)
        else:
            schedule = Interval(float(interval), timezone=timezone)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(str(e["msg"]) for e in exc.errors())
        raise ConfigError(f"invalid schedule ({cron or interval}): {problems}") from None
    except ValueError as exc:
        raise ConfigError(f"invalid schedule ({cron or interval}): {exc}") from None
    absolute = _absolute(config)
    flow = audit_flow.with_options(task_runner=task_runner(config))
    return flow.to_deployment(
        name=name,
        schedule=schedule,
        parameters=deployment_parameters(config),
        description=f"Recurring shortcut audit of {absolute.data} into {absolute.out}",
        tags=["shortcut-audit", "scheduled"],
    )


def serve(
    config: AuditConfig,
    *,
    cron: str | None,
    interval: float | None,
    name: str,
    timezone: str | None = None,
) -> None:
    """Serve the audit flow as deployment ``shortcut-audit/<name>`` on a schedule, until SIGTERM or Ctrl-C.

    Args:
        config: the audit to repeat; relative paths are resolved against the current folder now.
        cron: a cron expression, for example ``"0 2 * * *"`` (every night at 02:00), or None.
        interval: seconds between runs, or None. Exactly one of ``cron`` and ``interval`` is required.
        name: the deployment's name.
        timezone: IANA time zone of the schedule (for example ``"Europe/Berlin"``); default UTC.

    Raises:
        ConfigError: no Prefect server (``PREFECT_API_URL`` unset or not answering), or a bad schedule.
    """
    from prefect import serve as prefect_serve

    url = api_url()
    deployment = build_deployment(config, cron=cron, interval=interval, name=name, timezone=timezone)
    log.info(
        "serving deployment shortcut-audit/%s (%s) on %s: audits %s into %s; stop with SIGTERM or Ctrl-C",
        name,
        f"cron {cron!r}" if cron is not None else f"every {interval:g} s",
        url,
        _absolute(config).data,
        _absolute(config).out,
    )
    # Paused on shutdown: while nothing serves the deployment, runs must not pile up as "late" for the next start;
    # the next `audit serve` un-pauses it. Prefect's own pause on SIGTERM can be cut short by its sys.exit (notes,
    # section 4), hence the explicit pause afterwards.
    try:
        prefect_serve(deployment, limit=CONCURRENT_RUNS, pause_on_shutdown=True, print_starting_message=False)
    finally:
        pause_schedule(name)


def pause_schedule(name: str) -> bool:
    """Pause the schedule of deployment ``shortcut-audit/<name>``; False (and a warning) when that fails."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from flows.audit_flow import audit_flow

    full_name = f"{audit_flow.name}/{name}"
    try:
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(full_name)
            if not deployment.paused:
                client.pause_deployment(deployment.id)
    except ObjectNotFound:
        return False  # stopped before the deployment was created: nothing to pause
    except Exception as exc:  # the server may be gone already; stopping must not fail because of it
        log.warning(
            "could not pause deployment %s (%s); pause it with `prefect --no-prompt deployment schedule pause --all`",
            full_name,
            exc,
        )
        return False
    log.info("deployment %s paused; the next `audit serve` resumes it", full_name)
    return True
