"""Leakage of the region itself: how well a region kind predicts the label without any model of the image.

If the presence, size or position of burned-in text (or a marker, a border, a watermark...) predicts the class,
the dataset carries a shortcut before any network is trained: a model only has to find the region. This module
measures that honestly:

* **features** (:func:`region_features`): per image and region kind, ``FEATURES`` = whether the kind is present,
  how many boxes, the area fraction of the union of its boxes, the centre of the boxes' bounding box and that
  centre's distance to the nearest image edge;
* **prediction** (:func:`leakage`): a standardised logistic regression predicts the label from one kind's
  features, **out of fold** (stratified k-fold; patients or other ``cv_groups`` never split across folds), and
  each class gets the one-vs-rest AUC of its out-of-fold probability with a 95% percentile bootstrap interval
  (images, or whole ``cv_groups`` when given, resampled; no refitting), and the balanced accuracy of the
  out-of-fold argmax against the majority-class baseline;
* **table** (:func:`leakage_table`): every kind, over all images and per site/source group; ``leakage`` is
  ``auc >= auc_bar and auc_ci_low > 0.5``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from audit.errors import DataError, ShapeError

FEATURES = ("present", "count", "area_fraction", "center_x", "center_y", "edge_distance")

# Where an absent kind is "placed": the image centre. centre_x = centre_y = 0.5, and the centre's distance to the
# nearest edge is half the short side, i.e. 0.5 after normalising by the short side. A neutral, direction-free
# value that keeps the features finite; `present` = 0 lets the model tell these rows apart from a real region in
# the middle.
NEUTRAL_POSITION = 0.5

# Groups of up to this many boxes of one kind in one image get their union area in batched numpy (memory
# ~ k·(2k−1)² booleans per image); larger groups (rare: a page of text) go through an O(k) memory sweep.
_BATCH_MAX_BOXES = 32
_BATCH_CELL_BUDGET = 1 << 24  # booleans per batched chunk (16 MB)
# Bootstrap resamples are drawn in chunks of at most this many weights (n_boot × n would not fit for a million
# images).
_BOOT_CELL_BUDGET = 1 << 22


# ----------------------------------------------------------------------------------------------------------------
# Features


def region_features(
    image_ids: Sequence[str],
    widths: np.ndarray,
    heights: np.ndarray,
    regions: Sequence[dict],
    kinds: Sequence[str],
) -> dict[str, np.ndarray]:
    """Per region kind, the ``FEATURES`` of every image.

    Columns, in the order of ``FEATURES``:

    * ``present``: 1.0 when the image has at least one box of the kind, else 0.0;
    * ``count``: number of boxes of the kind;
    * ``area_fraction``: area of the **union** of the kind's boxes ÷ image area (overlaps counted once, exact,
      not the clipped sum), in [0, 1];
    * ``center_x``, ``center_y``: centre of the bounding box of all the kind's boxes, ÷ width and ÷ height, in
      [0, 1] (0 = left / top);
    * ``edge_distance``: distance of that centre to the nearest image edge ÷ the short side, in [0, 0.5].

    An absent kind gets present = count = area_fraction = 0 and the position of the image centre
    (``NEUTRAL_POSITION`` = 0.5 for centre_x, centre_y and edge_distance).

    Boxes are clipped to the image; a box with nothing left inside still counts in ``present`` and ``count`` (the
    detector reported it) but adds no area. Regions of images not in ``image_ids`` or of kinds not in ``kinds``
    are ignored (the regions table may cover more images than the subset audited).

    Args:
        image_ids: str [N], unique.
        widths, heights: [N] image sizes in pixels, as the boxes' coordinates are given (> 0).
        regions: dicts with keys ``image_id``, ``kind``, ``x0``, ``y0``, ``x1``, ``y1`` (pixels, x1/y1
            exclusive, x0 ≤ x1, y0 ≤ y1), e.g. rows of the ``regions`` table.
        kinds: the region kinds to describe, unique.

    Returns:
        kind → float64 [N, len(FEATURES)].

    Raises:
        ShapeError: widths or heights are not [N].
        DataError: duplicate ids or kinds, a non-positive size, or a box with x1 < x0, y1 < y0 or a NaN.
    """
    n_images = len(image_ids)
    widths = np.asarray(widths, dtype=np.float64)
    heights = np.asarray(heights, dtype=np.float64)
    for name, sizes in (("widths", widths), ("heights", heights)):
        if sizes.shape != (n_images,):
            raise ShapeError(name, f"[N] with N = len(image_ids) = {n_images}", tuple(sizes.shape))
        if not np.all(sizes > 0):
            raise DataError(f"{name}: every image size must be > 0 pixels; found {sizes[~(sizes > 0)][:3].tolist()}")
    image_index = {image_id: i for i, image_id in enumerate(image_ids)}
    kind_index = {kind: k for k, kind in enumerate(kinds)}
    if len(image_index) != n_images:
        raise DataError("image_ids: every image id must be unique; found duplicates")
    if len(kind_index) != len(kinds):
        raise DataError(f"kinds: every kind must be unique; found {list(kinds)}")

    out = np.zeros((len(kinds), n_images, len(FEATURES)), dtype=np.float64)
    out[:, :, 3:] = NEUTRAL_POSITION

    # One pass of Python over the dicts per column; everything after is numpy.
    n_regions = len(regions)
    image = np.fromiter((image_index.get(r["image_id"], -1) for r in regions), dtype=np.int64, count=n_regions)
    kind = np.fromiter((kind_index.get(r["kind"], -1) for r in regions), dtype=np.int64, count=n_regions)
    boxes = np.array([(r["x0"], r["y0"], r["x1"], r["y1"]) for r in regions], dtype=np.float64).reshape(-1, 4)
    keep = (image >= 0) & (kind >= 0)
    image, kind, boxes = image[keep], kind[keep], boxes[keep]
    bad = np.isnan(boxes).any(1) | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"regions: expected boxes with x0 <= x1 and y0 <= y1 (pixels, x1/y1 exclusive); found {bad.sum()} "
            f"invalid, e.g. image {image_ids[image[first]]!r}, kind {kinds[kind[first]]!r}: "
            f"{boxes[first].tolist()}"
        )
    if not len(image):
        return {name: out[k] for k, name in enumerate(kinds)}

    width, height = widths[image], heights[image]
    x0, x1 = np.clip(boxes[:, 0], 0, width), np.clip(boxes[:, 2], 0, width)
    y0, y1 = np.clip(boxes[:, 1], 0, height), np.clip(boxes[:, 3], 0, height)

    # Sort by (kind, image) so that each image's boxes of one kind are contiguous: one "group" per run.
    key = kind * n_images + image
    order = np.argsort(key, kind="stable")
    key, x0, y0, x1, y1 = key[order], x0[order], y0[order], x1[order], y1[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    counts = np.diff(np.r_[starts, len(key)])
    group_kind, group_image = np.divmod(key[starts], n_images)

    area = _union_areas(x0, y0, x1, y1, starts, counts)
    left, top = np.minimum.reduceat(x0, starts), np.minimum.reduceat(y0, starts)
    right, bottom = np.maximum.reduceat(x1, starts), np.maximum.reduceat(y1, starts)
    width, height = widths[group_image], heights[group_image]
    center_x, center_y = (left + right) / 2, (top + bottom) / 2
    edge = np.minimum(np.minimum(center_x, width - center_x), np.minimum(center_y, height - center_y))
    out[group_kind, group_image] = np.stack(
        [
            np.ones(len(starts)),
            counts.astype(np.float64),
            area / (width * height),
            center_x / width,
            center_y / height,
            edge / np.minimum(width, height),
        ],
        axis=1,
    )
    return {name: out[k] for k, name in enumerate(kinds)}


def _union_areas(
    x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray, starts: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Exact area of the union of the boxes of each group.

    Args:
        x0, y0, x1, y1: float [R], boxes sorted so that group g is rows ``starts[g] : starts[g] + counts[g]``.
        starts, counts: int [G].

    Returns:
        float [G].
    """
    areas = np.empty(len(starts))
    single = counts == 1
    rows = starts[single]
    areas[single] = (x1[rows] - x0[rows]) * (y1[rows] - y0[rows])
    for k in np.unique(counts[counts > 1]).tolist():
        groups = np.flatnonzero(counts == k)
        if k > _BATCH_MAX_BOXES:
            for g in groups.tolist():
                rows = slice(starts[g], starts[g] + k)
                areas[g] = _union_area_sweep(x0[rows], y0[rows], x1[rows], y1[rows])
            continue
        chunk = max(1, _BATCH_CELL_BUDGET // (k * (2 * k - 1) ** 2))
        for begin in range(0, len(groups), chunk):
            batch = groups[begin : begin + chunk]
            rows = starts[batch][:, None] + np.arange(k)  # [G, k]
            areas[batch] = _union_area_batch(x0[rows], y0[rows], x1[rows], y1[rows])
    return areas


def _union_area_batch(x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """Union area of k boxes per row by coordinate compression: the box edges cut the plane into (2k−1)² cells,
    a cell is covered when a box contains its midpoint, and the union is the summed area of the covered cells.

    Args:
        x0, y0, x1, y1: float [G, k].

    Returns:
        float [G].
    """
    xs = np.sort(np.concatenate([x0, x1], axis=1), axis=1)  # [G, 2k]
    ys = np.sort(np.concatenate([y0, y1], axis=1), axis=1)
    mid_x, mid_y = (xs[:, 1:] + xs[:, :-1]) / 2, (ys[:, 1:] + ys[:, :-1]) / 2  # [G, 2k−1]
    # A cell of positive width lies strictly between two consecutive edges, so its midpoint is inside a box
    # exactly when the whole cell is; cells of zero width add nothing whatever the test says.
    in_x = (x0[:, :, None] <= mid_x[:, None, :]) & (mid_x[:, None, :] < x1[:, :, None])  # [G, k, 2k−1]
    in_y = (y0[:, :, None] <= mid_y[:, None, :]) & (mid_y[:, None, :] < y1[:, :, None])
    covered = (in_x[:, :, :, None] & in_y[:, :, None, :]).any(axis=1)  # [G, 2k−1, 2k−1]
    return np.einsum("gij,gi,gj->g", covered.astype(np.float64), np.diff(xs, axis=1), np.diff(ys, axis=1))


def _union_area_sweep(x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> float:
    """Union area of many boxes (float [k] each) by sweeping the slabs between consecutive x edges; O(k) memory."""
    xs = np.unique(np.concatenate([x0, x1]))
    total = 0.0
    for left, right in zip(xs[:-1].tolist(), xs[1:].tolist(), strict=True):
        middle = (left + right) / 2
        active = (x0 <= middle) & (middle < x1)
        if active.any():
            total += (right - left) * _interval_union_length(y0[active], y1[active])
    return total


def _interval_union_length(starts: np.ndarray, ends: np.ndarray) -> float:
    """Length of the union of intervals [starts, ends) (float [m] each)."""
    order = np.argsort(starts)
    starts, ends = starts[order], ends[order]
    # Sorted by start, the earlier intervals cover [start_i, max of their ends) of interval i and nothing after.
    reach = np.r_[-np.inf, np.maximum.accumulate(ends)[:-1]]
    return float(np.maximum(0.0, ends - np.maximum(starts, reach)).sum())


# ----------------------------------------------------------------------------------------------------------------
# Cross-validated prediction


def fold_assignment(
    labels: np.ndarray, cv_groups: np.ndarray | None = None, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """The test fold of every image in the cross-validation :func:`leakage` runs (exposed for inspection).

    Args:
        labels: int [N].
        cv_groups: optional [N] ids kept together in one fold.
        folds: requested folds (reduced as :func:`leakage` does).

    Returns:
        int [N] fold index; −1 for every image when no cross-validation is possible.
    """
    labels = np.asarray(labels)
    if cv_groups is not None:
        cv_groups = _group_codes(np.asarray(cv_groups, dtype=object))
    plan = _plan_folds(labels, cv_groups, folds)
    assignment = np.full(len(labels), -1, dtype=np.int64)
    if isinstance(plan, int):
        for fold, (_, test) in enumerate(_splits(labels, cv_groups, plan, seed)):
            assignment[test] = fold
    return assignment


def leakage(
    features: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    *,
    cv_groups: np.ndarray | None = None,
    folds: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[dict]:
    """Cross-validated prediction of the label from one region kind's features.

    Model: ``StandardScaler`` → ``LogisticRegression(class_weight="balanced")`` (multinomial for > 2 classes),
    fitted on k − 1 folds and predicting the held-out fold (``cross_val_predict(method="predict_proba")``).
    Folds: ``StratifiedKFold``, or ``StratifiedGroupKFold`` when ``cv_groups`` is given, shuffled with ``seed``;
    ``folds`` is reduced to the number of images (or distinct ``cv_groups``) of the smallest class, and must stay
    ≥ 2.

    Classes with no image here (a site without that class) get NaN rows with a note and are left out of the fit;
    balanced accuracy and its baseline are then over the classes present. If fewer than two classes are present,
    or a present class has fewer than 2 images (or lies in fewer than 2 ``cv_groups``), no fold plan can hold it
    out and every row is NaN with a note. A constant feature matrix (the kind never present, or always present
    identically) predicts nothing: auc = its interval = 0.5 exactly, accuracies = their baselines, ``folds`` = 0,
    with a note, and no fitting (a prior-only model's out-of-fold scores would differ from 0.5 by fold noise
    alone: each training fold's class shares differ slightly).

    Args:
        features: float [N, F], finite.
        labels: int [N] in [0, len(classes)).
        classes: class names, index = label.
        cv_groups: optional [N] ids (patient, study...) never split across folds; None = every image its own.
        folds: requested number of folds (≥ 2).
        n_boot: bootstrap resamples of the AUC interval.
        seed: seeds the fold shuffle and the bootstrap.

    Returns:
        One dict per class, in the order of ``classes``: ``class``, ``n_images`` (N), ``n_class``, ``auc``
        (one-vs-rest AUC of the class's out-of-fold probability), ``auc_ci_low``, ``auc_ci_high`` (95% percentile
        bootstrap over images, or over whole ``cv_groups`` when given, of the fixed out-of-fold scores),
        ``balanced_accuracy`` and ``accuracy`` of the out-of-fold argmax (over all classes: the same on every
        row), ``baseline_balanced_accuracy`` (majority-class predictor: 1 / number of classes present),
        ``baseline_accuracy`` (majority share), ``folds`` used and ``note`` (None, or why a value is missing).

    Raises:
        ShapeError: features not [N, F] or labels not [N] integers.
        DataError: labels out of range, non-finite features, folds < 2.
    """
    features, labels, group_codes = _check_inputs(features, labels, classes, cv_groups)
    if folds < 2:
        raise DataError(f"folds: cross-validation needs at least 2 folds; found {folds}")
    if n_boot < 1:
        raise DataError(f"n_boot: expected at least 1 bootstrap resample; found {n_boot}")
    n_images = len(labels)
    n_class = np.bincount(labels, minlength=len(classes))
    present = np.flatnonzero(n_class)
    baseline_balanced_accuracy = 1.0 / len(present) if len(present) else math.nan
    baseline_accuracy = float(n_class.max() / n_images) if n_images else math.nan
    rows = [
        {
            "class": str(name),
            "n_images": n_images,
            "n_class": int(n_class[c]),
            "auc": math.nan,
            "auc_ci_low": math.nan,
            "auc_ci_high": math.nan,
            "balanced_accuracy": math.nan,
            "baseline_balanced_accuracy": baseline_balanced_accuracy,
            "accuracy": math.nan,
            "baseline_accuracy": baseline_accuracy,
            "folds": 0,
            "note": None if n_class[c] else "no image of this class",
        }
        for c, name in enumerate(classes)
    ]
    if len(present) < 2:
        return _with_note(rows, "fewer than two classes among the images: nothing to predict")
    if np.all(features == features[:1]):
        # Exactly what a model of the prior predicts: every score tied, the majority class everywhere.
        return _with_note(
            rows,
            "constant features (kind never present, or always present the same way): nothing to predict from; "
            "not fitted",
            auc=0.5,
            auc_ci_low=0.5,
            auc_ci_high=0.5,
            balanced_accuracy=baseline_balanced_accuracy,
            accuracy=baseline_accuracy,
        )

    # Encode the present classes as 0..P−1 so that the probability columns line up with them.
    encoded = np.searchsorted(present, labels)
    plan = _plan_folds(encoded, group_codes, folds)
    if isinstance(plan, str):
        return _with_note(rows, plan)
    splits = list(_splits(encoded, group_codes, plan, seed))
    if any(len(np.unique(encoded[train])) < 2 for train, _ in splits):
        return _with_note(rows, "a training fold holds a single class (cv_groups too unbalanced): not fitted")
    # Only possible with cv_groups: a class whose groups all fell in one test fold is unseen when that fold is
    # predicted, and cross_val_predict gives it probability 0 there.
    unseen = sorted({str(classes[present[c]]) for train, _ in splits for c in _absent(encoded[train], len(present))})

    model = Pipeline(
        [
            ("scale", StandardScaler()),
            # Linear in a handful of interpretable features (presence, size, position), which is the question
            # "does the region alone tell the class"; L2 (C = 1) on standardised features keeps it from chasing
            # noise. class_weight="balanced" so that the argmax aims at balanced accuracy, the number compared
            # with its baseline, rather than collapsing onto the majority class.
            ("logistic", LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000)),
        ]
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Number of classes in training fold")  # said in the note
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        proba = cross_val_predict(model, features, encoded, cv=splits, method="predict_proba")  # [N, P]

    predicted = proba.argmax(1)
    recall = np.bincount(encoded, weights=predicted == encoded, minlength=len(present)) / n_class[present]
    # With two classes both rows are the same separation (p0 = 1 − p1, so AUC0 = AUC1 resample by resample):
    # score it once.
    scored = 1 if len(present) == 2 else len(present)
    ranked = [_RankedScores.of(proba[:, p], encoded == p) for p in range(len(present) - scored, len(present))]
    auc = [float(_weighted_aucs(r, np.ones((n_images, 1)))[0]) for r in ranked]
    # Every class is scored on the same resamples; the out-of-fold scores stay fixed (no refitting).
    boot = np.concatenate(
        [
            np.stack([_weighted_aucs(r, chunk) for r in ranked], axis=1)
            for chunk in _bootstrap_weight_chunks(n_images, group_codes, n_boot, seed)
        ]
    )  # [n_boot, scored]
    if scored == 1:
        auc, boot = auc * 2, np.repeat(boot, 2, axis=1)
    for p, c in enumerate(present.tolist()):
        low, high = _percentile_interval(boot[:, p])
        rows[c].update(
            auc=auc[p],
            auc_ci_low=low,
            auc_ci_high=high,
            balanced_accuracy=float(recall.mean()),
            accuracy=float(np.mean(predicted == encoded)),
            folds=len(splits),
            note=f"class(es) {unseen} absent from a training fold (probability 0 there)" if unseen else None,
        )
    return rows


def leakage_table(
    features_by_kind: dict[str, np.ndarray],
    labels: np.ndarray,
    classes: Sequence[str],
    *,
    groups: np.ndarray | None = None,
    cv_groups: np.ndarray | None = None,
    auc_bar: float = 0.6,
    min_images: int = 10,
    folds: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[dict]:
    """:func:`leakage` for every region kind, over all images and per group (site, source).

    Every kind is cross-validated on the same folds (same ``seed``), so kinds are compared on equal terms.

    Args:
        features_by_kind: kind → float [N, F] (e.g. from :func:`region_features`).
        labels: int [N] in [0, len(classes)).
        classes: class names, index = label.
        groups: optional [N] site/source of every image (None or NaN = unknown: counted only in the all-images
            rows). A group gets rows when it has ≥ ``min_images`` images and at least two classes.
        cv_groups: optional [N] ids kept together in one fold (patients).
        auc_bar: AUC from which a kind counts as leakage (with ``auc_ci_low`` > 0.5 too).

    Returns:
        Rows of :func:`leakage` with ``region_kind`` and ``group`` (None = all images) first and ``leakage``
        (bool) last; kinds in the order given, all-images rows first, then groups sorted by name.
    """
    labels = np.asarray(labels)
    n_images = len(labels)
    if cv_groups is not None:
        cv_groups = np.asarray(cv_groups, dtype=object)
    subsets: list[tuple[object, np.ndarray | None]] = [(None, None)]
    if groups is not None:
        groups = np.asarray(groups, dtype=object)
        if groups.shape != (n_images,):
            raise ShapeError("groups", f"[N] with N = len(labels) = {n_images}", tuple(groups.shape))
        known = np.array([not _missing(g) for g in groups.tolist()], dtype=bool)
        for name in sorted({g for g in groups[known].tolist()}, key=str):
            mask = known & (groups == name)
            if mask.sum() >= min_images and len(np.unique(labels[mask])) >= 2:
                subsets.append((name, mask))

    table: list[dict] = []
    for kind, features in features_by_kind.items():
        features = np.asarray(features)
        if features.ndim != 2 or len(features) != n_images:
            raise ShapeError(f"features_by_kind[{kind!r}]", f"[N, F] with N = len(labels) = {n_images}", features.shape)
        for group, mask in subsets:
            rows = leakage(
                features if mask is None else features[mask],
                labels if mask is None else labels[mask],
                classes,
                cv_groups=cv_groups if mask is None or cv_groups is None else cv_groups[mask],
                folds=folds,
                n_boot=n_boot,
                seed=seed,
            )
            for row in rows:
                flagged = bool(row["auc"] >= auc_bar and row["auc_ci_low"] > 0.5)  # False for NaN
                table.append({"region_kind": kind, "group": group, **row, "leakage": flagged})
    return table


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def _check_inputs(
    features: np.ndarray, labels: np.ndarray, classes: Sequence[str], cv_groups: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise ShapeError("labels", "int [N]", f"{labels.dtype} {tuple(labels.shape)}")
    if features.ndim != 2 or len(features) != len(labels) or features.shape[1] == 0:
        raise ShapeError("features", f"float [N, F] with N = len(labels) = {len(labels)}, F ≥ 1", features.shape)
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"labels: expected integers in [0, {len(classes)}); found {labels.min()}..{labels.max()}")
    if not np.all(np.isfinite(features)):
        raise DataError("features: expected finite values; found NaN or infinity (absent kinds get 0 / 0.5)")
    if cv_groups is not None:
        cv_groups = np.asarray(cv_groups, dtype=object)
        if cv_groups.shape != labels.shape:
            raise ShapeError("cv_groups", f"[N] with N = len(labels) = {len(labels)}", tuple(cv_groups.shape))
        cv_groups = _group_codes(cv_groups)
    return features, labels.astype(np.int64), cv_groups  # cv_groups now int codes (or None)


def _group_codes(cv_groups: np.ndarray) -> np.ndarray:
    """int [N] codes 0..G−1 of the ids in ``cv_groups`` (object [N]); a missing id (None, NaN) is a group of its
    own, the safe reading of an image whose patient is unknown. A dict rather than np.unique, which cannot sort
    None among strings."""
    codes: dict[object, int] = {}
    out = np.empty(len(cv_groups), dtype=np.int64)
    for i, group in enumerate(cv_groups.tolist()):
        if _missing(group):
            out[i] = len(codes)
            codes[object()] = out[i]  # a fresh key: never matched again
        else:
            out[i] = codes.setdefault(group, len(codes))
    return out


def _plan_folds(labels: np.ndarray, group_codes: np.ndarray | None, folds: int) -> int | str:
    """The number of folds to use, or a note saying why there can be none.

    Each class must appear in every test fold's complement and, for stratification, in as many folds as
    possible: the folds are capped by the images (or distinct cv_groups) of the smallest present class.
    """
    present = np.unique(labels)
    if len(present) < 2:
        return "fewer than two classes among the images: nothing to predict"
    if group_codes is None:
        per_class = np.bincount(labels)[present]
        unit = "image"
    else:
        # Distinct (class, group) pairs: how many groups hold each class.
        pairs = np.unique(np.stack([labels, group_codes]), axis=1)
        per_class = np.bincount(pairs[0])[present]
        unit = "cv_group"
    smallest = int(per_class.min())
    if smallest < 2:
        return f"a class has fewer than 2 {unit}s ({smallest}): it cannot be held out and learned; not fitted"
    return min(folds, smallest)


def _splits(
    labels: np.ndarray, group_codes: np.ndarray | None, folds: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs; empty test folds (possible with unbalanced cv_groups) are dropped."""
    if group_codes is None:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        pairs = splitter.split(np.zeros(len(labels)), labels)
    else:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        pairs = splitter.split(np.zeros(len(labels)), labels, group_codes)
    for train, test in pairs:
        if len(test):
            yield train, test


@dataclass(frozen=True)
class _RankedScores:
    """Fixed scores of one class, sorted once for all the bootstrap resamples."""

    order: np.ndarray  # int [N], images by increasing score
    positive: np.ndarray  # bool [N], in that order
    tie_starts: np.ndarray | None  # int [U], first position of each distinct score; None when all are distinct

    @classmethod
    def of(cls, scores: np.ndarray, positive: np.ndarray) -> _RankedScores:
        """Args: scores float [N]; positive bool [N]."""
        order = np.argsort(scores, kind="stable")
        sorted_scores = scores[order]
        tie_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
        return cls(order, positive[order], None if len(tie_starts) == len(scores) else tie_starts)


def _weighted_aucs(ranked: _RankedScores, weights: np.ndarray) -> np.ndarray:
    """Mann–Whitney AUC (ties count one half) of fixed scores under several weightings of the images: O(N·b).

    Args:
        ranked: the scores and positives.
        weights: float32 or float64 [N, b], how often each image counts in each of b resamples (ones = the plain
            AUC). Images along the first axis so that sorting, tie sums and the cumulative sum move whole
            contiguous rows.

    Returns:
        float [b]; NaN where a resample has no positive or no negative image.
    """
    w = weights[ranked.order]
    w_pos = w * ranked.positive[:, None]
    if ranked.tie_starts is not None:  # tied scores pooled into one value each
        w, w_pos = np.add.reduceat(w, ranked.tie_starts, axis=0), np.add.reduceat(w_pos, ranked.tie_starts, axis=0)
    w_neg = w - w_pos
    below = np.cumsum(w_neg, axis=0) - w_neg  # negative weight strictly below each score
    wins = (w_pos * (below + 0.5 * w_neg)).sum(0, dtype=np.float64)
    pairs = w_pos.sum(0, dtype=np.float64) * w_neg.sum(0, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / pairs, np.nan)


def _bootstrap_weight_chunks(
    n_images: int, group_codes: np.ndarray | None, n_boot: int, seed: int
) -> Iterator[np.ndarray]:
    """Bootstrap resamples as weights, in chunks of float32 [N, b] (how often each image is drawn; n_boot in all).

    Args:
        group_codes: None, or int [N] cv_group codes 0..G−1 (:func:`_group_codes`).

    With cv_groups, whole groups are drawn (the images of one patient are not independent: resampling them one
    by one would make the interval too narrow); otherwise images. Chunks are generated lazily: n_boot × N
    weights would not fit in memory for a million images.
    """
    n_units = n_images if group_codes is None else int(group_codes.max()) + 1
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CELL_BUDGET // n_images)
    for begin in range(0, n_boot, chunk):
        b = min(chunk, n_boot - begin)
        # Resample j's draws land in column j: one bincount counts them all.
        draws = rng.integers(0, n_units, size=(n_units, b)) * b + np.arange(b)
        # float32: the counts and their running sums are integers, exact up to 2^24 images, and memory-bound
        # passes over them run about 3x faster than in float64.
        counts = np.bincount(draws.ravel(), minlength=n_units * b).reshape(n_units, b).astype(np.float32)
        yield counts if group_codes is None else counts[group_codes]


def _percentile_interval(values: np.ndarray) -> tuple[float, float]:
    """2.5th and 97.5th percentiles of the finite bootstrap values (NaN, NaN when there are none)."""
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def _with_note(rows: list[dict], note: str, **values: float) -> list[dict]:
    """Set ``note`` (and ``values``) on the rows of the classes that have images; absent classes keep theirs."""
    for row in rows:
        if row["n_class"]:
            row.update(note=note, **values)
    return rows


def _absent(labels: np.ndarray, n_classes: int) -> list[int]:
    """Classes in [0, n_classes) with no entry in ``labels`` (int [n])."""
    return np.flatnonzero(np.bincount(labels, minlength=n_classes) == 0).tolist()


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
