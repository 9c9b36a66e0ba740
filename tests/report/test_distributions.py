"""Tests of the report's distribution figures: DuckDB aggregates, region coverage and the three SVGs."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from audit.report.distributions import (
    COVERAGE_COLOURS,
    QUANTILES,
    attention_svg,
    coverage_svg,
    dependence_svg,
    distribution_data,
    region_coverage,
    region_coverage_from_catalog,
)
from audit.store.schemas import TABLES

SVG = "{http://www.w3.org/2000/svg}"
EVIL = '<img src=x onerror="alert(1)">'


def _table(name: str, columns: dict[str, list]) -> pa.Table:
    """A table with the catalog's schema; columns not given are NULL."""
    schema = TABLES[name]
    rows = len(next(iter(columns.values())))
    return pa.Table.from_pydict({f.name: columns.get(f.name, [None] * rows) for f in schema}, schema=schema)


def _catalog(
    images: dict[str, list], attributions: dict[str, list], regions: dict[str, list]
) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    for name, columns in (("images", images), ("attributions", attributions), ("regions", regions)):
        con.register("arrow_table", _table(name, columns))
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM arrow_table")
        con.unregister("arrow_table")
    return con


def _parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)  # raises on anything that is not well-formed XML
    assert root.tag == f"{SVG}svg"
    for attribute in ("width", "height", "viewBox", "aria-label"):
        assert root.get(attribute), attribute
    assert root.find(f"{SVG}title") is not None and root.find(f"{SVG}title").text
    assert "<script" not in svg and "href" not in svg and "url(" not in svg
    return root


def _groups(root: ET.Element, css_class: str) -> list[ET.Element]:
    return [g for g in root.iter(f"{SVG}g") if g.get("class") == css_class]


@pytest.fixture
def attention_catalog() -> tuple[duckdb.DuckDBPyConnection, dict]:
    """40 images in classes "a" and EVIL; text on most images, marker only in class "a"."""
    rng = np.random.default_rng(0)
    ids = [f"img{i:03d}" for i in range(40)]
    labels = ["a" if i % 2 else EVIL for i in range(40)]
    rows: dict[str, list] = {k: [] for k in ("image_id", "method", "region_kind", "present", "mass", "area")}
    for i, image_id in enumerate(ids):
        for method in ("gradcam", "rise"):
            for kind in ("text", "marker"):
                present = (kind == "text" and i % 5 != 0) or (kind == "marker" and labels[i] == "a")
                mass = float(rng.uniform(0, 1)) if present else math.nan
                area = float(rng.uniform(0.001, 0.2)) if present else math.nan
                for key, value in zip(rows, (image_id, method, kind, present, mass, area), strict=True):
                    rows[key].append(value)
    attributions = {
        "image_id": rows["image_id"],
        "method": rows["method"],
        "region_kind": rows["region_kind"],
        "present": rows["present"],
        "mass_fraction": rows["mass"],
        "area_fraction": rows["area"],
    }
    images = {"image_id": ids, "label": labels, "width": [64] * 40, "height": [64] * 40}
    regions = {"image_id": [ids[0]], "kind": ["text"], "x0": [0], "y0": [0], "x1": [8], "y1": [8]}
    return _catalog(images, attributions, regions), {"labels": labels, "rows": rows}


def test_distribution_quantiles_equal_numpy(attention_catalog: tuple[duckdb.DuckDBPyConnection, dict]) -> None:
    con, raw = attention_catalog
    data = distribution_data(con, "gradcam", ["text", "marker"], ["a", EVIL])
    assert [(d["region_kind"], d["label"]) for d in data] == [
        ("text", "a"),
        ("text", EVIL),
        ("marker", "a"),
        ("marker", EVIL),
    ]
    rows = raw["rows"]
    image_label = dict(zip([f"img{i:03d}" for i in range(40)], raw["labels"], strict=True))
    for entry in data:
        chosen = [
            i
            for i in range(len(rows["image_id"]))
            if rows["method"][i] == "gradcam"
            and rows["region_kind"][i] == entry["region_kind"]
            and rows["present"][i]
            and image_label[rows["image_id"][i]] == entry["label"]
        ]
        assert entry["n"] == len(chosen)
        if not chosen:  # marker never appears in the hostile class
            assert entry["mass_fraction"] is None and entry["area_fraction"] is None
            continue
        # The catalog stores float32: numpy sees the same rounded values.
        mass = np.array([rows["mass"][i] for i in chosen], np.float32).astype(np.float64)
        area = np.array([rows["area"][i] for i in chosen], np.float32).astype(np.float64)
        np.testing.assert_allclose(entry["mass_fraction"], np.quantile(mass, QUANTILES), rtol=0, atol=1e-12)
        np.testing.assert_allclose(entry["area_fraction"], np.quantile(area, QUANTILES), rtol=0, atol=1e-12)
        assert entry["mean_mass_fraction"] == pytest.approx(mass.mean(), abs=1e-12)
    assert [d["n"] for d in data] == [16, 16, 20, 0]


def test_attention_svg_one_pair_per_kind_and_class_with_data(
    attention_catalog: tuple[duckdb.DuckDBPyConnection, dict],
) -> None:
    con, _ = attention_catalog
    data = distribution_data(con, "gradcam", ["text", "marker"], ["a", EVIL])
    svg = attention_svg(data)
    root = _parse(svg)
    pairs = _groups(root, "pair")
    assert [(g.get("data-kind"), g.get("data-label")) for g in pairs] == [
        ("text", "a"),
        ("text", EVIL),
        ("marker", "a"),
    ]
    for pair in pairs:  # a mass box and an area box, and the numbers in the tooltip
        assert len([r for r in pair.iter(f"{SVG}rect") if r.get("class") == "box"]) == 2
        assert (
            "n = " in pair.find(f"{SVG}title").text
            and "enrichment (ratio of the means)" in pair.find(f"{SVG}title").text
        )
    assert "<img" not in svg and "&lt;img" in svg
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    assert any(t.startswith("<img src=x") for t in texts)  # the hostile label is shown as text
    assert "no image of this class carries the region" in texts
    assert attention_svg(data) == svg  # deterministic
    linear = attention_svg(data, scale="linear")
    assert len(_groups(_parse(linear), "pair")) == 3 and linear != svg


def test_attention_svg_log_axis_places_medians_by_ratio() -> None:
    row = {
        "region_kind": "text",
        "label": "a",
        "n": 10,
        "mass_fraction": (0.01, 0.05, 0.1, 0.2, 0.3),
        "area_fraction": (0.001, 0.005, 0.01, 0.02, 0.03),
    }
    root = _parse(attention_svg([row]))
    pair = _groups(root, "pair")[0]
    medians = [float(line.get("x1")) for line in pair.iter(f"{SVG}line") if line.get("stroke-width") == "2"]
    # Axis 0.001–1 (three decades); the medians 0.1 and 0.01 are one decade apart.
    mass, area = medians
    ticks = {t.text: float(t.get("x")) for t in root.iter(f"{SVG}text") if t.text in ("≤0.001", "0.01", "0.1", "1")}
    decade = ticks["0.1"] - ticks["0.01"]
    assert mass == pytest.approx(ticks["0.1"], abs=0.06) and area == pytest.approx(ticks["0.01"], abs=0.06)
    assert mass - area == pytest.approx(decade, abs=0.1)


def test_region_coverage_by_hand() -> None:
    # Grid 4: cell centres at image fractions 0.125, 0.375, 0.625, 0.875.
    boxes = np.array(
        [
            [0, 0, 4, 4],  # image 0 (8x8): cells rows 0-1, cols 0-1
            [2, 2, 6, 6],  # image 0, overlapping: rows 1-2, cols 1-2; the overlap (1, 1) counts once
            [4, 0, 8, 8],  # image 2 (16x8): x 0.25-0.5 covers col 1 only, every row
            [0, 0, 1, 1],  # image 3 (8x8, class b): smaller than a cell, covers no centre
            [-5, 6, 100, 100],  # image 4 (8x8, class "other", not asked): ignored
        ]
    )
    image_ids = np.array([0, 0, 2, 3, 4])
    widths = np.array([8, 8, 16, 8, 8])
    heights = np.array([8, 8, 8, 8, 8])
    labels = ["a", "a", "a", "b", "other"]  # image 1 (class a) has no region
    coverage = region_coverage(boxes, image_ids, widths, heights, labels, grid=4, classes=["a", "b", "empty"])
    assert list(coverage) == ["a", "b", "empty"]
    image0 = np.zeros((4, 4))
    image0[0:2, 0:2] = 1
    image0[1:3, 1:3] = 1
    image2 = np.zeros((4, 4))
    image2[:, 1] = 1
    expected = (image0 + image2) / 3
    assert expected[1, 1] == pytest.approx(2 / 3)  # overlap counted once (image 0) plus image 2
    np.testing.assert_array_equal(coverage["a"], expected)
    np.testing.assert_array_equal(coverage["b"], np.zeros((4, 4)))
    np.testing.assert_array_equal(coverage["empty"], np.zeros((4, 4)))
    assert coverage["a"].shape == (4, 4) and coverage["empty"].shape == (4, 4)


def test_region_coverage_equals_brute_force_and_ignores_chunking() -> None:
    rng = np.random.default_rng(3)
    n_images, n_boxes, grid = 30, 120, 16
    widths = rng.integers(20, 90, n_images)
    heights = rng.integers(20, 90, n_images)
    labels = rng.choice(["x", "y", "z"], n_images).tolist()
    image_ids = rng.integers(0, n_images, n_boxes)
    x0 = rng.integers(-5, 80, n_boxes)
    y0 = rng.integers(-5, 80, n_boxes)
    boxes = np.stack([x0, y0, x0 + rng.integers(1, 40, n_boxes), y0 + rng.integers(1, 40, n_boxes)], axis=1)
    centres = (np.arange(grid) + 0.5) / grid
    expected = {c: np.zeros((grid, grid)) for c in ("x", "y", "z")}
    for image in range(n_images):  # one image at a time, union by "any"
        mine = boxes[image_ids == image]
        xs, ys = centres * widths[image], centres * heights[image]
        inside = [
            (ys[:, None] >= b[1]) & (ys[:, None] < b[3]) & (xs[None, :] >= b[0]) & (xs[None, :] < b[2]) for b in mine
        ]
        expected[labels[image]] += np.any(inside, axis=0) if inside else 0
    for c in expected:
        expected[c] /= labels.count(c)
    for chunk in (1, 7, 1024):
        coverage = region_coverage(boxes, image_ids, widths, heights, labels, grid=grid, chunk=chunk)
        assert list(coverage) == ["x", "y", "z"]
        for c in expected:
            np.testing.assert_allclose(coverage[c], expected[c], rtol=0, atol=1e-12)


def test_region_coverage_from_catalog_samples_and_matches() -> None:
    ids = [f"id{i}" for i in range(6)]
    images = {"image_id": ids, "label": ["a", "a", "a", "b", "b", "c"], "width": [10] * 6, "height": [10] * 6}
    regions = {
        "image_id": ["id0", "id0", "id1", "id3", "id3", "id5"],
        "kind": ["text", "text", "marker", "text", "border", "text"],
        "x0": [0, 0, 5, 0, 0, 0],
        "y0": [0, 0, 5, 0, 0, 0],
        "x1": [5, 10, 10, 10, 10, 10],
        "y1": [5, 5, 10, 10, 10, 10],
    }
    attributions = {"image_id": ["id0"], "method": ["gradcam"], "region_kind": ["text"], "present": [True]}
    con = _catalog(images, attributions, regions)
    coverage, counts = region_coverage_from_catalog(con, ["text", "marker"], ["a", "b", "none"], grid=2)
    assert counts == {"a": 3, "b": 2, "none": 0}
    # Class a: id0 covers the top row (two boxes, union), id1 the bottom-right cell, id2 nothing.
    np.testing.assert_allclose(coverage["a"], [[1 / 3, 1 / 3], [0, 1 / 3]])
    np.testing.assert_allclose(coverage["b"], np.full((2, 2), 0.5))  # id3's text box (its border is not asked)
    np.testing.assert_array_equal(coverage["none"], np.zeros((2, 2)))
    sampled, sampled_counts = region_coverage_from_catalog(con, ["text"], ["a"], grid=2, max_images_per_class=2)
    assert sampled_counts == {"a": 2}
    again, _ = region_coverage_from_catalog(con, ["text"], ["a"], grid=2, max_images_per_class=2)
    np.testing.assert_array_equal(sampled["a"], again["a"])  # the same sample every time


def _finding(label: str, kind: str, flip: float | None, control: float | None, **extra: object) -> dict:
    row = {
        "label": label,
        "region_kind": kind,
        "method": "gradcam",
        "group": None,
        "flip_rate": flip,
        "flip_rate_control": control,
        "flip_difference_ci_low": None if flip is None else 0.4,
        "flip_difference_ci_high": None if flip is None else 0.7,
        "effect": 0.6,
        "effect_ci_low": 0.5,
        "effect_ci_high": 0.7,
        "effect_control": 0.01,
        "effect_control_ci_low": -0.02,
        "effect_control_ci_high": 0.03,
        "n_counterfactual": 300.0,
    }
    return row | extra


def test_dependence_svg_skips_rows_without_a_test() -> None:
    findings = [
        _finding("opacity", "text", 0.58, 0.0),
        _finding("opacity", "marker", None, None),  # the test did not run
        _finding("normal", "text", math.nan, 0.1),
        _finding("normal", "border", 0.2, float("nan")),
        _finding(EVIL, "text", 0.05, 0.04, flip_difference_ci_low=-0.02, flip_difference_ci_high=0.05),
        _finding("normal", "marker", 0.9, 0.0, group="site-1"),  # a group's row
        _finding("normal", "watermark", 0.9, 0.0, method="rise"),  # another method
        _finding("opacity", "text", 0.1, 0.1),  # the same (class, kind) again
    ]
    svg = dependence_svg(findings)
    root = _parse(svg)
    rows = _groups(root, "dependence")
    assert [(g.get("data-label"), g.get("data-kind")) for g in rows] == [("opacity", "text"), (EVIL, "text")]
    assert "58%" in rows[0].find(f"{SVG}title").text and "n = 300" in rows[0].find(f"{SVG}title").text
    assert "<img" not in svg
    # The first row's interval lies above the 0.1 bar: its diamond is filled; the hostile row's is hollow.
    diamonds = [[p for p in g.iter(f"{SVG}path")][0] for g in rows]
    assert diamonds[0].get("fill") == "#222222" and diamonds[1].get("fill") == "#FFFFFF"
    bell = _groups(_parse(dependence_svg([_finding("bell\x07\x00", "text", 0.5, 0.0)])), "dependence")
    assert bell[0].get("data-label") == "bell\ufffd\ufffd"  # characters XML forbids are replaced, not emitted
    empty = _parse(dependence_svg([_finding("a", "text", None, 0.0)]))
    assert _groups(empty, "dependence") == []


def test_coverage_svg_draws_one_map_per_class() -> None:
    share = np.zeros((8, 8))
    share[0:2, :] = 1.0
    share[5, 3:6] = 0.25
    coverage = {"a": share, EVIL: np.zeros((8, 8))}
    svg = coverage_svg(coverage, {"a": 12, EVIL: 0}, kinds=["text", "marker"])
    root = _parse(svg)
    maps = _groups(root, "coverage")
    assert [g.get("data-label") for g in maps] == ["a", EVIL]
    paths = [(p.get("fill"), p.get("d")) for p in maps[0].iter(f"{SVG}path")]
    # 25% falls in the step (20%, 30%], the 6th colour; 100% in the last one. One sub-path per run of a row.
    assert paths == [(COVERAGE_COLOURS[5], "M3 5h3v1h-3z"), (COVERAGE_COLOURS[9], "M0 0h8v1h-8zM0 1h8v1h-8z")]
    assert list(maps[1].iter(f"{SVG}path")) == []
    assert "<img" not in svg and coverage_svg(coverage, {"a": 12, EVIL: 0}, kinds=["text", "marker"]) == svg
