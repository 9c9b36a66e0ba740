"""Tests of the leakage of the region itself: features of region boxes, and cross-validated prediction of the label."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from audit.errors import DataError, ShapeError
from audit.evidence.leakage import (
    FEATURES,
    NEUTRAL_POSITION,
    _bootstrap_weight_chunks,
    _group_codes,
    _RankedScores,
    _union_areas,
    _weighted_aucs,
    fold_assignment,
    leakage,
    leakage_table,
    region_features,
)

CLASSES = ("normal", "opacity")
N_BOOT = 300  # enough for stable 95% bounds in these tests, and fast


def _presence_features(present: np.ndarray, center_y: np.ndarray | None = None) -> np.ndarray:
    """float [N, 6] features of a 40 × 20 px box at the bottom left of a 200 px image (or at ``center_y``)."""
    n = len(present)
    center_y = np.full(n, 0.9) if center_y is None else center_y
    features = np.empty((n, len(FEATURES)))
    features[:, 0] = features[:, 1] = present
    features[:, 2] = present * 0.02
    features[:, 3] = np.where(present > 0, 0.1, NEUTRAL_POSITION)
    features[:, 4] = np.where(present > 0, center_y, NEUTRAL_POSITION)
    features[:, 5] = np.where(present > 0, np.minimum(0.1, np.minimum(center_y, 1 - center_y)), NEUTRAL_POSITION)
    return features


def _by_class(rows: list[dict]) -> dict[str, dict]:
    return {row["class"]: row for row in rows}


# ---------------------------------------------------------------------------------------------------------------
# region_features


def test_region_features_exact_values_union_centre_and_edge_distance() -> None:
    image_ids = ["a", "b", "c"]
    widths, heights = np.array([100, 200, 80]), np.array([50, 100, 80])
    regions = [
        # Two overlapping boxes in a: union 400 + 400 − 100 = 700 px of 5000; bounding box (10, 5)–(40, 35).
        {"image_id": "a", "kind": "text", "x0": 10, "y0": 5, "x1": 30, "y1": 25},
        {"image_id": "a", "kind": "text", "x0": 20, "y0": 15, "x1": 40, "y1": 35},
        # A marker partly outside b: clipped to (190, 0)–(200, 10).
        {"image_id": "b", "kind": "marker", "x0": 190, "y0": -10, "x1": 210, "y1": 10},
        # Ignored: a kind not asked for, an image not in the list.
        {"image_id": "b", "kind": "border", "x0": 0, "y0": 0, "x1": 200, "y1": 10},
        {"image_id": "zzz", "kind": "text", "x0": 0, "y0": 0, "x1": 5, "y1": 5},
    ]
    out = region_features(image_ids, widths, heights, regions, ["text", "marker", "watermark"])

    assert set(out) == {"text", "marker", "watermark"}
    assert all(f.shape == (3, len(FEATURES)) and f.dtype == np.float64 for f in out.values())
    # a: centre (25, 20) → (0.25, 0.4); nearest edge: top at 20 px, ÷ short side 50 = 0.4.
    np.testing.assert_allclose(out["text"][0], [1, 2, 700 / 5000, 0.25, 0.4, 0.4])
    # b: centre (195, 5) → (0.975, 0.05); nearest edge 5 px (right and top) ÷ 100.
    np.testing.assert_allclose(out["marker"][1], [1, 1, 100 / 20000, 0.975, 0.05, 0.05])
    neutral = [0, 0, 0, NEUTRAL_POSITION, NEUTRAL_POSITION, NEUTRAL_POSITION]
    for kind, image in (("text", 1), ("text", 2), ("marker", 0), ("marker", 2), ("watermark", 0), ("watermark", 1)):
        np.testing.assert_array_equal(out[kind][image], neutral)


def test_region_features_box_wholly_outside_counts_but_adds_no_area() -> None:
    regions = [{"image_id": "a", "kind": "text", "x0": 120, "y0": 0, "x1": 150, "y1": 10}]
    out = region_features(["a"], np.array([100]), np.array([100]), regions, ["text"])
    assert out["text"][0, :3].tolist() == [1.0, 1.0, 0.0]


def test_region_features_no_regions_is_all_neutral() -> None:
    out = region_features(["a", "b"], np.array([10, 10]), np.array([10, 10]), [], ["text"])
    np.testing.assert_array_equal(out["text"], [[0, 0, 0, 0.5, 0.5, 0.5]] * 2)


@pytest.mark.parametrize("max_boxes", [6, 45])  # 45 > 32 boxes per image exercises the sweep instead of the batch
def test_union_area_matches_a_pixel_raster(max_boxes: int) -> None:
    rng = np.random.default_rng(max_boxes)
    counts = rng.integers(1, max_boxes + 1, size=12)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    n = int(counts.sum())
    x0, y0 = rng.integers(0, 30, n), rng.integers(0, 30, n)
    x1, y1 = x0 + rng.integers(0, 12, n), y0 + rng.integers(0, 12, n)
    areas = _union_areas(*(v.astype(np.float64) for v in (x0, y0, x1, y1)), starts, counts)
    for g, (start, count) in enumerate(zip(starts, counts, strict=True)):
        raster = np.zeros((50, 50), dtype=bool)
        for i in range(start, start + count):
            raster[y0[i] : y1[i], x0[i] : x1[i]] = True
        assert areas[g] == raster.sum()


def test_region_features_rejects_bad_input() -> None:
    box = {"image_id": "a", "kind": "text", "x0": 5, "y0": 0, "x1": 1, "y1": 3}
    with pytest.raises(DataError, match="x0 <= x1"):
        region_features(["a"], np.array([10]), np.array([10]), [box], ["text"])
    with pytest.raises(ShapeError, match="widths"):
        region_features(["a", "b"], np.array([10]), np.array([10, 10]), [], ["text"])
    with pytest.raises(DataError, match="unique"):
        region_features(["a", "a"], np.array([10, 10]), np.array([10, 10]), [], ["text"])


# ---------------------------------------------------------------------------------------------------------------
# leakage


def test_presence_that_predicts_the_label_is_leakage() -> None:
    labels = np.repeat([0, 1], 200)
    carries = np.r_[np.arange(200) < 20, np.arange(200) < 180].astype(float)  # 10% of normal, 90% of opacity
    rows = _by_class(leakage(_presence_features(carries), labels, CLASSES, n_boot=N_BOOT))
    row = rows["opacity"]
    # A binary score: P(carrier opacity, bare normal) + ½ P(tie) = 0.81 + ½ (0.09 + 0.01) = 0.86; fold-to-fold
    # differences in the fitted probabilities break some ties, hence the tolerance.
    assert row["auc"] == pytest.approx(0.86, abs=0.04)
    assert 0.75 < row["auc_ci_low"] < row["auc"] < row["auc_ci_high"]
    assert row["balanced_accuracy"] == pytest.approx(0.9, abs=0.02)
    assert row["balanced_accuracy"] > row["baseline_balanced_accuracy"] == 0.5
    assert row["baseline_accuracy"] == 0.5 and row["folds"] == 5 and row["note"] is None
    assert (row["n_images"], row["n_class"]) == (400, 200)
    assert rows["normal"]["auc"] == row["auc"]  # two classes: the same separation seen from both sides
    table = leakage_table({"text": _presence_features(carries)}, labels, CLASSES, n_boot=N_BOOT)
    assert [r["leakage"] for r in table] == [True, True]


def test_presence_independent_of_the_label_is_not_leakage() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 150)
    carries = (rng.random(300) < 0.5).astype(float)
    rows = _by_class(leakage(_presence_features(carries), labels, CLASSES, n_boot=N_BOOT))
    row = rows["opacity"]
    assert row["auc_ci_low"] < 0.5 < row["auc_ci_high"]
    assert abs(row["auc"] - 0.5) < 0.1
    table = leakage_table({"text": _presence_features(carries)}, labels, CLASSES, n_boot=N_BOOT)
    assert not any(r["leakage"] for r in table)


def test_position_leaks_even_when_presence_does_not() -> None:
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], 100)
    # Every image carries the marker: at the bottom in normal images, at the top in opacity images.
    center_y = np.where(labels == 1, rng.uniform(0.05, 0.2, 200), rng.uniform(0.8, 0.95, 200))
    features = _presence_features(np.ones(200), center_y)
    table = _by_class(leakage_table({"marker": features}, labels, CLASSES, n_boot=N_BOOT))
    assert table["opacity"]["auc"] > 0.95 and table["opacity"]["leakage"]
    # Presence alone is constant: auc exactly 0.5, a note, nothing fitted.
    presence_only = _by_class(leakage(features[:, :1], labels, CLASSES, n_boot=N_BOOT))["opacity"]
    assert presence_only["auc"] == presence_only["auc_ci_low"] == presence_only["auc_ci_high"] == 0.5
    assert presence_only["folds"] == 0 and "constant" in presence_only["note"]
    assert presence_only["balanced_accuracy"] == 0.5 and presence_only["accuracy"] == 0.5


def test_cross_validation_is_out_of_fold() -> None:
    """Pure noise in 200 dimensions for 40 images: an in-sample fit separates the classes, out of fold does not."""
    labels = np.repeat([0, 1], 20)
    aucs = []
    for seed in range(3):
        noise = np.random.default_rng(seed).normal(size=(40, 200))
        row = _by_class(leakage(noise, labels, CLASSES, n_boot=N_BOOT, seed=seed))["opacity"]
        assert row["auc_ci_low"] <= 0.5
        aucs.append(row["auc"])
        in_sample = LogisticRegression(max_iter=1000).fit(noise, labels).predict_proba(noise)[:, 1]
        assert roc_auc_score(labels, in_sample) == 1.0  # what a leaky evaluation would report
    assert abs(np.mean(aucs) - 0.5) < 0.15


def _grouped_dataset(n_groups: int = 24, per_group: int = 4, dims: int = 40, seed: int = 3):
    """Each patient (cv_group) has one random label and one random feature vector shared by its images (plus a
    little noise). Nothing generalises across patients, but an image's own patient-mates give its label away."""
    rng = np.random.default_rng(seed)
    group_labels = rng.permutation(np.arange(n_groups) % 2)
    group_features = rng.normal(size=(n_groups, dims))
    cv_groups = np.repeat(np.arange(n_groups), per_group)
    features = group_features[cv_groups] + 0.01 * rng.normal(size=(n_groups * per_group, dims))
    return features, group_labels[cv_groups], cv_groups


def test_grouped_folds_never_split_a_group() -> None:
    _, labels, cv_groups = _grouped_dataset()
    folds = fold_assignment(labels, cv_groups, folds=5, seed=0)
    assert folds.min() == 0 and len(np.unique(folds)) == 5
    for group in np.unique(cv_groups):
        assert len(np.unique(folds[cv_groups == group])) == 1
    # Without groups the same images are split apart (so the check above can fail).
    image_folds = fold_assignment(labels, None, folds=5, seed=0)
    assert any(len(np.unique(image_folds[cv_groups == g])) > 1 for g in np.unique(cv_groups))


def test_grouped_cross_validation_removes_patient_memorisation() -> None:
    features, labels, cv_groups = _grouped_dataset()
    by_image = _by_class(leakage(features, labels, CLASSES, n_boot=N_BOOT))["opacity"]
    by_patient = _by_class(leakage(features, labels, CLASSES, cv_groups=cv_groups, n_boot=N_BOOT))["opacity"]
    assert by_image["auc"] > 0.9  # patient-mates in the training folds give the label away
    assert by_patient["auc"] < 0.7 and by_patient["auc_ci_low"] < 0.5 and not by_patient["auc_ci_high"] < 0.5


def test_bootstrap_with_cv_groups_resamples_whole_groups() -> None:
    codes = _group_codes(np.array(["p1", "p1", "p1", "p2", "p3", "p3"], dtype=object))
    assert codes.tolist() == [0, 0, 0, 1, 2, 2]
    # An unknown patient is a group of its own (never merged with another unknown one).
    assert _group_codes(np.array(["a", None, "a", None, math.nan], dtype=object)).tolist() == [0, 1, 0, 2, 3]
    chunks = list(_bootstrap_weight_chunks(6, codes, n_boot=50, seed=0))
    weights = np.concatenate(chunks, axis=1)  # [6, 50]
    assert weights.shape == (6, 50)
    assert np.all(weights[0] == weights[1]) and np.all(weights[1] == weights[2]) and np.all(weights[4] == weights[5])
    assert np.all(weights[[0, 3, 4]].sum(0) == 3)  # three patients drawn per resample
    assert not np.all(weights[0] == weights[3])
    by_image = np.concatenate(list(_bootstrap_weight_chunks(6, None, n_boot=50, seed=0)), axis=1)
    assert np.all(by_image.sum(0) == 6) and not np.all(by_image[0] == by_image[1])


def test_folds_reduced_to_smallest_class_and_too_small_class_gives_nan() -> None:
    features = np.random.default_rng(4).normal(size=(23, 6))
    labels = np.r_[np.zeros(20, int), np.ones(3, int)]
    rows = leakage(features, labels, CLASSES, folds=5, n_boot=N_BOOT)
    assert {row["folds"] for row in rows} == {3}
    rows = leakage(features[:21], labels[:21], CLASSES, n_boot=N_BOOT)
    assert all(math.isnan(row["auc"]) and "fewer than 2" in row["note"] for row in rows)
    # A class with no image at all (a site without it) is left out; the others are still scored.
    three = leakage(features, labels, (*CLASSES, "effusion"), n_boot=N_BOOT)
    assert math.isnan(three[2]["auc"]) and three[2]["note"] == "no image of this class"
    assert not math.isnan(three[1]["auc"]) and three[1]["baseline_balanced_accuracy"] == 0.5


def test_three_classes_auc_per_class() -> None:
    rng = np.random.default_rng(5)
    labels = np.repeat([0, 1, 2], 80)
    # Only class 2 carries the region; classes 0 and 1 are indistinguishable from each other.
    carries = (labels == 2) & (rng.random(240) < 0.9)
    rows = leakage(_presence_features(carries.astype(float)), labels, ("a", "b", "c"), n_boot=N_BOOT)
    # c against the rest: its carriers (90%) beat every bare image, ties count half: 0.9 + ½·0.1 = 0.95.
    assert rows[2]["auc"] == pytest.approx(0.95, abs=0.03) and rows[2]["auc_ci_low"] > 0.85
    # a against the rest: tied with b (half the rest), above c's carriers: ½·½ + ½·(0.9 + ½·0.1) = 0.725. One-vs-rest
    # AUC also credits the classes the region argues against.
    assert rows[0]["auc"] == pytest.approx(0.725, abs=0.03) and rows[1]["auc"] == pytest.approx(0.725, abs=0.03)
    assert rows[0]["baseline_balanced_accuracy"] == pytest.approx(1 / 3)
    assert len({row["balanced_accuracy"] for row in rows}) == 1


def test_weighted_auc_equals_sklearn_with_ties_and_repeated_images() -> None:
    rng = np.random.default_rng(6)
    scores = np.round(rng.random(300), 1)  # many ties
    positive = rng.random(300) < 0.4
    counts = rng.integers(0, 3, size=300)
    ranked = _RankedScores.of(scores, positive)
    weights = np.stack([np.ones(300), counts], axis=1)  # [N, 2]
    plain, resampled = _weighted_aucs(ranked, weights)
    assert plain == pytest.approx(roc_auc_score(positive, scores))
    repeated = np.repeat(np.arange(300), counts)
    assert resampled == pytest.approx(roc_auc_score(positive[repeated], scores[repeated]))


def test_leakage_rejects_bad_input() -> None:
    with pytest.raises(ShapeError, match="features"):
        leakage(np.zeros((3, 2)), np.array([0, 1]), CLASSES)
    with pytest.raises(DataError, match="labels"):
        leakage(np.zeros((2, 2)), np.array([0, 2]), CLASSES)
    with pytest.raises(DataError, match="finite"):
        leakage(np.full((2, 2), np.nan), np.array([0, 1]), CLASSES)


# ---------------------------------------------------------------------------------------------------------------
# leakage_table


def test_table_rows_per_group_only_with_enough_images_and_two_classes() -> None:
    rng = np.random.default_rng(7)
    # site A: 40 images of both classes; B: 6 images (< min_images); C: 20 images of one class; 10 unknown.
    groups = np.array(["A"] * 40 + ["B"] * 6 + ["C"] * 20 + [None] * 10, dtype=object)
    labels = np.r_[np.repeat([0, 1], 20), [0, 1, 0, 1, 0, 1], np.zeros(20, int), np.repeat([0, 1], 5)]
    carries = (rng.random(len(labels)) < np.where(labels == 1, 0.9, 0.1)).astype(float)
    features = {"text": _presence_features(carries), "border": np.zeros((len(labels), len(FEATURES)))}
    cv_groups = np.arange(len(labels)) // 2  # patients of two images, each within one site
    table = leakage_table(features, labels, CLASSES, groups=groups, cv_groups=cv_groups, min_images=10, n_boot=N_BOOT)

    keys = [(r["region_kind"], r["group"], r["class"]) for r in table]
    expected_groups = [None, None, "A", "A"]
    assert keys == [("text", g, c) for g, c in zip(expected_groups, CLASSES * 2, strict=True)] + [
        ("border", g, c) for g, c in zip(expected_groups, CLASSES * 2, strict=True)
    ]
    everything, site_a = table[0], table[2]
    assert (everything["n_images"], site_a["n_images"]) == (76, 40)
    assert site_a["leakage"] and everything["leakage"]
    for row in table[4:]:  # a kind never present: constant features
        assert row["auc"] == 0.5 and "constant" in row["note"] and row["leakage"] is False
