"""`audit serve` against a real `prefect server start`: scheduled runs complete, each kept under OUT/runs/.

The temporary server Prefect starts on its own has no scheduler, so this test starts a real one (fresh database:
20-30 s here), serves a tiny demo audit every 10 s, waits for two completed scheduled runs, and stops everything
it started. About 2 minutes on the shared 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from audit.data.demo import write_demo
from audit.history import load_previous_summary

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

SERVER_READY_SECONDS = 180
RUNS_DONE_SECONDS = 240
STOP_SECONDS = 30
CONFIG = """\
shard_size = 10
gallery_size = 2

[probe]
image_size = 64
epochs = 2
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(command: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    """Start ``command`` in a process group of its own (so it and its children can be stopped together)."""
    with log.open("wb") as sink:
        return subprocess.Popen(
            command, env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip


def _group_alive(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            alive.append(int(stat.parent.name))
    return alive


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process (a graceful stop), SIGKILL to its whole group after a timeout or for leftovers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + STOP_SECONDS
    while _group_alive(process.pid) and time.monotonic() < deadline:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    if process.poll() is None:
        process.wait(STOP_SECONDS)


def _tail(log: Path, lines: int = 60) -> str:
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else "(no output)"
    return f"--- {log.name} (last {lines} lines) ---\n" + "\n".join(text.splitlines()[-lines:])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to check that every process is gone")
def test_serve_runs_the_audit_on_a_schedule_and_keeps_each_run(tmp_path: Path) -> None:
    write_demo(tmp_path / "data", n=24, shortcut_rate=0.9, seed=2)
    (tmp_path / "audit.toml").write_text(CONFIG, encoding="utf-8")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "5",
    }
    env.pop("PREFECT_API_URL", None)
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    server = _start(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env,
        server_log,
        tmp_path,
    )
    served: subprocess.Popen | None = None

    def logs() -> str:
        return _tail(server_log) + "\n" + _tail(serve_log)

    try:
        deadline = time.monotonic() + SERVER_READY_SECONDS
        while True:
            assert server.poll() is None, f"the Prefect server exited with {server.returncode}\n{logs()}"
            try:
                if httpx.get(f"{api}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"no healthy Prefect server after {SERVER_READY_SECONDS} s\n{logs()}"
            time.sleep(1)

        # Relative --data and --out: the deployment must store them as absolute paths.
        served = _start(
            [sys.executable, "-m", "flows.cli", "serve", "--interval", "10", "--name", "test-schedule",
             "--config", "audit.toml", "--data", "data", "--out", "out"],
            {**env, "PREFECT_API_URL": api},
            serve_log,
            tmp_path,
        )  # fmt: skip
        completed: list[dict] = []
        deadline = time.monotonic() + RUNS_DONE_SECONDS
        while len(completed) < 2:
            assert served.poll() is None, f"audit serve exited with {served.returncode}\n{logs()}"
            assert time.monotonic() < deadline, f"no 2 completed runs after {RUNS_DONE_SECONDS} s\n{logs()}"
            time.sleep(3)
            runs = httpx.post(f"{api}/flow_runs/filter", json={"sort": "START_TIME_ASC"}, timeout=10).json()
            failed = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
            assert not failed, f"flow runs failed: {[(r['name'], r['state_name']) for r in failed]}\n{logs()}"
            completed = [r for r in runs if r["state_type"] == "COMPLETED"]

        # Both runs came from the schedule of our deployment, with the configuration as JSON parameters.
        deployments = httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()
        assert [d["name"] for d in deployments] == ["test-schedule"], logs()
        deployment = deployments[0]
        assert {r["deployment_id"] for r in completed} == {deployment["id"]}
        assert all((r.get("created_by") or {}).get("type") == "SCHEDULE" for r in completed), completed
        config = deployment["parameters"]["config"]
        assert config["out"] == str(tmp_path / "out") and config["data"] == str(tmp_path / "data")
        assert config["shard_size"] == 10 and config["probe"]["epochs"] == 2

        # Each run is kept in its own folder; latest points at the newest; the second compares with the first.
        out = tmp_path / "out"
        assert (out / "summary.json").is_file(), logs()
        assert (out / "runs").is_dir(), "no OUT/runs: does summarise call audit.history.record_run?"
        folders = sorted(p for p in (out / "runs").iterdir() if p.is_dir() and not p.is_symlink())
        assert len(folders) >= 2, f"run folders: {[p.name for p in folders]}\n{logs()}"
        first, second = folders[0], folders[1]
        assert all((p / "summary.json").is_file() and (p / "index.html").is_file() for p in folders)
        assert json.loads((first / "summary.json").read_text())["changes"] is None
        changes = json.loads((second / "summary.json").read_text())["changes"]
        assert changes is not None and changes["previous"]["id"] == first.name
        assert {t["name"]: t["now"] for t in changes["trend"]}["images"] == 24
        assert "Since the previous run" in (second / "index.html").read_text(encoding="utf-8")
        latest = load_previous_summary(out)
        assert latest is not None and latest["run"]["id"] == folders[-1].name

        # Stopped with SIGTERM, audit serve pauses its schedule: no runs pile up while nothing serves them.
        _stop(served)
        paused = httpx.get(f"{api}/deployments/{deployment['id']}", timeout=10).json()["paused"]
        assert paused, f"the deployment is still active after audit serve stopped\n{logs()}"
    finally:
        for process in (served, server):
            if process is not None:
                _stop(process)
    assert served.returncode is not None and server.returncode is not None
    assert not _group_alive(served.pid), f"audit serve left processes behind\n{logs()}"
    assert not _group_alive(server.pid), f"the Prefect server left processes behind\n{logs()}"
