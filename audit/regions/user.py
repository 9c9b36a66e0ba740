"""Regions the user supplies: boxes from a CSV, masks from a folder, and the complement of an expected region.

* **Boxes**: a CSV in the form of ``eval-regions``' ground truth (columns ``path``, ``kind``, ``x0``, ``y0``,
  ``x1``, ``y1``; ``path`` relative to the dataset root; extra columns ignored; kind ``none`` skipped).
* **Masks**: a folder ``MASKS/<kind>/<image path relative to the dataset root, extension replaced by .png>``;
  a non-zero pixel belongs to the region. A mask whose size differs from its image's is resized (nearest).
* **Expected region** (``regions.expected = "lung"``): the complement of that kind's mask or boxes is a region
  kind of its own, ``outside_lung``: attention outside the content that should decide the label.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from audit.errors import DataError
from audit.regions.base import Detection

BOX_DETECTOR = "user-boxes"
MASK_DETECTOR = "user-masks"
VERSION = "1"


@dataclass(frozen=True)
class UserRegions:
    """What the user supplied, loaded once per audit (small: boxes, and where the masks are)."""

    boxes: dict[str, tuple[tuple[str, int, int, int, int], ...]] = field(default_factory=dict)
    masks_root: Path | None = None
    mask_kinds: tuple[str, ...] = ()
    expected: str | None = None

    @property
    def kinds(self) -> tuple[str, ...]:
        """Every kind the user regions add, the ``outside_<expected>`` kind last."""
        kinds = sorted({k for rows in self.boxes.values() for k, *_ in rows} | set(self.mask_kinds))
        return (*kinds, f"outside_{self.expected}") if self.expected else tuple(kinds)

    def detections(self, path: str) -> list[Detection]:
        """The user's boxes of one image as detections."""
        return [
            Detection(kind, x0, y0, x1, y1, 1.0, BOX_DETECTOR, VERSION)
            for kind, x0, y0, x1, y1 in self.boxes.get(path, ())
        ]

    def masks(self, path: str, height: int, width: int) -> dict[str, np.ndarray]:
        """The masks of one image: kind → bool [height, width] (only kinds with a mask file for this image)."""
        out: dict[str, np.ndarray] = {}
        if self.masks_root is None:
            return out
        relative = PurePosixPath(path).with_suffix(".png")
        for kind in self.mask_kinds:
            file = self.masks_root / kind / relative
            if not file.is_file():
                continue
            mask = cv2.imread(str(file), cv2.IMREAD_GRAYSCALE)
            if mask is None:
                raise DataError(f"mask {file} could not be read as an image; expected a grayscale PNG")
            if mask.shape != (height, width):
                mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
            out[kind] = mask > 0
        return out


def _read_boxes(csv_path: Path) -> dict[str, tuple[tuple[str, int, int, int, int], ...]]:
    boxes: dict[str, list[tuple[str, int, int, int, int]]] = defaultdict(list)
    with Path(csv_path).open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"path", "kind", "x0", "y0", "x1", "y1"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(
                f"user boxes {csv_path}: missing column(s) {sorted(missing)}; expected path, kind, x0, y0, x1, y1"
            )
        for line, row in enumerate(reader, start=2):
            if row["kind"] == "none":
                continue
            try:
                x0, y0, x1, y1 = (int(float(row[c])) for c in ("x0", "y0", "x1", "y1"))
            except ValueError:
                raise DataError(f"user boxes {csv_path}, line {line}: coordinates must be numbers") from None
            if x1 <= x0 or y1 <= y0:
                raise DataError(f"user boxes {csv_path}, line {line}: expected x0 < x1 and y0 < y1")
            if not row["kind"] or not row["kind"].replace("_", "").replace("-", "").isalnum():
                raise DataError(f"user boxes {csv_path}, line {line}: kind must be a name (letters, digits, - or _)")
            boxes[PurePosixPath(row["path"].replace("\\", "/")).as_posix()].append((row["kind"], x0, y0, x1, y1))
    return {k: tuple(v) for k, v in boxes.items()}


def load_user_regions(boxes: Path | None, masks: Path | None, expected: str | None) -> UserRegions:
    """Validate and load the user's regions (``None`` everywhere: no user regions)."""
    if boxes is not None and not Path(boxes).is_file():
        raise DataError(f"user boxes file {boxes} does not exist; expected a CSV with path, kind, x0, y0, x1, y1")
    if masks is not None and not Path(masks).is_dir():
        raise DataError(f"user masks folder {masks} does not exist; expected MASKS/<kind>/<image path>.png")
    box_rows = _read_boxes(Path(boxes)) if boxes is not None else {}
    mask_kinds = tuple(sorted(p.name for p in Path(masks).iterdir() if p.is_dir())) if masks is not None else ()
    regions = UserRegions(
        boxes=box_rows, masks_root=Path(masks) if masks else None, mask_kinds=mask_kinds, expected=expected
    )
    if expected is not None and expected not in regions.kinds[:-1]:
        raise DataError(
            f"expected region kind {expected!r} is not among the user's kinds "
            f"({', '.join(regions.kinds[:-1]) or 'none given'}); supply its boxes or masks"
        )
    return regions
