"""Bands along the image edges: padding, collimation (shutter) bands and bright edge strips.

A border is a band along one side of the image, at least a few pixels thick, that is not anatomy: black (or
constant) padding left by rotating or letterboxing the image, the dark band a collimator (shutter) leaves where it
blocked the beam, or a bright strip the scanner left unmasked. A classifier can key on any of them (their width and
grey level identify the site or the device). What is *not* a border: dark air around the body (its edge is the
body's soft, curved outline), soft gradients into an edge, and slivers of rotation padding a few pixels wide.

Method (on a copy whose long side is at most 512 px), for each of the four sides, seen as a [depth, position] view
whose row 0 is the outermost row of pixels:

1. **Flat padding.** The padding value is the most frequent grey level of the outermost row; the band depth at each
   position is the number of consecutive pixels, from the edge inward, within a tolerance of it (at least
   ``FLAT_TOLERANCE``, more where JPEG ringing makes the padding itself noisy; on a 3x3 median copy).
2. **Straight step edges.** A shutter band or a strip is not flat (anatomy shows through a shutter band), but its
   inner edge is a sharp step along a straight line. The step response (mean of a few pixels inside minus a few
   outside, at every depth, on a copy smoothed along the side) is computed for both polarities; its local maxima
   along the depth are edge points.
3. **Lines.** A Hough vote over (slope, depth) (Duda & Hart 1972), refined by least squares, finds the straight
   lines that the flat-depth profile (1) and the edge points (2) support; a band is the longest stretch of positions
   in which at least ``MIN_SUPPORT`` of them hold a point of its line, so that a wire or an arm crossing the edge
   does not cut the band in two.
4. **Validation** by what a border is:

   - geometry: within 11 degrees of the side; at least ``MIN_THICKNESS`` px thick; a wedge (tapering to less than
     half its width) at least ``MIN_WEDGE`` px at its widest with its thick end in a corner; a band of constant
     width reaching a corner and running along ``FULL_SIDE`` of the side. A corner may be the inner edge of a band
     on the side across: the padding of a rotated image ends where it meets the next side's padding.
   - padding: a step of at least ``MIN_STEP`` grey levels right at its edge (air clipped to the padding value
     rises over several pixels) and a straight edge (dark air follows the body's outline).
   - shutter bands (dark): a strong (``MIN_COLLIMATION_STEP``), sharp step; a band uniform across its depth next to
     that step and holding no stronger edge of its own (a band between the image edge and a body outline holds
     air, skin and arm); grey, not black (a collimated area still receives scatter, while air outside the body is
     the darkest thing in the image); and an edge within ``MAX_EDGE_RMS`` px of a line (a collimator blade is
     straight, a body outline wiggles).
   - strips (bright): a step of at least ``MIN_STRIP_STEP``, thin (``MAX_STRIP_DEPTH`` of the image) and of constant
     width, as an unmasked detector edge is.

5. **Box**: the band's stretch (extended to a corner it nearly reaches if it is still a band there) by its largest
   depth, so a tilted band gets the axis-aligned box that covers all of it, as in ``shared/data/cxr-real/regions.csv``.
   One band per side: the longest.

On the border boxes of ``shared/data/cxr-real`` at IoU >= 0.3 (thresholds tuned on the images of even index in
sorted path order, 31 boxes; the odd half, 29 boxes, held out): recall 0.97 / precision 0.97 on the tuning half,
0.90 / 0.96 on the held-out half; 15-25 ms per 512 px image on one (shared) core. It misses bands whose edge is
hidden along much of the side, a shutter wedge seen only in part and a bright strip with a soft edge; its false
detections were a 5 px dark band the annotator left out and a straight dark side region of a 224 px child's image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np

from audit.regions.base import DETECTORS, Detection, Detector, scale_box, to_gray, working_copy

# Geometry, in pixels of the original image where it says so.
MIN_THICKNESS = 4.0  # original px: a band thinner than this is not a border (README of cxr-real)
MIN_WEDGE = 8.0  # original px: a rotation wedge (tapering to nothing) must be at least this thick at its widest
MAX_DEPTH = 0.25  # fraction of the image a band may reach into
MAX_SLOPE = 0.2  # depth change per position along the side (about 11 degrees): shutters and rotations are small
SLOPES = np.linspace(-MAX_SLOPE, MAX_SLOPE, 41)  # Hough slope grid (0.01 steps)
HOUGH_BIN = 2.0  # px: Hough depth bin; edge points within ``LINE_TOLERANCE`` of a line support it
LINE_TOLERANCE = 2.5  # px
LINES_PER_POLARITY = 2  # lines taken from each Hough vote (the strongest straight edge may be the body's)
MIN_SUPPORT = 0.85  # fraction of positions along a band's stretch that must hold an edge point on its line
CORNER = 0.1  # fraction of the side: a band stretch ending this close to a corner reaches it
FULL_SIDE = 0.8  # fraction of the side a band of constant depth must run along
MIN_COVERAGE = 0.3  # fraction of the side any band (a wedge too) must run along
# Step edges.
STEP_WIDTH = 2  # px: pixels averaged on each side of a candidate edge
SIDE_SMOOTHING = 5  # px: box filter along the side before the step response (noise down, a straight edge kept)
MIN_STEP = 8.0  # grey levels: weakest step at a band's inner edge (padding next to dark air in small JPEGs)
NOISE_FACTOR = 3.0  # edge points need a step of at least this × the pixel noise
# Padding (flat bands).
FLAT_TOLERANCE = 3.0  # grey levels around the padding value (at least; grows with the noise of the padding)
MAX_RAMP_WIDTH = 3.5  # px: step / steepest slope at a padding edge; dark air clipped to 0 rises more slowly
# Collimation bands and strips.
MIN_COLLIMATION_STEP = 30.0  # grey levels between a collimation band and the image inside it
MIN_COLLIMATION_LEVEL = 25.0  # grey levels: a shutter band is grey; black at the edge is air (or padding)
MAX_EDGE_WIDTH = 5.5  # px: step / steepest slope; a collimator edge is sharp, a body outline is not
MAX_INNER_STEP = 0.7  # steepest slope inside a band / at its edge: a band holds no stronger edge than its own
MAX_EDGE_RMS = 1.0  # px: edge points of a collimator lie on a line; a body outline wiggles around it
MAX_PADDING_RMS = 0.8  # px: the same for the inner edge of flat padding
MAX_BAND_SPREAD = 0.2  # std across a band's depth / its step: a band is uniform next to its edge's contrast
MIN_STRIP_STEP = 80.0  # grey levels between a bright strip and the image inside it
MAX_STRIP_DEPTH = 0.05  # fraction of the image: a bright strip is a thin unmasked detector edge


@dataclass
class _Band:
    """One candidate band along one side, in working-copy pixels of that side's [depth, position] view.

    Attributes:
        side: ``top``, ``bottom``, ``left`` or ``right``.
        kind: ``padding``, ``collimation`` or ``strip``: the test it was put to.
        start, stop: stretch of positions along the side, [start, stop).
        slope, intercept: the inner edge, ``depth = slope × position + intercept``.
        features: the measurements validation used (kept for debugging and tuning).
        rejected: why validation rejected it, or ``""`` for a border.
    """

    side: str
    kind: str
    start: int
    stop: int
    slope: float
    intercept: float
    features: dict[str, float]
    rejected: str = ""

    @property
    def depth_low(self) -> float:
        """Least depth of the inner edge over the stretch."""
        return min(self.slope * self.start + self.intercept, self.slope * (self.stop - 1) + self.intercept)

    @property
    def depth_high(self) -> float:
        """Largest depth of the inner edge over the stretch."""
        return max(self.slope * self.start + self.intercept, self.slope * (self.stop - 1) + self.intercept)

    @property
    def score(self) -> float:
        """Confidence in [0.5, 1]: longer and more strongly supported bands score higher."""
        coverage = self.features.get("coverage", 0.0)
        support = self.features.get("support", 0.0)
        return float(np.clip(0.5 + 0.25 * coverage + 0.25 * support, 0.0, 1.0))


def _views(image: np.ndarray) -> dict[str, np.ndarray]:
    """Each side of ``image`` as a [depth, position] view: row 0 is the outermost row of pixels on that side."""
    return {"top": image, "bottom": image[::-1], "left": image.T, "right": image[:, ::-1].T}


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


def _fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares ``y = slope × x + intercept`` (closed form; np.polyfit costs more than the rest together)."""
    x_mean, y_mean = float(x.mean()), float(y.mean())
    dx = x - x_mean
    denominator = float(dx @ dx)
    slope = float(dx @ (y - y_mean)) / denominator if denominator > 0 else 0.0
    return slope, y_mean - slope * x_mean


def _hough_lines(positions: np.ndarray, depths: np.ndarray, n_lines: int) -> list[tuple[float, float, np.ndarray]]:
    """Straight lines ``depth = slope × position + intercept`` supported by the most edge points.

    A vote over a (slope, intercept) grid (Duda & Hart 1972), refined by least squares on the line's inliers.

    Args:
        positions, depths: float [P] edge points.
        n_lines: how many lines to return; the points of each line found are removed before the next vote.

    Returns:
        (slope, intercept, inlier mask bool [P]) per line, strongest first.
    """
    lines: list[tuple[float, float, np.ndarray]] = []
    alive = np.ones(len(positions), dtype=bool)
    for _ in range(n_lines):
        if alive.sum() < 8:
            break
        x, d = positions[alive], depths[alive]
        bins = np.round((d[None, :] - SLOPES[:, None] * x[None, :]) * (1 / HOUGH_BIN)).astype(np.int64)
        offset = int(bins.min()) - 1
        n_bins = int(bins.max()) - offset + 2
        flat_index = (np.arange(len(SLOPES))[:, None] * n_bins + (bins - offset)).ravel()
        votes = np.bincount(flat_index, minlength=len(SLOPES) * n_bins).reshape(len(SLOPES), n_bins)
        votes[:, 1:-1] += votes[:, :-2] + votes[:, 2:]  # a point near a bin boundary votes for both neighbours
        slope_index, bin_index = np.unravel_index(int(votes.argmax()), votes.shape)
        slope, intercept = float(SLOPES[slope_index]), float((bin_index + offset) * HOUGH_BIN)
        for _refine in range(2):  # the vote's grid is coarse
            inliers = alive & (np.abs(depths - slope * positions - intercept) <= LINE_TOLERANCE)
            if inliers.sum() < 3:
                break
            slope, intercept = _fit_line(positions[inliers], depths[inliers])
        residual = np.abs(depths - slope * positions - intercept)
        lines.append((slope, intercept, alive & (residual <= LINE_TOLERANCE)))
        alive &= residual > LINE_TOLERANCE + 1
    return lines


def _stretch(supported: np.ndarray) -> tuple[int, int, float] | None:
    """The stretch of positions a line holds: (start, stop, fraction of its positions supported).

    Of the stretches in which at least ``MIN_SUPPORT`` of the positions hold a point of the line, the one holding the
    most, so that a band stays whole where a wire, a marker or an arm hides its edge for a while.
    """
    runs = _runs(supported, max_gap=max(2, int(0.02 * len(supported))))
    if not runs:
        return None
    starts = np.array([r[0] for r in runs])
    stops = np.array([r[1] for r in runs])
    counts = np.cumsum([0] + [int(supported[a:b].sum()) for a, b in runs])
    # [i, j] spans runs i..j: supported positions counts[j + 1] - counts[i] over stops[j] - starts[i] positions.
    spans = stops[None, :] - starts[:, None]
    held = counts[None, 1:] - counts[:-1, None]
    ok = (spans > 0) & (held >= MIN_SUPPORT * spans)
    if not ok.any():
        return None
    i, j = np.unravel_index(int(np.where(ok, held, -1).argmax()), ok.shape)
    return int(starts[i]), int(stops[j]), float(held[i, j] / spans[i, j])


def _edge_rms(positions: np.ndarray, depths: np.ndarray, start: int, stop: int) -> float:
    """RMS distance (px) of the edge points in [start, stop) to their own least-squares line."""
    keep = (positions >= start) & (positions < stop)
    x, d = positions[keep], depths[keep]
    if len(x) < 6:
        return 0.0
    slope, intercept = _fit_line(x, d)
    return float(np.sqrt(np.mean((d - slope * x - intercept) ** 2)))


def _geometry(band: _Band, length: int, factor: float, ends: tuple[float, float]) -> str:
    """Thickness and extent rules shared by every kind of band (module docstring, step 4).

    Args:
        band: the candidate, in working-copy pixels.
        length: length of its side in working-copy pixels.
        factor: working copy → image scale, for the thickness limits given in image pixels.
        ends: where the side's corners are, as positions along it: (0, length), or the inner edges of the bands
            found on the two sides across it (a band ends where it meets another).

    Returns:
        Why the band fails them, or ``""``.
    """
    thick, thin = band.depth_high * factor, max(band.depth_low, 0.0) * factor
    if band.features["support"] < MIN_SUPPORT:
        return "support"
    if thick < MIN_THICKNESS:
        return "thin"
    if band.stop - band.start < MIN_COVERAGE * length:
        return "short"
    if abs(band.slope) > MAX_SLOPE:  # the least-squares refinement may leave the Hough grid
        return "slope"
    at_start, at_end = band.start <= ends[0] + CORNER * length, band.stop >= ends[1] - CORNER * length
    if thin < 0.5 * thick:
        # A wedge (rotation padding, a tilted shutter): thick enough at its widest, its thick end in a corner.
        if thick < MIN_WEDGE:
            return "sliver"
        return "" if (at_start if band.slope < 0 else at_end) else "wedge corner"
    if not (at_start or at_end):
        return "corner"
    return "" if band.stop - band.start >= FULL_SIDE * (ends[1] - ends[0]) else "partial"


def _padding(
    flat_view: np.ndarray, smooth: np.ndarray, depth_limit: int, factor: float, ends: tuple[float, float]
) -> _Band | None:
    """A flat padding band along row 0 of a side, or None when there is no candidate at all.

    Args:
        flat_view: uint8 [D, L]: the side's view of the 3x3-median working copy.
        smooth: float32 [rows, L]: the side's view smoothed along the side (rows >= depth_limit + 12).
        depth_limit: deepest row a band may reach.
        factor: working copy → image scale.
        ends: the side's corners (see :func:`_geometry`).

    Returns:
        The candidate, ``rejected`` when it failed validation.
    """
    length = flat_view.shape[1]
    outer = flat_view[0]
    histogram = np.convolve(np.bincount(outer, minlength=256).astype(np.float64), np.ones(7), mode="same")
    value = int(histogram.argmax())
    near = outer[np.abs(outer.astype(np.int16) - value) <= 8]
    # JPEG leaves a few grey levels of ringing on a constant band: widen the tolerance to the padding's own noise.
    tolerance = max(FLAT_TOLERANCE, 2.5 * float(near.std()) if near.size > 8 else FLAT_TOLERANCE)
    flat = np.abs(flat_view[:depth_limit].astype(np.int16) - value) <= tolerance
    depth = np.where(flat.all(axis=0), depth_limit, flat.argmin(axis=0)).astype(np.float64)
    positions = np.flatnonzero(depth >= 2).astype(np.float64)
    if len(positions) < max(8, MIN_COVERAGE * length):
        return None
    (slope, intercept, inliers), *_ = _hough_lines(positions, depth[positions.astype(np.int64)], 1)
    supported = np.zeros(length, dtype=bool)
    supported[positions[inliers].astype(np.int64)] = True
    stretch = _stretch(supported)
    if stretch is None:
        return None
    start, stop, support = stretch
    # The fitted line, not the deepest flat pixel, bounds the band: where the image beside the band happens to
    # match the padding value, flat pixels run on past the band's edge.
    band = _Band("", "padding", start, stop, slope, intercept, {"coverage": (stop - start) / length})
    band.features.update(support=support, value=float(value), tolerance=tolerance)
    # A band reaching the depth limit may go on past it: more than a quarter of the image is content, not a border.
    band.rejected = _geometry(band, length, factor, ends) or ("deep" if band.depth_high >= depth_limit - 1 else "")
    if band.rejected:
        return band
    rms = _edge_rms(positions[inliers], depth[positions[inliers].astype(np.int64)], start, stop)
    # Sharpness: padding meets the image in a step; air clipped to the padding value rises over several pixels.
    # On the copy smoothed along the side, so that pixel noise does not pass for a steep slope.
    where = np.arange(start, stop, max(1, (stop - start) // 128))
    edge = np.clip(np.round(slope * where + intercept).astype(np.int64), 1, smooth.shape[0] - 10)
    columns = smooth[:, where]
    inside = np.take_along_axis(columns, edge[None, :] + np.arange(2, 9)[:, None], axis=0)
    step = np.abs(np.median(inside, axis=0) - value)
    around = np.take_along_axis(columns, edge[None, :] + np.arange(-2, 5)[:, None], axis=0)
    steepest = np.abs(np.diff(around, axis=0)).max(axis=0)
    width = float(np.median(step / np.maximum(steepest, 1.0)))
    band.features.update(step=float(np.median(step)), width=width, rms=rms)
    if band.features["step"] < MIN_STEP:
        band.rejected = "weak"
    elif width > MAX_RAMP_WIDTH:
        band.rejected = "ramp"
    elif rms > MAX_PADDING_RMS:
        band.rejected = "wiggly"
    return band


def _step_bands(
    smooth: np.ndarray, depth_limit: int, depth: int, noise: float, factor: float, ends: tuple[float, float]
) -> list[_Band]:
    """Candidate collimation bands and bright strips along row 0 of a side.

    Args:
        smooth: float32 [rows, L]: the side's view smoothed along the side (rows >= depth_limit + 12).
        depth_limit: deepest row a band may reach.
        depth: the image's extent across the side (working-copy pixels).
        noise: pixel noise near the side (grey levels).
        factor: working copy → image scale.
        ends: the side's corners (see :func:`_geometry`).

    Returns:
        The candidates, measured if they passed the geometry rules.
    """
    rows, length = smooth.shape
    # Every other position: the smoothing along the side makes neighbours nearly equal, and this halves the cost.
    sub = smooth[:, ::2]
    cumulative = np.vstack([np.zeros((1, sub.shape[1]), np.float32), np.cumsum(sub, axis=0)])
    depths = np.arange(1, depth_limit)
    low = np.maximum(depths - STEP_WIDTH, 0)
    high = np.minimum(depths + STEP_WIDTH, rows)
    inner = (cumulative[high] - cumulative[depths]) / (high - depths)[:, None]
    outer = (cumulative[depths] - cumulative[low]) / (depths - low)[:, None]
    response = inner - outer  # [depth_limit - 1, L / 2]: > 0 where the image brightens inward (a dark band ends)
    threshold = max(MIN_STEP, NOISE_FACTOR * noise)
    bands: list[_Band] = []
    for kind, sign in (("collimation", 1.0), ("strip", -1.0)):
        signed = response if sign > 0 else -response
        middle = signed[1:-1]
        peaks = (middle >= signed[:-2]) & (middle > signed[2:]) & (middle >= threshold)
        peak_depth, peak_index = np.nonzero(peaks)
        if len(peak_index) < max(8, MIN_COVERAGE * sub.shape[1]):
            continue
        positions = 2.0 * peak_index  # back to working-copy positions
        edge_depths = depths[peak_depth + 1].astype(np.float64)
        for slope, intercept, inliers in _hough_lines(positions, edge_depths, LINES_PER_POLARITY):
            supported = np.zeros(sub.shape[1], dtype=bool)
            supported[peak_index[inliers]] = True
            stretch = _stretch(supported)
            if stretch is None:
                continue
            start, stop, support = 2 * stretch[0], min(length, 2 * stretch[1]), stretch[2]
            band = _Band("", kind, start, stop, slope, intercept, {"coverage": (stop - start) / length})
            band.features.update(support=support, noise=noise)
            bands.append(band)
            # Geometry first: it is cheap and rejects most lines (anatomy, thin slivers) before any measuring.
            band.rejected = _geometry(band, length, factor, ends) or ("deep" if band.depth_high + 10 >= rows else "")
            if band.rejected:
                continue
            band.features["rms"] = _edge_rms(positions[inliers], edge_depths[inliers], start, stop)
            band.features.update(_measure_step_band(smooth if sign > 0 else -smooth, band))
            band.rejected = _step_band_check(band, depth)
    return bands


def _measure_step_band(signed: np.ndarray, band: _Band) -> dict[str, float]:
    """Step, edge width, inner steps, level and spread of a band, on at most 128 positions of its stretch.

    Args:
        signed: float32 [rows, L]: the side's smoothed view, negated for a bright strip (so the band is dark).
        band: the candidate (its edge stays at least 10 rows inside ``signed``).
    """
    rows = signed.shape[0]
    where = np.arange(band.start, band.stop, max(1, (band.stop - band.start) // 128))
    edge = np.clip(np.round(band.slope * where + band.intercept).astype(np.int64), 1, rows - 10)
    columns = signed[:, where]
    outside = np.take_along_axis(columns, np.clip(edge[None, :] + np.arange(-4, -1)[:, None], 0, None), axis=0)
    inside = np.take_along_axis(columns, edge[None, :] + np.arange(2, 9)[:, None], axis=0)
    level = np.median(outside, axis=0)
    step = np.median(inside, axis=0) - level
    gradient = (columns[2:] - columns[:-2]) / 2  # central difference; row i is depth i + 1
    depth_index = np.arange(1, rows - 1)[:, None]
    near = (depth_index >= edge[None, :] - 2) & (depth_index <= edge[None, :] + 3)
    steepest = np.maximum(np.where(near, gradient, -np.inf).max(axis=0), 1e-3)
    # Steps inside the band (rows 2 .. edge - 3, away from the outermost rows, which may hold a 1-px line).
    within = (depth_index >= 2) & (depth_index <= edge[None, :] - 3)
    inner = np.where(within, np.abs(gradient), 0.0).max(axis=0)
    # Spread across the band's depth (rows 1 .. edge - 2), per position: anatomy seen through a shutter varies along
    # the side, but a band varies little from the edge inward, unlike the body and air beside it.
    band_rows = (np.arange(rows)[:, None] >= 1) & (np.arange(rows)[:, None] < edge[None, :] - 1)
    count = band_rows.sum(axis=0)
    mean = np.where(band_rows, columns, 0.0).sum(axis=0) / np.maximum(count, 1)
    variance = np.where(band_rows, (columns - mean) ** 2, 0.0).sum(axis=0) / np.maximum(count, 1)
    deep = count >= 2
    return {
        "step": float(np.median(step)),
        "width": float(np.median(step / steepest)),
        "inner": float(np.median(inner / steepest)),
        "level": float(abs(np.median(level))),
        "spread": float(np.median(np.sqrt(variance[deep]))) if deep.any() else 0.0,
    }


def _step_band_check(band: _Band, depth: int) -> str:
    """Validation of a measured collimation band or bright strip (module docstring, step 4): why it fails, or ""."""
    f = band.features
    if f["width"] > MAX_EDGE_WIDTH:
        return "soft"
    if f["spread"] > MAX_BAND_SPREAD * f["step"]:
        return "uneven"
    if band.kind == "collimation":
        if f["step"] < MIN_COLLIMATION_STEP:
            return "weak"
        if f["level"] < MIN_COLLIMATION_LEVEL:
            return "black"
        if f["inner"] > MAX_INNER_STEP:
            return "inner edge"
        return "wiggly" if f["rms"] > MAX_EDGE_RMS else ""
    if f["step"] < MIN_STRIP_STEP:
        return "weak"
    if band.depth_high > MAX_STRIP_DEPTH * depth:
        return "deep"
    # An unmasked detector edge is as wide all along.
    return "" if band.depth_low >= 0.5 * band.depth_high else "tapering"


def _noise(view: np.ndarray, depth_limit: int) -> float:
    """Pixel noise (grey levels) near one side: robust std of differences between neighbours along it."""
    differences = np.abs(np.diff(view[:depth_limit:2].astype(np.int16), axis=1))
    return 1.4826 * float(np.median(differences)) / np.sqrt(2) + 0.5


def _side_bands(
    view: np.ndarray, flat_view: np.ndarray, side: str, factor: float, ends: tuple[float, float] | None = None
) -> list[_Band]:
    """Every candidate band of one side, valid or ``rejected``.

    Args:
        view: uint8 [D, L]: the side's view of the working copy.
        flat_view: uint8 [D, L]: the same view of its 3x3-median copy.
        side: the side's name.
        factor: working copy → image scale.
        ends: the side's corners (see :func:`_geometry`); None for (0, L).
    """
    depth, length = view.shape
    depth_limit = max(8, int(MAX_DEPTH * depth))
    rows = depth_limit + 12
    if depth < rows or length < 16:
        return []
    ends = ends or (0.0, float(length))
    smooth = cv2.blur(np.ascontiguousarray(view[:rows]).astype(np.float32), (SIDE_SMOOTHING, 1))
    padding = _padding(np.ascontiguousarray(flat_view[:rows]), smooth, depth_limit, factor, ends)
    bands = [padding] if padding is not None else []
    bands += _step_bands(smooth, depth_limit, depth, _noise(view, depth_limit), factor, ends)
    for band in bands:
        band.side = side
    return bands


def _best(bands: list[_Band], side: str) -> _Band | None:
    """The band reported for a side: the longest valid one; on a tie, padding (measured pixel by pixel)."""
    valid = [b for b in bands if b.side == side and not b.rejected]
    return max(valid, key=lambda b: (b.stop - b.start, b.kind == "padding")) if valid else None


def _depth_at(band: _Band | None, position: float) -> float:
    """Depth of a band's inner edge at a position along its side (0 without a band)."""
    return 0.0 if band is None else max(0.0, band.slope * position + band.intercept)


def _candidates(gray: np.ndarray) -> tuple[list[_Band], float, tuple[int, int]]:
    """Every candidate band of every side, valid or ``rejected``.

    Args:
        gray: uint8 [H, W].

    Returns:
        The bands (working-copy pixels), the working copy → image factor, and the working copy's (h, w).
    """
    small, factor = working_copy(gray)
    h, w = small.shape
    views, flat_views = _views(small), _views(cv2.medianBlur(small, 3))
    bands = [band for side in views for band in _side_bands(views[side], flat_views[side], side, factor)]
    # A band may end where it meets the band of a side across it instead of in a corner (the padding of a rotated
    # image, a shutter band crossing another): look again at the sides that have no band, with those as corners.
    best = {side: _best(bands, side) for side in views}
    ends = {
        "top": (_depth_at(best["left"], 0), w - _depth_at(best["right"], 0)),
        "bottom": (_depth_at(best["left"], h - 1), w - _depth_at(best["right"], h - 1)),
        "left": (_depth_at(best["top"], 0), h - _depth_at(best["bottom"], 0)),
        "right": (_depth_at(best["top"], w - 1), h - _depth_at(best["bottom"], w - 1)),
    }
    for side, (start, stop) in ends.items():
        length = w if side in ("top", "bottom") else h
        if best[side] is None and (start > 0 or stop < length):
            bands = [b for b in bands if b.side != side]
            bands += _side_bands(views[side], flat_views[side], side, factor, (start, stop))
    return bands, factor, (h, w)


def _corners(band: _Band, length: int, factor: float) -> tuple[int, int]:
    """The band's stretch, extended to a corner it nearly reaches if its line is still a band there.

    A band often stops short of a corner where another band crosses it (two shutter bands meet in a dark corner),
    while a wedge ends where it has tapered to nothing, which is where its box should end too.
    """
    start, stop = band.start, band.stop
    thick_enough = MIN_THICKNESS / factor
    if start <= CORNER * length and band.intercept >= thick_enough:
        start = 0
    if stop >= (1 - CORNER) * length and band.slope * (length - 1) + band.intercept >= thick_enough:
        stop = length
    return start, stop


@DETECTORS.register("border")
class BorderDetector(Detector):
    """Padding, collimation bands and bright strips along the four edges (kind ``border``), one per side."""

    name: ClassVar[str] = "border"
    version: ClassVar[str] = "edge-band-2"
    kinds: ClassVar[tuple[str, ...]] = ("border",)

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Find border bands.

        Args:
            image: uint8 [H, W] grayscale or [H, W, 3] RGB.

        Returns:
            At most one ``border`` detection per side, boxes in ``image`` pixel coordinates.
        """
        gray = to_gray(image)
        height, width = gray.shape
        bands, factor, (h, w) = _candidates(gray)
        found: list[Detection] = []
        for side in ("top", "bottom", "left", "right"):
            band = _best(bands, side)
            if band is None:
                continue
            length = w if side in ("top", "bottom") else h
            start, stop = _corners(band, length, factor)
            thickness = int(np.ceil(band.depth_high - 0.1))  # 0.1: a least-squares 12.02 is a 12-px band
            box = {
                "top": (start, 0, stop, thickness),
                "bottom": (start, h - thickness, stop, h),
                "left": (0, start, thickness, stop),
                "right": (w - thickness, start, w, stop),
            }[side]
            x0, y0, x1, y1 = scale_box(box, factor, width, height)
            found.append(Detection("border", x0, y0, x1, y1, band.score, self.name, self.version))
        return found
