"""Figures for the report, drawn with numpy and OpenCV and returned as PNG bytes.

Pure functions: arrays in, PNG bytes (or a data URI) out. Images are kept at their display size (at most
:data:`MAX_SIDE` px on the longer side) so that the self-contained HTML page stays small.

The heatmaps use viridis, a perceptually uniform colormap that stays readable for colour-blind readers and in
gray print; region boxes use colours from the Okabe-Ito palette, chosen to stand out against viridis.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import cv2
import numpy as np

from audit.errors import ShapeError

# Longest side of any figure in the page, in pixels.
MAX_SIDE = 256
JPEG_QUALITY = 85
# Saliency maps are often tiny (7x7 for a CAM); without an image to match they are scaled up to this longest side.
DEFAULT_MAP_SIDE = 192
COLORMAP = cv2.COLORMAP_VIRIDIS
# Box colour per region kind (hex, for the HTML legend); Okabe-Ito colours with no counterpart in viridis.
BOX_COLOURS: dict[str, str] = {
    "text": "#D55E00",  # vermillion
    "marker": "#56B4E9",  # sky blue
    "border": "#CC79A7",  # reddish purple
}
OTHER_BOX_COLOUR = "#FFFFFF"


def box_colour(kind: str) -> str:
    """The hex colour used for boxes of region ``kind`` (white for kinds without their own colour)."""
    return BOX_COLOURS.get(kind, OTHER_BOX_COLOUR)


def _bgr(hex_colour: str) -> tuple[int, int, int]:
    value = hex_colour.lstrip("#")
    red, green, blue = (int(value[i : i + 2], 16) for i in (0, 2, 4))
    return blue, green, red


def fit_shape(height: int, width: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """The shape ``(height, width)`` scaled down, keeping the aspect ratio, so the longer side is <= ``max_side``."""
    scale = min(1.0, max_side / max(height, width, 1))
    return max(1, round(height * scale)), max(1, round(width * scale))


def clean_saliency(saliency: np.ndarray) -> np.ndarray:
    """Saliency as float32 [h, w] with NaN, infinities and negative values set to 0.

    Args:
        saliency: [h, w] (or [1, h, w] / [h, w, 1]) of any real dtype.

    Returns:
        float32 [h, w], >= 0.

    Raises:
        ShapeError: the map is not two-dimensional (after dropping a singleton axis) or is empty.
    """
    array = np.asarray(saliency)
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:-1])
    if array.ndim != 2 or array.size == 0:
        raise ShapeError("saliency", "[h, w] with h, w >= 1", tuple(array.shape))
    array = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    # The report speaks of positive saliency only (mass fraction is the share of positive saliency).
    return np.maximum(array, 0.0)


def normalise(saliency: np.ndarray) -> np.ndarray:
    """Scale a cleaned map to [0, 1] by its maximum; an all-zero map stays zero (no division by zero).

    Args:
        saliency: [h, w], any real dtype; NaN and negative values count as 0.

    Returns:
        float32 [h, w] in [0, 1].
    """
    array = clean_saliency(saliency)
    peak = float(array.max())
    return array / peak if peak > 0.0 else np.zeros_like(array)


def to_bgr(image: np.ndarray) -> np.ndarray:
    """An image as uint8 BGR [H, W, 3], the layout OpenCV draws and encodes.

    Args:
        image: gray [H, W] or [H, W, 1], or RGB [H, W, 3]; uint8, or float/int values clipped to [0, 255].

    Raises:
        ShapeError: the image is not gray or RGB, or is empty.
    """
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)) or array.size == 0:
        raise ShapeError("image", "uint8 [H, W] (gray) or [H, W, 3] (RGB)", tuple(array.shape))
    if array.dtype != np.uint8:
        array = np.clip(np.nan_to_num(array.astype(np.float32)), 0, 255).round().astype(np.uint8)
    if array.ndim == 2:
        return cv2.cvtColor(array, cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(array, cv2.COLOR_RGB2BGR)


def encode_png(image_bgr: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W] or [H, W, 3] (BGR) array."""
    # OpenCV's default PNG compression level is 1 (fast); 9 keeps the self-contained page small.
    ok, buffer = cv2.imencode(".png", image_bgr, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:  # cv2 reports failure by a flag, not an exception
        raise ShapeError("png image", "uint8 [H, W] or [H, W, 3]", (image_bgr.dtype, tuple(image_bgr.shape)))
    return buffer.tobytes()


def encode_jpeg(image_bgr: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of a uint8 [H, W] or [H, W, 3] (BGR) array: for photographs and overlays, a fifth of a PNG's size."""
    ok, buffer = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ShapeError("jpeg image", "uint8 [H, W] or [H, W, 3]", (image_bgr.dtype, tuple(image_bgr.shape)))
    return buffer.tobytes()


def to_data_uri(data: bytes) -> str:
    """A ``data:image/png;base64,...`` (or ``image/jpeg``, told by the bytes) URI, to embed in an ``<img src>``."""
    mime = "image/jpeg" if data[:3] == b"\xff\xd8\xff" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def colour_map(saliency: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The normalised saliency resized to ``shape`` and coloured with viridis.

    Args:
        saliency: [h, w], any size; NaN and negative values count as 0.
        shape: output ``(height, width)``.

    Returns:
        (uint8 BGR [height, width, 3], float32 [height, width] normalised map in [0, 1]).
    """
    height, width = shape
    resized = cv2.resize(normalise(saliency), (width, height), interpolation=cv2.INTER_LINEAR)
    resized = np.clip(resized, 0.0, 1.0)  # linear interpolation cannot overshoot, but rounding can
    coloured = cv2.applyColorMap((resized * 255.0).round().astype(np.uint8), COLORMAP)
    return coloured, resized


def heatmap_png(saliency: np.ndarray, shape: tuple[int, int] | None = None) -> bytes:
    """A saliency map as a viridis PNG, normalised to its maximum for display.

    Args:
        saliency: float [h, w], any size; NaN counts as 0; an all-zero map gives a uniform image.
        shape: output ``(height, width)``; by default the map's shape scaled so its longer side is
            :data:`DEFAULT_MAP_SIDE`. Either way the longer side is capped at :data:`MAX_SIDE`.

    Returns:
        PNG bytes of a BGR image [height, width, 3].
    """
    cleaned = clean_saliency(saliency)
    if shape is None:
        height, width = cleaned.shape
        scale = DEFAULT_MAP_SIDE / max(height, width)
        shape = (max(1, round(height * scale)), max(1, round(width * scale)))
    coloured, _ = colour_map(cleaned, fit_shape(*shape))
    return encode_png(coloured)


def image_png(image: np.ndarray) -> bytes:
    """An image as PNG, downsized (area interpolation) to at most :data:`MAX_SIDE` px on the longer side.

    Args:
        image: gray [H, W] or RGB [H, W, 3].

    Returns:
        PNG bytes of a gray image [h, w] (for a gray input: a third of the bytes) or a BGR image [h, w, 3], with
        ``(h, w) = fit_shape(H, W)``.
    """
    bgr = to_bgr(image)
    height, width = fit_shape(*bgr.shape[:2])
    if (height, width) != bgr.shape[:2]:
        bgr = cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA)
    is_gray = bool((bgr[:, :, 0] == bgr[:, :, 1]).all() and (bgr[:, :, 1] == bgr[:, :, 2]).all())
    return encode_png(bgr[:, :, 0] if is_gray else bgr)


def overlay_png(
    image: np.ndarray,
    saliency: np.ndarray,
    boxes: Sequence[tuple[str, int, int, int, int]] = (),
    alpha: float = 0.7,
) -> bytes:
    """The image with its saliency overlaid and region boxes drawn, as PNG.

    The heatmap is blended with a per-pixel weight of ``alpha * normalised saliency``, so that pixels without
    attention show the image unchanged and the attended ones take the viridis colour.

    Args:
        image: uint8 gray [H, W] or RGB [H, W, 3]; downsized to at most :data:`MAX_SIDE` px if larger.
        saliency: float [h, w], any size, resized (bilinear) to the image; NaN counts as 0.
        boxes: ``(kind, x0, y0, x1, y1)`` in ``image`` pixel coordinates, x1/y1 exclusive; clipped to the image.
        alpha: weight of the heatmap where saliency is at its maximum, in [0, 1].

    Returns:
        PNG bytes of a BGR image [h, w, 3] with ``(h, w) = fit_shape(H, W)``.
    """
    return encode_png(_overlay(image, saliency, boxes, alpha))


def overlay_jpeg(
    image: np.ndarray,
    saliency: np.ndarray,
    boxes: Sequence[tuple[str, int, int, int, int]] = (),
    alpha: float = 0.7,
) -> bytes:
    """:func:`overlay_png` as JPEG (the gallery's many images stay within the report's size budget)."""
    return encode_jpeg(_overlay(image, saliency, boxes, alpha))


def boxed_jpeg(image: np.ndarray, boxes: Sequence[tuple[str, int, int, int, int]] = ()) -> bytes:
    """The image as it is, with its region boxes drawn, as JPEG of BGR [h, w, 3], ``(h, w) = fit_shape(H, W)``."""
    return encode_jpeg(_overlay(image, np.zeros((1, 1), np.float32), boxes, 0.0))


def _overlay(
    image: np.ndarray, saliency: np.ndarray, boxes: Sequence[tuple[str, int, int, int, int]], alpha: float
) -> np.ndarray:
    bgr = to_bgr(image)
    source_height, source_width = bgr.shape[:2]
    height, width = fit_shape(source_height, source_width)
    if (height, width) != (source_height, source_width):
        bgr = cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA)
    coloured, weight = colour_map(saliency, (height, width))
    weight = (float(np.clip(alpha, 0.0, 1.0)) * weight)[:, :, None]
    blended = (bgr.astype(np.float32) * (1.0 - weight) + coloured.astype(np.float32) * weight).round()
    canvas = np.ascontiguousarray(blended.astype(np.uint8))

    scale_x, scale_y = width / source_width, height / source_height
    thickness = 1 if max(height, width) < 160 else 2
    for kind, x0, y0, x1, y1 in boxes:
        left = int(np.clip(round(x0 * scale_x), 0, width - 1))
        top = int(np.clip(round(y0 * scale_y), 0, height - 1))
        # x1/y1 are exclusive; cv2.rectangle's corners are inclusive.
        right = int(np.clip(round(x1 * scale_x) - 1, left, width - 1))
        bottom = int(np.clip(round(y1 * scale_y) - 1, top, height - 1))
        cv2.rectangle(canvas, (left, top), (right, bottom), _bgr(box_colour(kind)), thickness)
    return canvas


def colourbar_png(width: int = 192, height: int = 12) -> bytes:
    """A horizontal viridis colour bar, low on the left, high on the right: PNG of BGR [height, width, 3]."""
    ramp = np.tile(np.linspace(0, 255, width).round().astype(np.uint8), (height, 1))
    return encode_png(cv2.applyColorMap(ramp, COLORMAP))
