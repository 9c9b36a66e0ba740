"""Burned-in text and laterality markers, found with classical OpenCV morphology (no model, no download).

Burned-in overlays are drawn into the pixels by software after the exposure, and that leaves traces that anatomy
and devices, which pass through the blur and noise of the imaging chain, do not have:

- **flat pixels**: a marker's box is one grey level, or a plane when the image was post-processed after the box
  was drawn, and a letter's ink is one value, usually the brightest value in the image (often exactly 255);
- **step edges**: an overlay goes from background to ink in one or two pixels, while the edges of bones are
  spread over several, so the steepest step at a glyph is close to its full contrast; a box ends in a step too;
- **shape**: a letter is a compact group of strokes, and a word has columns that cross ink twice, while a wire
  or the bright edge of a strip is one long thin stroke; a letter stands alone, while a bright piece of a clip
  or of a bundle of wires has more bright structure around it;
- **position**: overlays sit near the image edges and corners, where they hide no anatomy.

Method (on a copy whose long side is at most 512 px):

1. Boxes: regions that are planar (second differences within a grey level or two), fill a rectangle of marker
   or label size, end in a step all round, and hold ink with step edges that departs from the fitted plane. A
   box holding one glyph is a ``marker`` (the whole box, outline included), a box holding a row is ``text``.
2. Glyph candidates: (a) top-hat with a square kernel a bit larger than a stroke, thresholded at a contrast
   scaled to the image's noise, with hysteresis, components of glyph size near the edges; a component too large
   for a glyph (a letter joined to a bright strip by a few antialiased pixels) is split at rising thresholds and
   a piece split off is kept only when its ink is flat (a piece that is not kept is split again at the next
   threshold); (b) components of the plateau at the image's brightest value, which finds white text on a bright
   background and tiny symbols that the top-hat merges with a gradient next to them (the plateau glyph then
   replaces the top-hat one, whose box runs on into the gradient).
3. Evidence per glyph: the steepest step at the glyph against its contrast (sharpness), that contrast against
   the glyph's immediate surroundings, the share of its ink on the plateau at the image's brightest value
   (measured on the image itself: downscaling mixes thin strokes with their background), and its distance to
   the nearest edge. Glyphs without enough evidence are dropped before grouping, so a rib edge cannot join a
   real letter.
4. Glyphs of similar height that share a baseline band and are separated by small gaps are joined into lines
   (a glyph inside another, such as a letter inside the ring of a round lead marker, belongs to it). A line of
   two or more glyphs or a wide component (merged glyphs) is ``text`` when it has stacked strokes; a single
   symbol that is wider than tall or too small for a letter is ``text`` (the tiny glyphs burned into a
   corner), unless it is too small for a letter and narrower than tall (a sliver of a wire or a bone: nothing);
   a single letter-sized glyph is a ``marker``, scored down when bright structure crowds it (unless its ink is
   on the brightest plateau), and boxed together with its small uniform box when it sits in one. Text lines
   stacked with less than half a line between them and sharing most of their width are one block (a multi-line
   time or ID stamp), which is how such stamps are boxed by hand.

Only bright ink is looked for: modalities burn overlays in white (dark glyphs found by a black-hat were, on the
real images, the gaps between ribs and drop shadows), and dark text on a light label is found by step 1. The
thresholds were tuned on half of the labelled real radiographs in ``shared/data/cxr-real`` (the images at even
positions in sorted path order) and checked on the other half and on the synthetic demo. Devices (ECG clips,
wire loops) drawn as bright metal are the main false markers left. A learned detector (``dbnet``) reads text
better where there is much of it; this one is cheap and needs no model.
"""

from __future__ import annotations

from typing import ClassVar

import cv2
import numpy as np

from audit.regions.base import DETECTORS, Detection, Detector, scale_box, to_gray, working_copy

Box = tuple[int, int, int, int]
Region = tuple[str, Box, float]  # kind, box in working-copy pixels, score

# Glyph candidates (step 2).
MIN_CONTRAST = 30.0  # grey levels; burned-in overlays are near-white, anatomy is rarely this sharp
NOISE_FACTOR = 6.0  # T >= this x the median top-hat response (which grows with pixel noise)
WEAK_FRACTION = 0.6  # hysteresis: glyph pixels above this x T join a glyph that has a pixel above T
SPLIT_LEVELS = (1.0, 2.0)  # x T: thresholds at which a component too large for a glyph is split
MAX_COMPONENTS = 400  # cap on candidates per threshold (a noisy or busy image should not cost seconds)
MIN_GLYPH_HEIGHT = 4  # working-copy pixels: a tiny burned-in symbol of a 640 px image is 5-6 px here
CONTEXT_DIVISOR = 4  # a glyph's background is the median of a margin of (its height / this) around it

# Evidence of drawn ink (step 3).
SHARPNESS_RANGE = (0.5, 0.9)  # steepest step / contrast: blurred anatomy below the first, overlays above
CONTRAST_RANGE = (25.0, 70.0)  # grey levels: evidence grows from the first to the second
FLAT_INK = 0.3  # share of the ink on the plateau at the image's brightest value that marks drawn ink
RUN_ON = 2  # px a glyph's box may extend past its ink on the brightest plateau (antialiasing) on any side
PLATEAU = 2  # grey levels
EDGE_BAND = (0.15, 0.35)  # distance to the nearest edge / short side: full weight below, none above
MIN_EVIDENCE = 0.5  # a glyph with less evidence is dropped before grouping

# Regions (step 4).
MIN_STACKED = 0.05  # share of a text line's columns that must cross ink twice (see _stacked_strokes)
CLUTTER_RANGE = (0.05, 0.15)  # share of bright pixels around a single letter: full score below, none above
MIN_SCORE = 0.6  # a region with a lower score is not reported
LINE_HEIGHT_RATIO = 1.8  # glyphs of one line, and lines of one block, differ in height by at most this factor
BLOCK_GAP = 0.5  # x the shorter line's height: the largest vertical gap between two lines of one block
BLOCK_OVERLAP = 0.5  # x the narrower line's width: the horizontal extent two lines of one block share
# Ink height (box less its one-pixel rim) / short side below which a lone glyph is fine print, not a laterality
# letter: on cxr-real the tiny burned-in glyphs are 0.009-0.013 of the short side, the smallest letters 0.021.
TINY_GLYPH = 0.015

# Flat boxes (step 1).
FLAT_RANGE = 2  # grey levels: largest second difference inside a box (a flat fill, or a ramp across it)
BOX_HEIGHT = (0.025, 0.2)  # box height / short side of the image
MIN_BOX_INK = 25.0  # grey levels between the box's plane and its ink
BOX_SCORE = 0.9
MIN_BOX_PLANAR = 0.6  # share of a box's pixels (away from its ink) that are planar
MIN_BOX_STEP = 8.0  # grey levels between a box's plane and the pixels around it, on half its outline
MAX_BOX_SPREAD = 3.0  # grey levels (80th percentile) a letter's box may depart from a plane around it


def _kernel_side(long_side: int) -> int:
    """Top-hat kernel side (odd): wider than the strokes of bold overlay letters at the working resolution.

    About 3% of the long side (7 px at 256, 15 px at 512): a laterality marker's strokes are a few percent of the
    image, and a stroke as wide as the kernel would be erased by the opening.
    """
    return max(7, int(long_side / 34) | 1)


def _median_u8(image: np.ndarray) -> float:
    """Median of a uint8 array from its histogram (several times faster than np.median on 512 x 512)."""
    histogram = cv2.calcHist([image], [0], None, [256], [0, 256]).ravel()
    return float(np.searchsorted(np.cumsum(histogram), histogram.sum() / 2))


def _quantile(values: np.ndarray, q: float) -> float:
    """The ``q`` quantile (0..1) of a 1-D array, lower value (np.partition; np.percentile costs far more)."""
    rank = int(q * (values.size - 1))
    return float(np.partition(values, rank)[rank])


def _ramp(value: float, low: float, high: float) -> float:
    """0 at or below ``low``, 1 at or above ``high``, linear in between."""
    return float(np.clip((value - low) / (high - low), 0.0, 1.0))


def _steepest_step(gray: np.ndarray) -> np.ndarray:
    """Largest absolute difference between a pixel and its right or lower neighbour.

    Args:
        gray: uint8 [h, w].

    Returns:
        uint8 [h, w]; an ideal step edge of contrast C gives C, a blurred one much less.
    """
    step = np.zeros_like(gray)
    step[:, :-1] = cv2.absdiff(gray[:, 1:], gray[:, :-1])
    np.maximum(step[:-1], cv2.absdiff(gray[1:], gray[:-1]), out=step[:-1])
    return step


def _planar(gray: np.ndarray) -> np.ndarray:
    """Pixels where the image is a plane to within rounding (small second differences): a flat fill or a ramp.

    A drawn box is one grey level, or a gentle ramp when the image was post-processed after the box was drawn;
    either way its second differences are within a level or two of 0. Pixel noise and anatomy are not.

    Args:
        gray: uint8 [h, w].

    Returns:
        uint8 [h, w], 1 where planar.
    """
    s = gray.astype(np.int16)
    ok = np.ones(gray.shape, np.uint8)
    ok[:, 1:-1] = np.abs(s[:, :-2] - 2 * s[:, 1:-1] + s[:, 2:]) <= FLAT_RANGE
    ok[1:-1] &= np.abs(s[:-2] - 2 * s[1:-1] + s[2:]) <= FLAT_RANGE
    # Drop the isolated pixels where noise happens to be planar (they would be thousands of components): an
    # opening with a 2 x 2 square, its two passes anchored at opposite corners so that nothing shifts.
    square = np.ones((2, 2), np.uint8)
    return cv2.dilate(cv2.erode(ok, square, anchor=(0, 0)), square, anchor=(1, 1))


def _fit_plane(values: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Plane ``a + b x + c y`` through values (float [n]) at pixels (xs, ys); returns (a, b, c).

    Least squares, refitted once on the inliers: a few pixels of a letter's flat ink joined to its box must not
    tilt the box's plane.
    """
    design = np.stack([np.ones_like(xs), xs, ys], axis=1).astype(np.float32)
    values = values.astype(np.float32)
    coefficients = np.linalg.lstsq(design, values, rcond=None)[0]
    residual = np.abs(values - design @ coefficients)
    inliers = residual <= max(2.0, 2.0 * float(np.median(residual)))
    if 3 <= inliers.sum() < values.size:
        coefficients = np.linalg.lstsq(design[inliers], values[inliers], rcond=None)[0]
    return coefficients


def _components(mask: np.ndarray, connectivity: int) -> tuple[int, np.ndarray, np.ndarray]:
    """``cv2.connectedComponentsWithStats`` run on the bounding box of a mask's pixels only.

    Its statistics pass costs a few ms on a full 512 x 512 mask however little is set; most masks here (the
    plateau, the strong pixels of oversized components) set a small part of the image.

    Args:
        mask: uint8 [h, w], nonzero where set.
        connectivity: 4 or 8.

    Returns:
        Number of labels (background included), int32 [h, w] labels and int32 [n, 5] stats in image coordinates.
    """
    x, y, w, h = cv2.boundingRect(mask)
    labels = np.zeros(mask.shape, np.int32)
    if w == 0 or h == 0:
        return 1, labels, np.array([[0, 0, mask.shape[1], mask.shape[0], mask.size]], np.int32)
    n, labels[y : y + h, x : x + w], stats, _ = cv2.connectedComponentsWithStats(
        mask[y : y + h, x : x + w], connectivity=connectivity
    )
    stats[1:, 0] += x
    stats[1:, 1] += y
    return n, labels, stats


def _union_find_groups(n: int, pairs: np.ndarray) -> list[list[int]]:
    """Connected groups of ``n`` items linked by ``pairs`` (int [P, 2])."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


class _Images:
    """An image at both resolutions, and the maps every measurement shares."""

    def __init__(self, full: np.ndarray, small: np.ndarray, factor: float) -> None:
        self.full = full  # uint8 [H, W], the image as given
        self.small = small  # uint8 [h, w], its working copy
        self.factor = factor  # x_full = x_small * factor
        self.step = _steepest_step(small)
        self.brightest = int(cv2.minMaxLoc(full)[1])
        self.bright = np.zeros(small.shape, np.uint8)  # the weak top-hat mask, once computed


class _Glyph:
    """A glyph candidate at working resolution, with its cues and its evidence of being drawn."""

    __slots__ = ("x0", "y0", "x1", "y1", "contrast", "sharpness", "flat", "edge", "evidence")

    def __init__(self, box: Box, contrast: float, sharpness: float, flat: float, edge: float) -> None:
        self.x0, self.y0, self.x1, self.y1 = box
        self.contrast = contrast  # grey levels above the immediate surroundings
        self.sharpness = sharpness  # steepest step / contrast
        self.flat = flat  # share of the ink on the plateau at the image's brightest value
        self.edge = edge  # distance to the nearest image edge / short side
        drawn = _ramp(sharpness, *SHARPNESS_RANGE) * _ramp(contrast, *CONTRAST_RANGE)
        if flat >= FLAT_INK:
            drawn = 0.5 + 0.5 * drawn
        self.evidence = float(np.sqrt(drawn) * (1.0 - _ramp(edge, *EDGE_BAND)))


def _plausible(stats: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Which components are glyph-shaped and near an edge, and which are too large for a glyph.

    Args:
        stats: int [n, 5] from ``cv2.connectedComponentsWithStats`` (row 0 is the background).
        h, w: working image size.

    Returns:
        bool [n] glyph candidates, and bool [n] components too large to be a glyph (worth splitting).
    """
    x0, y0 = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    cw, ch, area = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT], stats[:, cv2.CC_STAT_AREA]
    fill = area / np.maximum(cw * ch, 1)
    too_big = (ch > max(20, 0.12 * min(h, w))) | (cw > 0.6 * w)
    keep = (ch >= MIN_GLYPH_HEIGHT) & ~too_big & (cw >= 2) & (area >= 8) & (fill >= 0.08)
    # Strokes, not blobs: a glyph covers part of its box, except a thin bar such as "I" or "l" and a tiny symbol,
    # whose strokes fill the few pixels it has.
    keep &= (fill <= 0.93) | (cw <= 0.35 * ch) | ((ch <= 2 * MIN_GLYPH_HEIGHT) & (cw <= 2 * ch))
    # Overlays sit near the edges; anything farther in has no evidence (step 3), so it is not measured at all.
    keep &= np.minimum(np.minimum(x0, y0), np.minimum(w - x0 - cw, h - y0 - ch)) < EDGE_BAND[1] * min(h, w)
    keep[0] = too_big[0] = False
    return keep, too_big


def _measure(
    images: _Images,
    response: np.ndarray,
    labels: np.ndarray,
    label: int,
    bounds: Box,
    threshold: float,
    min_contrast: float,
) -> _Glyph | None:
    """Validate one component as a glyph and measure its cues, or None when it is not ink.

    Args:
        images: the image, its working copy and their shared maps.
        response: uint8 [h, w] response the component was found in (top-hat, or the brightest plateau).
        labels: int32 [h, w] component labels; ``label`` is this component's.
        bounds: the component's box (x0, y0, x1, y1).
        threshold: the response threshold T.
        min_contrast: grey levels the ink must stand above its surroundings.
    """
    gray = images.small
    h, w = gray.shape
    x0, y0, x1, y1 = bounds
    # Work in a window around the component: whole-image masks would cost a full pass per candidate.
    m = max(3, int((y1 - y0) / CONTEXT_DIVISOR))
    rx0, ry0, rx1, ry1 = max(0, x0 - m), max(0, y0 - m), min(w, x1 + m), min(h, y1 + m)
    mask = labels[ry0:ry1, rx0:rx1] == label
    ys, xs = np.nonzero(mask)
    own_response = response[ry0:ry1, rx0:rx1][ys, xs]
    xs, ys = xs + rx0, ys + ry0
    # Ink is at full contrast along most of its strokes; noise joined into a blob is strong at a few pixels.
    if own_response.max() <= threshold or own_response.mean() < threshold:
        return None
    # The box of the strong pixels plus their one-pixel antialiased rim: the weak pixels can trail off into a
    # gradient next to the glyph (a small symbol burned in just above the brighter body).
    strong = own_response > threshold
    x0, x1 = max(x0, int(xs[strong].min()) - 1), min(x1, int(xs[strong].max()) + 2)
    y0, y1 = max(y0, int(ys[strong].min()) - 1), min(y1, int(ys[strong].max()) + 2)
    # Contrast against the immediate surroundings (own pixels excluded): a letter in a grey box is measured
    # against the box, not against the anatomy around it.
    patch = gray[ry0:ry1, rx0:rx1]
    own = mask
    ring = patch[~own]
    if ring.size < 8:
        return None
    background = _quantile(ring, 0.5)
    contrast = _quantile(patch[own], 0.9) - background
    if contrast < min_contrast:
        return None
    # Sharpness: the steepest step at the glyph (box grown by one pixel) against its contrast. The 95th percentile,
    # not the maximum, so that one noisy pixel does not make a blurred edge sharp.
    steps = images.step[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1].ravel()
    sharpness = _quantile(steps, 0.95) / max(contrast, 1.0)
    if x1 - x0 >= 1.6 * (y1 - y0):
        # Wide: merged glyphs cross a row several times or fill a compact blob (small text merged by blur), a
        # line (a wire, the bright edge of a strip) crosses it once and is long and thin.
        rows = own[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0]
        crossings = rows[:, 0].astype(np.int64) + (rows[:, 1:] & ~rows[:, :-1]).sum(axis=1)
        if np.median(crossings) < 2 and (rows.mean() < 0.25 or x1 - x0 > 4 * (y1 - y0)):
            return None
    flat = _flatness(images, (x0, y0, x1, y1), background + contrast / 2)
    edge = min(x0, y0, w - x1, h - y1) / min(h, w)
    return _Glyph((x0, y0, x1, y1), contrast, sharpness, flat, edge)


def _flatness(images: _Images, box: Box, ink_level: float) -> float:
    """Share of a glyph's ink on one plateau at the image's brightest value; 0 when its peak is not there.

    Drawn ink is one value, and overlays are drawn at the brightest value the image has; a small piece of bone
    can have a plateau by chance, but not at the image's maximum. Measured on the image itself: downscaling
    mixes thin strokes with their background.
    """
    f = images.factor
    x0, y0, x1, y1 = box
    crop = images.full[int(y0 * f) : int(np.ceil(y1 * f)), int(x0 * f) : int(np.ceil(x1 * f))]
    if crop.size == 0 or int(crop.max()) < images.brightest - PLATEAU:
        return 0.0
    ink = crop[crop > ink_level]
    return float(np.mean(ink >= images.brightest - PLATEAU)) if ink.size else 0.0


def _stacked_strokes(bright: np.ndarray, box: Box) -> float:
    """Share of a box's columns that cross the bright (weak top-hat) mask at least twice."""
    x0, y0, x1, y1 = box
    ink = bright[y0:y1, x0:x1].astype(bool)
    crossings = ink[0].astype(np.int64) + (ink[1:] & ~ink[:-1]).sum(axis=0)
    return float(np.mean(crossings >= 2))


def _clutter(bright: np.ndarray, box: Box) -> float:
    """Share of bright (weak top-hat) pixels in a margin of half the box height around a box."""
    h, w = bright.shape
    x0, y0, x1, y1 = box
    m = max(2, (y1 - y0) // 2)
    wx0, wy0, wx1, wy1 = max(0, x0 - m), max(0, y0 - m), min(w, x1 + m), min(h, y1 + m)
    around = int(bright[wy0:wy1, wx0:wx1].sum()) - int(bright[y0:y1, x0:x1].sum())
    area = (wx1 - wx0) * (wy1 - wy0) - (x1 - x0) * (y1 - y0)
    return around / max(area, 1)


@DETECTORS.register("text")
class TextDetector(Detector):
    """Burned-in text lines (kind ``text``) and single-letter laterality markers (kind ``marker``)."""

    name: ClassVar[str] = "text"
    version: ClassVar[str] = "opencv-morph-3"
    kinds: ClassVar[tuple[str, ...]] = ("text", "marker")

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Find text lines and markers.

        Args:
            image: uint8 [H, W] grayscale or [H, W, 3] RGB.

        Returns:
            Detections of kind ``text`` or ``marker``, boxes in ``image`` pixel coordinates.
        """
        gray = to_gray(image)
        height, width = gray.shape
        small, factor = working_copy(gray)
        found: list[Detection] = []
        for kind, box, score in self._regions(_Images(gray, small, factor)):
            x0, y0, x1, y1 = scale_box(box, factor, width, height)
            if x1 > x0 and y1 > y0 and score >= MIN_SCORE:
                found.append(Detection(kind, x0, y0, x1, y1, float(score), self.name, self.version))
        return found

    def _regions(self, images: _Images) -> list[Region]:
        """All regions of one image, boxes in working-copy coordinates, before the score cut."""
        boxes = self._flat_boxes(images)
        glyphs = self._glyphs(images)
        # A glyph inside a box is its ink, already accounted for.
        free = [g for g in glyphs if not any(_inside(g, b) for _, b, _ in boxes)]
        return boxes + self._lines(images, free)

    # ------------------------------------------------------------------------------------------------------------
    # Step 1: flat boxes

    def _flat_boxes(self, images: _Images) -> list[Region]:
        """Planar rectangles of marker or label size that hold ink: a grey box with a letter, a text label."""
        gray = images.small
        h, w = gray.shape
        side = min(h, w)
        flat = _planar(gray)
        # Label the planar pixels grown by one: the antialiased rim of a letter can cut a narrow box into pieces.
        grown = cv2.dilate(flat, np.ones((3, 3), np.uint8))
        n, labels, stats, _ = cv2.connectedComponentsWithStats(grown, connectivity=4)
        bw, bh, area = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT], stats[:, cv2.CC_STAT_AREA]
        keep = (bh >= BOX_HEIGHT[0] * side) & (bh <= BOX_HEIGHT[1] * side) & (bw >= 0.4 * bh) & (bw <= 0.6 * w)
        keep &= area >= 0.4 * bw * bh
        keep[0] = False
        out: list[Region] = []
        for i in np.nonzero(keep)[0][:MAX_COMPONENTS]:
            x0, y0, cw, ch = (int(v) for v in stats[i, :4])
            own = labels[y0 : y0 + ch, x0 : x0 + cw] == i
            # Trim the spurs where the region leaks into a planar neighbour through a pixel or two: keep the rows
            # and columns that the region covers for at least half of its extent.
            rows, cols = np.flatnonzero(own.sum(1) >= 0.5 * cw), np.flatnonzero(own.sum(0) >= 0.5 * ch)
            if rows.size < 3 or cols.size < 3:
                continue
            own = own[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
            x0, y0 = x0 + int(cols[0]), y0 + int(rows[0])
            ch, cw = own.shape
            x1, y1 = x0 + cw, y0 + ch
            if ch < BOX_HEIGHT[0] * side or cw < 0.4 * ch:
                continue
            # A rectangle: the region runs along all four sides of its box (within the two outermost pixels).
            sides = (own[:2].any(0), own[-2:].any(0), own[:, :2].any(1), own[:, -2:].any(1))
            if min(float(s.mean()) for s in sides) < 0.7:
                continue
            patch = gray[y0:y1, x0:x1].astype(np.float32)
            planar = own & (flat[y0:y1, x0:x1] > 0)
            if planar.sum() < 8:
                continue
            # The fill is a plane (a flat value or a ramp): fit it to the planar pixels, and call ink what departs.
            ys, xs = np.nonzero(planar)
            a, b, c = _fit_plane(patch[ys, xs], xs, ys)
            yy, xx = np.mgrid[0:ch, 0:cw]
            departure = np.abs(patch - (a + b * xx + c * yy))
            ink = departure > MIN_BOX_INK
            # A drawn box is planar all over, but for a pixel around its ink; and its ink is drawn with step edges.
            # Smooth anatomy is planar in patches, and what departs from the plane does so gradually.
            around_ink = cv2.dilate(ink.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
            if not ink.any() or around_ink.all() or planar[~around_ink].mean() < MIN_BOX_PLANAR:
                continue
            steps = images.step[y0:y1, x0:x1][around_ink]
            if np.percentile(steps, 95) < SHARPNESS_RANGE[0] * np.percentile(departure[ink], 90):
                continue
            ink[[0, -1]] = False  # the outline, if any
            ink[:, [0, -1]] = False
            _, _, ink_stats, _ = cv2.connectedComponentsWithStats(ink.astype(np.uint8), connectivity=8)
            ink_stats = ink_stats[1:]
            # Glyphs sit inside the box, clear of its sides; ink that reaches a side is something the region
            # only partly covers (a piece of a letter next to a planar strip, anatomy next to a flat patch).
            clear = (ink_stats[:, 0] >= 2) & (ink_stats[:, 1] >= 2)
            clear &= (ink_stats[:, 0] + ink_stats[:, 2] <= cw - 2) & (ink_stats[:, 1] + ink_stats[:, 3] <= ch - 2)
            if not clear[ink_stats[:, 4] >= 6].all():
                continue
            glyphs = ink_stats[(ink_stats[:, 3] >= max(3, 0.25 * ch)) & (ink_stats[:, 4] >= 6)]
            if len(glyphs) == 0:
                continue
            gx0, gx1 = int(glyphs[:, 0].min()), int((glyphs[:, 0] + glyphs[:, 2]).max())
            if gx1 - gx0 < 0.2 * cw and glyphs[:, 3].max() < 0.3 * ch:
                continue
            if not _ends_in_step(gray, (x0, y0, x1, y1), (a, b, c)):
                continue
            fill = float(np.median(patch[planar]))
            box = _grow_over_outline(gray, (max(0, x0 - 1), max(0, y0 - 1), min(w, x1 + 1), min(h, y1 + 1)), fill)
            kind = "text" if len(glyphs) >= 3 or cw >= 1.6 * ch else "marker"
            out.append((kind, box, BOX_SCORE))
        return out

    # ------------------------------------------------------------------------------------------------------------
    # Steps 2 and 3: glyph candidates and their evidence

    def _glyphs(self, images: _Images) -> list[_Glyph]:
        """Glyph candidates with their evidence, boxes in working-copy coordinates."""
        gray = images.small
        h, w = gray.shape
        side = _kernel_side(max(h, w))
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (side, side))
        # Pad by replication first: morphologyEx pads each of its two passes separately, so that a gradient running
        # into the image edge (a soft body outline, vignetting) would light up as a thin band along the edge.
        padded = cv2.copyMakeBorder(gray, side, side, side, side, cv2.BORDER_REPLICATE)
        response = cv2.morphologyEx(padded, cv2.MORPH_TOPHAT, kernel)[side:-side, side:-side]
        threshold = max(MIN_CONTRAST, NOISE_FACTOR * _median_u8(response))
        images.bright = (response > WEAK_FRACTION * threshold).astype(np.uint8)
        n, labels, stats = _components(images.bright, 8)
        keep, too_big = _plausible(stats, h, w)
        # A letter next to a bright structure (a collimator edge, the bright strip along a border) can join it
        # through a row of antialiased pixels. Split such components at rising thresholds until the pieces are
        # glyph-sized; a piece split off that is not kept as a glyph (a tiny symbol still joined to a bright band
        # along the edge) is split again at the next level.
        glyphs: list[_Glyph] = []
        ids, to_split = np.nonzero(keep)[0], too_big
        for split, level in enumerate((0.0, *SPLIT_LEVELS)):
            if split:
                if not to_split.any():
                    break
                strong = (response > level * threshold).astype(np.uint8)
                m, strong_labels, stats = _components(strong, 8)
                parent = np.zeros(m, np.int64)
                inside = strong > 0
                parent[strong_labels[inside]] = labels[inside]
                keep_strong, too_big_strong = _plausible(stats, h, w)
                ids = np.nonzero(keep_strong & to_split[parent])[0]
                labels, to_split = strong_labels, too_big_strong & to_split[parent]
            for i in ids[:MAX_COMPONENTS]:
                bx, by, bw, bh = (int(v) for v in stats[i, :4])
                bounds = (bx, by, bx + bw, by + bh)
                glyph = _measure(images, response, labels, int(i), bounds, threshold, 0.8 * threshold)
                # A piece split off a large structure is kept only when its ink is flat: bones, devices and
                # collimator edges split into many sharp, bright pieces, but not into pieces of drawn ink.
                if glyph is not None and (not split or glyph.flat >= FLAT_INK):
                    glyphs.append(glyph)
                elif split:
                    to_split[i] = True
        # A glyph on the brightest plateau is added where the top-hat found none, and replaces a top-hat glyph
        # around it that has merged with something next to it (a tiny symbol with a brighter body or gradient
        # just below it): one much larger and mostly not on the plateau, or one whose ink is this plateau glyph
        # alone but whose box runs on past it by more than an antialiased rim.
        plateaus = self._plateau_glyphs(images)
        for plateau in plateaus:
            around = [o for o in glyphs if _inside(plateau, _box(o))]
            if all(
                (_area(o) > 2 * _area(plateau) and o.flat < FLAT_INK)
                or (
                    o.flat >= FLAT_INK
                    and sum(_inside(q, _box(o)) for q in plateaus) == 1
                    and max(plateau.x0 - o.x0, plateau.y0 - o.y0, o.x1 - plateau.x1, o.y1 - plateau.y1) > RUN_ON
                )
                for o in around
            ):
                glyphs = [o for o in glyphs if o not in around] + [plateau]
        return glyphs

    def _plateau_glyphs(self, images: _Images) -> list[_Glyph]:
        """Glyphs drawn at the image's brightest value, found without the top-hat.

        White text on a bright background (with a dark drop shadow) stands only a little above it, and a tiny
        symbol burned in next to a gradient merges with it in the top-hat; both are plain in the plateau of
        pixels at the image's brightest value. Its share per working-copy pixel is the response here.
        """
        h, w = images.small.shape
        plateau = (images.full >= images.brightest - PLATEAU).astype(np.uint8) * 255
        if images.factor != 1.0:
            plateau = cv2.resize(plateau, (w, h), interpolation=cv2.INTER_AREA)
        threshold = 128.0  # at least half of the pixel on the plateau
        weak = (plateau > WEAK_FRACTION * threshold).astype(np.uint8)
        n, labels, stats = _components(weak, 8)
        keep, _ = _plausible(stats, h, w)
        glyphs = []
        for i in np.nonzero(keep)[0][:MAX_COMPONENTS]:
            bx, by, bw, bh = (int(v) for v in stats[i, :4])
            glyph = _measure(images, plateau, labels, int(i), (bx, by, bx + bw, by + bh), threshold, MIN_CONTRAST)
            if glyph is not None and glyph.flat >= FLAT_INK:
                glyphs.append(glyph)
        return glyphs

    # ------------------------------------------------------------------------------------------------------------
    # Step 4: lines and kinds

    def _lines(self, images: _Images, glyphs: list[_Glyph]) -> list[Region]:
        """Join glyphs into lines and classify each group as ``text`` or ``marker``."""
        glyphs = [g for g in glyphs if g.evidence >= MIN_EVIDENCE]
        if not glyphs:
            return []
        gray = images.small
        h, w = gray.shape
        x0, y0, x1, y1 = np.array([(g.x0, g.y0, g.x1, g.y1) for g in glyphs], dtype=np.int64).T
        hh = y1 - y0
        # A piece inside another one's box (the counter of an "O", a letter inside the ring of a lead marker)
        # belongs to it.
        inside = (x0[:, None] >= x0[None] - 1) & (x1[:, None] <= x1[None] + 1)
        inside &= (y0[:, None] >= y0[None] - 1) & (y1[:, None] <= y1[None] + 1)
        np.fill_diagonal(inside, False)
        contained = inside.any(axis=1)
        # Same line: similar height, overlapping vertical extents (shared baseline band), a gap of at most about
        # one letter height. Contained pieces link only to their container, so that a ring marker next to a word
        # does not join it through the letter inside the ring.
        tall, short = np.maximum(hh[:, None], hh[None]), np.minimum(hh[:, None], hh[None])
        v_overlap = np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None])
        gap = np.maximum(x0[:, None], x0[None]) - np.minimum(x1[:, None], x1[None])
        line = (tall <= LINE_HEIGHT_RATIO * short) & (v_overlap >= 0.6 * short) & (gap <= 0.9 * tall)
        line &= ~contained[:, None] & ~contained[None]
        linked = inside | inside.T | line
        np.fill_diagonal(linked, False)
        out: list[Region] = []
        for group in _union_find_groups(len(glyphs), np.argwhere(np.triu(linked))):
            box = (int(x0[group].min()), int(y0[group].min()), int(x1[group].max()), int(y1[group].max()))
            gw, gh = box[2] - box[0], box[3] - box[1]
            letters = sum(1 for i in group if not contained[i])
            evidence = max(glyphs[i].evidence for i in group)
            ink_height = gh - (box[1] > 0) - (box[3] < h)  # the box less its one-pixel rim (none at an edge)
            if letters >= 2 or gw >= 1.6 * gh:
                # Letters have horizontal strokes too, so some columns of a word cross ink twice; a long row of
                # pieces of a bright strip or of wires crosses each column once.
                if gw >= 3 * gh and _stacked_strokes(images.bright, box) < MIN_STACKED:
                    continue
                out.append(("text", box, evidence * (1.0 if letters >= 3 or gw >= 2.5 * gh else 0.9)))
            elif ink_height < TINY_GLYPH * min(h, w) and gw < gh:
                # Too small for a letter and narrower than tall: a sliver of a wire or of a bone, not a symbol.
                continue
            elif (gw > 1.15 * gh and box[1] > 0 and box[3] < h) or ink_height < TINY_GLYPH * min(h, w):
                # One small symbol wider than tall, or too small for a letter: a burned-in symbol or a fragment
                # of text (the top or bottom edge cutting a letter makes it look wide too).
                out.append(("text", box, 0.9 * evidence))
            elif gw >= 0.3 * gh:
                # A letter alone on the anatomy; a bright piece of a device or a bone has bright structure around.
                # Ink on the image's brightest plateau is drawn wherever it stands (next to a bright strip, say).
                flat = any(glyphs[i].flat >= FLAT_INK for i in group)
                score = evidence * (1.0 if flat else 1.0 - _ramp(_clutter(images.bright, box), *CLUTTER_RANGE))
                out.append(("marker", _enclosing_box(gray, box) or box, score))
        return _blocks(out)


def _blocks(regions: list[Region]) -> list[Region]:
    """Join text lines stacked into a block (a multi-line time or ID stamp) into one ``text`` region.

    Lines of one block have about the same height, are separated by less than half a line and share most of their
    horizontal extent (left-aligned, or cut by the same image edge). Only reported lines join; markers and lines
    below the score cut are left as they are.

    Args:
        regions: (kind, box, score) in working-copy pixels.

    Returns:
        The regions, with the lines of each block replaced by the block's box and their best score.
    """
    lines = [i for i, (kind, _, score) in enumerate(regions) if kind == "text" and score >= MIN_SCORE]
    if len(lines) < 2:
        return regions
    x0, y0, x1, y1 = np.array([regions[i][1] for i in lines], dtype=np.int64).T
    hh, ww = y1 - y0, x1 - x0
    tall, short = np.maximum(hh[:, None], hh[None]), np.minimum(hh[:, None], hh[None])
    v_gap = np.maximum(y0[:, None], y0[None]) - np.minimum(y1[:, None], y1[None])
    h_overlap = np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None])
    stacked = (tall <= LINE_HEIGHT_RATIO * short) & (v_gap <= BLOCK_GAP * short)
    stacked &= h_overlap >= BLOCK_OVERLAP * np.minimum(ww[:, None], ww[None])
    np.fill_diagonal(stacked, False)
    joined = set(lines)
    out = [r for i, r in enumerate(regions) if i not in joined]
    for group in _union_find_groups(len(lines), np.argwhere(np.triu(stacked))):
        box = (int(x0[group].min()), int(y0[group].min()), int(x1[group].max()), int(y1[group].max()))
        out.append(("text", box, max(regions[lines[i]][2] for i in group)))
    return out


def _ends_in_step(gray: np.ndarray, box: Box, plane: tuple[float, float, float]) -> bool:
    """Whether a box's fill ends in a step: on most of its outline, the pixels around it depart from its plane.

    A drawn box ends in a step (its outline, or the anatomy past the outline); smooth anatomy or dark air that
    happens to be planar fades into its surroundings instead. Looked at one and three pixels out.

    Args:
        gray: uint8 [h, w].
        box: (x0, y0, x1, y1).
        plane: (a, b, c) of the fill ``a + b x + c y``, x and y relative to the box's top-left corner.
    """
    h, w = gray.shape
    x0, y0, x1, y1 = box
    a, b, c = plane
    best = 0.0
    for d in (1, 3):
        ring = np.zeros((y1 - y0 + 2 * d, x1 - x0 + 2 * d), bool)
        ring[[0, -1], :] = True
        ring[:, [0, -1]] = True
        ys, xs = np.nonzero(ring)
        ys, xs = ys - d, xs - d
        seen = (ys + y0 >= 0) & (ys + y0 < h) & (xs + x0 >= 0) & (xs + x0 < w)  # a box cut by the image edge
        ys, xs = ys[seen], xs[seen]
        if ys.size:
            outside = gray[ys + y0, xs + x0].astype(np.float32)
            best = max(best, float(np.mean(np.abs(outside - (a + b * xs + c * ys)) > MIN_BOX_STEP)))
    return best >= 0.5


def _box(glyph: _Glyph) -> Box:
    return (glyph.x0, glyph.y0, glyph.x1, glyph.y1)


def _area(glyph: _Glyph) -> int:
    return (glyph.x1 - glyph.x0) * (glyph.y1 - glyph.y0)


def _inside(glyph: _Glyph, box: Box) -> bool:
    """Whether a glyph's centre lies in a box."""
    cx, cy = (glyph.x0 + glyph.x1) / 2, (glyph.y0 + glyph.y1) / 2
    return box[0] <= cx <= box[2] and box[1] <= cy <= box[3]


def _grow_over_outline(gray: np.ndarray, box: Box, fill: float, tolerance: float = 4.0) -> Box:
    """Grow a box over a thin outline (1-2 px of another uniform value around it), which belongs to it."""
    h, w = gray.shape
    bx0, by0, bx1, by1 = box
    for _ in range(2):
        grown = False
        for side in ("top", "bottom", "left", "right"):
            if side == "top" and by0 > 0:
                line = gray[by0 - 1, bx0:bx1]
            elif side == "bottom" and by1 < h:
                line = gray[by1, bx0:bx1]
            elif side == "left" and bx0 > 0:
                line = gray[by0:by1, bx0 - 1]
            elif side == "right" and bx1 < w:
                line = gray[by0:by1, bx1]
            else:
                continue
            line = line.astype(np.int16)
            if np.ptp(line) <= 2 * tolerance and abs(float(np.median(line)) - fill) > tolerance:
                grown = True
                if side == "top":
                    by0 -= 1
                elif side == "bottom":
                    by1 += 1
                elif side == "left":
                    bx0 -= 1
                else:
                    bx1 += 1
        if not grown:
            break
    return (bx0, by0, bx1, by1)


def _enclosing_box(gray: np.ndarray, box: Box) -> Box | None:
    """The small uniform box a marker letter sits in (outline included), or None when there is none.

    The ring just outside the letter must lie on a plane (a flat fill or a ramp); the region on that plane grown
    from it must be closed (not reach past about one letter height) and fill a rectangle. This also finds boxes
    that are uniform but not planar to a grey level (a JPEG-compressed box), which step 1 misses.
    """
    h, w = gray.shape
    x0, y0, x1, y1 = box
    size = max(x1 - x0, y1 - y0)
    reach = size + 3
    wx0, wy0, wx1, wy1 = max(0, x0 - reach), max(0, y0 - reach), min(w, x1 + reach), min(h, y1 + reach)
    window = gray[wy0:wy1, wx0:wx1].astype(np.float32)
    lx0, ly0, lx1, ly1 = x0 - wx0, y0 - wy0, x1 - wx0, y1 - wy0
    # The ring 2-3 px around the letter's box (the pixel next to it can still be part of its antialiased rim).
    ring = np.zeros(window.shape, bool)
    ring[max(0, ly0 - 3) : ly1 + 3, max(0, lx0 - 3) : lx1 + 3] = True
    ring[max(0, ly0 - 1) : ly1 + 1, max(0, lx0 - 1) : lx1 + 1] = False
    ys, xs = np.nonzero(ring)
    if ys.size < 8:
        return None
    values = window[ys, xs]
    a, b, c = _fit_plane(values, xs, ys)
    spread = float(np.percentile(np.abs(values - (a + b * xs + c * ys)), 80))
    if spread > MAX_BOX_SPREAD:
        return None
    tolerance = max(4.0, 2.5 * spread)
    yy, xx = np.mgrid[0 : window.shape[0], 0 : window.shape[1]]
    uniform = (np.abs(window - (a + b * xx + c * yy)) <= tolerance).astype(np.uint8)
    uniform[max(0, ly0 - 1) : ly1 + 1, max(0, lx0 - 1) : lx1 + 1] = 1  # the letter (and its rim) sits in the box
    # Open, so that the box does not leak into anatomy that happens to lie near the plane through thin bridges.
    uniform = cv2.morphologyEx(uniform, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(uniform, connectivity=4)
    seed = np.bincount(labels[ring], minlength=n)
    seed[0] = 0
    label = int(seed.argmax())
    bx, by, bw, bh, area = (int(v) for v in stats[label])
    # Trim the spurs that survive the opening: keep the rows and columns the region covers for half its extent.
    own = labels[by : by + bh, bx : bx + bw] == label
    rows, cols = np.flatnonzero(own.sum(1) >= 0.5 * bw), np.flatnonzero(own.sum(0) >= 0.5 * bh)
    if rows.size == 0 or cols.size == 0:
        return None
    own = own[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    bx, by = bx + int(cols[0]), by + int(rows[0])
    bh, bw = own.shape
    area = int(own.sum())
    touches = bx == 0 or by == 0 or bx + bw == window.shape[1] or by + bh == window.shape[0]
    # A box touching the window is open, unless the window itself is cut by the image edge there.
    open_sides = (
        (bx == 0 and wx0 > 0)
        or (by == 0 and wy0 > 0)
        or (bx + bw == window.shape[1] and wx1 < w)
        or (by + bh == window.shape[0] and wy1 < h)
    )
    if open_sides or (touches and area > 0.9 * window.size):
        return None
    if area < 0.8 * bw * bh or bw < (x1 - x0) + 2 or bh < (y1 - y0) + 2:
        return None
    if not _ends_in_step(gray, (bx + wx0, by + wy0, bx + bw + wx0, by + bh + wy0), (a + b * bx + c * by, b, c)):
        return None
    fill = float(np.median(values))
    grown = _grow_over_outline(gray[wy0:wy1, wx0:wx1], (bx, by, bx + bw, by + bh), fill, tolerance)
    return (grown[0] + wx0, grown[1] + wy0, grown[2] + wx0, grown[3] + wy0)
