"""Tests of the DICOM header's burned-in annotation flag as evidence beside the detectors."""

from __future__ import annotations

import pyarrow as pa

from audit.evidence.header import burned_in_by_class
from audit.store.schemas import TABLES


def _images(rows: list[tuple[str, str, str, bool | None]]) -> pa.Table:
    columns = {name: [None] * len(rows) for name in TABLES["images"].names}
    columns["image_id"] = [r[0] for r in rows]
    columns["label"] = [r[1] for r in rows]
    columns["format"] = [r[2] for r in rows]
    columns["burned_in_annotation"] = [r[3] for r in rows]
    return pa.table(columns, schema=TABLES["images"])


def _regions(rows: list[tuple[str, str]]) -> pa.Table:
    columns = {name: [None] * len(rows) for name in TABLES["regions"].names}
    columns["image_id"] = [r[0] for r in rows]
    columns["kind"] = [r[1] for r in rows]
    return pa.table(columns, schema=TABLES["regions"])


def test_flag_rates_per_class_and_agreement_with_detectors() -> None:
    # covid: 12 DICOMs flagged YES (text found on 9), normal: 12 flagged NO (text found on 1), 3 unstated.
    rows = [(f"c{i}", "covid", "DICOM", True) for i in range(12)]
    rows += [(f"n{i}", "normal", "DICOM", False) for i in range(12)]
    rows += [(f"u{i}", "normal", "DICOM", None) for i in range(3)] + [("p0", "normal", "PNG", None)]
    regions = [(f"c{i}", "text") for i in range(9)] + [("n0", "marker"), ("n1", "border"), ("p0", "text")]
    by_label = {r["label"]: r for r in burned_in_by_class(_images(rows), _regions(regions), ["covid", "normal"])}
    covid, normal = by_label["covid"], by_label["normal"]
    assert (covid["n_dicom"], covid["flag_yes"], covid["flag_no"], covid["flag_absent"]) == (12, 12, 0, 0)
    assert (normal["n_images"], normal["n_dicom"], normal["flag_no"], normal["flag_absent"]) == (16, 15, 12, 3)
    assert covid["yes_rate"] == 1.0 and covid["yes_rate_other"] == 0.0
    assert covid["yes_detected"] == 9  # the text detector agrees with the header on 9 of 12
    assert normal["no_detected"] == 1  # a marker on an image the header calls clean (the border does not count)
    assert "may separate the classes" in covid["note"]


def test_no_note_when_rates_are_alike_and_nothing_without_dicom() -> None:
    rows = [(f"a{i}", "a", "DICOM", i % 2 == 0) for i in range(20)] + [
        (f"b{i}", "b", "DICOM", i % 2 == 0) for i in range(20)
    ]
    assert all(r["note"] == "" for r in burned_in_by_class(_images(rows), _regions([]), ["a", "b"]))
    pngs = [("x", "a", "PNG", None), ("y", "b", "PNG", None)]
    assert burned_in_by_class(_images(pngs), _regions([]), ["a", "b"]) == []
