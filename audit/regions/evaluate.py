"""Scoring region detectors against hand-drawn boxes: recall, precision and cost per region kind.

The boxes come from a CSV in the form of ``shared/data/cxr-real/regions.csv``: columns ``path, kind, x0, y0, x1,
y1`` (any others, such as ``note``, are ignored), ``path`` relative to the dataset root, integer pixel boxes of the
stored image with x1/y1 exclusive, and one row of kind ``none`` with empty coordinates for an image that holds no
region (so that it still counts, for false detections). The demo's ``ground_truth.csv`` has the same form.

Two levels are reported per kind:

* boxes: one-to-one greedy matching at IoU >= ``min_iou`` (:func:`audit.regions.base.match_boxes`); recall is
  matches / true boxes and precision matches / detections, both summed over images;
* images: an image is positive for a kind when it holds at least one true box of that kind and detected when the
  detectors return at least one box of that kind; image recall and precision compare the two sets.

The command line (``audit eval-regions``) and ``make eval-regions`` are thin wrappers::

    result = evaluate_regions(root, boxes_csv, detectors=names)
    print(format_table(result))
    if json_path:
        write_json(result, json_path)
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from audit.data.decode import read_image
from audit.data.manifest import safe_join
from audit.errors import DataError
from audit.regions.base import DETECTORS, Box, Detection, match_boxes, to_gray

REQUIRED_COLUMNS = ("path", "kind", "x0", "y0", "x1", "y1")
NO_REGION = "none"  # the kind of the row that lists an image holding no region


@dataclass
class ImageBoxes:
    """The true boxes of one image, by kind, in CSV order.

    Attributes:
        path: the image's path, relative to the dataset root, as written in the CSV.
        boxes: kind → (x0, y0, x1, y1) boxes; empty for an image listed only with kind ``none``.
    """

    path: str
    boxes: dict[str, list[Box]] = field(default_factory=dict)


def read_boxes(boxes_csv: Path) -> list[ImageBoxes]:
    """Read a regions CSV into the true boxes of each image, images in order of first appearance.

    Args:
        boxes_csv: the CSV (columns ``path, kind, x0, y0, x1, y1``; others ignored).

    Returns:
        One entry per distinct path; an image listed only with kind ``none`` has no boxes.

    Raises:
        DataError: the file is missing or empty, a column is missing, or a row has a bad box.
    """
    boxes_csv = Path(boxes_csv)
    try:
        handle = boxes_csv.open(newline="", encoding="utf-8-sig")  # utf-8-sig: a spreadsheet's BOM is not a column
    except OSError as exc:
        raise DataError(f"cannot read the boxes CSV {boxes_csv}: {exc.strerror or exc}") from None
    with handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise DataError(
                f"boxes CSV {boxes_csv} lacks the column(s) {', '.join(missing)}; expected a header with "
                f"{', '.join(REQUIRED_COLUMNS)} (found: {', '.join(columns) or 'no header'})"
            )
        reader.fieldnames = columns
        images: dict[str, ImageBoxes] = {}
        for line, row in enumerate(reader, start=2):
            path = (row["path"] or "").strip()
            kind = (row["kind"] or "").strip()
            if not path or not kind:
                raise DataError(f"{boxes_csv}, line {line}: empty path or kind; every row needs both")
            truth = images.setdefault(path, ImageBoxes(path))
            if kind == NO_REGION:
                continue
            truth.boxes.setdefault(kind, []).append(_parse_box(row, boxes_csv, line))
    if not images:
        raise DataError(f"boxes CSV {boxes_csv} holds no rows; list at least one image")
    return list(images.values())


def _parse_box(row: dict[str, str], boxes_csv: Path, line: int) -> Box:
    """The (x0, y0, x1, y1) of one CSV row; whole numbers written as floats ("12.0") are accepted."""
    try:
        values = [float(row[k]) for k in ("x0", "y0", "x1", "y1")]
        if not all(math.isfinite(v) for v in values):
            raise ValueError("not a finite number")
    except (TypeError, ValueError):
        coordinates = ", ".join(f"{k}={row[k]!r}" for k in ("x0", "y0", "x1", "y1"))
        raise DataError(
            f"{boxes_csv}, line {line}: kind {row['kind']!r} needs numeric coordinates, found {coordinates} "
            f"(use kind {NO_REGION!r} with empty coordinates for an image without regions)"
        ) from None
    x0, y0, x1, y1 = (round(v) for v in values)
    if x1 <= x0 or y1 <= y0 or min(x0, y0) < 0:
        raise DataError(
            f"{boxes_csv}, line {line}: box ({x0}, {y0}, {x1}, {y1}) is empty or negative; "
            "expected 0 <= x0 < x1 and 0 <= y0 < y1 (x1/y1 exclusive)"
        )
    return x0, y0, x1, y1


def _ratio(numerator: int, denominator: int) -> float | None:
    """numerator / denominator, or None when it is undefined (nothing to count)."""
    return numerator / denominator if denominator else None


def evaluate_regions(
    root: Path,
    boxes_csv: Path,
    detectors: Sequence[str] = ("text", "border"),
    min_iou: float = 0.3,
) -> dict[str, Any]:
    """Run region detectors over the images of a boxes CSV and score them per kind.

    Args:
        root: the folder the CSV's paths are relative to.
        boxes_csv: true boxes (see the module docstring for the form).
        detectors: registry names of the detectors to run (:data:`audit.regions.DETECTORS`).
        min_iou: IoU at which a detection matches a true box.

    Returns:
        A JSON-ready dict:

        * ``root``, ``boxes``, ``min_iou``, ``n_images``;
        * ``detectors``: name → version;
        * ``kinds``: kind → ``n_truth``, ``n_found``, ``matched``, ``recall``, ``precision`` (boxes), and
          ``images_positive``, ``images_detected``, ``images_hit`` (positive and detected), ``image_recall``,
          ``image_precision``; a ratio with a zero denominator is None;
        * ``ms_per_image``: detector name → mean ms of its ``detect`` call, and ``total`` → mean ms of the
          grayscale conversion plus all detectors (decoding excluded);
        * ``images``: per image, ``path``, ``ms`` (per detector), ``found`` (the detections: kind, box, score,
          detector) and ``kinds`` (kind → ``n_truth``, ``n_found``, ``matched``), for finding the misses.

        Kinds are those in the CSV plus those the detectors declare or emit, sorted.

    Raises:
        DataError: bad CSV (see :func:`read_boxes`), a path leaving ``root`` or missing, or ``min_iou`` out of
            (0, 1].
        DecodeError: an image cannot be decoded.
        UnknownNameError: a detector name is not registered.
    """
    if not 0.0 < float(min_iou) <= 1.0:
        raise DataError(f"min_iou must be in (0, 1], got {min_iou!r}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a folder")
    truths = read_boxes(boxes_csv)
    names = list(dict.fromkeys(detectors))  # a name given twice runs once
    instances = [DETECTORS.get(name)() for name in names]  # resolve names first: a typo fails before any work
    kinds = {kind for truth in truths for kind in truth.boxes}
    kinds.update(kind for detector in instances for kind in detector.kinds)

    files = []
    for truth in truths:  # check every path before the slow part, so a bad row fails at once
        full = safe_join(root, truth.path)
        if not full.is_file():
            raise DataError(f"{boxes_csv}: image {truth.path!r} not found under {root}")
        files.append(full)

    images: list[dict[str, Any]] = []
    total_ms = 0.0
    detector_ms = dict.fromkeys(names, 0.0)
    for truth, full in zip(truths, files, strict=True):
        decoded = read_image(full.read_bytes(), truth.path)
        image = decoded.pixels
        found: list[Detection] = []
        ms: dict[str, float] = {}
        start = time.perf_counter()
        gray = to_gray(image)
        for name, detector in zip(names, instances, strict=True):
            tick = time.perf_counter()
            # The truth boxes are in the file's pixels; an image larger than MAX_SIDE was downscaled for detection.
            found.extend(_unscaled(d, decoded.scale) for d in detector.detect(gray))
            ms[name] = (time.perf_counter() - tick) * 1000.0
            detector_ms[name] += ms[name]
        total_ms += (time.perf_counter() - start) * 1000.0
        kinds.update(d.kind for d in found)
        images.append({"path": truth.path, "ms": ms, "found": [_detection_record(d) for d in found]})

    counters = ("n_truth", "n_found", "matched", "positive", "detected", "hit")
    per_kind = {kind: dict.fromkeys(counters, 0) for kind in kinds}
    for truth, record in zip(truths, images, strict=True):
        record["kinds"] = {}
        for kind in sorted(kinds):
            true_boxes = truth.boxes.get(kind, [])
            found_boxes = [tuple(f["box"]) for f in record["found"] if f["kind"] == kind]
            matched = match_boxes(true_boxes, found_boxes, min_iou=min_iou)
            counts = per_kind[kind]
            counts["n_truth"] += len(true_boxes)
            counts["n_found"] += len(found_boxes)
            counts["matched"] += matched
            counts["positive"] += bool(true_boxes)
            counts["detected"] += bool(found_boxes)
            counts["hit"] += bool(true_boxes) and bool(found_boxes)
            if true_boxes or found_boxes:
                record["kinds"][kind] = {"n_truth": len(true_boxes), "n_found": len(found_boxes), "matched": matched}

    n_images = len(images)
    return {
        "root": str(root),
        "boxes": str(boxes_csv),
        "min_iou": float(min_iou),
        "n_images": n_images,
        "detectors": {name: detector.version for name, detector in zip(names, instances, strict=True)},
        "kinds": {
            kind: {
                "n_truth": c["n_truth"],
                "n_found": c["n_found"],
                "matched": c["matched"],
                "recall": _ratio(c["matched"], c["n_truth"]),
                "precision": _ratio(c["matched"], c["n_found"]),
                "images_positive": c["positive"],
                "images_detected": c["detected"],
                "images_hit": c["hit"],
                "image_recall": _ratio(c["hit"], c["positive"]),
                "image_precision": _ratio(c["hit"], c["detected"]),
            }
            for kind, c in sorted(per_kind.items())
        },
        "ms_per_image": {name: detector_ms[name] / n_images for name in names} | {"total": total_ms / n_images},
        "images": images,
    }


def _unscaled(d: Detection, scale: tuple[float, float]) -> Detection:
    """A detection on an image downscaled by (x, y) ``scale``, in the file's pixels."""
    sx, sy = scale
    if (sx, sy) == (1.0, 1.0):
        return d
    return replace(d, x0=int(d.x0 / sx), y0=int(d.y0 / sy), x1=round(d.x1 / sx), y1=round(d.y1 / sy))


def _detection_record(detection: Detection) -> dict[str, Any]:
    return {
        "kind": detection.kind,
        "box": [detection.x0, detection.y0, detection.x1, detection.y1],
        "score": round(float(detection.score), 4),
        "detector": detection.detector,
    }


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of :func:`evaluate_regions`' result: one line per kind, then the cost per image."""

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    header = ("kind", "truth", "found", "matched", "recall", "precision", "img+", "img found", "img R", "img P")
    rows = [header]
    for kind, k in result["kinds"].items():
        rows.append(
            (
                kind,
                str(k["n_truth"]),
                str(k["n_found"]),
                str(k["matched"]),
                number(k["recall"]),
                number(k["precision"]),
                str(k["images_positive"]),
                str(k["images_detected"]),
                number(k["image_recall"]),
                number(k["image_precision"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    # The kind column is left-aligned, the numbers right-aligned.
    lines = [
        "  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)])
        for row in rows
    ]
    cost = ", ".join(f"{name} {ms:.1f}" for name, ms in result["ms_per_image"].items())
    versions = ", ".join(f"{name} {version}" for name, version in result["detectors"].items())
    lines.append(
        f"{result['n_images']} images, IoU >= {result['min_iou']:g}; ms per image: {cost}; detectors: {versions}"
    )
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: Path) -> None:
    """Write the result as indented JSON, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
