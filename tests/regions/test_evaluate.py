"""Scoring region detectors against a boxes CSV: known figures on hand-built cases, the demo, and bad input."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
import pytest

from audit.data.demo import write_demo
from audit.errors import DataError, UnknownNameError
from audit.regions import DETECTORS, Detection, Detector, detect_regions, match_boxes
from audit.regions.evaluate import evaluate_regions, format_table, read_boxes, write_json

HEADER = ("path", "kind", "x0", "y0", "x1", "y1", "note")

# Each hand-built image is a flat 64 x 80 grey of its own value; the fake detector looks its answer up by it.
FAKE_ANSWERS: dict[int, list[tuple[str, tuple[int, int, int, int]]]] = {
    10: [("border", (0, 0, 8, 64)), ("text", (40, 40, 60, 50))],  # the band, plus a false text box
    20: [("border", (0, 56, 80, 64))],  # an image without regions: a false band
    30: [("border", (70, 4, 80, 64)), ("border", (0, 0, 10, 17))],  # one band shifted (IoU 0.76), one short (0.27)
}


class FakeDetector(Detector):
    """Returns the boxes of FAKE_ANSWERS for the image whose grey value it recognises."""

    name: ClassVar[str] = "fake"
    version: ClassVar[str] = "fake-1"
    kinds: ClassVar[tuple[str, ...]] = ("border", "text")

    def detect(self, image: np.ndarray) -> list[Detection]:
        answers = FAKE_ANSWERS.get(int(image[0, 0]), [])
        return [Detection(kind, *box, 0.9, self.name, self.version) for kind, box in answers]


def _write_csv(path: Path, rows: list[tuple], header: tuple[str, ...] = HEADER) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def hand_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Three images, their true boxes, and the fake detector registered (for this test only)."""
    monkeypatch.setitem(DETECTORS._items, "fake", FakeDetector)
    (tmp_path / "images").mkdir()
    for value, name in ((10, "a"), (20, "b"), (30, "c")):
        assert cv2.imwrite(str(tmp_path / "images" / f"{name}.png"), np.full((64, 80), value, np.uint8))
    rows = [
        ("images/a.png", "border", 0, 0, 8, 64, "found exactly"),
        ("images/a.png", "text", 10, 10, 30, 20, "missed"),
        ("images/b.png", "none", "", "", "", "", "no region"),
        ("images/c.png", "border", 72, 0, 80, 64, "found a few px off"),
        ("images/c.png", "border", 0, 0, 10, 64, "found too short"),
    ]
    return _write_csv(tmp_path / "boxes.csv", rows)


def test_known_recall_and_precision_per_kind(hand_built: Path) -> None:
    result = evaluate_regions(hand_built.parent, hand_built, detectors=("fake",))
    border, text = result["kinds"]["border"], result["kinds"]["text"]
    # Boxes: a's band and c's shifted band match; c's short one (IoU 0.27) and b's false band do not.
    assert (border["n_truth"], border["n_found"], border["matched"]) == (3, 4, 2)
    assert border["recall"] == pytest.approx(2 / 3) and border["precision"] == pytest.approx(2 / 4)
    # Images: a and c hold bands, all three got one.
    assert (border["images_positive"], border["images_detected"], border["images_hit"]) == (2, 3, 2)
    assert border["image_recall"] == 1.0 and border["image_precision"] == pytest.approx(2 / 3)
    # The text box is missed and the text detection is false, but a holds both: a hit at image level.
    assert (text["n_truth"], text["n_found"], text["matched"]) == (1, 1, 0)
    assert text["recall"] == 0.0 and text["precision"] == 0.0
    assert text["image_recall"] == 1.0 and text["image_precision"] == 1.0
    assert result["n_images"] == 3 and result["detectors"] == {"fake": "fake-1"}
    assert set(result["kinds"]) == {"border", "text"}
    per_image = {image["path"]: image for image in result["images"]}
    assert per_image["images/b.png"]["kinds"] == {"border": {"n_truth": 0, "n_found": 1, "matched": 0}}
    assert set(result["ms_per_image"]) == {"fake", "total"}
    assert result["ms_per_image"]["total"] >= result["ms_per_image"]["fake"] >= 0.0


def test_min_iou_is_applied(hand_built: Path) -> None:
    strict = evaluate_regions(hand_built.parent, hand_built, detectors=("fake",), min_iou=0.95)
    assert strict["kinds"]["border"]["matched"] == 1  # only the exact box is left
    loose = evaluate_regions(hand_built.parent, hand_built, detectors=("fake",), min_iou=0.2)
    assert loose["kinds"]["border"]["matched"] == 3
    with pytest.raises(DataError, match="min_iou"):
        evaluate_regions(hand_built.parent, hand_built, detectors=("fake",), min_iou=0.0)


def test_kinds_the_detectors_declare_are_reported_even_without_boxes(hand_built: Path) -> None:
    boxes = _write_csv(hand_built.parent / "only_none.csv", [("images/b.png", "none", "", "", "", "", "")])
    result = evaluate_regions(hand_built.parent, boxes, detectors=("fake",))
    assert result["kinds"]["text"] == {
        "n_truth": 0,
        "n_found": 0,
        "matched": 0,
        "recall": None,
        "precision": None,
        "images_positive": 0,
        "images_detected": 0,
        "images_hit": 0,
        "image_recall": None,
        "image_precision": None,
    }
    assert result["kinds"]["border"]["precision"] == 0.0  # b's false band


def test_table_and_json(hand_built: Path, tmp_path: Path) -> None:
    result = evaluate_regions(hand_built.parent, hand_built, detectors=("fake",))
    table = format_table(result)
    lines = table.splitlines()
    assert lines[0].split()[:6] == ["kind", "truth", "found", "matched", "recall", "precision"]
    border = next(line for line in lines if line.startswith("border"))
    assert border.split()[1:6] == ["3", "4", "2", "0.667", "0.500"]
    assert "3 images" in lines[-1] and "fake fake-1" in lines[-1]
    out = tmp_path / "nested" / "result.json"
    write_json(result, out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert not list(out.parent.glob(".*.tmp"))  # the temporary file was renamed, not left behind


def test_demo_figures_match_an_independent_count(tmp_path: Path) -> None:
    demo = write_demo(tmp_path / "demo", n=40, shortcut_rate=0.5, seed=5, size=256)
    result = evaluate_regions(demo.root, demo.ground_truth, detectors=("text", "border"))
    # The same numbers, counted directly with detect_regions and match_boxes.
    truth: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    with demo.ground_truth.open(newline="") as f:
        for row in csv.DictReader(f):
            boxes = truth[row["path"]]  # every image counts, with or without boxes
            if row["kind"] != "none":
                boxes[row["kind"]].append(tuple(int(row[k]) for k in ("x0", "y0", "x1", "y1")))
    matched: dict[str, int] = defaultdict(int)
    found: dict[str, int] = defaultdict(int)
    for path, boxes in truth.items():
        detections = detect_regions(cv2.imread(str(demo.root / path), cv2.IMREAD_GRAYSCALE), ("text", "border"))
        for kind in ("text", "marker", "border"):
            mine = [(d.x0, d.y0, d.x1, d.y1) for d in detections if d.kind == kind]
            matched[kind] += match_boxes(boxes[kind], mine, min_iou=0.3)
            found[kind] += len(mine)
    assert result["n_images"] == 40
    for kind in ("text", "marker", "border"):
        figures = result["kinds"][kind]
        assert figures["n_truth"] == sum(len(b[kind]) for b in truth.values())
        assert (figures["matched"], figures["n_found"]) == (matched[kind], found[kind])
    assert result["kinds"]["border"]["n_truth"] >= 5
    assert result["kinds"]["border"]["recall"] >= 0.9  # the demo's padding bands are easy
    assert set(result["ms_per_image"]) == {"text", "border", "total"}


def test_paths_that_leave_the_root_are_refused(hand_built: Path) -> None:
    outside = hand_built.parent / "outside.png"
    assert cv2.imwrite(str(outside), np.zeros((32, 32), np.uint8))
    root = hand_built.parent / "images"
    for path in ("../outside.png", str(outside)):
        boxes = _write_csv(hand_built.parent / "escape.csv", [(path, "none", "", "", "", "", "")])
        with pytest.raises(DataError, match="leaves the dataset root"):
            evaluate_regions(root, boxes, detectors=("fake",))


def test_missing_columns_are_named(tmp_path: Path) -> None:
    header = ("path", "kind", "x0", "y0", "x1")
    boxes = _write_csv(tmp_path / "boxes.csv", [("a.png", "border", 0, 0, 4)], header=header)
    with pytest.raises(DataError, match=r"lacks the column\(s\) y1"):
        read_boxes(boxes)
    no_kind = _write_csv(tmp_path / "no_kind.csv", [("a.png",)], header=("path",))
    with pytest.raises(DataError, match="kind, x0, y0, x1, y1"):
        read_boxes(no_kind)


def test_none_rows_and_extra_columns(tmp_path: Path) -> None:
    rows = [
        ("a.png", "none", "", "", "", "", "nothing here", "extra"),
        ("b.png", "marker", 1, 2, 5, 9, "R", "extra"),
        ("b.png", "marker", "3.0", "4", "8", "12", "float written", ""),
    ]
    truths = read_boxes(_write_csv(tmp_path / "boxes.csv", rows, header=(*HEADER, "reviewer")))
    assert [t.path for t in truths] == ["a.png", "b.png"]
    assert truths[0].boxes == {} and truths[1].boxes == {"marker": [(1, 2, 5, 9), (3, 4, 8, 12)]}


def test_bad_rows_and_missing_files(hand_built: Path) -> None:
    root = hand_built.parent
    for row, message in (
        (("images/a.png", "border", "", "", "", "", ""), "needs numeric coordinates"),
        (("images/a.png", "border", "nan", 0, 5, 10, ""), "needs numeric coordinates"),
        (("images/a.png", "border", 5, 0, 5, 10, ""), "empty or negative"),
        (("", "border", 0, 0, 5, 10, ""), "empty path or kind"),
        (("images/missing.png", "none", "", "", "", "", ""), "not found"),
    ):
        with pytest.raises(DataError, match=message):
            evaluate_regions(root, _write_csv(root / "bad.csv", [row]), detectors=("fake",))
    with pytest.raises(DataError, match="cannot read the boxes CSV"):
        evaluate_regions(root, root / "absent.csv", detectors=("fake",))
    with pytest.raises(DataError, match="holds no rows"):
        evaluate_regions(root, _write_csv(root / "empty.csv", []), detectors=("fake",))
    with pytest.raises(UnknownNameError, match="valid names"):
        evaluate_regions(root, hand_built, detectors=("no-such-detector",))
