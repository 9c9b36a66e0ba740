"""The learned (PP-OCRv6 det) text / marker detector: synthetic text, blank images, kinds, session sharing."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from audit.errors import ConfigError, ModelError, ShapeError
from audit.regions import DETECTORS, Detection, dbnet, match_boxes
from audit.regions.dbnet import DBNetTextDetector

pytest.importorskip("onnxruntime")
if importlib.util.find_spec("rapidocr") is None:  # not importorskip: the detector must work without importing it
    pytest.skip("the rapidocr package (which ships the model file) is not installed", allow_module_level=True)


def _background(size: tuple[int, int] = (384, 320), seed: int = 0) -> np.ndarray:
    """A smooth, noisy radiograph-like background, uint8 [H, W]: a bright body on darker air."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    body = 150 * np.exp(-(((xx - w / 2) / (0.35 * w)) ** 2 + ((yy - h / 2) / (0.45 * h)) ** 2))
    return np.clip(40 + body + rng.normal(0, 4, size), 0, 255).astype(np.uint8)


def _write(image: np.ndarray, text: str, origin: tuple[int, int], scale: float, thickness: int = 2) -> tuple:
    """Draw white ``text`` with its baseline at ``origin``; returns its tight ink box (x0, y0, x1, y1)."""
    before = image.copy()
    cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thickness, cv2.LINE_AA)
    ys, xs = np.nonzero(image != before)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _boxes(found: list[Detection], kind: str | None = None) -> list[tuple[int, int, int, int]]:
    return [(d.x0, d.y0, d.x1, d.y1) for d in found if kind is None or d.kind == kind]


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, dict[str, tuple]]:
    """Two text lines and one single letter near the top-left corner, with their ink boxes."""
    image = _background()
    truth = {
        "line1": _write(image, "PORTABLE", (150, 350), 0.8),
        "line2": _write(image, "AP SUPINE", (60, 40), 0.7),
        "letter": _write(image, "R", (10, 372), 0.9),
    }
    return image, truth


def test_finds_text_lines_and_a_marker(scene) -> None:
    image, truth = scene
    found = DBNetTextDetector().detect(image)
    text, markers = _boxes(found, "text"), _boxes(found, "marker")
    assert match_boxes([truth["line1"], truth["line2"]], text, min_iou=0.3) == 2, found
    assert match_boxes([truth["letter"]], markers, min_iou=0.3) == 1, found
    assert len(found) == 3, found  # nothing else on a smooth body


def test_boxes_inside_the_image_and_well_formed(scene) -> None:
    image, _ = scene
    for crop in (image, image[:200, :150], image[30:, 5:]):
        for d in DBNetTextDetector().detect(crop):
            assert 0 <= d.x0 < d.x1 <= crop.shape[1] and 0 <= d.y0 < d.y1 <= crop.shape[0]
            assert 0.0 <= d.score <= 1.0
            assert d.kind in DBNetTextDetector.kinds
            assert (d.detector, d.detector_version) == ("text_dbnet", DBNetTextDetector.version)


@pytest.mark.parametrize("kind", ["blank", "noise", "body"])
def test_nothing_on_images_without_text(kind: str) -> None:
    rng = np.random.default_rng(1)
    image = {
        "blank": np.full((256, 256), 90, np.uint8),
        "noise": rng.normal(120, 12, (300, 260)).clip(0, 255).astype(np.uint8),
        "body": _background((320, 320), seed=3),
    }[kind]
    assert DBNetTextDetector().detect(image) == []


def test_single_letter_in_a_corner_is_a_marker_and_a_word_is_text() -> None:
    for corner, origin in (("top-left", (8, 30)), ("top-right", (280, 30)), ("bottom-right", (280, 372))):
        image = _background(seed=5)
        letter = _write(image, "L", origin, 0.9)
        word = _write(image, "liegend", (110, 200), 0.6)
        found = DBNetTextDetector().detect(image)
        assert match_boxes([letter], _boxes(found, "marker"), min_iou=0.3) == 1, (corner, found)
        assert match_boxes([word], _boxes(found, "text"), min_iou=0.3) == 1, (corner, found)
        assert len(found) == 2, (corner, found)


def test_tiny_lone_glyph_is_fine_print_not_a_marker() -> None:
    """A lone glyph under MARKER_MIN_HEIGHT of the long side is text (as the tiny corner glyphs of cxr-real)."""
    probability = np.zeros((512, 512), np.float32)
    probability[490:496, 500:506] = 0.9  # kernel 5 x 5 px (centres): 1.0% of the long side
    probability[20:30, 20:30] = 0.9  # kernel 9 x 9 px: 1.8% of the long side
    found = sorted(DBNetTextDetector().regions_from_map(probability, 1024, 1024), key=lambda d: d.y0)
    assert [d.kind for d in found] == ["marker", "text"]


def test_rgb_and_gray_give_the_same_boxes(scene) -> None:
    image, _ = scene
    detector = DBNetTextDetector()
    gray = detector.detect(image)
    assert gray  # the comparison below must compare something
    assert detector.detect(np.repeat(image[:, :, None], 3, axis=2)) == gray
    assert detector.detect(image[:, :, None]) == gray


def test_model_ships_in_the_installed_package() -> None:
    path = dbnet.model_path()
    assert path.is_file() and path.suffix == ".onnx"
    assert path.stat().st_size > 1_000_000  # the weights themselves, not a pointer to a download
    assert "rapidocr" in path.parts


def test_model_path_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dbnet, "MODEL_PACKAGE", "no_such_package_for_dbnet")
    with pytest.raises(ModelError, match="pip install"):
        dbnet.model_path()


def test_runs_without_network_and_without_importing_rapidocr() -> None:
    """In a fresh process whose sockets refuse to connect: rapidocr's pipeline (and its downloader) stays unloaded."""
    script = """
import socket, sys
import numpy as np
def refuse(*args, **kwargs):
    raise OSError("network access attempted")
socket.socket.connect = socket.socket.connect_ex = socket.create_connection = refuse
from audit.regions.dbnet import DBNetTextDetector
image = np.full((96, 160), 60, np.uint8)
import cv2
cv2.putText(image, "PORTABLE", (10, 60), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 255, 2, cv2.LINE_AA)
found = DBNetTextDetector().detect(image)
print(len(found), [d.kind for d in found], "rapidocr" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "['text']", "False"], result.stdout


def test_session_is_created_once_and_shared_across_threads(scene) -> None:
    image, _ = scene
    dbnet.get_session()  # whatever earlier tests did, the default session exists from here on
    before = dbnet.sessions_created
    detectors = [DBNetTextDetector() for _ in range(3)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda d: d.detect(image), detectors))
    assert dbnet.sessions_created == before
    assert results[0] == results[1] == results[2]
    # A different provider list is a different session, made once too.
    DBNetTextDetector(providers=["CPUExecutionProvider"]).detect(image[:64, :64])
    DBNetTextDetector(providers=["CPUExecutionProvider"]).detect(image[:64, :64])
    expected = before + (dbnet.default_providers() != ("CPUExecutionProvider",))
    assert dbnet.sessions_created == expected


def test_registered_with_kinds_and_rejects_bad_input() -> None:
    assert DETECTORS.get("text_dbnet") is DBNetTextDetector
    assert DBNetTextDetector.kinds == ("text", "marker")
    with pytest.raises(ShapeError):
        DBNetTextDetector().detect(np.zeros((64, 64), np.float32))
    with pytest.raises(ConfigError, match="multiples of 32"):
        DBNetTextDetector(max_side=500)
    with pytest.raises(ConfigError, match="min_side <= max_side"):
        DBNetTextDetector(max_side=512, min_side=640)


def test_input_size_keeps_aspect_and_clamps_the_long_side() -> None:
    assert dbnet.input_size(2048, 1600) == (640, 512)  # shrunk to max_side
    assert dbnet.input_size(224, 224) == (512, 512)  # enlarged to min_side
    assert dbnet.input_size(524, 640) == (512, 640)  # between the two: its own size, sides rounded to 32
    assert dbnet.input_size(20, 4000) == (32, 640)  # never below one stride


def test_post_processing_on_a_hand_made_map() -> None:
    """A 40 x 10 kernel and a 10 x 14 one of probability 0.9: a text box and a marker, unclipped by d."""
    probability = np.zeros((128, 128), np.float32)
    probability[20:30, 30:70] = 0.9
    probability[80:94, 100:110] = 0.9
    probability[60:62, 10:60] = 0.9  # 2 px thin: below the minimum kernel side, dropped
    probability[100:110, 10:20] = 0.35  # above the map threshold, below the box threshold
    found = DBNetTextDetector().regions_from_map(probability, 256, 256)  # image twice the map's size
    assert [d.kind for d in sorted(found, key=lambda d: d.x0)] == ["text", "marker"]
    text = next(d for d in found if d.kind == "text")
    # minAreaRect of the pixel centres (30.5 ... 69.5, 20.5 ... 29.5) spans 39 x 9, so d = 39 * 9 * ratio / 96.
    d = 39 * 9 * dbnet.UNCLIP_RATIO / (2 * 48)
    expected = (2 * (30.5 - d), 2 * (20.5 - d), 2 * (69.5 + d), 2 * (29.5 + d))  # outward rounding below
    assert (text.x0, text.y0, text.x1, text.y1) == (
        math.floor(expected[0]),
        math.floor(expected[1]),
        math.ceil(expected[2]),
        math.ceil(expected[3]),
    )
    assert text.score == pytest.approx(0.9, abs=0.02)
