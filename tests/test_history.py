"""Run history: comparing two runs of the same dataset, and keeping each run under OUT/runs/ (no Prefect)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from audit.history import compare_runs, load_previous_summary, record_run, same_dataset


def _finding(label: str, kind: str, verdict: str, enrichment: float = 1.0, group: str | None = None) -> dict:
    return {
        "label": label,
        "group": group,
        "region_kind": kind,
        "method": "gradcam",
        "verdict": verdict,
        "enrichment": enrichment,
        "flip_rate": 0.1,
        "leakage_auc": 0.5,
        "reason": "…",
    }


def _summary(findings: list[dict], verdict: str, images: int = 24, **extra: object) -> dict:
    by = {v: sum(f["verdict"] == v for f in findings) for v in ("none", "watch", "shortcut")}
    return {
        "verdict": verdict,
        "findings": findings,
        "counts": {"images": images, "errors": 0, "findings": len(findings), "by_verdict": by},
        "model": {"kind": "probe", "heldout_accuracy": 0.9},
        "labels": ["normal", "opacity"],
        "region_kinds": ["text", "border", "marker"],
        **extra,
    }


@pytest.fixture
def two_runs() -> tuple[dict, dict]:
    previous = _summary(
        [
            _finding("opacity", "text", "watch", 3.0),  # escalates to shortcut
            _finding("opacity", "border", "watch", 2.5),  # resolved: none now
            _finding("normal", "text", "shortcut", 9.0),  # resolved: absent now
            _finding("normal", "border", "none", 1.1),  # new: watch now
            _finding("normal", "marker", "watch", 2.2),  # unchanged
        ],
        "shortcut",
        images=24,
    )
    current = _summary(
        [
            _finding("opacity", "text", "shortcut", 7.5),
            _finding("opacity", "border", "none", 1.2),
            _finding("normal", "border", "watch", 2.4),
            _finding("normal", "marker", "watch", 2.2),
            _finding("opacity", "marker", "watch", 4.0),  # new: absent before
        ],
        "shortcut",
        images=30,
    )
    return previous, current


def _keys(rows: list[dict]) -> list[tuple]:
    return [(r["label"], r["region_kind"]) for r in rows]


def test_compare_runs_lists_new_resolved_and_changed_findings(two_runs: tuple[dict, dict]) -> None:
    previous, current = two_runs
    changes = compare_runs(previous, current)
    assert changes is not None
    assert _keys(changes["new"]) == [("normal", "border"), ("opacity", "marker")]
    assert changes["new"][1]["before"] is None and changes["new"][1]["now"]["verdict"] == "watch"
    assert _keys(changes["resolved"]) == [("normal", "text"), ("opacity", "border")]
    assert changes["resolved"][0]["now"] is None and changes["resolved"][1]["now"]["verdict"] == "none"
    assert _keys(changes["verdict_changes"]) == [("opacity", "text")]
    change = changes["verdict_changes"][0]
    assert (change["before"]["verdict"], change["now"]["verdict"]) == ("watch", "shortcut")
    assert (change["before"]["enrichment"], change["now"]["enrichment"]) == (3.0, 7.5)
    # Every finding of either run is in the per-finding trend; the unchanged one in no list.
    assert len(changes["findings"]) == 6
    assert ("normal", "marker") not in _keys(changes["new"] + changes["resolved"] + changes["verdict_changes"])
    trend = {t["name"]: (t["before"], t["now"]) for t in changes["trend"]}
    assert trend["images"] == (24, 30)
    assert trend["overall verdict"] == ("shortcut", "shortcut")
    assert trend["findings at watch"] == (3, 3) and trend["findings at shortcut"] == (1, 1)
    json.dumps(changes)  # goes into summary.json as it is


def test_groups_are_part_of_the_key() -> None:
    previous = _summary([_finding("opacity", "text", "watch", group="site-a")], "watch")
    current = _summary([_finding("opacity", "text", "watch", group="site-b")], "watch")
    changes = compare_runs(previous, current)
    assert changes is not None
    assert [r["group"] for r in changes["new"]] == ["site-b"]
    assert [r["group"] for r in changes["resolved"]] == ["site-a"]


def test_no_previous_run_or_another_dataset_gives_no_comparison(two_runs: tuple[dict, dict]) -> None:
    previous, current = two_runs
    assert compare_runs(None, current) is None
    other_labels = {**previous, "labels": ["cat", "dog"]}
    assert compare_runs(other_labels, current) is None
    other_kinds = {**previous, "region_kinds": ["text"]}
    assert compare_runs(other_kinds, current) is None
    # An explicit dataset value decides when both runs have one, whatever the labels.
    assert compare_runs({**previous, "dataset": "/data/a"}, {**current, "dataset": "/data/b"}) is None
    assert same_dataset({**other_labels, "dataset": "/data/a"}, {**current, "dataset": "/data/a"})
    # Label order does not matter.
    assert compare_runs({**previous, "labels": ["opacity", "normal"]}, current) is not None


def _finish_run(out: Path, summary: dict) -> Path:
    """What summarise does: compare, write summary.json and index.html, record."""
    summary = {**summary, "changes": compare_runs(load_previous_summary(out), summary)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    (out / "index.html").write_text(f"<p>{summary['verdict']}</p>", encoding="utf-8")
    return record_run(out, summary)


def test_record_run_twice_keeps_both_and_points_at_the_second(two_runs: tuple[dict, dict], tmp_path: Path) -> None:
    previous, current = two_runs
    assert load_previous_summary(tmp_path) is None
    first = _finish_run(tmp_path, previous)
    second = _finish_run(tmp_path, current)  # usually within the same second: the name must still be unique

    runs = tmp_path / "runs"
    assert first != second and first.parent == second.parent == runs
    assert sorted(p.name for p in runs.iterdir() if p.is_dir() and not p.is_symlink()) == [first.name, second.name]
    assert all((p / "summary.json").is_file() and (p / "index.html").is_file() for p in (first, second))
    assert os.readlink(runs / "latest") == second.name  # relative, so the folder can be moved
    assert (runs / "latest" / "summary.json").is_file()
    assert (runs / "LATEST").read_text().strip() == second.name
    assert not list(runs.glob(".*.tmp"))

    loaded = load_previous_summary(tmp_path)
    assert loaded is not None and loaded["run"]["id"] == second.name
    assert loaded["counts"]["images"] == 30
    assert loaded["run"]["recorded_at"].endswith("Z")
    # The first run had nothing before it; the second was compared with the first.
    assert json.loads((first / "summary.json").read_text())["changes"] is None
    changes = json.loads((second / "summary.json").read_text())["changes"]
    assert changes["previous"]["id"] == first.name
    assert _keys(changes["verdict_changes"]) == [("opacity", "text")]


def test_latest_file_wins_over_the_symlink_and_bad_pointers_are_ignored(
    two_runs: tuple[dict, dict], tmp_path: Path
) -> None:
    previous, current = two_runs
    first = _finish_run(tmp_path, previous)
    _finish_run(tmp_path, current)
    runs = tmp_path / "runs"
    (runs / "LATEST").write_text(first.name + "\n")
    loaded = load_previous_summary(tmp_path)
    assert loaded is not None and loaded["run"]["id"] == first.name
    # Without LATEST the symlink is used (systems where only the link survived a copy).
    (runs / "LATEST").unlink()
    loaded = load_previous_summary(tmp_path)
    assert loaded is not None and loaded["counts"]["images"] == 30
    # A pointer that leaves OUT/runs, or a corrupt summary, means "no previous run", not a crash.
    (runs / "LATEST").write_text("../../etc\n")
    assert load_previous_summary(tmp_path) is None
    (runs / "LATEST").write_text(first.name)
    (first / "summary.json").write_text("{not json")
    assert load_previous_summary(tmp_path) is None
