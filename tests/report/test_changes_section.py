"""The report's "Since the previous run" section, rendered from summary["changes"] (audit.history.compare_runs)."""

from __future__ import annotations

import re

from audit.history import compare_runs
from audit.report import ReportContent, render_report

EVIL = "<script>alert(1)</script>"


def _finding(label: str, kind: str, verdict: str, enrichment: float) -> dict:
    return {
        "label": label,
        "group": None,
        "region_kind": kind,
        "method": "gradcam",
        "verdict": verdict,
        "enrichment": enrichment,
        "flip_rate": 0.25,
        "leakage_auc": 0.71,
        "mean_mass_fraction": 0.3,
        "mean_area_fraction": 0.05,
    }


def _summary(findings: list[dict], verdict: str, images: int) -> dict:
    return {
        "verdict": verdict,
        "findings": findings,
        "counts": {"images": images, "errors": 0, "by_verdict": {"watch": 1, "shortcut": 0}},
        "model": {"kind": "probe", "heldout_accuracy": 0.9},
        "labels": [EVIL, "normal"],
        "region_kinds": ["text", "border"],
    }


def _content(changes: dict | None) -> ReportContent:
    return ReportContent(
        title="demo",
        verdict="watch",
        gate=None,
        findings=[],
        counts={"images": 30, "errors": 0},
        model={"kind": "probe", "arch": "probe-cnn", "heldout_accuracy": 0.9},
        class_maps=[],
        gallery=[],
        errors=[],
        settings={},
        versions={},
        changes=changes,
    )


def _section(html: str) -> str:
    match = re.search(r'<section id="changes">(.*?)</section>', html, re.S)
    assert match, "no changes section"
    return match.group(1)


def test_changes_section_lists_new_resolved_and_the_trend() -> None:
    previous = _summary([_finding(EVIL, "text", "none", 1.2), _finding("normal", "border", "watch", 2.5)], "watch", 24)
    previous["run"] = {
        "id": "20261123T020000Z",
        "folder": "/x/runs/20261123T020000Z",
        "recorded_at": "2026-11-23T02:00:00Z",
    }
    current = _summary([_finding(EVIL, "text", "watch", 3.4), _finding("normal", "border", "none", 1.1)], "watch", 30)
    html = render_report(_content(compare_runs(previous, current)))
    section = _section(html)

    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in section
    assert "2026-11-23T02:00:00Z" in section and "runs/20261123T020000Z" in section
    new = section.split("New findings (1)")[1].split("Resolved findings (1)")
    assert "text regions" in new[0] and "1.2 → 3.4" in new[0]
    assert "border regions" in new[1] and "2.5 → 1.1" in new[1]
    assert "Verdict changes" not in section
    # The trend table: images 24 -> 30, bold because it changed.
    assert re.search(
        r"<th scope=\"row\">images</th><td class=\"num\">24</td><td class=\"num\"><strong>30</strong>", section
    )
    assert html.index('id="changes"') < html.index('id="audited"')


def test_no_section_without_a_previous_run() -> None:
    html = render_report(_content(None))
    assert 'id="changes"' not in html and "Since the previous run" not in html


def test_unchanged_runs_say_so() -> None:
    summary = _summary([_finding("normal", "text", "none", 1.0)], "none", 24)
    section = _section(render_report(_content(compare_runs(summary, summary))))
    assert "No finding changed its verdict." in section
    assert "All 1 findings were" in section and 'id="finding-trend"' not in section
