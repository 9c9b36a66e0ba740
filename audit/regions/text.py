"""Burned-in text and laterality markers, found with classical OpenCV morphology (no model, no download).

Method (on a copy whose long side is at most 512 px):

1. Top-hat (bright ink) and black-hat (dark ink) with a square kernel a bit larger than a stroke: they keep thin
   structures much brighter (darker) than their surroundings and drop anything wider than the kernel, i.e. ribs,
   the spine, lung edges and the body outline, whose profiles are broad or soft.
2. Threshold at a contrast ``T`` scaled to the image's noise (never below ``MIN_CONTRAST`` grey levels), with
   hysteresis: a component of the ``0.6 T`` mask is kept when it holds a pixel above ``T``, so antialiased
   strokes keep their edges.
3. Connected components are glyph candidates, filtered by size, aspect and fill, and by their contrast against a
   ring around them (which rejects the gaps between bright letters that the black-hat also lights up).
4. Glyphs of similar height that share a baseline band and are separated by small gaps are joined into lines.
   A line of two or more glyphs, or one wide component (merged glyphs), is ``text``; an isolated letter-sized,
   square-ish glyph is a ``marker``, boxed together with its small uniform box when it sits in one.

The study in ``shared/notes/detectors.md`` measured this family at about 11 ms per 512 px image, with good recall
but false positives on devices (ECG electrodes, wire loops) in real radiographs; a learned detector (PP-OCR det)
is the better choice where those matter.
"""

from __future__ import annotations

from typing import ClassVar

import cv2
import numpy as np

from audit.regions.base import DETECTORS, Detection, Detector, scale_box, to_gray, working_copy

MIN_CONTRAST = 30.0  # grey levels; burned-in overlays are near-white (or black), anatomy rarely this sharp
NOISE_FACTOR = 6.0  # T >= this × the median top-hat response (which grows with pixel noise)
WEAK_FRACTION = 0.6  # hysteresis: glyph pixels above this × T join a glyph that has a pixel above T
MAX_COMPONENTS = 400  # cap on candidates per polarity (a noisy or busy image should not cost seconds)


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


class _Glyph:
    """A glyph candidate at working resolution."""

    __slots__ = ("x0", "y0", "x1", "y1", "contrast", "bright")

    def __init__(self, x0: int, y0: int, x1: int, y1: int, contrast: float, bright: bool) -> None:
        self.x0, self.y0, self.x1, self.y1 = x0, y0, x1, y1
        self.contrast = contrast
        self.bright = bright

    @property
    def w(self) -> int:
        return self.x1 - self.x0

    @property
    def h(self) -> int:
        return self.y1 - self.y0


@DETECTORS.register("text")
class TextDetector(Detector):
    """Burned-in text lines (kind ``text``) and single-letter laterality markers (kind ``marker``)."""

    name: ClassVar[str] = "text"
    version: ClassVar[str] = "opencv-morph-1"
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
        glyphs = self._glyphs(small)
        found: list[Detection] = []
        for kind, box, score in self._group(small, glyphs):
            x0, y0, x1, y1 = scale_box(box, factor, width, height)
            if x1 > x0 and y1 > y0:
                found.append(Detection(kind, x0, y0, x1, y1, float(score), self.name, self.version))
        return found

    # ------------------------------------------------------------------------------------------------------------

    def _glyphs(self, gray: np.ndarray) -> list[_Glyph]:
        """Glyph candidates of both polarities, uint8 [h, w] working image in, boxes in its coordinates out."""
        h, w = gray.shape
        side = _kernel_side(max(h, w))
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (side, side))
        # Pad by replication first: morphologyEx pads each of its two passes separately, so that a gradient running
        # into the image edge (a soft body outline, vignetting) would light up as a thin band along the edge.
        padded = cv2.copyMakeBorder(gray, side, side, side, side, cv2.BORDER_REPLICATE)
        glyphs: list[_Glyph] = []
        for bright, op in ((True, cv2.MORPH_TOPHAT), (False, cv2.MORPH_BLACKHAT)):
            response = cv2.morphologyEx(padded, op, kernel)[side:-side, side:-side]
            threshold = max(MIN_CONTRAST, NOISE_FACTOR * _median_u8(response))
            glyphs.extend(self._components(gray, response, threshold, bright))
        return glyphs

    def _components(self, gray: np.ndarray, response: np.ndarray, threshold: float, bright: bool) -> list[_Glyph]:
        """Glyphs of one polarity: components of ``response`` (uint8 [h, w]) above the threshold, validated."""
        h, w = gray.shape
        if cv2.minMaxLoc(response)[1] <= threshold:
            return []
        weak = (response > WEAK_FRACTION * threshold).astype(np.uint8)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(weak, connectivity=8)
        cw, ch, area = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT], stats[:, cv2.CC_STAT_AREA]
        fill = area / np.maximum(cw * ch, 1)
        max_height = max(20, 0.12 * min(h, w))
        keep = (ch >= 5) & (ch <= max_height) & (cw >= 2) & (cw <= 0.6 * w) & (area >= 10)
        # Strokes, not blobs: a glyph covers part of its box, except a thin bar such as "I" or "l".
        keep &= (fill <= 0.93) | (cw <= 0.35 * ch)
        keep &= fill >= 0.08
        keep[0] = False
        ids = np.nonzero(keep)[0][:MAX_COMPONENTS]
        glyphs = []
        for i in ids:
            x0, y0, cw_i, ch_i = (int(v) for v in stats[i, :4])
            x1, y1 = x0 + cw_i, y0 + ch_i
            own_response = response[y0:y1, x0:x1][labels[y0:y1, x0:x1] == i]
            # Ink is at full contrast along most of its strokes; noise joined into a blob is strong at a few pixels.
            if own_response.max() <= threshold or own_response.mean() < threshold:
                continue
            # Contrast of the ink against its surroundings: the median of a window five glyph heights tall (own
            # pixels excluded) is the local background. The window must be wide: the gaps between the strokes of
            # a bright letter light up in the black-hat too, and a tight ring around one would be all letter.
            m = max(3, 2 * ch_i)
            rx0, ry0, rx1, ry1 = max(0, x0 - m), max(0, y0 - m), min(w, x1 + m), min(h, y1 + m)
            patch = gray[ry0:ry1, rx0:rx1]
            own = labels[ry0:ry1, rx0:rx1] == i
            ring = patch[~own]
            if ring.size < 8:
                continue
            background = float(np.median(ring))
            ink = patch[own]
            contrast = float(np.percentile(ink, 90)) - background if bright else background - np.percentile(ink, 10)
            if contrast >= 0.8 * threshold:
                glyphs.append(_Glyph(x0, y0, x1, y1, float(contrast), bright))
        return glyphs

    def _group(self, gray: np.ndarray, glyphs: list[_Glyph]) -> list[tuple[str, tuple[int, int, int, int], float]]:
        """Join glyphs into lines and classify each group as ``text`` or ``marker``."""
        if not glyphs:
            return []
        box = np.array([(g.x0, g.y0, g.x1, g.y1) for g in glyphs], dtype=np.int64)
        polarity = np.array([g.bright for g in glyphs])
        x0, y0, x1, y1 = box.T
        hh = y1 - y0
        # A piece inside another one's box (the counter of an "O", a ring around a letter) belongs to it.
        inside = (x0[:, None] >= x0[None] - 1) & (x1[:, None] <= x1[None] + 1)
        inside &= (y0[:, None] >= y0[None] - 1) & (y1[:, None] <= y1[None] + 1)
        # Same line: similar height, overlapping vertical extents (shared baseline band), a gap of at most about
        # one letter height, same polarity.
        tall, short = np.maximum(hh[:, None], hh[None]), np.minimum(hh[:, None], hh[None])
        v_overlap = np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None])
        gap = np.maximum(x0[:, None], x0[None]) - np.minimum(x1[:, None], x1[None])
        line = (tall <= 1.8 * short) & (v_overlap >= 0.6 * short) & (gap <= 0.9 * tall)
        linked = (inside | inside.T | line) & (polarity[:, None] == polarity[None])
        np.fill_diagonal(linked, False)
        pairs = np.argwhere(np.triu(linked))
        candidates: list[tuple[str, tuple[int, int, int, int], float, bool]] = []
        for group in _union_find_groups(len(glyphs), pairs):
            gx0, gy0 = int(x0[group].min()), int(y0[group].min())
            gx1, gy1 = int(x1[group].max()), int(y1[group].max())
            contrast = max(glyphs[i].contrast for i in group)
            # Pieces contained in another piece do not count as separate letters.
            members = [i for i in group if not any(inside[i, j] and i != j for j in group)]
            gw, gh = gx1 - gx0, gy1 - gy0
            strength = float(np.clip(contrast / 160.0, 0.0, 1.0))
            bright = bool(polarity[group[0]])
            if len(members) >= 2 or gw >= 1.6 * gh:
                shape = 1.0 if len(members) >= 3 or gw >= 2.5 * gh else 0.8
                candidates.append(("text", (gx0, gy0, gx1, gy1), 0.3 + 0.7 * strength * shape, bright))
            elif 0.3 * gh <= gw <= 1.6 * gh and gh >= 6:
                candidates.append(("marker", (gx0, gy0, gx1, gy1), 0.3 + 0.7 * strength, bright))
        out: list[tuple[str, tuple[int, int, int, int], float]] = []
        for kind, (gx0, gy0, gx1, gy1), score, bright in candidates:
            # Closing fills the counters of bright letters and the gaps between them, so bright text also shows up
            # in the black-hat (and dark text in the top-hat). Ink encloses its gaps: of two overlapping groups of
            # opposite polarity, the smaller one is the gaps of the other.
            area = (gx1 - gx0) * (gy1 - gy0)
            shadowed = False
            for _, (ox0, oy0, ox1, oy1), _, other in candidates:
                if other == bright or (ox1 - ox0) * (oy1 - oy0) <= area:
                    continue
                overlap = max(0, min(gx1, ox1) - max(gx0, ox0)) * max(0, min(gy1, oy1) - max(gy0, oy0))
                if overlap >= 0.3 * area:
                    shadowed = True
                    break
            if shadowed:
                continue
            if kind == "marker":
                boxed = self._enclosing_box(gray, (gx0, gy0, gx1, gy1))
                if boxed is None:
                    score = 0.3 + 0.85 * (score - 0.3)  # a bare letter is a little less certain than a boxed one
                out.append(("marker", boxed or (gx0, gy0, gx1, gy1), score))
            else:
                out.append((kind, (gx0, gy0, gx1, gy1), score))
        return out

    @staticmethod
    def _enclosing_box(gray: np.ndarray, box: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
        """The small uniform box a marker letter sits in (outline included), or None when there is none.

        The ring just outside the letter must be uniform; the uniform region grown from it must be closed (not
        reach past about one letter height) and fill a rectangle.
        """
        h, w = gray.shape
        x0, y0, x1, y1 = box
        size = max(x1 - x0, y1 - y0)
        reach = size + 3
        wx0, wy0, wx1, wy1 = max(0, x0 - reach), max(0, y0 - reach), min(w, x1 + reach), min(h, y1 + reach)
        window = gray[wy0:wy1, wx0:wx1].astype(np.int16)
        lx0, ly0, lx1, ly1 = x0 - wx0, y0 - wy0, x1 - wx0, y1 - wy0
        # The ring 1-2 px around the letter's box.
        ring = np.zeros(window.shape, bool)
        ring[max(0, ly0 - 2) : ly1 + 2, max(0, lx0 - 2) : lx1 + 2] = True
        ring[ly0:ly1, lx0:lx1] = False
        values = window[ring]
        if values.size == 0:
            return None
        fill = float(np.median(values))
        spread = float(np.percentile(np.abs(values - fill), 80))
        if spread > 6:
            return None
        tolerance = max(4.0, 2.5 * spread)
        uniform = (np.abs(window - fill) <= tolerance).astype(np.uint8)
        uniform[ly0:ly1, lx0:lx1] = 1  # the letter sits inside the box
        n, labels, stats, _ = cv2.connectedComponentsWithStats(uniform, connectivity=4)
        seed = np.bincount(labels[ring], minlength=n)
        seed[0] = 0
        label = int(seed.argmax())
        bx, by, bw, bh, area = (int(v) for v in stats[label])
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
        bx0, by0, bx1, by1 = bx, by, bx + bw, by + bh
        # Grow over a thin outline (1-2 px of another uniform value), which belongs to the box.
        for _ in range(2):
            grown = False
            for side in ("top", "bottom", "left", "right"):
                if side == "top" and by0 > 0:
                    line = window[by0 - 1, bx0:bx1]
                elif side == "bottom" and by1 < window.shape[0]:
                    line = window[by1, bx0:bx1]
                elif side == "left" and bx0 > 0:
                    line = window[by0:by1, bx0 - 1]
                elif side == "right" and bx1 < window.shape[1]:
                    line = window[by0:by1, bx1]
                else:
                    continue
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
        return (bx0 + wx0, by0 + wy0, bx1 + wx0, by1 + wy0)
