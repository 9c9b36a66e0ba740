"""The command line: demo, sql, and clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from audit.store.catalog import build_catalog
from audit.store.parquet import rows_to_table, write_part
from flows.cli import EXIT_ERROR, EXIT_OK, main


def test_demo_writes_classes_manifest_and_ground_truth(tmp_path: Path) -> None:
    assert main(["demo", "--out", str(tmp_path), "--n", "8", "--shortcut-rate", "0.9", "--seed", "1"]) == EXIT_OK
    rows = list(csv.DictReader((tmp_path / "manifest.csv").open()))
    assert len(rows) == 8 and {r["label"] for r in rows} == {"normal", "opacity"}
    assert all((tmp_path / r["path"]).is_file() for r in rows)
    assert (tmp_path / "ground_truth.csv").is_file()


def test_demo_rejects_a_bad_rate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path), "--shortcut-rate", "1.5"]) == EXIT_ERROR
    assert "error:" in capsys.readouterr().err


@pytest.fixture
def finished_audit(tmp_path: Path) -> Path:
    rows = [{"path": "a/<b>.png", "stage": "decode", "message": "broken"}]
    write_part(tmp_path, "errors", rows_to_table("errors", rows), "x")
    build_catalog(tmp_path)
    return tmp_path


def test_sql_prints_rows_in_each_format(finished_audit: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sql", str(finished_audit), "SELECT path, stage FROM errors", "--format", "json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == [{"path": "a/<b>.png", "stage": "decode"}]
    assert main(["sql", str(finished_audit), "SELECT count(*) AS n FROM errors"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].strip() == "n" and "(1 row)" in printed


def test_sql_refuses_writes(finished_audit: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sql", str(finished_audit), "DELETE FROM errors"]) == EXIT_ERROR
    assert "read-only" in capsys.readouterr().err
    main(["sql", str(finished_audit), "SELECT count(*) AS n FROM errors", "--format", "csv"])
    assert capsys.readouterr().out.split() == ["n", "1"]


def test_run_without_data_explains_what_is_needed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--out", "x"]) == EXIT_ERROR
    assert "--data" in capsys.readouterr().err


def test_unknown_method_is_refused_with_the_valid_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["demo", "--out", str(tmp_path / "d"), "--n", "4"])
    code = main(
        ["run", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--methods", "nope", "--no-prefect"]
    )
    assert code == EXIT_ERROR
    err = capsys.readouterr().err
    assert "unknown saliency method 'nope'" in err and "gradcam" in err
