"""The dataset-level watermark detector: a planted class-associated logo is found and located, a clean set is not.

The datasets are demo radiographs at 128 px (class 1 carries the demo's lung opacity, a genuine class difference,
and every image a class-independent L/R marker). The planted overlay is a semi-transparent (α 0.3) "(H) CITY
HOSPITAL" logo, drawn at 256 px and downsampled like the audit's resize does, in 20% of the dataset, all in class 1,
at a position drawn from the seed and jittered by ±3 px per image. N = 600 gives about 120 carrier images, near the
~100 the study (shared/notes/detectors.md, section 6) found necessary for a clear overlay.
"""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest

from audit.data.demo import render_demo_image
from audit.errors import ShapeError
from audit.regions.base import box_iou, match_boxes
from audit.regions.watermark import (
    WatermarkMatches,
    WatermarkModel,
    WatermarkStatistics,
    fit_carriers,
    high_pass,
)

GRID = 128
N = 600
ALPHA = 0.3
JITTER = 3

Box = tuple[int, int, int, int]


def _logo() -> np.ndarray:
    """float32 [h, w] in [0, 1]: a circled "H" and two lines of text, drawn at 256 px, halved to the grid."""
    ink = np.zeros((34, 110), np.uint8)
    cv2.circle(ink, (16, 17), 15, 255, 2, cv2.LINE_AA)
    cv2.putText(ink, "H", (9, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, 2, cv2.LINE_AA)
    cv2.putText(ink, "CITY", (37, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, 255, 1, cv2.LINE_AA)
    cv2.putText(ink, "HOSPITAL", (37, 31), cv2.FONT_HERSHEY_SIMPLEX, 0.45, 255, 1, cv2.LINE_AA)
    small = cv2.resize(ink, (55, 17), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    ys, xs = np.nonzero(small > 0.05)
    return small[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


@pytest.fixture(scope="module")
def backgrounds() -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, GRID, GRID] demo radiographs and int [N] labels (alternating 0, 1)."""
    labels = np.arange(N) % 2
    images = np.stack(
        [render_demo_image(5_000 + i, GRID, opacity=bool(labels[i]), marker=True).image for i in range(N)]
    )
    return images, labels


def _plant(
    images: np.ndarray, labels: np.ndarray, carrier_class: int, prevalence: float, seed: int
) -> tuple[np.ndarray, np.ndarray, dict[int, Box], Box]:
    """Blend the logo into ``prevalence`` of the whole dataset, all in ``carrier_class``.

    Returns:
        The watermarked copy, bool [N] carriers, the true box per carrier, and the unjittered box.
    """
    rng = np.random.default_rng(seed)
    ink = _logo()
    h, w = ink.shape
    x, y = int(rng.integers(8, GRID - w - 8)), int(rng.integers(8, GRID - h - 8))
    in_class = np.flatnonzero(labels == carrier_class)
    chosen = rng.choice(in_class, size=round(prevalence * len(labels)), replace=False)
    out = images.copy()
    carriers = np.zeros(len(labels), bool)
    boxes: dict[int, Box] = {}
    for i in chosen.tolist():
        dx, dy = (int(v) for v in rng.integers(-JITTER, JITTER + 1, size=2))
        x0, y0 = x + dx, y + dy
        patch = out[i, y0 : y0 + h, x0 : x0 + w].astype(np.float32)
        out[i, y0 : y0 + h, x0 : x0 + w] = np.clip((1 - ALPHA * ink) * patch + ALPHA * ink * 255 + 0.5, 0, 255)
        carriers[i] = True
        boxes[i] = (x0, y0, x0 + w, y0 + h)
    return out, carriers, boxes, (x, y, x + w, y + h)


def _statistics(images: np.ndarray, labels: np.ndarray, batch: int = 100) -> WatermarkStatistics:
    stats = WatermarkStatistics(grid=GRID, seed=0)
    for start in range(0, len(labels), batch):
        stats.add(images[start : start + batch], labels[start : start + batch])
    return stats


@pytest.fixture(scope="module")
def planted(backgrounds):
    images, labels = backgrounds
    marked, carriers, boxes, true_box = _plant(images, labels, carrier_class=1, prevalence=0.2, seed=7)
    stats = _statistics(marked, labels)
    return marked, labels, carriers, boxes, true_box, stats, stats.finish()


def test_planted_watermark_is_found_and_located(planted) -> None:
    images, labels, carriers, boxes, true_box, stats, model = planted
    assert carriers.sum() >= 100
    assert len(model.regions) == 1, model.regions
    region = model.regions[0]
    assert region.label == 1
    assert region.z > region.threshold == model.threshold
    assert box_iou(region.box, true_box) >= 0.3

    # Pass 2 streamed in batches, the mixture fitted once on all scores.
    matches = WatermarkMatches.concatenate([model.match(images[s : s + 128]) for s in range(0, N, 128)])
    fits = model.assign(matches.scores)
    found = model.detections(matches, fits, [(GRID, GRID)] * N)
    flagged = np.array([bool(d) for d in found])
    recall = (flagged & carriers).sum() / carriers.sum()
    precision = (flagged & carriers).sum() / max(flagged.sum(), 1)
    located = sum(match_boxes([boxes[i]], [(d.x0, d.y0, d.x1, d.y1) for d in found[i]]) for i in boxes)
    first = {i: found[i][0] for i in boxes if found[i]}
    ious = [box_iou(boxes[i], (d.x0, d.y0, d.x1, d.y1)) for i, d in first.items()]
    print(
        f"z {region.z:.2f} vs threshold {region.threshold:.2f} (other class max z "
        f"{stats.z_maps()[0].max():.2f}); region {region.box} true {true_box}; carriers {carriers.sum()}: "
        f"recall {recall:.3f} precision {precision:.3f}; boxes IoU >= 0.3: {located}/{len(boxes)}, "
        f"median IoU {np.median(ious):.2f}; prevalence {fits[0].prevalence(labels)}"
    )
    assert recall >= 0.9 and precision >= 0.9
    assert located >= 0.9 * len(boxes)
    assert all(d.kind == "watermark" and d.detector == "watermark" and 0 <= d.score <= 1 for ds in found for d in ds)
    assert fits[0].prevalence(labels)[0] <= 0.05  # class 0 has no carrier


def test_clean_dataset_has_no_region(backgrounds) -> None:
    images, labels = backgrounds
    stats = _statistics(images, labels)
    model = stats.finish()
    peak = max(float(z.max()) for z in stats.z_maps().values())
    print(f"clean: largest class z {peak:.2f} vs threshold {model.threshold:.2f}")
    assert model.regions == ()
    assert peak < model.threshold
    assert model.locate(images[:50], [(GRID, GRID)] * 50) == [[] for _ in range(50)]


def test_watermark_in_one_of_three_classes(backgrounds) -> None:
    images, _ = backgrounds
    labels = np.arange(N) % 3  # the opacity now falls across classes; the logo goes in class 2 only
    marked, _, _, true_box = _plant(images, labels, carrier_class=2, prevalence=0.2, seed=11)
    model = _statistics(marked, labels, batch=200).finish()
    assert [r.label for r in model.regions] == [2]
    assert box_iou(model.regions[0].box, true_box) >= 0.3


def test_batching_does_not_change_the_result(planted) -> None:
    images, labels, _, _, _, stats, model = planted
    whole = _statistics(images, labels, batch=N)
    assert whole.tau == stats.tau and whole.n_images == stats.n_images == N
    again = whole.finish()
    assert again.threshold == pytest.approx(model.threshold, rel=1e-6)
    assert [r.box for r in again.regions] == [r.box for r in model.regions]
    np.testing.assert_allclose(again.regions[0].template, model.regions[0].template, rtol=1e-4, atol=1e-4)


def test_model_is_small_picklable_and_boxes_scale_to_the_stored_size(planted) -> None:
    images, _, carriers, boxes, _, _, model = planted
    restored: WatermarkModel = pickle.loads(pickle.dumps(model))
    assert len(pickle.dumps(model)) < 50_000
    subset = images[:60]
    np.testing.assert_array_equal(restored.scores(subset), model.scores(subset))

    matches = model.match(images)
    fits = model.assign(matches.scores)
    on_grid = model.detections(matches, fits, [(GRID, GRID)] * N)
    stretched = model.detections(matches, fits, [(3 * GRID, 2 * GRID)] * N)  # width 384, height 256
    i = int(np.flatnonzero(carriers)[0])
    a, b = on_grid[i][0], stretched[i][0]
    assert (b.x0, b.y0, b.x1, b.y1) == (3 * a.x0, 2 * a.y0, 3 * a.x1, 2 * a.y1)
    assert box_iou(boxes[i], (a.x0, a.y0, a.x1, a.y1)) >= 0.3


def test_high_pass_of_a_batch_equals_per_image_blur() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 64, 64), dtype=np.uint8)
    batch = high_pass(images)
    for image, hp in zip(images, batch, strict=True):
        blurred = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 2.0 * 64 / 256, borderType=cv2.BORDER_REFLECT_101)
        np.testing.assert_allclose(hp, image - blurred, atol=1e-3)


def test_mixture_separates_two_groups_and_keeps_one_skewed_hump() -> None:
    rng = np.random.default_rng(1)
    scores = np.concatenate([rng.normal(0.05, 0.02, 800), rng.normal(0.3, 0.04, 200)])
    fit = fit_carriers(scores)
    assert fit.components == 2
    assert fit.carriers[800:].mean() >= 0.99 and fit.carriers[:800].mean() <= 0.01
    # The maximum of many correlations is right-skewed (Gumbel-like): one population, no carriers.
    skewed = rng.gumbel(0.1, 0.02, 1000)
    single = fit_carriers(skewed)
    assert single.components == 1 and not single.carriers.any()


def test_wrong_inputs_raise_shape_errors() -> None:
    stats = WatermarkStatistics(grid=64)
    with pytest.raises(ShapeError, match="resize to the grid"):
        stats.add(np.zeros((2, 32, 32), np.uint8), np.array([0, 1]))
    with pytest.raises(ShapeError, match="uint8"):
        stats.add(np.zeros((2, 64, 64), np.float32), np.array([0, 1]))
    with pytest.raises(ShapeError, match="labels"):
        stats.add(np.zeros((2, 64, 64), np.uint8), np.array([0.0, 1.0]))
    assert stats.finish().regions == ()  # nothing added: no threshold, no region
