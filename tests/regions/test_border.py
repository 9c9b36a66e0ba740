"""The border / padding detector: the demo's padding bands, synthetic bands, and what it must leave alone."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest

from audit.data.demo import render_demo_image, write_demo
from audit.regions import DETECTORS, detect_regions, match_boxes
from audit.regions.border import BorderDetector


def _noise_image(seed: int, height: int = 200, width: int = 240) -> np.ndarray:
    """uint8 [height, width]: a smooth gradient with pixel noise, nowhere flat."""
    rng = np.random.default_rng(seed)
    base = np.linspace(60, 160, width, dtype=np.float32)[None, :] + np.zeros((height, 1), np.float32)
    return np.clip(base + rng.normal(0, 4, (height, width)), 1, 255).astype(np.uint8)


@pytest.fixture(scope="module", params=[0.5, 0.9], ids=["R0.5", "R0.9"])
def demo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    rate = request.param
    return write_demo(tmp_path_factory.mktemp(f"border{rate}"), n=120, shortcut_rate=rate, seed=31, size=256)


def test_recall_and_precision_on_the_demo(demo) -> None:
    truth: dict[str, list] = {}
    with demo.ground_truth.open(newline="") as f:
        for row in csv.DictReader(f):
            boxes = truth.setdefault(row["path"], [])
            if row["kind"] == "border":
                boxes.append(tuple(int(row[k]) for k in ("x0", "y0", "x1", "y1")))
    matched = n_truth = n_found = 0
    for path, boxes in truth.items():
        found = detect_regions(cv2.imread(str(demo.root / path), cv2.IMREAD_GRAYSCALE), names=("border",))
        mine = [(d.x0, d.y0, d.x1, d.y1) for d in found]
        matched += match_boxes(boxes, mine, min_iou=0.3)
        n_truth += len(boxes)
        n_found += len(mine)
    recall, precision = matched / n_truth, matched / max(n_found, 1)
    print(f"R={demo.shortcut_rate}: border recall {recall:.3f} precision {precision:.3f} ({n_truth} bands)")
    assert n_truth >= 15
    assert recall >= 0.9 and precision >= 0.9


def test_no_border_on_the_demo_background_or_its_air() -> None:
    detector = BorderDetector()
    flagged = sum(bool(detector.detect(render_demo_image(20_000 + s, 256, marker=False).image)) for s in range(60))
    assert flagged / 60 <= 0.1


@pytest.mark.parametrize("side", ["top", "bottom", "left", "right"])
@pytest.mark.parametrize("value", [0, 255, 97])
def test_constant_band_on_each_side(side: str, value: int) -> None:
    image = _noise_image(1)
    h, w = image.shape
    box = {"top": (0, 0, w, 12), "bottom": (0, h - 12, w, h), "left": (0, 0, 12, h), "right": (w - 12, 0, w, h)}[side]
    image[box[1] : box[3], box[0] : box[2]] = value
    (found,) = BorderDetector().detect(image)
    assert found.kind == "border" and found.detector == "border"
    # A grey band may run a pixel into content of nearly its own value.
    assert (found.x0, found.y0, found.x1, found.y1) == pytest.approx(box, abs=0 if value in (0, 255) else 1)
    assert 0.0 <= found.score <= 1.0


def test_jpeg_band_and_tilted_wedge() -> None:
    image = _noise_image(2)
    h, w = image.shape
    image[:, :10] = 0
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    jpeg = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)
    found = BorderDetector().detect(jpeg)
    assert match_boxes([(0, 0, 10, h)], [(d.x0, d.y0, d.x1, d.y1) for d in found], min_iou=0.7) == 1

    wedge = _noise_image(3)
    depth = np.linspace(30, 6, w).astype(int)  # a straight, tilted inner edge: rotation padding
    rows = np.arange(h)[:, None]
    wedge[rows < depth[None, :]] = 0
    (found,) = BorderDetector().detect(wedge)
    assert (found.x0, found.y0, found.x1) == (0, 0, w) and 28 <= found.y1 <= 31


def test_curved_flat_region_and_thin_band_are_not_borders() -> None:
    image = _noise_image(4)
    h, w = image.shape
    yy, xx = np.mgrid[:h, :w]
    image[(xx - w / 2) ** 2 / 90**2 + yy**2 / 40**2 < 1] = 0  # air clipped to 0 along a curved outline
    assert BorderDetector().detect(image) == []
    thin = _noise_image(5)
    thin[:2] = 0  # below the minimum thickness
    assert BorderDetector().detect(thin) == []


def test_downscaled_copy_boxes_scale_back_and_rgb_equals_gray() -> None:
    image = np.tile(_noise_image(6, 300, 400), (4, 4))  # 1200 x 1600, analysed at 384 x 512
    image[:, -40:] = 0
    rgb = np.repeat(image[:, :, None], 3, axis=2)
    found = BorderDetector().detect(image)
    assert found == BorderDetector().detect(rgb)
    (band,) = found
    assert abs(band.x0 - (1600 - 40)) <= 4 and (band.y0, band.x1, band.y1) == (0, 1600, 1200)


def test_registered() -> None:
    assert DETECTORS.get("border") is BorderDetector
    assert BorderDetector.kinds == ("border",)
    assert isinstance(BorderDetector.version, str) and BorderDetector.version
