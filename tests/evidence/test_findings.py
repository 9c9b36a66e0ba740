"""Tests of the dataset-level statistics and the verdict scale, on constructed attribution columns."""

from __future__ import annotations

import math

import numpy as np
import pytest

from audit.config import FindingConfig
from audit.evidence.findings import (
    AttributionColumns,
    bootstrap_ratio,
    compute_findings,
    gate_failed,
    overall_verdict,
    proportion_difference_low,
)
from audit.store.schemas import FINDINGS

CONFIG = FindingConfig(bootstrap=200, seed=0)


def _columns(groups: list[tuple[str, int, int, float, float]], method: str = "gradcam", kind: str = "text"):
    """Rows for one method and region kind.

    Each group is (label, n_images, n_with_region, mass, area): the first ``n_with_region`` images carry the
    region with the given mass and area fractions (plus a little noise on the mass), the rest have none.
    """
    rng = np.random.default_rng(0)
    label, present, mass, area = [], [], [], []
    for name, n_images, n_with, mass_value, area_value in groups:
        for i in range(n_images):
            label.append(name)
            carries = i < n_with
            present.append(carries)
            mass.append(mass_value * rng.uniform(0.95, 1.05) if carries else math.nan)
            area.append(area_value if carries else math.nan)
    n = len(label)
    mass_array = np.array(mass)
    return AttributionColumns(
        label=np.array(label),
        method=np.full(n, method),
        region_kind=np.full(n, kind),
        present=np.array(present),
        mass=mass_array,
        area=np.array(area),
        hit=np.where(np.array(present), 1.0, math.nan),
        rank=np.where(np.array(present), 0.5, math.nan),
    )


def _concat(*parts: AttributionColumns) -> AttributionColumns:
    return AttributionColumns(
        **{
            field: np.concatenate([getattr(p, field) for p in parts])
            for field in AttributionColumns.__dataclass_fields__
        }
    )


def _by_label(rows: list[dict]) -> dict[str, dict]:
    return {row["label"]: row for row in rows}


def test_bootstrap_ratio_contains_truth_and_is_narrow() -> None:
    rng = np.random.default_rng(1)
    denominator = rng.uniform(0.01, 0.1, 2000)
    numerator = 3.0 * denominator * rng.uniform(0.8, 1.2, 2000)
    low, high = bootstrap_ratio(numerator, denominator, n_boot=500, seed=0)
    assert low < 3.0 < high
    assert high - low < 0.1
    assert bootstrap_ratio(numerator, denominator, n_boot=500, seed=0) == (low, high)  # seeded


def test_bootstrap_ratio_of_constant_ratio_is_a_point() -> None:
    denominator = np.array([0.1, 0.2, 0.05])
    low, high = bootstrap_ratio(4 * denominator, denominator, n_boot=100, seed=3)
    assert low == pytest.approx(4.0)
    assert high == pytest.approx(4.0)


def test_proportion_difference_low() -> None:
    assert proportion_difference_low(1.0, 10, 0.0, 10) == pytest.approx(1.0)
    assert proportion_difference_low(0.5, 100, 0.5, 100) < 0
    assert proportion_difference_low(0.5, 0, 0.5, 10) == -math.inf


def test_shortcut_attention_and_leakage() -> None:
    # Class "covid" carries the text region in 19/20 images and the model looks at it (enrichment ≈ 10);
    # "normal" carries it in 2/20.
    rows = compute_findings(_columns([("covid", 20, 19, 0.5, 0.05), ("normal", 20, 2, 0.5, 0.05)]), CONFIG)
    assert [(r["label"], r["region_kind"], r["method"]) for r in rows] == [
        ("covid", "text", "gradcam"),
        ("normal", "text", "gradcam"),
    ]
    covid = _by_label(rows)["covid"]
    assert covid["verdict"] == "shortcut"
    assert covid["attention"] is True and covid["leakage"] is True
    assert covid["n_images"] == 20 and covid["n_with_region"] == 19
    assert covid["presence_rate"] == pytest.approx(0.95)
    assert covid["presence_rate_other"] == pytest.approx(0.1)
    assert covid["enrichment"] == pytest.approx(10.0, rel=0.05)
    assert covid["ci_low"] <= covid["enrichment"] <= covid["ci_high"]
    assert covid["ci_low"] > CONFIG.enrichment_bar
    assert covid["mean_area_fraction"] == pytest.approx(0.05)
    assert covid["pointing_hit_rate"] == 1.0
    assert covid["rank_accuracy"] == 0.5
    assert "attention" in covid["reason"] and "leakage" in covid["reason"]
    # The other class has too few carriers for any verdict.
    normal = _by_label(rows)["normal"]
    assert normal["verdict"] == "none"
    assert "only 2 image(s)" in normal["reason"]
    assert set(covid) == set(FINDINGS.names)


def test_attention_without_leakage_is_watch() -> None:
    rows = _by_label(compute_findings(_columns([("a", 20, 20, 0.5, 0.05), ("b", 20, 20, 0.05, 0.05)]), CONFIG))
    assert rows["a"]["verdict"] == "watch"
    assert rows["a"]["attention"] is True and rows["a"]["leakage"] is False
    assert "no leakage" in rows["a"]["reason"]
    assert rows["b"]["verdict"] == "none"
    assert rows["b"]["enrichment"] == pytest.approx(1.0, rel=0.05)


def test_leakage_with_moderate_attention_is_watch() -> None:
    # Enrichment ≈ 1.8: above watch_bar (1.5), below enrichment_bar (2).
    rows = _by_label(compute_findings(_columns([("a", 30, 30, 0.09, 0.05), ("b", 30, 3, 0.09, 0.05)]), CONFIG))
    a = rows["a"]
    assert a["leakage"] is True and a["attention"] is False
    assert CONFIG.watch_bar < a["ci_low"] < CONFIG.enrichment_bar
    assert a["verdict"] == "watch"
    assert a["reason"].startswith("leakage")


def test_leakage_with_low_attention_is_none() -> None:
    rows = _by_label(compute_findings(_columns([("a", 30, 30, 0.05, 0.05), ("b", 30, 3, 0.05, 0.05)]), CONFIG))
    assert rows["a"]["leakage"] is True
    assert rows["a"]["attention"] is False
    assert rows["a"]["verdict"] == "none"


def test_small_presence_difference_is_not_leakage() -> None:
    # 100% vs 90%: significant perhaps, but below leakage_bar (0.2).
    rows = _by_label(compute_findings(_columns([("a", 40, 40, 0.09, 0.05), ("b", 40, 36, 0.09, 0.05)]), CONFIG))
    assert rows["a"]["leakage"] is False
    assert rows["a"]["verdict"] == "none"


def test_fewer_than_min_images_gives_none_with_reason() -> None:
    rows = _by_label(compute_findings(_columns([("a", 4, 4, 0.9, 0.01), ("b", 40, 0, 0.0, 0.0)]), CONFIG))
    a = rows["a"]
    assert a["enrichment"] > 50
    assert a["attention"] is False
    assert a["verdict"] == "none"
    assert a["reason"] == "only 4 image(s) of the class carry the region (< 5)"
    b = rows["b"]
    assert b["n_with_region"] == 0
    assert math.isnan(b["enrichment"]) and math.isnan(b["ci_low"])
    assert b["verdict"] == "none"
    # min_images is a setting: with 4 allowed, the same data is a shortcut.
    relaxed = FindingConfig(bootstrap=200, min_images=4)
    a_relaxed = _by_label(compute_findings(_columns([("a", 4, 4, 0.9, 0.01), ("b", 40, 0, 0.0, 0.0)]), relaxed))["a"]
    assert a_relaxed["verdict"] == "shortcut"


def test_methods_and_kinds_are_kept_apart() -> None:
    looked_at = _columns([("a", 20, 20, 0.5, 0.05), ("b", 20, 2, 0.5, 0.05)], method="gradcam", kind="text")
    ignored = _columns([("a", 20, 20, 0.05, 0.05), ("b", 20, 2, 0.05, 0.05)], method="gradcam", kind="border")
    other_method = _columns([("a", 20, 20, 0.05, 0.05), ("b", 20, 2, 0.05, 0.05)], method="gradcampp", kind="text")
    rows = compute_findings(_concat(looked_at, ignored, other_method), CONFIG)
    verdicts = {(r["label"], r["region_kind"], r["method"]): r["verdict"] for r in rows}
    assert len(rows) == 6
    assert verdicts[("a", "text", "gradcam")] == "shortcut"
    assert verdicts[("a", "border", "gradcam")] == "none"
    assert verdicts[("a", "text", "gradcampp")] == "none"
    assert all(r["n_images"] == 20 for r in rows)


def test_overall_verdict() -> None:
    assert overall_verdict([]) == "none"
    assert overall_verdict([{"verdict": "none"}, {"verdict": "watch"}]) == "watch"
    assert overall_verdict([{"verdict": "watch"}, {"verdict": "shortcut"}, {"verdict": "none"}]) == "shortcut"


@pytest.mark.parametrize(
    ("verdict", "fail_on", "failed"),
    [
        ("shortcut", None, False),
        ("none", "watch", False),
        ("watch", "watch", True),
        ("shortcut", "watch", True),
        ("watch", "shortcut", False),
        ("shortcut", "shortcut", True),
        ("none", "none", True),
    ],
)
def test_gate_failed(verdict: str, fail_on: str | None, failed: bool) -> None:
    assert gate_failed(verdict, fail_on) is failed
