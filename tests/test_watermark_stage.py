"""The watermark stage of the audit: a semi-transparent overlay in 20% of one class is found and located."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from audit.config import build_config
from audit.data.demo import render_demo_image
from audit.pipeline import detect_watermarks, ingest_shard, plan
from audit.regions.base import box_iou
from audit.store.parquet import read_table

GRID = 128


def _overlay() -> np.ndarray:
    ink = np.zeros((17, 55), np.uint8)
    cv2.circle(ink, (8, 8), 7, 255, 1, cv2.LINE_AA)
    cv2.putText(ink, "CITY HOSP", (18, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.3, 255, 1, cv2.LINE_AA)
    return ink.astype(np.float32) / 255.0


def _write(root: Path, n: int, watermark: bool) -> dict[str, tuple[int, int, int, int]]:
    """n demo images of two classes; in 20% of all images (all of class 'opacity') a logo at α 0.3, ±3 px."""
    rng = np.random.default_rng(11)
    ink = _overlay()
    h, w = ink.shape
    carriers: dict[str, tuple[int, int, int, int]] = {}
    chosen = set(rng.choice(np.arange(1, n, 2), size=n // 5, replace=False).tolist()) if watermark else set()
    for i in range(n):
        label = "opacity" if i % 2 else "normal"
        image = render_demo_image(9_000 + i, GRID, opacity=bool(i % 2), marker=True).image
        if i in chosen:
            x0, y0 = 60 + int(rng.integers(-3, 4)), 90 + int(rng.integers(-3, 4))
            patch = image[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
            image[y0 : y0 + h, x0 : x0 + w] = np.clip((1 - 0.3 * ink) * patch + 0.3 * ink * 255 + 0.5, 0, 255)
            carriers[f"{label}/{i:04d}.png"] = (x0, y0, x0 + w, y0 + h)
        (root / label).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / label / f"{i:04d}.png"), image)
    return carriers


def _audit_regions(root: Path, out: Path) -> tuple[list[dict], dict]:
    config = build_config(
        data=root,
        out=out,
        shard_size=250,
        **{"probe.image_size": GRID, "regions.cache": False, "regions.detectors": []},
    )
    p = plan(config)
    for shard in p.shards:
        ingest_shard(p, shard)
    record = detect_watermarks(p)
    return read_table(out, "regions").to_pylist(), record


@pytest.mark.slow
def test_planted_watermark_is_found_and_located(tmp_path: Path) -> None:
    carriers = _write(tmp_path / "data", 600, watermark=True)
    rows, record = _audit_regions(tmp_path / "data", tmp_path / "out")
    assert len(record["regions"]) == 1 and record["regions"][0]["label"] == "opacity"
    found = {r["path"]: (r["x0"], r["y0"], r["x1"], r["y1"]) for r in rows if r["kind"] == "watermark"}
    hits = [path for path, box in carriers.items() if path in found and box_iou(box, found[path]) >= 0.3]
    assert len(hits) >= 0.9 * len(carriers)
    assert len(set(found) - set(carriers)) <= 0.1 * len(carriers)
    assert json.loads((tmp_path / "out" / "work" / "watermark.json").read_text())["regions"]


@pytest.mark.slow
def test_clean_dataset_has_no_watermark(tmp_path: Path) -> None:
    _write(tmp_path / "data", 600, watermark=False)
    rows, record = _audit_regions(tmp_path / "data", tmp_path / "out")
    assert record["regions"] == [] and not [r for r in rows if r["kind"] == "watermark"]
