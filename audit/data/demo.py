"""The built-in demo dataset: synthetic radiograph-like images with a planted shortcut of known location.

Two classes, ``normal`` (class 0) and ``opacity`` (class 1). Class 1 carries a real but subtle signal, a diffuse
brighter blob in one lung. The planted shortcut is a burned-in word, ``PORTABLE``, present with probability ``R``
in class 1 and ``1 - R`` in class 0 (``R = shortcut_rate``; ``R = 0.5`` means the token says nothing about the
class). This is the setting of DeGrave, Janizek & Lee (Nature Machine Intelligence 2021), where COVID-19 models
read "PORTABLE"-like text and laterality markers instead of the lungs.

Every image also carries, independently of its class, a laterality marker (a single ``L`` or ``R`` near a top
corner, in a small grey box in half of the images), and a quarter of the images carry a black (exactly 0)
padding band along one edge. The ground truth (``ground_truth.csv``) holds the tight ink box of the token and of
the marker (the whole box, outline included, for a boxed marker) and the box of the padding band, in the same form
as ``shared/data/cxr-real/regions.csv``, so the region detectors can be scored on it.

Everything is drawn with numpy and OpenCV, vectorised per image, and is a pure function of ``(seed, index)``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from audit.errors import ConfigError

DEMO_TOKEN = "PORTABLE"
CLASS_NAMES: tuple[str, str] = ("normal", "opacity")
GENERATOR_VERSION = "demo-1"

# Sizes below are given at 256 px and scaled with size / 256.
_MARKER_CAP = (12.0, 16.0)  # cap height of the L/R letter
_TOKEN_CAP = (9.0, 12.0)  # cap height of the token
_TOKEN_BAND = (4.0, 30.0)  # distance of the token from its nearest (content) edge
_MARKER_MARGIN = (4.0, 20.0)  # distance of the marker from the top and side (content) edges
_CLEARANCE = 14.0  # minimum gap between the token and the marker, so the two never read as one text line
_BAND_THICKNESS = (8, 24)  # padding band thickness
_BAND_RATE = 0.25
_BOX_RATE = 0.5
# The hidden shortcut (``square=True``): a bright square, 8% of the side, on the soft tissue below the left lung
# (outside the lungs, where the real signal is) and away from the edges where the text and marker detectors look;
# (x0, y0, x1, y1) as image fractions.
SQUARE_BOX = (0.24, 0.76, 0.32, 0.84)
_SQUARE_LIFT = 70.0
# Air is noisy and never below this value, so that only the padding band (exactly 0) is perfectly flat: real air
# is never a constant, and the border detector must not confuse the two.
_AIR_FLOOR = 4.0


@dataclass(frozen=True)
class DemoRegion:
    """One ground-truth region of a demo image.

    Attributes:
        kind: ``"text"`` (the token), ``"marker"`` (the L/R letter, with its box if any) or ``"border"``.
        x0, y0, x1, y1: pixel box, x1/y1 exclusive.
        note: what the region is, for a person reading the CSV.
    """

    kind: str
    x0: int
    y0: int
    x1: int
    y1: int
    note: str


@dataclass(frozen=True)
class DemoImage:
    """One rendered demo image and its ground truth.

    Attributes:
        image: uint8 [size, size] grayscale image.
        regions: the planted regions (token, marker, padding band), possibly empty.
    """

    image: np.ndarray
    regions: tuple[DemoRegion, ...]


@dataclass(frozen=True)
class DemoInfo:
    """What :func:`write_demo` wrote.

    Attributes:
        root: the output folder; image paths in the CSV files are relative to it.
        manifest: ``root/manifest.csv`` (columns path, label).
        ground_truth: ``root/ground_truth.csv`` (columns path, kind, x0, y0, x1, y1, note).
        meta: ``root/demo.json`` (parameters, token, class names, counts).
        n_images: number of images written.
        counts: images per label.
        token_counts: images carrying the token, per label.
        shortcut_rate: R, the probability of the token in class 1 (and 1 - R in class 0).
        seed: the seed the dataset is a pure function of.
        size: image side in pixels.
        token: the planted word.
        class_names: labels in class-index order.
    """

    root: Path
    manifest: Path
    ground_truth: Path
    meta: Path
    n_images: int
    counts: dict[str, int]
    token_counts: dict[str, int]
    shortcut_rate: float
    seed: int
    size: int
    token: str = DEMO_TOKEN
    class_names: tuple[str, ...] = field(default=CLASS_NAMES)


# ----------------------------------------------------------------------------------------------------------------
# Rendering


@lru_cache(maxsize=4)
def _axes(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised pixel-centre coordinates in [0, 1): x as float32 [1, size], y as float32 [size, 1].

    Kept 1-D so that terms depending on one axis only are computed on ``size`` values, not ``size**2``.
    """
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    return axis[None, :], axis[:, None]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0)))


def _anatomy(rng: np.random.Generator, size: int, opacity: bool) -> np.ndarray:
    """A radiograph-like background without any overlay.

    Returns:
        float32 [size, size], roughly 4..255: a soft-tissue trunk on dark air, darker lung fields, ribs, a spine
        and mediastinum, vignetting, low-frequency mottle and pixel noise; with ``opacity``, a diffuse brighter
        blob inside one lung (the real class-1 signal).
    """
    xx, yy = _axes(size)
    cx, cy = 0.5 + rng.uniform(-0.04, 0.04), 0.6 + rng.uniform(-0.03, 0.03)
    ax, ay = rng.uniform(0.36, 0.44), rng.uniform(0.55, 0.65)
    body_r = np.sqrt(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2)
    body = _sigmoid((1.0 - body_r) / 0.025)
    air, tissue = rng.uniform(20.0, 34.0), rng.uniform(125.0, 150.0)
    img = air + (tissue - air) * body

    # Lungs: two soft ellipses, darker than the soft tissue.
    lungs = np.zeros_like(img)
    lung_geometry = []
    for side in (-1.0, 1.0):
        lx, ly = cx + side * rng.uniform(0.15, 0.18), cy - rng.uniform(0.12, 0.16)
        lax, lay = rng.uniform(0.11, 0.135), rng.uniform(0.2, 0.24)
        r = np.sqrt(((xx - lx) / lax) ** 2 + ((yy - ly) / lay) ** 2)
        lungs = np.maximum(lungs, _sigmoid((1.0 - r) / 0.08))
        lung_geometry.append((lx, ly, lax, lay))
    img -= rng.uniform(45.0, 65.0) * lungs

    # Ribs: curved bands that droop laterally, faint (contrast well below any burned-in overlay).
    curvature, period = rng.uniform(1.2, 2.0), rng.uniform(0.06, 0.075)
    phase = (yy - curvature * (xx - cx) ** 2) / period + rng.uniform(0, 1)
    ribs = 0.5 + 0.5 * np.cos(2 * np.pi * phase)
    ribs = ribs * ribs * ribs  # sharpen the bands (x**3 is several times slower in numpy)
    img += rng.uniform(12.0, 20.0) * ribs * body * (0.3 + 0.7 * lungs)

    # Spine / mediastinum and heart: broad brighter structures in the middle.
    spine = np.exp(-(((xx - cx) / rng.uniform(0.03, 0.04)) ** 2))  # [1, size]
    vertebrae = 0.85 + 0.15 * np.cos(2 * np.pi * yy / rng.uniform(0.05, 0.06))  # [size, 1]
    img += rng.uniform(25.0, 40.0) * (spine * vertebrae) * body
    hx, hy = cx + rng.uniform(0.02, 0.07), cy + rng.uniform(0.02, 0.08)
    heart = np.exp(-(((xx - hx) / 0.11) ** 2)) * np.exp(-(((yy - hy) / 0.09) ** 2))  # separable Gaussian
    img += rng.uniform(20.0, 35.0) * heart * body

    if opacity:
        # A diffuse opacity inside one lung: learnable, but weaker than the token.
        lx, ly, lax, lay = lung_geometry[int(rng.integers(2))]
        angle, radius = rng.uniform(0, 2 * np.pi), 0.55 * np.sqrt(rng.uniform(0, 1))
        ox, oy = lx + radius * lax * np.cos(angle), ly + radius * lay * np.sin(angle)
        sigma = rng.uniform(0.05, 0.075)
        blob = np.exp(-((xx - ox) ** 2) / (2 * sigma**2)) * np.exp(-((yy - oy) ** 2) / (2 * sigma**2))
        img += rng.uniform(35.0, 50.0) * blob * lungs

    # Vignetting, low-frequency mottle and pixel noise (air included, so that no natural region is flat).
    img *= 1.0 - 0.3 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    coarse = rng.standard_normal((max(4, size // 16),) * 2, dtype=np.float32)
    img += 3.0 * cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    # Triangular pixel noise (sum of two uniforms): looks Gaussian, and costs a fifth of standard_normal.
    noise = rng.random((size, size), dtype=np.float32) + rng.random((size, size), dtype=np.float32) - 1.0
    img += rng.uniform(3.5, 5.0) * np.sqrt(6.0) * noise  # std of the triangular noise is 1/sqrt(6)
    return np.clip(img, _AIR_FLOOR, 255.0)


@lru_cache(maxsize=64)
def _ink(text: str, font: int, scale: float, thickness: int) -> np.ndarray:
    """Antialiased ink of ``text``, cropped to its tight box: uint8 [h, w], 0 = no ink, 255 = full ink."""
    (width, height), baseline = cv2.getTextSize(text, font, scale, thickness)
    pad = 4 + thickness
    canvas = np.zeros((height + baseline + 2 * pad, width + 2 * pad), np.uint8)
    cv2.putText(canvas, text, (pad, pad + height), font, scale, 255, thickness, cv2.LINE_AA)
    ys, xs = np.nonzero(canvas)
    return canvas[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].copy()


@lru_cache(maxsize=16)
def _cap_height(text: str, font: int, thickness: int) -> float:
    """Ink height of ``text`` at font scale 1 (for scaling to a wanted cap height)."""
    return float(_ink(text, font, 1.0, thickness).shape[0])


def _scaled_ink(text: str, font: int, cap: float, thickness: int) -> np.ndarray:
    scale = round(cap / _cap_height(text, font, thickness), 3)  # rounded so the ink cache gets hits
    return _ink(text, font, scale, thickness)


def _composite(img: np.ndarray, ink: np.ndarray, x: int, y: int, value: float) -> None:
    """Burn ``ink`` (alpha, uint8 [h, w]) into ``img`` at top-left (x, y) with grey level ``value``, in place."""
    h, w = ink.shape
    alpha = ink.astype(np.float32) / 255.0
    region = img[y : y + h, x : x + w]
    region *= 1.0 - alpha
    region += alpha * value


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: float) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def render_demo_image(
    rng: np.random.Generator | int,
    size: int = 256,
    *,
    opacity: bool = False,
    token: bool = False,
    marker: bool = True,
    border: bool = False,
    square: bool = False,
) -> DemoImage:
    """Render one demo image with the overlays asked for.

    With ``token=False, marker=False, border=False`` this is the bare radiograph-like background, a negative for
    every region detector.

    Args:
        rng: a numpy Generator, or an int seed.
        size: image side in pixels (>= 64); all sizes scale with ``size / 256``.
        opacity: add the class-1 lung opacity.
        token: burn in the word ``PORTABLE`` near an edge.
        marker: burn in an L/R laterality marker near a top corner.
        border: set a padding band along one random edge to exactly 0.
        square: add the hidden shortcut, a small bright square at a fixed off-centre position
            (:data:`SQUARE_BOX`), which no region detector looks for.

    Returns:
        The uint8 [size, size] image and its ground-truth regions (token first, then marker, then border).
    """
    if size < 64:
        raise ConfigError(f"demo image size must be >= 64 px, got {size}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    s = size / 256.0
    img = _anatomy(rng, size, opacity)
    regions: list[DemoRegion] = []

    # The content rectangle is the image minus the padding band; overlays are placed relative to it, so that they
    # never fall inside the band.
    cx0, cy0, cx1, cy1 = 0, 0, size, size
    band: DemoRegion | None = None
    if border:
        side = ("top", "bottom", "left", "right")[int(rng.integers(4))]
        thick = max(4, round(int(rng.integers(_BAND_THICKNESS[0], _BAND_THICKNESS[1] + 1)) * s))
        box = {
            "top": (0, 0, size, thick),
            "bottom": (0, size - thick, size, size),
            "left": (0, 0, thick, size),
            "right": (size - thick, 0, size, size),
        }[side]
        cx0, cy0 = (thick if side == "left" else 0), (thick if side == "top" else 0)
        cx1, cy1 = (size - thick if side == "right" else size), (size - thick if side == "bottom" else size)
        band = DemoRegion("border", *box, note=f"black padding band {side} edge ({thick} px)")

    marker_box: tuple[int, int, int, int] | None = None
    if marker:
        letter = "LR"[int(rng.integers(2))]
        font = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX)[int(rng.integers(2))]
        thickness = max(1, round(2 * s))
        ink = _scaled_ink(letter, font, rng.uniform(*_MARKER_CAP) * s, thickness)
        ih, iw = ink.shape
        boxed = rng.random() < _BOX_RATE
        pad = round(rng.uniform(3.0, 5.0) * s) if boxed else 0
        outline = max(1, round(s)) if boxed else 0
        mw, mh = iw + 2 * (pad + outline), ih + 2 * (pad + outline)
        mx_margin, my_margin = (round(rng.uniform(*_MARKER_MARGIN) * s) for _ in range(2))
        right = rng.random() < 0.5
        mx = cx1 - mx_margin - mw if right else cx0 + mx_margin
        my = cy0 + my_margin
        if boxed:
            fill = rng.uniform(90.0, 150.0)
            img[my : my + mh, mx : mx + mw] = min(255.0, fill + rng.uniform(40.0, 70.0))  # the outline
            img[my + outline : my + mh - outline, mx + outline : mx + mw - outline] = fill
        _composite(img, ink, mx + outline + pad, my + outline + pad, rng.uniform(230.0, 255.0))
        marker_box = (mx, my, mx + mw, my + mh)
        note = f"{letter} in grey box" if boxed else f"{letter} (white letter, no box)"
        marker_region = DemoRegion("marker", *marker_box, note=note)

    if token:
        font = cv2.FONT_HERSHEY_SIMPLEX
        thickness = max(1, round(int(rng.integers(1, 3)) * s))
        ink = _scaled_ink(DEMO_TOKEN, font, rng.uniform(*_TOKEN_CAP) * s, thickness)
        th, tw = ink.shape
        lo, hi = (round(v * s) for v in _TOKEN_BAND)
        edge_margin = round(4 * s)
        for _attempt in range(100):
            side = ("top", "bottom", "left", "right")[int(rng.integers(4))]
            depth = int(rng.integers(lo, hi + 1))
            if side in ("top", "bottom"):
                tx = int(rng.integers(cx0 + edge_margin, cx1 - edge_margin - tw + 1))
                ty = cy0 + depth if side == "top" else cy1 - depth - th
            else:
                ty = int(rng.integers(cy0 + edge_margin, cy1 - edge_margin - th + 1))
                tx = cx0 + depth if side == "left" else cx1 - depth - tw
            candidate = (tx, ty, tx + tw, ty + th)
            if marker_box is None or not _overlaps(candidate, marker_box, _CLEARANCE * s):
                break
        else:  # pragma: no cover - the marker occupies one corner; 100 draws never all hit it
            raise RuntimeError("could not place the demo token away from the marker")
        _composite(img, ink, tx, ty, rng.uniform(220.0, 255.0))
        regions.append(DemoRegion("text", *candidate, note=f"{DEMO_TOKEN} token {side} edge"))

    if square:
        x0, y0, x1, y1 = (round(v * size) for v in SQUARE_BOX)
        img[y0:y1, x0:x1] = np.minimum(255.0, img[y0:y1, x0:x1] + _SQUARE_LIFT)
        regions.append(DemoRegion("square", x0, y0, x1, y1, note="hidden shortcut: bright square (no detector kind)"))
    if marker:
        regions.append(marker_region)
    if band is not None:
        img[band.y0 : band.y1, band.x0 : band.x1] = 0.0
        regions.append(band)
    return DemoImage(np.clip(np.rint(img), 0, 255).astype(np.uint8), tuple(regions))


# ----------------------------------------------------------------------------------------------------------------
# The dataset


def _validate(n: int, shortcut_rate: float, size: int) -> None:
    if not isinstance(n, int | np.integer) or n < 4:
        raise ConfigError(f"demo n must be an integer >= 4 (at least two images per class), got {n!r}")
    if not isinstance(shortcut_rate, int | float | np.number) or not 0.0 <= float(shortcut_rate) <= 1.0:
        raise ConfigError(
            f"demo shortcut_rate must be in [0, 1] (0.5 = token independent of the class), got {shortcut_rate!r}"
        )
    if not isinstance(size, int | np.integer) or size < 64:
        raise ConfigError(f"demo size must be an integer >= 64 px, got {size!r}")


def write_demo(
    out: Path, n: int = 600, shortcut_rate: float = 0.9, seed: int = 0, size: int = 256, square_rate: float = 0.0
) -> DemoInfo:
    """Write the demo dataset: class subfolders of PNGs, a manifest, the ground truth and a JSON description.

    Images ``0 .. n//2 - 1`` are ``normal``, the rest ``opacity``; image ``i`` is ``out/<label>/<label>_<i:05d>.png``
    and depends only on ``(seed, i)`` and the parameters.

    Args:
        out: output folder (created if missing; files of the same names are overwritten).
        n: number of images, >= 4; ``n // 2`` normal and ``n - n // 2`` opacity.
        shortcut_rate: R in [0, 1]: the token is present with probability R in class 1 and 1 - R in class 0.
        seed: random seed.
        size: image side in pixels, >= 64.
        square_rate: probability of the hidden shortcut (a bright square at a fixed off-centre position that no
            detector knows) in class 1; never in class 0. 0 leaves the default dataset unchanged.

    Returns:
        The paths written and the counts.

    Raises:
        ConfigError: an argument is out of range.
    """
    _validate(n, shortcut_rate, size)
    if not 0.0 <= float(square_rate) <= 1.0:
        raise ConfigError(f"demo square_rate must be in [0, 1], got {square_rate!r}")
    out = Path(out)
    n_normal = n // 2
    for label in CLASS_NAMES:
        (out / label).mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(CLASS_NAMES, 0)
    token_counts = dict.fromkeys(CLASS_NAMES, 0)
    manifest_rows: list[tuple[str, str]] = []
    truth_rows: list[tuple[str, str, object, object, object, object, str]] = []
    for index in range(n):
        class_index = 0 if index < n_normal else 1
        label = CLASS_NAMES[class_index]
        rng = np.random.default_rng([seed, index])
        p_token = shortcut_rate if class_index == 1 else 1.0 - shortcut_rate
        has_token = bool(rng.random() < p_token)
        has_border = bool(rng.random() < _BAND_RATE)
        # From a stream of its own, so that every image is the one of the dataset without the square, plus the square.
        has_square = class_index == 1 and bool(np.random.default_rng([seed, index, 1]).random() < square_rate)
        demo = render_demo_image(
            rng, size, opacity=class_index == 1, token=has_token, border=has_border, square=has_square
        )
        rel = f"{label}/{label}_{index:05d}.png"
        if not cv2.imwrite(str(out / rel), demo.image):
            raise OSError(f"could not write {out / rel}")
        counts[label] += 1
        token_counts[label] += has_token
        manifest_rows.append((rel, label))
        for r in demo.regions:
            truth_rows.append((rel, r.kind, r.x0, r.y0, r.x1, r.y1, r.note))
        if not demo.regions:
            truth_rows.append((rel, "none", "", "", "", "", "no planted region"))

    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("path", "label"))
        writer.writerows(manifest_rows)
    ground_truth = out / "ground_truth.csv"
    with ground_truth.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("path", "kind", "x0", "y0", "x1", "y1", "note"))
        writer.writerows(truth_rows)
    meta = out / "demo.json"
    meta.write_text(
        json.dumps(
            {
                "generator": GENERATOR_VERSION,
                "parameters": {
                    "n": n,
                    "shortcut_rate": float(shortcut_rate),
                    "seed": seed,
                    "size": size,
                    "square_rate": float(square_rate),
                },
                "token": DEMO_TOKEN,
                "class_names": list(CLASS_NAMES),
                "counts": counts,
                "token_counts": token_counts,
                "region_counts": {
                    kind: sum(1 for row in truth_rows if row[1] == kind)
                    for kind in ("text", "marker", "border", "square")
                },
            },
            indent=2,
        )
    )
    return DemoInfo(
        root=out,
        manifest=manifest,
        ground_truth=ground_truth,
        meta=meta,
        n_images=n,
        counts=counts,
        token_counts=token_counts,
        shortcut_rate=float(shortcut_rate),
        seed=seed,
        size=size,
    )
