"""`audit serve` settings without a server: a clear error without PREFECT_API_URL, schedules and parameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from audit.config import AuditConfig, build_config
from audit.errors import ConfigError
from flows.cli import EXIT_ERROR, main


@pytest.fixture
def no_api_url():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


def test_serve_without_a_server_says_how_to_start_one(
    no_api_url: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["serve", "--interval", "10", "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    assert code == EXIT_ERROR
    err = capsys.readouterr().err
    assert "prefect server start" in err and "PREFECT_API_URL=http://127.0.0.1:4200/api" in err


def test_serve_needs_exactly_one_schedule(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--data", "x"])
    assert "--cron" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--data", "x", "--cron", "0 2 * * *", "--interval", "5"])


def test_bad_schedules_are_config_errors(tmp_path: Path) -> None:
    from flows.serve import build_deployment

    config = build_config(data=tmp_path)
    with pytest.raises(ConfigError, match="schedule"):
        build_deployment(config, cron="every night", interval=None, name="x")
    with pytest.raises(ConfigError, match="positive"):
        build_deployment(config, cron=None, interval=0, name="x")
    with pytest.raises(ConfigError, match="exactly one"):
        build_deployment(config, cron=None, interval=None, name="x")
    with pytest.raises(ConfigError, match="schedule"):
        build_deployment(config, cron="0 2 * * *", interval=None, name="x", timezone="Mars/Olympus")


def test_deployment_parameters_are_json_with_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.serve import build_deployment

    monkeypatch.chdir(tmp_path)
    config = build_config(data=Path("data"), out=Path("out"), methods="gradcam,ig", **{"probe.epochs": 3})
    deployment = build_deployment(config, cron="0 2 * * *", interval=None, name="nightly", timezone="Europe/Berlin")
    parameters = deployment.parameters["config"]
    assert parameters["data"] == str(tmp_path / "data") and parameters["out"] == str(tmp_path / "out")
    assert parameters["methods"] == ["gradcam", "ig"] and parameters["probe"]["epochs"] == 3
    # What the flow run receives validates back into the same settings (paths now absolute).
    restored = AuditConfig.model_validate(parameters)
    assert restored.data == tmp_path / "data" and restored.methods == ("gradcam", "ig")
    assert restored.model_dump(exclude={"data", "out"}) == config.model_dump(exclude={"data", "out"})
    assert deployment.name == "nightly"
    assert deployment.schedules[0].schedule.cron == "0 2 * * *"
    assert deployment.schedules[0].schedule.timezone == "Europe/Berlin"
