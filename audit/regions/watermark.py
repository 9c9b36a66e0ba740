"""Dataset-level watermark detector: fixed-position overlays that come with one class.

A watermark, logo or stamp burned in at (nearly) the same place in many images of one class is a shortcut no
per-image detector can name: a faint logo looks like any other texture in one image, but it shows up as a place
where the fine structure of that class differs from the rest of the dataset (Lapuschkin et al., Nature
Communications 2019: a PASCAL VOC "horse" classifier read a copyright watermark). The method is the one measured in
``shared/notes/detectors.md``, section 6, and runs in two streaming passes over images on one common grid (in the
audit, the classifier's input grid):

Pass 1, :class:`WatermarkStatistics` (``add()`` batch by batch, then ``finish()``):

1. ``hp = image − Gauss(σ = 2)``: the fine structure; smooth anatomy and genuine diffuse class differences are
   removed.
2. Per class and pixel, the number of images with ``|hp| > τ``, ``τ = 2.5 × robust std`` of ``hp`` calibrated on
   the first batch. Each image contributes 0 or 1 per pixel, so outliers (electrodes, clips) weigh no more than
   any other image; a Welch test on mean ``hp`` has a heavy-tailed null and failed in the study.
3. ``z`` of a two-proportion test, class ``c`` versus the rest, per pixel.
4. The threshold comes from an empirical null built in the same pass: ``null_splits`` random pseudo-label splits
   of the same images, threshold = ``1.2 ×`` their largest ``|z|``. No known clean data is needed, and the
   threshold follows the dataset's size and texture.
5. Regions are ``z > threshold`` after a 5×5 close, components of at least ``min_area`` pixels, grown by
   hysteresis into connected pixels above ``0.7 × threshold`` (the faint parts of an overlay widen its box);
   components of one class closer than ``merge_gap`` pixels are one region (a logo and its caption are one
   overlay). Each region keeps a template: the class-mean difference of ``hp`` over its box.

Pass 2, :meth:`WatermarkModel.match` (batch by batch): the normalised cross-correlation of each image's ``hp``
with each template, maximised over shifts of up to ``±search`` pixels (overlays move by a few pixels between
scanners and crops). :meth:`WatermarkModel.assign` then fits a one- and a two-component Gaussian mixture to the
scores of all images and keeps the two-component one when BIC prefers it and its components are separated
(Ashman's D ≥ 2); images in the high component carry the overlay, and :meth:`WatermarkModel.detections` turns
them into :class:`Detection` records, boxes scaled to each image's stored size.

Limitations (measured in the study): only class-associated overlays are found; an overlay equally frequent in all
classes leaves no trace in a class-versus-rest test (run the same statistics with site or scanner as the grouping
for those). Detection needs about 100 carrier images for a clear overlay (α 0.3) and 200 or more when it is faint
or jittered by more than a few pixels. Images must be on one grid: letterboxing or aspect changes move overlays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from audit.errors import ShapeError
from audit.regions.base import Detection, scale_box

NAME = "watermark"
VERSION = "1"

SIGMA = 2.0  # high-pass scale at a 256 px grid
TAU_FACTOR = 2.5  # exceedance threshold in robust standard deviations of hp
NULL_MARGIN = 1.2  # threshold = NULL_MARGIN × largest |z| of the pseudo-label splits
CALIBRATION_IMAGES = 64  # at most this many images of the first batch set τ
_CHUNK = 64  # images per vectorised step (bounds the float32 working memory to ~50 MB at 256 px)


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not records
class WatermarkRegion:
    """One fixed-position overlay found in one class.

    Attributes:
        label: class index (as given to :meth:`WatermarkStatistics.add`) in which the overlay is more frequent.
        x0, y0, x1, y1: box on the grid, x1/y1 exclusive.
        z: largest two-proportion z in the region.
        threshold: the z threshold from the pseudo-label null.
        template: float32 [y1 - y0 + 2m, x1 - x0 + 2m], the class-mean difference of hp over the box grown by
            ``m = template_margin`` pixels on each side (clipped to the grid).
        template_box: (x0, y0, x1, y1) of ``template`` on the grid.
    """

    label: int
    x0: int
    y0: int
    x1: int
    y1: int
    z: float
    threshold: float
    template: np.ndarray = field(repr=False)
    template_box: tuple[int, int, int, int]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) on the grid."""
        return self.x0, self.y0, self.x1, self.y1


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not records
class WatermarkMatches:
    """Pass-2 results for a set of images (a batch, or all batches concatenated).

    Attributes:
        scores: float32 [N, R], the best NCC of each image with each region's template, in [-1, 1].
        offsets: int16 [N, R, 2], the (dx, dy) shift of that best match, in grid pixels.
    """

    scores: np.ndarray
    offsets: np.ndarray

    @staticmethod
    def concatenate(parts: Sequence[WatermarkMatches]) -> WatermarkMatches:
        """Join batch results in order (an empty sequence gives zero images and zero regions)."""
        if not parts:
            return WatermarkMatches(np.zeros((0, 0), np.float32), np.zeros((0, 0, 2), np.int16))
        return WatermarkMatches(np.concatenate([p.scores for p in parts]), np.concatenate([p.offsets for p in parts]))


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not records
class CarrierFit:
    """Which images carry one region's overlay, from a Gaussian mixture on its scores.

    Attributes:
        carriers: bool [N], images assigned to the high-score component (all False when there is none).
        posterior: float32 [N], probability of the high-score component (0 when the mixture has one component).
        components: 2 when the two-component mixture was kept, else 1.
        means: (low, high) component means (equal when one component).
        weights: (low, high) component weights.
        bic: (one component, two components).
        separation: Ashman's D of the two components (0 with one component).
    """

    carriers: np.ndarray
    posterior: np.ndarray
    components: int
    means: tuple[float, float]
    weights: tuple[float, float]
    bic: tuple[float, float]
    separation: float

    def prevalence(self, labels: np.ndarray) -> dict[int, float]:
        """Fraction of carriers per class: ``labels`` int [N] → {class index: fraction}."""
        labels = np.asarray(labels)
        return {int(c): float(self.carriers[labels == c].mean()) for c in np.unique(labels)}


def _check_images(images: np.ndarray, grid: int) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 3:
        found = f"{type(images).__name__} {getattr(images, 'dtype', None)} {getattr(images, 'shape', None)}"
        raise ShapeError("images", f"uint8 [N, {grid}, {grid}] (grayscale, resized to the grid)", found)
    if images.shape[1:] != (grid, grid):
        raise ShapeError("images", f"uint8 [N, {grid}, {grid}] (resize to the grid first)", tuple(images.shape))
    return images


def _gaussian_kernel(grid: int) -> np.ndarray:
    # σ scales with the grid so that the same overlay strokes pass at any grid size.
    sigma = SIGMA * grid / 256.0
    return cv2.getGaussianKernel(2 * math.ceil(3 * sigma) + 1, sigma, cv2.CV_32F)


def high_pass(images: np.ndarray) -> np.ndarray:
    """``hp = image − Gauss(σ)`` for a batch, in one OpenCV call.

    The images are stacked into one [N·(G + 2r), G] array, each padded above and below by the kernel radius ``r``
    with its own reflection, so that the vertical pass never mixes two images and the result equals a per-image
    blur with ``BORDER_REFLECT_101``; it is about 5 times faster than filtering along each axis of a reshaped
    batch, and avoids a Python loop over images.

    Args:
        images: uint8 [N, G, G].

    Returns:
        float32 [N, G, G].
    """
    n, g, _ = images.shape
    kernel = _gaussian_kernel(g)
    r = kernel.shape[0] // 2
    if n == 0:
        return images.astype(np.float32)
    padded = np.pad(images, ((0, 0), (r, r), (0, 0)), mode="reflect")  # numpy "reflect" is REFLECT_101
    blurred = cv2.sepFilter2D(padded.reshape(n * (g + 2 * r), g), cv2.CV_32F, kernel, kernel)
    return images.astype(np.float32) - blurred.reshape(n, g + 2 * r, g)[:, r : r + g]


def _two_proportion_z(k1: np.ndarray, n1: float, k2: np.ndarray, n2: float) -> np.ndarray:
    """z of the pooled two-proportion test, per element; 0 where the pooled proportion is 0 or 1."""
    pooled = (k1 + k2) / (n1 + n2)
    var = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (k1 / n1 - k2 / n2) / np.sqrt(var)
    return np.where(var > 0, z, 0.0)


class WatermarkStatistics:
    """Pass 1: per-class exceedance counts and pseudo-label nulls, accumulated batch by batch.

    Memory is O(classes × grid²) whatever the number of images.

    Args:
        grid: side of the square grid all images are resized to.
        seed: seed of the pseudo-label splits.
        null_splits: number of random pseudo-label splits that make the null.
        min_area: smallest region: pixels above the threshold after the close (6 at 256 px in the study).
        merge_gap: components of one class whose boxes are at most this many grid pixels apart are one region.
        template_margin: grid pixels added around each region's box for its template.
        grow: a region also takes in the connected pixels with z above ``grow × threshold`` (hysteresis).

    Sizes are in grid pixels and are not rescaled with ``grid`` (they worked unchanged at 128 and 256 px).
    """

    def __init__(
        self,
        grid: int = 256,
        seed: int = 0,
        null_splits: int = 4,
        *,
        min_area: int = 6,
        merge_gap: int = 6,
        template_margin: int = 3,
        grow: float = 0.7,
    ) -> None:
        if grid < 16 or null_splits < 1:
            raise ValueError(f"grid must be >= 16 and null_splits >= 1, got {grid} and {null_splits}")
        self.grid = grid
        self.null_splits = null_splits
        self.min_area = min_area
        self.merge_gap = merge_gap
        self.template_margin = template_margin
        self.grow = grow
        self.tau: float | None = None
        self.n_images = 0
        self._rng = np.random.default_rng(seed)
        pixels = grid * grid
        self._class_count: dict[int, int] = {}
        self._class_exceed: dict[int, np.ndarray] = {}  # float64 [G²] per class
        self._class_hp: dict[int, np.ndarray] = {}  # float64 [G²] per class: sum of hp
        self._split_count = np.zeros(null_splits, np.int64)
        self._split_exceed = np.zeros((null_splits, pixels), np.float64)  # group 1 of each split
        self._total_exceed = np.zeros(pixels, np.float64)

    def add(self, images: np.ndarray, labels: np.ndarray) -> None:
        """Accumulate one batch.

        Args:
            images: uint8 [N, grid, grid], grayscale, already resized to the grid.
            labels: int [N], class indices.
        """
        images = _check_images(images, self.grid)
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ShapeError("labels", f"int [{images.shape[0]}]", f"{labels.dtype} {labels.shape}")
        for start in range(0, images.shape[0], _CHUNK):
            self._add_chunk(images[start : start + _CHUNK], labels[start : start + _CHUNK])

    def _add_chunk(self, images: np.ndarray, labels: np.ndarray) -> None:
        n = images.shape[0]
        if n == 0:
            return
        hp = high_pass(images).reshape(n, -1)
        if self.tau is None:
            sample = hp[:CALIBRATION_IMAGES].ravel()
            sample = sample[:: max(1, sample.size // 2**20)]  # a million values pin the median down
            mad = float(np.median(np.abs(sample - np.median(sample))))
            # 1.4826 × MAD estimates σ for Gaussian noise; the floor keeps quantised flat images from flagging
            # every non-zero residual.
            self.tau = max(TAU_FACTOR * 1.4826 * mad, 1.0)
        exceed = (np.abs(hp) > self.tau).astype(np.float32)
        classes = np.unique(labels)
        # Drawn image-major, so that an image's pseudo-labels do not depend on how the dataset is batched.
        splits = (self._rng.random((n, self.null_splits)) < 0.5).T
        # Every per-group count is one row of a [groups, N] @ [N, G²] product: one BLAS call per chunk.
        design = np.concatenate([labels[None, :] == classes[:, None], splits]).astype(np.float32)
        counts = design @ exceed
        hp_sums = design[: len(classes)] @ hp
        for i, c in enumerate(classes.tolist()):
            if c not in self._class_count:
                self._class_count[c] = 0
                self._class_exceed[c] = np.zeros(self.grid * self.grid, np.float64)
                self._class_hp[c] = np.zeros(self.grid * self.grid, np.float64)
            self._class_count[c] += int(design[i].sum())
            self._class_exceed[c] += counts[i]
            self._class_hp[c] += hp_sums[i]
        self._split_count += splits.sum(axis=1)
        self._split_exceed += counts[len(classes) :]
        self._total_exceed += counts[: len(classes)].sum(axis=0)
        self.n_images += n

    def null_threshold(self) -> float:
        """``NULL_MARGIN ×`` the largest |z| over pixels and pseudo-label splits (inf before any split has 2 groups)."""
        peaks = []
        for s in range(self.null_splits):
            n1 = float(self._split_count[s])
            n2 = float(self.n_images) - n1
            if n1 > 0 and n2 > 0:
                rest = self._total_exceed - self._split_exceed[s]
                peaks.append(float(np.abs(_two_proportion_z(self._split_exceed[s], n1, rest, n2)).max()))
        return NULL_MARGIN * max(peaks) if peaks else math.inf

    def z_maps(self) -> dict[int, np.ndarray]:
        """Per class, float32 [grid, grid] z of its exceedance frequency versus the rest (classes with a rest)."""
        maps = {}
        for c, n1 in self._class_count.items():
            n2 = self.n_images - n1
            if n2 > 0:
                rest = self._total_exceed - self._class_exceed[c]
                z = _two_proportion_z(self._class_exceed[c], float(n1), rest, float(n2))
                maps[c] = z.reshape(self.grid, self.grid).astype(np.float32)
        return maps

    def finish(self) -> WatermarkModel:
        """The regions found so far, as a small picklable :class:`WatermarkModel` (its region list may be empty)."""
        threshold = self.null_threshold()
        regions: list[WatermarkRegion] = []
        g = self.grid
        for c, z in sorted(self.z_maps().items()):
            # One-sided: an overlay adds edges, so it raises the exceedance frequency of the class that carries
            # it; with two classes, the other class's negative z is the same region and is not reported twice.
            seeds = z > threshold
            if not seeds.any():
                continue
            # Hysteresis (as in Canny's edge linking): a region needs min_area pixels above the threshold, and
            # then takes in the connected pixels above grow × threshold, so that the fainter parts of an overlay
            # widen its box instead of being cut off.
            close = np.ones((5, 5), np.uint8)
            strong = cv2.morphologyEx(seeds.astype(np.uint8), cv2.MORPH_CLOSE, close)
            weak = cv2.morphologyEx((z > self.grow * threshold).astype(np.uint8), cv2.MORPH_CLOSE, close) | strong
            count, components, stats, _ = cv2.connectedComponentsWithStats(weak, connectivity=8)
            strong_area = np.bincount(components[strong > 0], minlength=count)
            boxes = [
                (int(x), int(y), int(x + w), int(y + h))
                for (x, y, w, h, _), area in zip(stats[1:count], strong_area[1:count], strict=True)
                if area >= self.min_area
            ]
            n_c = self._class_count[c]
            n_rest = self.n_images - n_c
            diff = (self._class_hp[c] / n_c - (sum(self._class_hp.values()) - self._class_hp[c]) / n_rest).reshape(g, g)
            for x0, y0, x1, y1 in _merge_boxes(boxes, self.merge_gap):
                m = self.template_margin
                tx0, ty0, tx1, ty1 = max(0, x0 - m), max(0, y0 - m), min(g, x1 + m), min(g, y1 + m)
                regions.append(
                    WatermarkRegion(
                        label=int(c),
                        x0=x0,
                        y0=y0,
                        x1=x1,
                        y1=y1,
                        z=float(z[y0:y1, x0:x1].max()),
                        threshold=threshold,
                        template=diff[ty0:ty1, tx0:tx1].astype(np.float32),
                        template_box=(tx0, ty0, tx1, ty1),
                    )
                )
        regions.sort(key=lambda r: -r.z)
        return WatermarkModel(grid=g, tau=float(self.tau or 0.0), threshold=threshold, regions=tuple(regions))


def _merge_boxes(boxes: list[tuple[int, int, int, int]], gap: int) -> list[tuple[int, int, int, int]]:
    """Union boxes that are at most ``gap`` pixels apart, repeatedly, until no two are."""
    boxes = list(boxes)
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if max(a[0], b[0]) - min(a[2], b[2]) <= gap and max(a[1], b[1]) - min(a[3], b[3]) <= gap:
                    boxes[i] = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return boxes


@dataclass(frozen=True)
class WatermarkModel:
    """Pass 2: the regions found in pass 1, and how to find them in each image. Small and picklable.

    Attributes:
        grid: side of the grid the images must be resized to.
        tau: the exceedance threshold used in pass 1 (kept for the record).
        threshold: the z threshold from the pseudo-label null.
        regions: the regions, strongest first (may be empty).
        search: largest shift, in grid pixels at 256 px (scaled with the grid), tried when matching a template.
    """

    grid: int
    tau: float
    threshold: float
    regions: tuple[WatermarkRegion, ...]
    search: int = 12

    @property
    def search_pixels(self) -> int:
        """The search radius on this grid."""
        return max(1, round(self.search * self.grid / 256))

    def match(self, images: np.ndarray) -> WatermarkMatches:
        """Best NCC of each image's hp with each region's template within ``±search`` pixels.

        One OpenCV call per region and batch: the search windows of all images are stacked vertically, and only
        the rows of the result whose template lies inside one window are kept.

        Args:
            images: uint8 [N, grid, grid], resized to the grid like in pass 1.

        Returns:
            Scores float32 [N, R] and offsets int16 [N, R, 2].
        """
        images = _check_images(images, self.grid)
        n, r = images.shape[0], len(self.regions)
        scores = np.zeros((n, r), np.float32)
        offsets = np.zeros((n, r, 2), np.int16)
        if n == 0 or r == 0:
            return WatermarkMatches(scores, offsets)
        s = self.search_pixels
        for start in range(0, n, _CHUNK):
            hp = high_pass(images[start : start + _CHUNK])
            b = hp.shape[0]
            for j, region in enumerate(self.regions):
                tx0, ty0, tx1, ty1 = region.template_box
                th, tw = ty1 - ty0, tx1 - tx0
                windows = _window(hp, tx0 - s, ty0 - s, tx1 + s, ty1 + s)
                wh = th + 2 * s
                ncc = cv2.matchTemplate(windows.reshape(b * wh, tw + 2 * s), region.template, cv2.TM_CCOEFF_NORMED)
                ncc = ncc[np.arange(b)[:, None] * wh + np.arange(2 * s + 1)]  # [b, 2s + 1, 2s + 1]: the valid rows
                flat = np.clip(np.nan_to_num(ncc, nan=0.0), -1.0, 1.0).reshape(b, -1)
                best = flat.argmax(axis=1)
                scores[start : start + b, j] = flat[np.arange(b), best]
                offsets[start : start + b, j, 0] = best % (2 * s + 1) - s
                offsets[start : start + b, j, 1] = best // (2 * s + 1) - s
        return WatermarkMatches(scores, offsets)

    def scores(self, images: np.ndarray) -> np.ndarray:
        """float32 [N, R]: the NCC scores of :meth:`match`."""
        return self.match(images).scores

    def assign(self, scores: np.ndarray) -> list[CarrierFit]:
        """Per region, which images carry it, from a Gaussian mixture on the scores of all images.

        Args:
            scores: float32 [N, R], :attr:`WatermarkMatches.scores` of every image of the dataset.

        Returns:
            One :class:`CarrierFit` per region.
        """
        scores = np.asarray(scores, np.float64)
        if scores.ndim != 2 or scores.shape[1] != len(self.regions):
            raise ShapeError("scores", f"float [N, {len(self.regions)}]", tuple(scores.shape))
        return [fit_carriers(scores[:, j]) for j in range(scores.shape[1])]

    def detections(
        self,
        matches: WatermarkMatches,
        fits: Sequence[CarrierFit],
        original_sizes: np.ndarray | Sequence[tuple[int, int]],
    ) -> list[list[Detection]]:
        """Per image, a ``"watermark"`` detection for each region it carries, in its stored pixel coordinates.

        Args:
            matches: pass-2 results of the N images.
            fits: :meth:`assign` on ``matches.scores`` (or on the scores of a larger set holding these images,
                sliced to them with :func:`slice_fits`).
            original_sizes: int [N, 2], (width, height) of each stored image; the grid box is stretched to it,
                as the audit's resize stretches images to the grid.

        Returns:
            N lists of detections, score = posterior probability of the carrier component.
        """
        sizes = np.asarray(original_sizes, np.int64).reshape(-1, 2)
        n = matches.scores.shape[0]
        if sizes.shape[0] != n:
            raise ShapeError("original_sizes", f"int [{n}, 2] (width, height)", tuple(sizes.shape))
        found: list[list[Detection]] = [[] for _ in range(n)]
        for j, (region, fit) in enumerate(zip(self.regions, fits, strict=True)):
            for i in np.flatnonzero(fit.carriers).tolist():
                dx, dy = (int(v) for v in matches.offsets[i, j])
                width, height = int(sizes[i, 0]), int(sizes[i, 1])
                x0, y0, x1, y1 = (
                    max(0, region.x0 + dx),
                    max(0, region.y0 + dy),
                    min(self.grid, region.x1 + dx),
                    min(self.grid, region.y1 + dy),
                )
                # Width and height scale separately (the resize to the grid does not keep the aspect ratio).
                bx0, _, bx1, _ = scale_box((x0, 0, x1, 0), width / self.grid, width, height)
                _, by0, _, by1 = scale_box((0, y0, 0, y1), height / self.grid, width, height)
                found[i].append(Detection("watermark", bx0, by0, bx1, by1, float(fit.posterior[i]), NAME, VERSION))
        return found

    def locate(
        self, images: np.ndarray, original_sizes: np.ndarray | Sequence[tuple[int, int]]
    ) -> list[list[Detection]]:
        """:meth:`match`, :meth:`assign` and :meth:`detections` in one call, for image sets that fit in memory.

        The mixture is fitted on these images alone; for a streamed dataset, concatenate the batches' matches
        (:meth:`WatermarkMatches.concatenate`), call :meth:`assign` once, then :meth:`detections`.
        """
        matches = self.match(images)
        return self.detections(matches, self.assign(matches.scores), original_sizes)


def _window(hp: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """float32 [N, y1 - y0, x1 - x0] crop of ``hp`` [N, G, G], reflected (not zero-padded: a flat window has no
    defined NCC) where it leaves the grid; contiguous."""
    g = hp.shape[1]
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(g, x1), min(g, y1)
    crop = hp[:, cy0:cy1, cx0:cx1]
    pads = ((0, 0), (cy0 - y0, y1 - cy1), (cx0 - x0, x1 - cx1))
    return np.pad(crop, pads, mode="reflect") if any(p for pair in pads for p in pair) else np.ascontiguousarray(crop)


def slice_fits(fits: Sequence[CarrierFit], index: slice | np.ndarray) -> list[CarrierFit]:
    """The same fits restricted to a subset of images (for example one shard of a dataset-wide fit)."""
    return [
        CarrierFit(f.carriers[index], f.posterior[index], f.components, f.means, f.weights, f.bic, f.separation)
        for f in fits
    ]


def fit_carriers(scores: np.ndarray, iterations: int = 200) -> CarrierFit:
    """Split one region's scores into carriers and non-carriers with a 1-D Gaussian mixture.

    Two components are kept when BIC (Schwarz 1978) prefers them to one and Ashman's D =
    √2·|μ₁ − μ₂| / √(σ₁² + σ₂²) ≥ 2 (Ashman, Bird & Zepf 1994: a clean separation). NCC maxima are right-skewed,
    so BIC alone would split a single skewed hump.

    Args:
        scores: float [N], one region's score for every image.
        iterations: EM iterations (the fit starts from Otsu's split of the scores).

    Returns:
        The :class:`CarrierFit`.
    """
    x = np.asarray(scores, np.float64)
    n = x.size
    none = CarrierFit(np.zeros(n, bool), np.zeros(n, np.float32), 1, (0.0, 0.0), (1.0, 0.0), (0.0, 0.0), 0.0)
    if n < 4 or float(x.std()) < 1e-9:
        return none
    mean1, var1 = float(x.mean()), float(x.var())
    log_like1 = float(np.sum(-0.5 * (np.log(2 * np.pi * var1) + (x - mean1) ** 2 / var1)))
    bic1 = -2 * log_like1 + 2 * math.log(n)

    # Start from Otsu's split of the sorted scores: the between-class variance is largest there.
    order = np.sort(x)
    k = np.arange(1, n)
    cumulative = np.cumsum(order)[:-1]
    between = (cumulative / k - (order.sum() - cumulative) / (n - k)) ** 2 * k * (n - k)
    cut = order[int(np.argmax(between))]
    high = x > cut
    weights = np.array([1 - high.mean(), high.mean()])
    means = np.array([x[~high].mean(), x[high].mean()])
    floor = 1e-6 * var1 + 1e-12  # keeps a component from collapsing onto one value
    variances = np.array([max(x[~high].var(), floor), max(x[high].var(), floor)])
    log_like2 = -math.inf
    for _ in range(iterations):
        log_p = -0.5 * (np.log(2 * np.pi * variances) + (x[:, None] - means) ** 2 / variances) + np.log(weights)
        top = log_p.max(axis=1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(log_p - top).sum(axis=1))
        resp = np.exp(log_p - log_norm[:, None])
        new_log_like = float(log_norm.sum())
        mass = resp.sum(axis=0) + 1e-12
        weights = mass / n
        means = (resp * x[:, None]).sum(axis=0) / mass
        variances = np.maximum((resp * (x[:, None] - means) ** 2).sum(axis=0) / mass, floor)
        if new_log_like - log_like2 < 1e-9 * abs(new_log_like):
            log_like2 = new_log_like
            break
        log_like2 = new_log_like
    bic2 = -2 * log_like2 + 5 * math.log(n)
    hi = int(np.argmax(means))
    lo = 1 - hi
    separation = math.sqrt(2) * abs(means[hi] - means[lo]) / math.sqrt(variances[hi] + variances[lo])
    if bic2 >= bic1 or separation < 2.0 or weights[hi] < 1.0 / n:
        return CarrierFit(
            np.zeros(n, bool),
            np.zeros(n, np.float32),
            1,
            (mean1, mean1),
            (1.0, 0.0),
            (bic1, bic2),
            float(separation),
        )
    log_p = -0.5 * (np.log(2 * np.pi * variances) + (x[:, None] - means) ** 2 / variances) + np.log(weights)
    posterior = np.exp(log_p[:, hi] - np.logaddexp(log_p[:, 0], log_p[:, 1]))
    # Scores above the carrier mean are carriers even where the wider low component's tail wins the posterior.
    carriers = (posterior > 0.5) | (x >= means[hi])
    return CarrierFit(
        carriers,
        posterior.astype(np.float32),
        2,
        (float(means[lo]), float(means[hi])),
        (float(weights[lo]), float(weights[hi])),
        (bic1, bic2),
        float(separation),
    )
