"""The text / marker detector: the demo's ground truth, one synthetic case per cue of drawn overlays, real radiographs
from shared/data/cxr-real, and the detector contract."""

from __future__ import annotations

import csv
import os
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
CXR_REAL = Path(os.environ.get("CXR_REAL", Path(__file__).resolve().parents[3] / "shared" / "data" / "cxr-real"))


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


# ----------------------------------------------------------------------------------------------------------------
# The cues of drawn overlays, one synthetic case each: a smooth body-like background with pixel noise, and an
# overlay (or a look-alike) whose answer is known.


def _background(seed: int, size: int = 256) -> np.ndarray:
    """float32 [size, size]: a soft bright blob (the body) on a darker field, with pixel noise; nowhere flat."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    body = 60.0 * np.exp(-(((xx - size / 2) / (0.35 * size)) ** 2 + ((yy - size / 2) / (0.45 * size)) ** 2))
    return 70.0 + body + rng.normal(0.0, 3.0, (size, size)).astype(np.float32)


def _burn(image: np.ndarray, text: str, x: int, y: int, cap: int, value: float, thickness: int = 2) -> None:
    """Burn antialiased Hershey ``text`` into ``image`` (float32, in place) with grey level ``value``."""
    ink = np.zeros(image.shape, np.uint8)
    cv2.putText(ink, text, (x, y + cap), cv2.FONT_HERSHEY_SIMPLEX, cap / 22.0, 255, thickness, cv2.LINE_AA)
    alpha = ink.astype(np.float32) / 255.0
    image *= 1.0 - alpha
    image += alpha * value


def _u8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _found(image: np.ndarray) -> list[tuple[str, tuple[int, int, int, int]]]:
    return [(d.kind, (d.x0, d.y0, d.x1, d.y1)) for d in TextDetector().detect(_u8(image))]


@pytest.mark.parametrize("ramp", [0.0, 1.3], ids=["flat", "ramp"])
def test_saturated_letter_in_a_grey_box_near_a_corner_is_a_marker_with_its_box(ramp: float) -> None:
    # The box's fill is one grey level, or a ramp when the image was post-processed after the box was drawn;
    # either way it is planar, and the marker is the whole box with its one-pixel outline.
    image = _background(1)
    x0, y0, x1, y1 = 14, 10, 44, 50
    yy, xx = np.mgrid[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1]
    image[y0:y1, x0:x1] = 150.0
    image[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] = 85.0 + ramp * (xx - x0) + 0.3 * ramp * (yy - y0)
    _burn(image, "R", 21, 17, 24, 255.0, thickness=3)
    assert _found(image) == [("marker", (x0, y0, x1, y1))]


def test_bright_but_blurred_rib_like_curve_near_the_edge_is_nothing() -> None:
    # As bright as an overlay and as close to the edge, but its edges are spread over several pixels.
    image = _background(2)
    rib = np.zeros(image.shape, np.float32)
    cv2.ellipse(rib, (60, 80), (70, 40), 0, 180, 300, 1.0, 4)
    rib = cv2.GaussianBlur(rib, (0, 0), 2.0)
    assert _found(image + 150.0 * rib / rib.max()) == []


@pytest.mark.parametrize(("blur", "expected"), [(0.0, 1), (1.5, 0)])
def test_a_letter_is_found_when_its_edges_are_steps_and_not_when_blurred(blur: float, expected: int) -> None:
    image = _background(3)
    ink = np.zeros(image.shape, np.float32)
    _burn(ink, "R", 20, 20, 18, 1.0)
    if blur:
        ink = cv2.GaussianBlur(ink, (0, 0), blur)
    found = _found(image * (1.0 - ink) + 230.0 * ink)
    assert [kind for kind, _ in found] == ["marker"] * expected


@pytest.mark.parametrize(("corner", "expected"), [((20, 20), ["marker"]), ((120, 120), [])])
def test_overlays_sit_near_the_edges_so_a_letter_in_the_middle_is_not_one(corner, expected) -> None:
    image = _background(4)
    _burn(image, "L", *corner, 18, 250.0)
    assert [kind for kind, _ in _found(image)] == expected


def test_tiny_saturated_symbol_in_a_corner_is_text() -> None:
    # The tiny burned-in glyphs in the bottom-right corner of real PA images: a few white pixels, wider than tall.
    image = _background(5)
    image[240:246, 236:244] = 255.0
    image[242:244, 238:240] = 60.0
    image[246, 236:244] = 20.0
    assert _found(image) == [("text", (236, 240, 244, 246))]


def test_white_text_with_a_drop_shadow_on_a_bright_background_is_one_line_of_text() -> None:
    # On a bright, noisy background the top-hat barely sees white ink; the plateau at the image's brightest
    # value does (this case is missed without it).
    rng = np.random.default_rng(6)
    image = 210.0 + rng.normal(0.0, 8.0, (256, 256)).astype(np.float32)
    ink = np.zeros(image.shape, np.float32)
    _burn(ink, "liegend", 60, 225, 12, 1.0)
    shadow = np.roll(ink, (1, 1), axis=(0, 1))
    image = image * (1.0 - shadow) + 40.0 * shadow
    image = image * (1.0 - ink) + 255.0 * ink
    found = _found(image)
    assert [kind for kind, _ in found] == ["text"]
    assert match_boxes([(60, 225, 115, 241)], [found[0][1]], min_iou=0.6) == 1


def test_bright_sharp_lines_near_a_corner_are_not_text() -> None:
    # Sharp and bright like ink, but each is one long thin stroke, not a row of glyphs.
    image = _background(7)
    for k in range(5):
        cv2.line(image, (0, 10 + 9 * k), (60, 40 + 7 * k), 200.0, 2, cv2.LINE_AA)
    assert _found(image) == []


@pytest.mark.parametrize(("wires", "expected"), [(False, ["marker"]), (True, [])])
def test_a_letter_shape_crowded_by_wires_is_not_a_marker(wires: bool, expected: list[str]) -> None:
    # A bright, sharp letter-like shape near a corner, not on the image's brightest plateau (a metal clip, say):
    # alone it is a marker, with a bundle of wires beside it it is a device.
    image = _background(9)
    image[128, 128] = 255.0  # something brighter elsewhere, so the shape's ink is not at the image's maximum
    _burn(image, "J", 20, 30, 18, 200.0)
    if wires:
        for x in (36, 38, 40, 42):
            cv2.line(image, (x, 0), (x, 100), 190.0, 1, cv2.LINE_AA)
    assert [kind for kind, _ in _found(image)] == expected


def test_saturated_letter_joined_to_a_bright_strip_is_still_a_marker() -> None:
    # A letter burned in next to a thin bright strip joins it through a bridge of antialiased pixels into one
    # component too large for a glyph; the letter is split off (and is also on the brightest plateau).
    image = _background(8)
    image[:, 230:234] = 200.0
    _burn(image, "L", 214, 60, 16, 255.0)
    image[60:78, 227:230] = 150.0
    found = _found(image)
    assert [kind for kind, _ in found] == ["marker"]
    assert match_boxes([(215, 61, 227, 77)], [found[0][1]], min_iou=0.7) == 1


def test_stacked_lines_of_a_time_stamp_are_one_block_of_text() -> None:
    # A multi-line time / ID stamp in a corner is boxed by hand as one block, so its lines are joined into one.
    image = _background(11)
    for k, line in enumerate(["12:00:36", "ID 4711", "2017/03/05"]):
        _burn(image, line, 190, 4 + 10 * k, 7, 255.0, thickness=1)
    found = _found(image)
    assert [kind for kind, _ in found] == ["text"]
    assert match_boxes([(190, 4, 240, 34)], [found[0][1]], min_iou=0.7) == 1


def test_a_bright_sliver_too_small_for_a_letter_is_nothing() -> None:
    # Too small for a laterality letter and narrower than tall: a bright piece of a wire or of a bone at the edge,
    # neither a marker nor a burned-in symbol (those are wider than tall).
    image = _background(15, 512)
    image[240:246, 500:503] = 200.0
    assert _found(image) == []


# ----------------------------------------------------------------------------------------------------------------
# Real radiographs (shared/data/cxr-real, attribution in its README). The thresholds were tuned on the images at
# even positions of the sorted labelled paths; the single cases below come from that half.

REAL_CASES = [
    "hannover-mhh-covid19/png/3248cc61.png",  # L in a grey box whose fill is a ramp
    "hannover-mhh-covid19/png/d6494b39.png",  # R in a grey box cut by the left edge
    "hannover-mhh-covid19/png/88859dc1.png",  # white L (255) a few pixels from a bright strip
    "hannover-mhh-covid19/png/61bc50d1.png",  # round lead marker, and "liegend" with a drop shadow
    "hannover-mhh-covid19/png/c0f74558.png",  # white L, and "pa"
    "hannover-mhh-covid19/png/27f5a41d.png",  # tiny burned-in glyph above a brighter body
    "hannover-mhh-covid19/png/b9673e89.png",  # tiny glyph joined to a bright band along the bottom edge
    "kermany-pediatric-cxr-224px/PNEUMONIA/person46_virus_96.jpeg",  # R, time stamp and text cut by the edges
    "kermany-pediatric-cxr-224px/NORMAL/IM-0033-0001.jpeg",  # R cut by the top edge
    "kermany-pediatric-cxr-224px/NORMAL/NORMAL2-IM-0096-0001.jpeg",  # nothing
]


# From the held-out (odd) half, looked at during development, so no longer a clean hold-out.
HELD_OUT_CASES = [
    "hannover-mhh-covid19/png/1479fa94.png",  # tiny glyph whose top-hat box runs on into the gradient below it
]


def _real_truth() -> dict[str, dict[str, list[tuple[int, int, int, int]]]]:
    truth: dict[str, dict[str, list]] = {}
    with (CXR_REAL / "regions.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            boxes = truth.setdefault(row["path"], defaultdict(list))
            if row["kind"] in KINDS:
                boxes[row["kind"]].append(tuple(int(row[k]) for k in ("x0", "y0", "x1", "y1")))
    return truth


@pytest.mark.skipif(not (CXR_REAL / "regions.csv").is_file(), reason="shared/data/cxr-real is not available")
@pytest.mark.parametrize("path", REAL_CASES + HELD_OUT_CASES, ids=[Path(p).stem for p in REAL_CASES + HELD_OUT_CASES])
def test_real_radiographs(path: str) -> None:
    truth = _real_truth()[path]
    found = TextDetector().detect(cv2.imread(str(CXR_REAL / path), cv2.IMREAD_GRAYSCALE))
    for kind in KINDS:
        mine = [(d.x0, d.y0, d.x1, d.y1) for d in found if d.kind == kind]
        assert len(mine) == len(truth[kind]), (kind, mine, truth[kind])
        assert match_boxes(truth[kind], mine, min_iou=0.5) == len(truth[kind]), (kind, mine, truth[kind])


@pytest.mark.skipif(not (CXR_REAL / "regions.csv").is_file(), reason="shared/data/cxr-real is not available")
def test_recall_and_precision_on_all_of_cxr_real_do_not_regress() -> None:
    # A guard, not the tuning target: measured 0.92 / 0.91 (markers) and 0.94 / 0.83 (text) on all 200 images
    # with opencv-morph-3 (the tuning half 0.90 / 0.89 and 0.90 / 0.90, the other half 0.94 / 0.94 and
    # 0.96 / 0.79). Issue #4 asks for text recall >= 0.9 and precision >= 0.8.
    detector = TextDetector()
    matched, n_truth, n_found = defaultdict(int), defaultdict(int), defaultdict(int)
    for path, boxes in _real_truth().items():
        found = detector.detect(cv2.imread(str(CXR_REAL / path), cv2.IMREAD_GRAYSCALE))
        for kind in KINDS:
            mine = [(d.x0, d.y0, d.x1, d.y1) for d in found if d.kind == kind]
            matched[kind] += match_boxes(boxes[kind], mine, min_iou=0.3)
            n_truth[kind] += len(boxes[kind])
            n_found[kind] += len(mine)
    scores = {kind: (matched[kind] / n_truth[kind], matched[kind] / max(n_found[kind], 1)) for kind in KINDS}
    print(", ".join(f"{k} recall {r:.3f} precision {p:.3f}" for k, (r, p) in scores.items()))
    assert scores["marker"][0] >= 0.88 and scores["marker"][1] >= 0.85, scores
    assert scores["text"][0] >= 0.9 and scores["text"][1] >= 0.8, scores
