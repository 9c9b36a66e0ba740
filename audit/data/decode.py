"""Reading one file into an image array, with a readable error for anything that is not a whole image."""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from audit.errors import DecodeError

MIN_SIDE = 16
# Above this many pixels PIL raises DecompressionBombError before decoding (a hostile header cannot make us
# allocate gigabytes); 16k × 16k covers any real radiograph.
Image.MAX_IMAGE_PIXELS = 16384 * 16384


def content_hash(data: bytes) -> str:
    """The image's identity: a hash of its bytes, so a renamed copy is the same image and an edited one is not."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Map 16-bit or float pixels to 0..255 with a robust (0.5–99.5 percentile) window."""
    if array.dtype == np.uint8:
        return array
    values = array.astype(np.float32)
    low, high = np.percentile(values, [0.5, 99.5])
    if high <= low:
        high = low + 1.0
    return np.clip((values - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode an encoded image into uint8 pixels.

    Args:
        data: the file's bytes.
        name: used in error messages only.

    Returns:
        uint8 array [H, W] for grayscale images, [H, W, 3] RGB for colour ones (alpha dropped, EXIF rotation
        applied, palette expanded, 16-bit windowed to 8 bits).

    Raises:
        DecodeError: empty, truncated, not an image, too small, or too large.
    """
    if not data:
        raise DecodeError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()  # decodes now, so a truncated file raises here rather than yielding grey rows
                img = ImageOps.exif_transpose(img)
                mode = img.mode
                if mode in ("1", "L", "LA"):
                    array = np.asarray(img.convert("L"))
                elif mode == "P":
                    rgb = np.asarray(img.convert("RGB"))
                    array = rgb[..., 0] if _is_gray(rgb) else rgb
                elif mode.startswith("I") or mode == "F":
                    array = _to_uint8(np.asarray(img))
                else:
                    rgb = np.asarray(img.convert("RGB"))
                    array = rgb[..., 0].copy() if _is_gray(rgb) else rgb
    except UnidentifiedImageError:
        raise DecodeError(f"{name}: not a readable image (unknown or corrupt format, {len(data)} bytes)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"{name}: image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError(f"{name}: could not decode ({exc}); the file is probably truncated or corrupt") from None
    if min(array.shape[:2]) < MIN_SIDE:
        raise DecodeError(
            f"{name}: image is {array.shape[1]}x{array.shape[0]} px; at least {MIN_SIDE} px per side is needed"
        )
    return np.ascontiguousarray(array)


def _is_gray(rgb: np.ndarray) -> bool:
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
