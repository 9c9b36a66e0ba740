"""Per-image region detectors: the :class:`Detection` record, the :class:`Detector` base class and its registry.

A detector finds "suspicious regions" in one image (burned-in text, laterality markers, padding bands): regions
a classifier should not need to look at. They are model-independent, so the audit computes them once per image
and caches them by image id. Each detector registers itself under a name, as timm's models do::

    @DETECTORS.register("text")
    class TextDetector(Detector): ...

and :func:`detect_regions` runs any of them by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np

from audit.errors import ShapeError
from audit.registry import Registry

# Working resolution of the per-image detectors: they run on a copy whose long side is at most this, which keeps
# them at a few ms per image whatever the stored size, and scale their boxes back.
MAX_WORKING_SIDE = 512


@dataclass(frozen=True)
class Detection:
    """One region found in one image.

    Attributes:
        kind: ``"text"`` (burned-in words or lines), ``"marker"`` (a single-letter laterality marker, with its
            box if it has one) or ``"border"`` (a uniform band along an edge).
        x0, y0, x1, y1: integer pixel box in the image as given to ``detect()``; x1/y1 exclusive.
        score: confidence in [0, 1].
        detector: registry name of the detector that found it.
        detector_version: that detector's version string, so cached regions can be invalidated.
    """

    kind: str
    x0: int
    y0: int
    x1: int
    y1: int
    score: float
    detector: str
    detector_version: str

    @property
    def area(self) -> int:
        """Box area in pixels."""
        return max(0, self.x1 - self.x0) * max(0, self.y1 - self.y0)


class Detector(ABC):
    """A per-image region detector.

    Subclasses set ``name`` (their registry name), ``version`` (changes whenever their output may change) and
    ``kinds`` (the region kinds they emit), and implement :meth:`detect`.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]

    @abstractmethod
    def detect(self, image: np.ndarray) -> list[Detection]:
        """Find regions in one image.

        Args:
            image: uint8 [H, W] grayscale or [H, W, 3] RGB.

        Returns:
            Detections with boxes in ``image`` pixel coordinates, clipped to the image.
        """


DETECTORS: Registry[type[Detector]] = Registry("region detector")


def to_gray(image: np.ndarray) -> np.ndarray:
    """Check an image and convert it to grayscale.

    Args:
        image: uint8 [H, W], [H, W, 1], [H, W, 3] (RGB) or [H, W, 4] (RGBA).

    Returns:
        uint8 [H, W]; the input itself when it already is one.

    Raises:
        ShapeError: the array is not a uint8 image of one of those shapes.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        found = f"{type(image).__name__} of dtype {getattr(image, 'dtype', None)}"
        raise ShapeError("image", "uint8 [H, W] or [H, W, 3] (decode it with audit.data first)", found)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] in (3, 4):
        code = cv2.COLOR_RGB2GRAY if image.shape[2] == 3 else cv2.COLOR_RGBA2GRAY
        image = cv2.cvtColor(np.ascontiguousarray(image), code)
    if image.ndim != 2 or min(image.shape) < 2:
        raise ShapeError("image", "uint8 [H, W] or [H, W, 3] with H, W >= 2", tuple(image.shape))
    return image


def working_copy(gray: np.ndarray, max_side: int = MAX_WORKING_SIDE) -> tuple[np.ndarray, float]:
    """Downscale ``gray`` so its long side is at most ``max_side`` (never upscale).

    Args:
        gray: uint8 [H, W].
        max_side: largest allowed side of the copy.

    Returns:
        The copy, uint8 [h, w], and the factor ``f`` that maps its coordinates back (``x_image = x_copy * f``).
    """
    long_side = max(gray.shape)
    if long_side <= max_side:
        return gray, 1.0
    factor = long_side / max_side
    size = (max(1, round(gray.shape[1] / factor)), max(1, round(gray.shape[0] / factor)))
    # INTER_AREA averages, so thin strokes keep part of their contrast instead of aliasing away.
    small = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    return small, (gray.shape[1] / size[0] + gray.shape[0] / size[1]) / 2


def scale_box(
    box: tuple[float, float, float, float], factor: float, width: int, height: int
) -> tuple[int, int, int, int]:
    """Map a box from a working copy back to the image: outward rounding, then clipping to [0, W] × [0, H]."""
    x0, y0, x1, y1 = box
    return (
        max(0, min(width, int(np.floor(x0 * factor)))),
        max(0, min(height, int(np.floor(y0 * factor)))),
        max(0, min(width, int(np.ceil(x1 * factor)))),
        max(0, min(height, int(np.ceil(y1 * factor)))),
    )


Box = tuple[int, int, int, int]


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes, x1/y1 exclusive; 0 when either is empty."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(truth: Sequence[Box], found: Sequence[Box], min_iou: float = 0.3) -> int:
    """Number of one-to-one matches between true and found boxes of one image and kind.

    Greedy: pairs are taken in order of decreasing IoU, each box used at most once; a pair counts when its IoU
    is at least ``min_iou``. Recall is matches / len(truth), precision matches / len(found), summed over images.
    """
    pairs = sorted(((box_iou(t, f), i, j) for i, t in enumerate(truth) for j, f in enumerate(found)), reverse=True)
    used_truth: set[int] = set()
    used_found: set[int] = set()
    for iou, i, j in pairs:
        if iou < min_iou:
            break
        if i not in used_truth and j not in used_found:
            used_truth.add(i)
            used_found.add(j)
    return len(used_truth)


def detect_regions(image: np.ndarray, names: Sequence[str] = ("text", "border")) -> list[Detection]:
    """Run the named detectors on one image.

    Args:
        image: uint8 [H, W] grayscale or [H, W, 3] RGB; converted to grayscale once for all detectors.
        names: registry names of the detectors to run, in order.

    Returns:
        All detections, detector by detector, boxes in ``image`` pixel coordinates.

    Raises:
        ShapeError: ``image`` is not a uint8 image.
        UnknownNameError: a name is not registered (the message lists the valid names).
    """
    detectors = [DETECTORS.get(name)() for name in names]  # resolve names first: a typo fails before any work
    gray = to_gray(image)
    found: list[Detection] = []
    for detector in detectors:
        found.extend(detector.detect(gray))
    return found
