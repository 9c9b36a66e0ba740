"""The Prefect flow wires the same stages: run it against a real (temporary) Prefect API server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from audit.config import build_config
from audit.data.demo import write_demo
from audit.pipeline import run_pipeline

pytestmark = [pytest.mark.prefect, pytest.mark.slow]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """One Prefect test server for the module, on 127.0.0.1, stopped afterwards (imported lazily: ~9 s)."""
    import os

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_flow_gives_the_same_tables_as_the_local_runner(prefect_server: None, tmp_path: Path) -> None:
    from prefect import get_client

    from flows.audit_flow import run_flow

    write_demo(tmp_path / "data", n=24, shortcut_rate=0.9, seed=2)
    settings = {
        "data": tmp_path / "data",
        "shard_size": 10,
        "gallery_size": 2,
        "probe.image_size": 64,
        "probe.epochs": 2,
    }
    flow_summary = run_flow(build_config(out=tmp_path / "flow", **settings))
    local_summary = run_pipeline(build_config(out=tmp_path / "local", **settings))

    assert (tmp_path / "flow" / "index.html").is_file()
    assert json.loads((tmp_path / "flow" / "summary.json").read_text())["verdict"] == flow_summary["verdict"]
    # Same data, same seeds: the flow and the plain runner agree on every finding.
    strip = [{k: v for k, v in f.items()} for f in flow_summary["findings"]]
    assert strip == local_summary["findings"]
    assert flow_summary["counts"] == local_summary["counts"]

    async def flow_runs() -> list:
        async with get_client() as client:
            return await client.read_flow_runs()

    import asyncio

    runs = asyncio.run(flow_runs())
    assert [r.state.type.value for r in runs if r.name] and all(r.state.is_completed() for r in runs)
