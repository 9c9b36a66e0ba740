"""The border detector: the demo's padding bands, synthetic bands of each kind, what it must leave alone, and real
radiographs with hand-drawn boxes."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from audit.data.demo import render_demo_image, write_demo
from audit.regions import DETECTORS, detect_regions, match_boxes
from audit.regions.border import BorderDetector

# The labelled real radiographs (README there: licences and attribution; Hannover images are CC BY 3.0, Winther et
# al., COVID-19 Image Repository; Kermany images CC BY 4.0, Kermany et al., Cell 2018).
CXR_REAL = Path(os.environ.get("CXR_REAL", Path(__file__).resolve().parents[3] / "shared" / "data" / "cxr-real"))


def _noise_image(seed: int, height: int = 200, width: int = 240) -> np.ndarray:
    """uint8 [height, width]: a smooth gradient with pixel noise, nowhere flat."""
    rng = np.random.default_rng(seed)
    base = np.linspace(60, 160, width, dtype=np.float32)[None, :] + np.zeros((height, 1), np.float32)
    return np.clip(base + rng.normal(0, 4, (height, width)), 1, 255).astype(np.uint8)


def _anatomy(seed: int, height: int = 320, width: int = 400) -> np.ndarray:
    """float [height, width]: a smooth random field (100..220) with pixel noise, a stand-in for a radiograph."""
    rng = np.random.default_rng(seed)
    field = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 12)
    field = (field - field.min()) / (field.max() - field.min())
    return 100 + 100 * field + np.linspace(0, 20, width)[None, :] + rng.normal(0, 4, (height, width))


def _boxes(image: np.ndarray) -> list[tuple[int, int, int, int]]:
    return [(d.x0, d.y0, d.x1, d.y1) for d in BorderDetector().detect(image)]


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
    flagged = [s for s in range(60) if detector.detect(render_demo_image(20_000 + s, 256, marker=False).image)]
    assert flagged == []


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


def test_collimation_band_with_anatomy_showing_through() -> None:
    image = _anatomy(1)
    h, w = image.shape
    rows, columns = np.mgrid[:h, :w]
    band = columns < 30 + 0.05 * rows  # a shutter band, slightly tilted: 30 px at the top, 46 at the bottom
    image[band] = 0.35 * image[band] + 20  # darker, but not flat: the anatomy is still there, attenuated
    (found,) = _boxes(np.clip(image, 0, 255).astype(np.uint8))
    assert found[:2] == (0, 0) and found[3] == h
    assert 45 <= found[2] <= 48  # the axis-aligned box covers the whole tilted band


def test_bright_strip_that_is_not_flat() -> None:
    image = 0.6 * _anatomy(2)
    h, w = image.shape
    image[:, -9:] = 240 + np.random.default_rng(3).normal(0, 6, (h, 9))  # an unmasked detector edge, noisy
    (found,) = _boxes(np.clip(image, 0, 255).astype(np.uint8))
    assert found == pytest.approx((w - 9, 0, w, h), abs=1)


def test_padding_wedge_that_ends_at_another_band() -> None:
    image = _anatomy(6)
    h, w = image.shape
    rows, columns = np.mgrid[:h, :w]
    image[:, 360:] = 0  # padding on the right
    image[rows < (columns - 200) * 25 / 160] = 0  # a rotation wedge along the top, 25 px where it meets it
    found = sorted(_boxes(np.clip(image, 0, 255).astype(np.uint8)))
    assert len(found) == 2
    top, right = found
    assert right == (360, 0, w, h)
    assert abs(top[0] - 200) <= 12 and top[1] == 0 and top[2] >= 355 and 24 <= top[3] <= 27


def test_soft_ramp_and_thin_wedge_are_not_borders() -> None:
    image = _anatomy(4)
    h, w = image.shape
    rows, columns = np.mgrid[:h, :w]
    ramp = image * (0.2 + 0.8 * np.clip(rows / 30.0, 0, 1))  # darkening smoothly into the top edge
    assert _boxes(np.clip(ramp, 0, 255).astype(np.uint8)) == []
    sliver = _anatomy(5)
    sliver[columns < 6 - 6 * rows / h] = 0  # rotation padding 6 px at its widest: below MIN_WEDGE
    assert _boxes(np.clip(sliver, 0, 255).astype(np.uint8)) == []


# Real radiographs from the half of cxr-real the thresholds were tuned on: black padding, a tilted shutter band,
# bright edge strips, three shutter bands (one 5 px thick), JPEG padding in a small image; and, without borders,
# black air clipped flat beside a child's body, rotation slivers under 8 px, dark air around an adult.
REAL_CASES = [
    "hannover-mhh-covid19/png/61bc50d1.png",
    "hannover-mhh-covid19/png/a7e0a141.png",
    "hannover-mhh-covid19/png/88859dc1.png",
    "hannover-mhh-covid19/png/5b324cc7.png",
    "kermany-pediatric-cxr-224px/NORMAL/NORMAL2-IM-0013-0001.jpeg",
    "kermany-pediatric-cxr-224px/PNEUMONIA/person1628_virus_2821.jpeg",
    "hannover-mhh-covid19/png/c0f74558.png",
    "hannover-mhh-covid19/png/3248cc61.png",
]


@pytest.mark.skipif(not (CXR_REAL / "regions.csv").is_file(), reason="shared/data/cxr-real is not available")
@pytest.mark.parametrize("path", REAL_CASES, ids=[Path(p).stem for p in REAL_CASES])
def test_real_radiographs(path: str) -> None:
    with (CXR_REAL / "regions.csv").open(newline="") as f:
        truth = [
            tuple(int(row[k]) for k in ("x0", "y0", "x1", "y1"))
            for row in csv.DictReader(f)
            if row["path"] == path and row["kind"] == "border"
        ]
    image = cv2.imread(str(CXR_REAL / path), cv2.IMREAD_GRAYSCALE)
    found = _boxes(image)
    assert len(found) == len(truth), (found, truth)
    assert match_boxes(truth, found, min_iou=0.5) == len(truth), (found, truth)
