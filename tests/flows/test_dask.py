"""Scale-out: the flow's shard tasks on a Dask cluster give the same tables as the plain local runner."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from audit.config import build_config
from audit.data.demo import write_demo
from audit.pipeline import run_pipeline

# Rows are compared sorted by these columns (the table's key); every other column must match too.
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "images": ("image_id",),
    "regions": ("image_id", "kind", "detector", "x0", "y0", "x1", "y1"),
    "attributions": ("image_id", "method", "region_kind"),
    "maps": ("image_id", "method"),
    "counterfactuals": ("image_id", "region_kind", "fill"),
    "errors": ("path", "stage", "message"),
    "sanity": ("method",),
    "leakage": ("region_kind", "group", "label"),
    "clusters": ("method", "label", "cluster"),
    "findings": ("label", "group", "region_kind", "method"),
}

SETTINGS: dict[str, Any] = {"shard_size": 10, "gallery_size": 2, "probe.image_size": 64, "probe.epochs": 2}


def read_rows(out: Path, table: str) -> list[dict]:
    """All rows of ``OUT/tables/<table>``, sorted by the table's key (NULLs first)."""
    rows = [r for part in sorted((out / "tables" / table).glob("*.parquet")) for r in pq.read_table(part).to_pylist()]
    return sorted(rows, key=lambda r: tuple((r[k] is not None, r[k]) for k in TABLE_KEYS[table]))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def table_differences(left: Path, right: Path) -> list[str]:
    """Every difference between two audits' tables: row keys, then values (floats exactly, NaN equal to NaN)."""
    problems = []
    for table, key in TABLE_KEYS.items():
        a, b = read_rows(left, table), read_rows(right, table)
        keys_a, keys_b = [tuple(r[k] for k in key) for r in a], [tuple(r[k] for k in key) for r in b]
        if keys_a != keys_b:
            problems.append(f"{table}: rows differ ({len(a)} vs {len(b)} rows)")
            continue
        for ra, rb in zip(a, b, strict=True):
            for column in ra:
                if not _same(ra[column], rb[column]):
                    where = tuple(ra[k] for k in key)
                    problems.append(f"{table}.{column} at {where}: {ra[column]!r} != {rb[column]!r}")
    return problems


def test_task_runner_follows_the_settings(tmp_path: Path) -> None:
    """Fast, no cluster: threads, a local Dask cluster of ``workers`` processes, or an existing scheduler."""
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.audit_flow import task_runner

    threads = task_runner(build_config(data=tmp_path, workers=3))
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3

    local = task_runner(build_config(data=tmp_path, workers=3, runner="dask"))
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert {k: local.cluster_kwargs[k] for k in ("n_workers", "threads_per_worker", "processes")} == {
        "n_workers": 3,
        "threads_per_worker": 1,
        "processes": True,
    }
    assert local.cluster_kwargs["env"]["OMP_WAIT_POLICY"]  # set before torch is imported in the workers

    remote = task_runner(build_config(data=tmp_path, runner="dask", dask_address="tcp://10.0.0.5:8786"))
    assert isinstance(remote, DaskTaskRunner)
    assert remote.address == "tcp://10.0.0.5:8786" and not remote.cluster_kwargs


def test_paths_are_made_absolute_for_workers_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.audit_flow import absolute_paths

    monkeypatch.chdir(tmp_path)
    config = build_config(data=Path("data"), out=Path("out"), **{"model.path": Path("m.pt"), "regions.cache": False})
    fixed = absolute_paths(config)
    assert (fixed.data, fixed.out, fixed.model.path) == (tmp_path / "data", tmp_path / "out", tmp_path / "m.pt")
    assert fixed.manifest is None and fixed.model_dump(exclude={"data", "out", "model"}) == config.model_dump(
        exclude={"data", "out", "model"}
    )


def test_remote_workers_and_a_loopback_api_give_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    from flows.audit_flow import _warn_if_unreachable

    _warn_if_unreachable("tcp://127.0.0.1:8786", "http://127.0.0.1:8123/api")  # all on this machine
    _warn_if_unreachable("tcp://10.0.0.5:8786", "http://10.0.0.2:4200/api")  # a reachable server
    assert not caplog.records
    _warn_if_unreachable("tcp://10.0.0.5:8786", "http://127.0.0.1:8123/api")
    assert "prefect server start --host 0.0.0.0" in caplog.text


def test_the_local_clusters_environment_changes_are_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dask's nanny sets OMP_NUM_THREADS=1 etc. in the starting process; the caller's later subprocesses must not."""
    import os

    from flows.audit_flow import _environ_restored

    monkeypatch.setenv("AUDIT_TEST_KEPT", "1")
    monkeypatch.delenv("AUDIT_TEST_ADDED", raising=False)
    with _environ_restored():
        os.environ["AUDIT_TEST_ADDED"] = "1"
        os.environ["AUDIT_TEST_KEPT"] = "2"
    assert "AUDIT_TEST_ADDED" not in os.environ and os.environ["AUDIT_TEST_KEPT"] == "1"


class _ServerWatch(threading.Thread):
    """Records every Prefect API server process started below this process (by us, Dask workers, ...)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.pids: set[int] = set()
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.done.is_set():
            for child in me.children(recursive=True):
                try:
                    if "prefect.server.api.server:create_app" in " ".join(child.cmdline()):
                        self.pids.add(child.pid)
                except psutil.Error:
                    continue
            self.done.wait(0.5)


@pytest.fixture(scope="module")
def no_api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The CLI's situation, no ``PREFECT_API_URL``, with a private Prefect home and database for this module.

    The startup timeout is set here, not through ``flows/__init__.py``'s environment defaults: under pytest,
    ``import flows`` finds this test folder (a namespace package), so that module may never run.
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_DATABASE_CONNECTION_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    home = tmp_path_factory.mktemp("prefect-home")
    updates = {
        PREFECT_HOME: home,
        PREFECT_SERVER_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{home}/prefect.db",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180,  # a new database's migrations on a loaded machine
    }
    with temporary_settings(updates=updates, restore_defaults={PREFECT_API_URL}):
        yield home


@pytest.mark.prefect
@pytest.mark.slow
def test_dask_flow_gives_the_same_rows_as_the_local_runner(no_api_url: Path, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    from flows.audit_flow import run_flow

    write_demo(tmp_path / "data", n=24, shortcut_rate=0.9, seed=2)
    watch = _ServerWatch()
    watch.start()
    try:
        # A local cluster of 2 worker processes, created and torn down by the run; the region cache is on, so the
        # workers also write it.
        dask_summary = run_flow(
            build_config(data=tmp_path / "data", out=tmp_path / "dask", runner="dask", workers=2, **SETTINGS)
        )
    finally:
        watch.done.set()
        watch.join()
    assert PREFECT_API_URL.value() is None  # the temporary server's URL was published for the run only
    assert len(watch.pids) == 1, f"Prefect servers started: {sorted(watch.pids)} (expected one for all processes)"

    # The plain local runner, detecting every region afresh (cache off), must give the same rows.
    local_summary = run_pipeline(
        build_config(data=tmp_path / "data", out=tmp_path / "local", **SETTINGS, **{"regions.cache": False})
    )
    assert dask_summary["counts"]["images"] == 24 and len(list((tmp_path / "dask" / "work").glob("shard-*.npz"))) == 3
    assert table_differences(tmp_path / "dask", tmp_path / "local") == []
    assert dask_summary["findings"] == local_summary["findings"]
