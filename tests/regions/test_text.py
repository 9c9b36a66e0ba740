"""The text / marker detector, scored against the demo's ground truth, plus the detector contract."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from audit.data.demo import render_demo_image, write_demo
from audit.errors import ShapeError, UnknownNameError
from audit.regions import DETECTORS, Detection, detect_regions, match_boxes
from audit.regions.text import TextDetector

KINDS = ("text", "marker")


def _score(root: Path, kinds: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """Recall and precision per kind at IoU >= 0.3 over a demo folder, against its ground_truth.csv."""
    truth: dict[str, dict[str, list]] = {}
    with (root / "ground_truth.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            boxes = truth.setdefault(row["path"], defaultdict(list))  # every image counts, with or without boxes
            if row["kind"] in kinds:
                boxes[row["kind"]].append(tuple(int(row[k]) for k in ("x0", "y0", "x1", "y1")))
    matched, n_truth, n_found = defaultdict(int), defaultdict(int), defaultdict(int)
    for path, boxes in truth.items():
        found = detect_regions(cv2.imread(str(root / path), cv2.IMREAD_GRAYSCALE), names=("text",))
        for kind in kinds:
            mine = [(d.x0, d.y0, d.x1, d.y1) for d in found if d.kind == kind]
            matched[kind] += match_boxes(boxes[kind], mine, min_iou=0.3)
            n_truth[kind] += len(boxes[kind])
            n_found[kind] += len(mine)
    return {k: (matched[k] / max(n_truth[k], 1), matched[k] / max(n_found[k], 1)) for k in kinds}


@pytest.fixture(scope="module", params=[0.5, 0.9], ids=["R0.5", "R0.9"])
def demo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    rate = request.param
    return write_demo(tmp_path_factory.mktemp(f"demo{rate}"), n=120, shortcut_rate=rate, seed=21, size=256)


def test_recall_and_precision_on_the_demo(demo) -> None:
    scores = _score(demo.root, KINDS)
    print(
        f"R={demo.shortcut_rate}: " + ", ".join(f"{k} recall {r:.3f} precision {p:.3f}" for k, (r, p) in scores.items())
    )
    for kind, (recall, precision) in scores.items():
        assert recall >= 0.9, (kind, recall)
        assert precision >= 0.9, (kind, precision)


def test_no_text_or_marker_on_bare_backgrounds() -> None:
    detector = TextDetector()
    clean = 0
    for seed in range(60):
        image = render_demo_image(10_000 + seed, 256, opacity=seed % 2 == 0, marker=False).image
        clean += not detector.detect(image)
    assert clean / 60 >= 0.9


def test_token_is_text_and_letter_is_marker() -> None:
    demo = render_demo_image(7, 256, token=True, marker=True)
    truth = {r.kind: (r.x0, r.y0, r.x1, r.y1) for r in demo.regions}
    found = TextDetector().detect(demo.image)
    assert [d.kind for d in found].count("text") == 1
    assert [d.kind for d in found].count("marker") == 1
    for d in found:
        assert match_boxes([truth[d.kind]], [(d.x0, d.y0, d.x1, d.y1)], min_iou=0.5) == 1


def test_boxed_marker_includes_its_box() -> None:
    for seed in range(40):
        demo = render_demo_image(seed, 256, marker=True)
        (marker,) = demo.regions
        if "box" in marker.note:
            break
    else:
        pytest.fail("no boxed marker in 40 seeds")
    (found,) = TextDetector().detect(demo.image)
    assert found.kind == "marker"
    assert (found.x0, found.y0, found.x1, found.y1) == pytest.approx(
        (marker.x0, marker.y0, marker.x1, marker.y1), abs=1
    )


def test_rgb_equals_gray_and_boxes_are_inside_the_image(demo) -> None:
    paths = sorted(demo.root.glob("*/*.png"))[::12]
    for path in paths:
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
        found = detect_regions(gray)
        assert found == detect_regions(rgb)
        assert found == detect_regions(gray[:, :, None])
        for d in found:
            assert isinstance(d, Detection)
            assert 0 <= d.x0 < d.x1 <= gray.shape[1] and 0 <= d.y0 < d.y1 <= gray.shape[0]
            assert 0.0 <= d.score <= 1.0
            assert d.detector in DETECTORS and d.kind in DETECTORS.get(d.detector).kinds
            assert d.detector_version == DETECTORS.get(d.detector).version


def test_large_image_is_detected_on_a_downscaled_copy_and_boxes_scale_back() -> None:
    demo = render_demo_image(3, 512, token=True, marker=True)
    large = cv2.resize(demo.image, (1024, 1024), interpolation=cv2.INTER_NEAREST)
    found = TextDetector().detect(large)
    for region in demo.regions:
        truth = (2 * region.x0, 2 * region.y0, 2 * region.x1, 2 * region.y1)
        mine = [(d.x0, d.y0, d.x1, d.y1) for d in found if d.kind == region.kind]
        assert match_boxes([truth], mine, min_iou=0.5) == 1, (region, found)


def test_non_square_image_keeps_its_coordinates() -> None:
    demo = render_demo_image(4, 256, token=True, marker=True)
    wide = np.hstack([demo.image, demo.image[:, :128]])  # 256 x 384: nothing new at the same positions
    found = TextDetector().detect(wide)
    for region in demo.regions:
        mine = [(d.x0, d.y0, d.x1, d.y1) for d in found if d.kind == region.kind]
        assert match_boxes([(region.x0, region.y0, region.x1, region.y1)], mine, min_iou=0.5) == 1


def test_registry_and_input_errors() -> None:
    assert {"text", "border"} <= set(DETECTORS.names())
    assert DETECTORS.get("text") is TextDetector
    assert TextDetector.kinds == ("text", "marker")
    with pytest.raises(UnknownNameError, match="valid names: .*text"):
        detect_regions(np.zeros((64, 64), np.uint8), names=("txt",))
    with pytest.raises(ShapeError, match="uint8"):
        detect_regions(np.zeros((64, 64), np.float32))
    with pytest.raises(ShapeError, match="expected shape"):
        detect_regions(np.zeros((64, 64, 2), np.uint8))
    assert TextDetector().detect(np.full((64, 64), 128, np.uint8)) == []
