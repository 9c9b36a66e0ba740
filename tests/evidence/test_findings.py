"""Tests of the dataset-level statistics and the verdict scale, on constructed attribution columns."""

from __future__ import annotations

import math

import numpy as np
import pytest

from audit.config import FindingConfig
from audit.evidence.findings import (
    AttributionColumns,
    accuracy_above_chance,
    attention_bar,
    bootstrap_ratio,
    cap_at_watch,
    compute_findings,
    excess_p_value,
    gate_failed,
    holm,
    overall_verdict,
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
            if field != "group"
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


def _leak(auc: float, low: float, leaks: bool) -> dict:
    return {
        "auc": auc,
        "auc_ci_low": low,
        "auc_ci_high": min(1.0, auc + 0.05),
        "leakage": leaks,
        "balanced_accuracy": auc,
        "baseline_balanced_accuracy": 0.5,
    }


def _depend(difference_low: float) -> dict:
    return {
        "flip_difference": difference_low + 0.1,
        "flip_difference_ci_low": difference_low,
        "flip_difference_ci_high": difference_low + 0.2,
        "n": 20,
        "n_control": 20,
        "flip_rate": 0.6,
        "flip_rate_control": 0.05,
        "effect": 0.4,
        "effect_ci_low": 0.3,
        "effect_ci_high": 0.5,
        "effect_control": 0.02,
        "effect_control_ci_low": 0.0,
        "effect_control_ci_high": 0.04,
        "difference": difference_low + 0.1,
        "difference_ci_low": difference_low,
        "difference_ci_high": difference_low + 0.2,
    }


LEAKS = {("covid", None, "text"): _leak(0.92, 0.85, True), ("normal", None, "text"): _leak(0.92, 0.85, True)}


def test_holm_adjustment_matches_the_step_down_rule() -> None:
    p = np.array([0.01, 0.04, math.nan, 0.03, 0.5])
    adjusted = holm(p)
    # Sorted 0.01, 0.03, 0.04, 0.5 with m = 4: 0.04, 0.09, max(0.09, 0.08) = 0.09, max(0.09, 0.5) = 0.5.
    np.testing.assert_allclose(adjusted[[0, 3, 1, 4]], [0.04, 0.09, 0.09, 0.5])
    assert math.isnan(adjusted[2])
    assert holm(np.array([0.6, 0.7])).max() == 1.0  # capped


def test_excess_p_value_is_small_only_when_mass_exceeds_area() -> None:
    rng = np.random.default_rng(0)
    area = rng.uniform(0.02, 0.05, 30)
    assert excess_p_value(area * 5, area) < 1e-4
    assert excess_p_value(area * rng.uniform(0.5, 1.5, 30), area) > 0.01
    assert math.isnan(excess_p_value(area[:1] * 2, area[:1]))  # one image: no test


def test_attention_bar_is_capped_for_large_regions() -> None:
    assert attention_bar(2.0, 0.05) == 2.0
    assert attention_bar(2.0, 0.6) == pytest.approx((1 + 1 / 0.6) / 2)  # 1.33: reachable by a 60% region
    # A region covering 60% of the image that holds 95% of the saliency is attention; the plain bar of 2 is not
    # reachable (the largest possible enrichment is 1 / 0.6 = 1.67).
    rows = _by_label(compute_findings(_columns([("a", 30, 30, 0.95, 0.6), ("b", 30, 30, 0.6, 0.6)]), CONFIG))
    assert rows["a"]["attention"] is True and rows["b"]["attention"] is False


def test_two_kinds_of_evidence_make_a_shortcut() -> None:
    # Class "covid" carries the text region in 19/20 images and the model looks at it (enrichment ≈ 10);
    # "normal" carries it in 2/20; the region's presence predicts the class.
    columns = _columns([("covid", 20, 19, 0.5, 0.05), ("normal", 20, 2, 0.5, 0.05)])
    rows = compute_findings(columns, CONFIG, leakage=LEAKS)
    assert [(r["label"], r["region_kind"], r["method"]) for r in rows] == [
        ("covid", "text", "gradcam"),
        ("normal", "text", "gradcam"),
    ]
    covid = _by_label(rows)["covid"]
    assert covid["verdict"] == "shortcut"
    assert covid["attention"] is True and covid["leakage"] is True and covid["dependence"] is False
    assert covid["evidence"] == 2
    assert covid["n_images"] == 20 and covid["n_with_region"] == 19
    assert covid["presence_rate"] == pytest.approx(0.95)
    assert covid["presence_rate_other"] == pytest.approx(0.1)
    assert covid["enrichment"] == pytest.approx(10.0, rel=0.05)
    assert covid["ci_low"] <= covid["enrichment"] <= covid["ci_high"]
    assert covid["ci_low"] > CONFIG.enrichment_bar
    assert covid["p_adjusted"] < 0.05 and covid["p_adjusted"] >= covid["p_value"]
    assert covid["leakage_auc"] == 0.92
    assert covid["mean_area_fraction"] == pytest.approx(0.05)
    assert covid["pointing_hit_rate"] == 1.0
    assert covid["rank_accuracy"] == 0.5
    assert "attention: enrichment" in covid["reason"] and "leakage: the region predicts" in covid["reason"]
    assert "dependence not tested" in covid["reason"]
    # The other class has too few carriers for any verdict.
    normal = _by_label(rows)["normal"]
    assert normal["verdict"] == "none"
    assert "only 2 image(s)" in normal["reason"]
    assert set(covid) == set(FINDINGS.names)
    # Attention and dependence, without leakage: also a shortcut.
    both = _by_label(compute_findings(columns, CONFIG, dependence={("covid", None, "text"): _depend(0.2)}))
    assert both["covid"]["verdict"] == "shortcut" and both["covid"]["dependence"] is True
    assert "flips 60% of predictions vs 5% for controls" in both["covid"]["reason"]
    # Dependence and leakage, with the attention of a method that failed the sanity check: attention is reported
    # but does not count, and the other two still make a shortcut.
    insane = _by_label(
        compute_findings(
            columns,
            CONFIG,
            dependence={("covid", None, "text"): _depend(0.2)},
            leakage=LEAKS,
            sanity={"gradcam": False},
        )
    )["covid"]
    assert insane["attention"] is False and insane["sanity_passed"] is False
    assert insane["verdict"] == "shortcut" and insane["evidence"] == 2
    assert "failed the sanity check" in insane["reason"]


def test_one_kind_of_evidence_is_watch() -> None:
    rows = _by_label(compute_findings(_columns([("a", 20, 20, 0.5, 0.05), ("b", 20, 20, 0.05, 0.05)]), CONFIG))
    assert rows["a"]["verdict"] == "watch"
    assert rows["a"]["attention"] is True and rows["a"]["leakage"] is False
    assert "leakage not measured" in rows["a"]["reason"]
    assert rows["b"]["verdict"] == "none"
    assert rows["b"]["enrichment"] == pytest.approx(1.0, rel=0.05)
    # Leakage alone (the model does not look at the region): watch, a data problem.
    low = _columns([("a", 30, 30, 0.05, 0.05), ("b", 30, 3, 0.05, 0.05)])
    leak_only = _by_label(compute_findings(low, CONFIG, leakage={("a", None, "text"): _leak(0.9, 0.8, True)}))
    assert leak_only["a"]["attention"] is False and leak_only["a"]["verdict"] == "watch"
    # A dependence interval that reaches below the bar is not dependence.
    weak = _by_label(compute_findings(low, CONFIG, dependence={("a", None, "text"): _depend(0.01)}))
    assert weak["a"]["dependence"] is False and weak["a"]["verdict"] == "none"
    assert "no dependence" in weak["a"]["reason"]


def test_a_sanity_failure_alone_cannot_drive_a_verdict() -> None:
    columns = _columns([("a", 20, 20, 0.5, 0.05), ("b", 20, 20, 0.05, 0.05)])
    rows = _by_label(compute_findings(columns, CONFIG, sanity={"gradcam": False}))
    assert rows["a"]["attention"] is False and rows["a"]["verdict"] == "none"
    passed = _by_label(compute_findings(columns, CONFIG, sanity={"gradcam": True}))
    assert passed["a"]["verdict"] == "watch" and passed["a"]["sanity_passed"] is True


def test_findings_per_group_find_a_shortcut_of_one_site() -> None:
    # Site "x": the model looks at the region in class a; site "y": it does not. Over all images the attention is
    # diluted but a per-site row shows it.
    site_x = _columns([("a", 20, 20, 0.5, 0.05), ("b", 20, 20, 0.05, 0.05)])
    site_y = _columns([("a", 20, 20, 0.05, 0.05), ("b", 20, 20, 0.05, 0.05)])
    columns = _concat(site_x, site_y)
    columns = AttributionColumns(**{**columns.__dict__, "group": np.array(["x"] * 40 + ["y"] * 40, dtype=object)})
    rows = {(r["label"], r["group"]): r for r in compute_findings(columns, CONFIG)}
    assert set(rows) == {(label, g) for label in "ab" for g in (None, "x", "y")}
    assert rows[("a", "x")]["attention"] is True and rows[("a", "x")]["n_images"] == 20
    assert rows[("a", "y")]["attention"] is False
    assert rows[("a", None)]["n_images"] == 40


def test_fewer_than_min_images_gives_none_with_reason() -> None:
    leaks = {("a", None, "text"): _leak(0.9, 0.8, True)}
    rows = _by_label(
        compute_findings(_columns([("a", 4, 4, 0.9, 0.01), ("b", 40, 0, 0.0, 0.0)]), CONFIG, leakage=leaks)
    )
    a = rows["a"]
    assert a["enrichment"] > 50
    assert a["attention"] is False
    assert a["verdict"] == "none"
    assert a["reason"] == "only 4 image(s) of the class carry the region (< 5)"
    b = rows["b"]
    assert b["n_with_region"] == 0
    assert math.isnan(b["enrichment"]) and math.isnan(b["ci_low"])
    assert b["verdict"] == "none"
    # min_images is a setting: with 4 allowed, the same data is a verdict. Not attention: four images cannot make
    # the one-sided Wilcoxon test significant (its smallest p-value is 1/16), so the evidence is leakage alone.
    relaxed = FindingConfig(bootstrap=200, min_images=4)
    data = _columns([("a", 4, 4, 0.9, 0.01), ("b", 40, 0, 0.0, 0.0)])
    a_relaxed = _by_label(compute_findings(data, relaxed, leakage=leaks))["a"]
    assert a_relaxed["verdict"] == "watch" and a_relaxed["p_value"] == pytest.approx(1 / 16)


def test_methods_and_kinds_are_kept_apart() -> None:
    looked_at = _columns([("a", 20, 20, 0.5, 0.05), ("b", 20, 2, 0.5, 0.05)], method="gradcam", kind="text")
    ignored = _columns([("a", 20, 20, 0.05, 0.05), ("b", 20, 2, 0.05, 0.05)], method="gradcam", kind="border")
    other_method = _columns([("a", 20, 20, 0.05, 0.05), ("b", 20, 2, 0.05, 0.05)], method="gradcampp", kind="text")
    leaks = {("a", None, kind): _leak(0.9, 0.8, True) for kind in ("text", "border")}
    rows = compute_findings(_concat(looked_at, ignored, other_method), CONFIG, leakage=leaks)
    verdicts = {(r["label"], r["region_kind"], r["method"]): r["verdict"] for r in rows}
    assert len(rows) == 6
    assert verdicts[("a", "text", "gradcam")] == "shortcut"
    assert verdicts[("a", "border", "gradcam")] == "watch"  # leakage alone
    assert verdicts[("a", "text", "gradcampp")] == "watch"
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


def test_a_model_no_better_than_chance_cannot_give_a_shortcut() -> None:
    labels = np.array([0] * 60 + [1] * 40)
    rng = np.random.default_rng(0)
    chance = rng.random(100) < 0.6  # about the majority share
    above, sentence = accuracy_above_chance(chance, labels)
    assert above is False and "vs 0.600" in sentence
    good = np.arange(100) % 10 != 0  # 90%
    assert accuracy_above_chance(good, labels)[0] is True
    rows = compute_findings(
        _columns([("covid", 20, 19, 0.5, 0.05), ("normal", 20, 2, 0.5, 0.05)]), CONFIG, leakage=LEAKS
    )
    assert any(r["verdict"] == "shortcut" for r in rows)
    cap_at_watch(rows, sentence)
    assert not any(r["verdict"] == "shortcut" for r in rows)
    assert any(r["reason"].startswith("capped at watch: the model is no better than chance") for r in rows)
