"""User regions: boxes from a CSV, masks from a folder, and attention outside an expected region."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from audit.config import build_config
from audit.data.demo import write_demo
from audit.errors import DataError
from audit.pipeline import run_pipeline
from audit.regions.user import load_user_regions
from audit.store.catalog import query


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    write_demo(tmp_path / "data", n=8, shortcut_rate=0.5, seed=7, size=64)
    return tmp_path / "data"


def _lung_masks(data: Path, masks: Path) -> None:
    """A mask of kind 'lung' (the central half of the image) for every image but the first."""
    for i, image in enumerate(sorted(data.glob("*/*.png"))):
        if i == 0:
            continue
        target = masks / "lung" / image.relative_to(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 16:48] = 255
        cv2.imwrite(str(target), mask)


def test_user_boxes_masks_and_outside_expected_are_measured(dataset: Path, tmp_path: Path) -> None:
    boxes = tmp_path / "boxes.csv"
    first = sorted(p.relative_to(dataset).as_posix() for p in dataset.glob("*/*.png"))[0]
    boxes.write_text(f"path,kind,x0,y0,x1,y1\n{first},tube,0,0,32,64\n")
    _lung_masks(dataset, tmp_path / "masks")
    config = build_config(
        data=dataset,
        out=tmp_path / "out",
        **{
            "probe.image_size": 32,
            "probe.epochs": 1,
            "regions.user_boxes": boxes,
            "regions.user_masks": tmp_path / "masks",
            "regions.expected": "lung",
        },
    )
    summary = run_pipeline(config)
    assert summary["region_kinds"][-3:] == ["lung", "tube", "outside_lung"]
    out = tmp_path / "out"
    _, rows = query(out, "SELECT region_kind, count(*) FILTER (WHERE present) FROM attributions GROUP BY 1 ORDER BY 1")
    present = dict(rows)
    assert present["lung"] == 7 and present["outside_lung"] == 7 and present["tube"] == 1
    # Inside and outside the expected region share all the attention and all the area.
    _, rows = query(
        out,
        """SELECT max(abs(i.mass_fraction + o.mass_fraction - 1)), max(abs(i.area_fraction
                            + o.area_fraction - 1)) FROM attributions i JOIN attributions o USING (image_id, method)
                            WHERE i.region_kind = 'lung' AND o.region_kind = 'outside_lung' AND i.present""",
    )
    assert rows[0][0] < 1e-4 and rows[0][1] < 1e-6
    _, rows = query(out, "SELECT area_fraction FROM attributions WHERE region_kind = 'lung' AND present LIMIT 1")
    assert abs(rows[0][0] - 0.25) < 1e-6  # the central half of each side
    _, rows = query(
        out, "SELECT detector, x0, y0, x1, y1 FROM regions WHERE kind IN ('lung', 'tube') ORDER BY 1 LIMIT 1"
    )
    assert rows == [("user-boxes", 0, 0, 32, 64)]
    assert {f["region_kind"] for f in summary["findings"]} >= {"lung", "tube", "outside_lung"}


def test_bad_user_regions_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_user_regions(tmp_path / "missing.csv", None, None)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,kind,x0\na.png,tube,1\n")
    with pytest.raises(DataError, match="missing column"):
        load_user_regions(bad, None, None)
    bad.write_text("path,kind,x0,y0,x1,y1\na.png,tube,5,0,1,4\n")
    with pytest.raises(DataError, match="x0 < x1"):
        load_user_regions(bad, None, None)
    good = tmp_path / "good.csv"
    good.write_text("path,kind,x0,y0,x1,y1\na.png,tube,0,0,1,4\n")
    with pytest.raises(DataError, match="expected region kind 'lung'"):
        load_user_regions(good, None, "lung")
