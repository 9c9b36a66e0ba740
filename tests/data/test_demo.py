"""The demo dataset: counts, the planted correlation, ground truth that points at the ink, determinism."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from audit.data.demo import CLASS_NAMES, DEMO_TOKEN, SQUARE_BOX, render_demo_image, write_demo
from audit.errors import ConfigError


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def demo_r90(tmp_path_factory: pytest.TempPathFactory):
    return write_demo(tmp_path_factory.mktemp("demo90"), n=200, shortcut_rate=0.9, seed=11, size=128)


def test_counts_per_class(demo_r90) -> None:
    manifest = _rows(demo_r90.manifest)
    assert len(manifest) == 200
    per_label = defaultdict(int)
    for row in manifest:
        per_label[row["label"]] += 1
        assert row["path"].startswith(row["label"] + "/")
        assert (demo_r90.root / row["path"]).is_file()
    assert dict(per_label) == {"normal": 100, "opacity": 100} == demo_r90.counts
    assert {p.parent.name for p in demo_r90.root.glob("*/*.png")} == set(CLASS_NAMES)
    meta = json.loads(demo_r90.meta.read_text())
    assert meta["token"] == DEMO_TOKEN
    assert meta["class_names"] == ["normal", "opacity"]
    assert meta["counts"] == {"normal": 100, "opacity": 100}
    assert meta["parameters"] == {"n": 200, "shortcut_rate": 0.9, "seed": 11, "size": 128, "square_rate": 0.0}


@pytest.mark.parametrize("rate", [0.9, 0.5, 0.2])
def test_token_rate_per_class_matches_shortcut_rate(tmp_path: Path, rate: float) -> None:
    info = write_demo(tmp_path, n=200, shortcut_rate=rate, seed=3, size=64)
    truth = _rows(info.ground_truth)
    with_token = {row["path"] for row in truth if row["kind"] == "text"}
    label_of = {row["path"]: row["label"] for row in _rows(info.manifest)}
    for label, expected in (("opacity", rate), ("normal", 1.0 - rate)):
        paths = [p for p, lab in label_of.items() if lab == label]
        observed = sum(p in with_token for p in paths) / len(paths)
        sigma = max(np.sqrt(expected * (1 - expected) / len(paths)), 0.01)
        assert abs(observed - expected) <= 4 * sigma, (label, observed, expected)
        assert info.token_counts[label] == sum(p in with_token for p in paths)


def test_every_image_has_a_marker_and_a_quarter_a_border(demo_r90) -> None:
    truth = _rows(demo_r90.ground_truth)
    markers = defaultdict(int)
    borders = 0
    for row in truth:
        markers[row["path"]] += row["kind"] == "marker"
        borders += row["kind"] == "border"
    assert len(markers) == 200 and set(markers.values()) == {1}
    assert 0.15 <= borders / 200 <= 0.35


def test_ground_truth_boxes_contain_the_bright_ink(tmp_path: Path) -> None:
    # At the default size, where strokes are at least a pixel wide and the antialiased ink reaches full white.
    info = write_demo(tmp_path, n=60, shortcut_rate=0.5, seed=2, size=256)
    checked = 0
    for row in _rows(info.ground_truth):
        image = cv2.imread(str(info.root / row["path"]), cv2.IMREAD_GRAYSCALE)
        x0, y0, x1, y1 = (int(row[k]) for k in ("x0", "y0", "x1", "y1"))
        assert 0 <= x0 < x1 <= image.shape[1] and 0 <= y0 < y1 <= image.shape[0]
        inside = image[y0:y1, x0:x1]
        if row["kind"] == "border":
            assert inside.max() == 0  # padding is exactly black...
            assert image.min() == 0 and (image > 0).mean() > 0.5  # ...and the rest is not
            continue
        ring = np.zeros(image.shape, bool)  # 3 to 6 px around the box
        ring[max(0, y0 - 6) : y1 + 6, max(0, x0 - 6) : x1 + 6] = True
        ring[max(0, y0 - 3) : y1 + 3, max(0, x0 - 3) : x1 + 3] = False
        ring &= image > 0  # the padding band next to a box is not its surroundings
        assert inside.max() >= 215, row
        assert inside.max() - np.median(image[ring]) >= 50, row
        checked += 1
    assert checked >= 80


def test_token_and_marker_never_overlap_each_other_or_the_band(demo_r90) -> None:
    boxes = defaultdict(dict)
    for row in _rows(demo_r90.ground_truth):
        boxes[row["path"]][row["kind"]] = tuple(int(row[k]) for k in ("x0", "y0", "x1", "y1"))
    for kinds in boxes.values():
        present = [kinds[k] for k in ("text", "marker", "border") if k in kinds]
        for i, a in enumerate(present):
            for b in present[i + 1 :]:
                overlap_x = min(a[2], b[2]) - max(a[0], b[0])
                overlap_y = min(a[3], b[3]) - max(a[1], b[1])
                assert overlap_x <= 0 or overlap_y <= 0, kinds


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    first = write_demo(tmp_path / "a", n=8, seed=5, size=64)
    again = write_demo(tmp_path / "b", n=8, seed=5, size=64)
    other = write_demo(tmp_path / "c", n=8, seed=6, size=64)
    files = sorted(p.relative_to(first.root) for p in first.root.rglob("*") if p.is_file())
    assert len(files) == 8 + 3
    for rel in files:
        assert (first.root / rel).read_bytes() == (again.root / rel).read_bytes(), rel
    assert (first.root / files[-1]).read_bytes() != (other.root / files[-1]).read_bytes()


def test_bare_background_has_noisy_air_and_no_regions() -> None:
    demo = render_demo_image(0, 128, opacity=True, token=False, marker=False, border=False)
    assert demo.regions == ()
    assert demo.image.dtype == np.uint8 and demo.image.shape == (128, 128)
    # The air is never exactly flat or black: only the padding band is (the border detector relies on it).
    assert demo.image.min() > 0
    assert demo.image[:8, :8].std() > 2


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"n": 3}, "n must be an integer >= 4"),
        ({"shortcut_rate": -0.1}, "shortcut_rate must be in [0, 1]"),
        ({"shortcut_rate": 1.5}, "shortcut_rate must be in [0, 1]"),
        ({"size": 32}, "size must be an integer >= 64"),
    ],
)
def test_bad_arguments_raise_config_error(tmp_path: Path, kwargs: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        write_demo(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())  # validated before anything is written


def test_hidden_square_only_in_class_one_and_the_default_dataset_is_unchanged(tmp_path: Path) -> None:
    plain = write_demo(tmp_path / "plain", n=20, shortcut_rate=0.5, seed=2, size=64)
    squared = write_demo(tmp_path / "square", n=20, shortcut_rate=0.5, seed=2, size=64, square_rate=1.0)
    rows = list(csv.DictReader(squared.ground_truth.open()))
    with_square = {r["path"] for r in rows if r["kind"] == "square"}
    assert with_square == {r["path"] for r in rows if r["path"].startswith("opacity/")}
    x0, y0, x1, y1 = (round(v * 64) for v in SQUARE_BOX)
    sample = sorted(with_square)[0]
    a = cv2.imread(str(plain.root / sample), cv2.IMREAD_GRAYSCALE).astype(int)
    b = cv2.imread(str(squared.root / sample), cv2.IMREAD_GRAYSCALE).astype(int)
    assert (b[y0:y1, x0:x1] >= a[y0:y1, x0:x1]).all() and (b[y0:y1, x0:x1] - a[y0:y1, x0:x1]).mean() > 40
    # The rest of the image and every normal image are those of the dataset without the square.
    outside = np.ones_like(a, bool)
    outside[y0:y1, x0:x1] = False
    assert (a[outside] == b[outside]).all()
    normal = sorted(p for p in {r["path"] for r in rows} if p.startswith("normal/"))[0]
    assert (cv2.imread(str(plain.root / normal)) == cv2.imread(str(squared.root / normal))).all()
