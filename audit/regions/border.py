"""Uniform bands along the image edges: padding, letterbox bars, flat frames.

Method (on a copy whose long side is at most 512 px), for each of the four sides:

1. The band value is the most frequent grey level of the outermost row (within ``TOLERANCE``), so a band that
   covers only part of the side (a rotation wedge) is still found.
2. For every position along the side, the band depth is the number of consecutive rows, from the edge inward,
   whose pixel stays within ``TOLERANCE`` of that value: a small tolerance that absorbs JPEG noise on a constant
   region, but not the pixel noise of natural dark regions such as the air around a body.
3. The depth profile is median-filtered (so isolated columns of noise that happen to be flat do not count) and
   the longest stretch at least ``MIN_THICKNESS`` deep, covering at least ``MIN_COVERAGE`` of the side, is the
   band. Its box spans that stretch and the 95th percentile of its depth (a tilted band gets the axis-aligned
   box that covers it, as in ``shared/data/cxr-real/regions.csv``).
4. The band's inner edge must be straight (a line fitted to the depth profile explains it to within
   ``STRAIGHTNESS``): padding and frames are straight, while dark air clipped to a constant follows the body.
5. The band must end in a step of at least ``MIN_STEP`` grey levels, which rejects smooth ramps into the edge
   (they look flat on a downscaled copy, where averaging removes the pixel noise).

What it does not find: noisy collimation (shutter) bands, whose pixels are no flatter than the anatomy next to
them, and frames thinner than ``MIN_THICKNESS``.
"""

from __future__ import annotations

from typing import ClassVar

import cv2
import numpy as np

from audit.regions.base import DETECTORS, Detection, Detector, scale_box, to_gray, working_copy

TOLERANCE = 3  # grey levels around the band value: JPEG ringing on a flat band stays within it
MIN_THICKNESS = 4  # pixels of the original image
MIN_COVERAGE = 0.3  # fraction of the side the band must run along
MAX_DEPTH = 0.45  # fraction of the image a band may reach into
SMOOTHING = 9  # median-filter window (positions along the side) of the depth profile
MIN_STEP = 8  # grey levels between the band value and the image just inside its edge (median along the band)
STRAIGHTNESS = 2.0  # px: the inner edge may depart this much from a straight line (80th percentile)


def _runs(good: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """Runs [start, stop) of True in a 1-D bool array, joining runs separated by at most ``max_gap`` False."""
    padded = np.concatenate(([False], good, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    runs: list[tuple[int, int]] = []
    for start, stop in zip(edges[::2], edges[1::2], strict=True):
        if runs and start - runs[-1][1] <= max_gap:
            runs[-1] = (runs[-1][0], int(stop))
        else:
            runs.append((int(start), int(stop)))
    return runs


def _band(view: np.ndarray, min_thickness: int) -> tuple[int, int, int, float] | None:
    """Find a band along the top row of ``view``.

    Args:
        view: uint8 [D, L]: rows are depths from the edge (row 0 outermost), columns are positions along it.
        min_thickness: minimum band depth in rows.

    Returns:
        (start, stop, thickness, score) along/into the side, or None.
    """
    depth_limit = max(min_thickness + 1, int(MAX_DEPTH * view.shape[0]))
    length = view.shape[1]
    histogram = np.bincount(view[0], minlength=256).astype(np.float64)
    histogram = np.convolve(histogram, np.ones(2 * TOLERANCE + 1), mode="same")
    value = int(histogram.argmax())
    flat = np.abs(view[:depth_limit].astype(np.int16) - value) <= TOLERANCE
    depth = np.where(flat.all(axis=0), depth_limit, flat.argmin(axis=0))
    smooth = cv2.medianBlur(np.minimum(depth, 255).astype(np.uint8)[None, :], SMOOTHING)[0]
    runs = _runs(smooth >= min_thickness, max_gap=max(3, length // 30))
    if not runs:
        return None
    start, stop = max(runs, key=lambda r: r[1] - r[0])
    if stop - start < MIN_COVERAGE * length:
        return None
    # Padding, frames and collimation have a straight inner edge (tilted at most); air clipped to a constant
    # follows the body outline. Fit a line to the depth profile and require it to explain the profile.
    positions = np.arange(start, stop)
    depths = np.minimum(depth[start:stop], depth_limit).astype(np.float64)
    slope, intercept = np.polyfit(positions, depths, 1)
    residual = np.abs(depths - (slope * positions + intercept))
    if np.percentile(residual, 80) > max(STRAIGHTNESS, 0.1 * float(np.median(depths))):
        return None
    # A band ends in a step: a little past its inner edge the image must differ clearly from the band value. A
    # smooth ramp running into the edge (a gradient, soft air made smooth by downscaling) has no step.
    beyond = view[np.minimum(depths.astype(np.int64) + 2, view.shape[0] - 1), positions].astype(np.int16)
    if np.median(np.abs(beyond - value)) < MIN_STEP:
        return None
    # Snap to the corners when the band (nearly) reaches them: the median filter shortens runs at the ends.
    start = 0 if start <= SMOOTHING else start
    stop = length if stop >= length - SMOOTHING else stop
    thickness = int(np.ceil(np.percentile(depth[start:stop], 95)))
    coverage = (stop - start) / length
    solidity = float(np.mean(depth[start:stop] >= min_thickness))
    score = float(np.clip(0.4 + 0.3 * coverage + 0.3 * solidity, 0.0, 1.0))
    return start, stop, thickness, score


@DETECTORS.register("border")
class BorderDetector(Detector):
    """Uniform padding bands along the four edges (kind ``border``), one detection per side found."""

    name: ClassVar[str] = "border"
    version: ClassVar[str] = "flat-band-1"
    kinds: ClassVar[tuple[str, ...]] = ("border",)

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Find padding bands.

        Args:
            image: uint8 [H, W] grayscale or [H, W, 3] RGB.

        Returns:
            At most one ``border`` detection per side, boxes in ``image`` pixel coordinates.
        """
        gray = to_gray(image)
        height, width = gray.shape
        small, factor = working_copy(gray)
        h, w = small.shape
        min_thickness = max(2, round(MIN_THICKNESS / factor))
        views = {
            "top": small,
            "bottom": small[::-1],
            "left": small.T,
            "right": small[:, ::-1].T,
        }
        found: list[Detection] = []
        for side, view in views.items():
            band = _band(np.ascontiguousarray(view), min_thickness)
            if band is None:
                continue
            start, stop, thickness, score = band
            box = {
                "top": (start, 0, stop, thickness),
                "bottom": (start, h - thickness, stop, h),
                "left": (0, start, thickness, stop),
                "right": (w - thickness, start, w, stop),
            }[side]
            x0, y0, x1, y1 = scale_box(box, factor, width, height)
            found.append(Detection("border", x0, y0, x1, y1, score, self.name, self.version))
        return found
