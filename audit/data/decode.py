"""Reading one file into an image array, with a readable error for anything that is not a whole image.

Every format Pillow reads (PNG, JPEG, TIFF, BMP, WebP, GIF; 1/8/16-bit, float, grayscale, RGB, RGBA, palette,
CMYK, LAB, YCbCr) and DICOM (:mod:`audit.data.dicom`) come out as the same thing: uint8 pixels, grayscale
[H, W] or RGB [H, W, 3], EXIF orientation applied, at most ``MAX_SIDE`` pixels on the long side. A hostile file
(a decompression bomb, a header that claims 100,000 × 100,000 pixels, a truncated stream) raises
:class:`DecodeError` with a message for the ``errors`` table, never anything else.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from audit.errors import DecodeError

MIN_SIDE = 16
# Files larger than this are refused before they are read into memory (a multi-gigabyte whole-slide TIFF).
MAX_FILE_BYTES = 2**31
# Files with more pixels than this are refused before their pixels are decoded (decompression-bomb protection:
# a 100-byte header cannot make us allocate gigabytes); 16k × 16k covers any real radiograph or slide thumbnail.
MAX_PIXELS = 16384 * 16384
# Larger images are downscaled (area interpolation) to this long side as they are decoded: detectors and the
# model see at most this much, and the regions' coordinates are those of the downscaled image.
MAX_SIDE = 4096
# Pillow's own guard warns above MAX_IMAGE_PIXELS and raises above twice that; we refuse at the warning.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not an image with grey rows


@dataclass(frozen=True)
class DecodedImage:
    """One decoded file.

    Attributes:
        pixels: uint8 [H, W] (grayscale) or [H, W, 3] (RGB), H and W at most ``MAX_SIDE``.
        original_width, original_height: the file's size in pixels (after EXIF rotation), before downscaling.
        format: the format read from the content, not the file name ("PNG", "JPEG", "DICOM", ...).
        bits: bits per sample in the file (8, 16, 32; DICOM: Bits Stored).
        metadata: DICOM header fields kept as evidence (pixel spacing of the *audited* pixels in mm, Burned In
            Annotation, modality, photometric interpretation); empty for other formats.
    """

    pixels: np.ndarray
    original_width: int
    original_height: int
    format: str
    bits: int
    metadata: dict[str, object] = field(default_factory=dict)

    @property
    def scale(self) -> tuple[float, float]:
        """Audited pixels per file pixel, (x, y): (1.0, 1.0) unless the image was downscaled. The two differ
        slightly, since each side is rounded to whole pixels."""
        return self.pixels.shape[1] / self.original_width, self.pixels.shape[0] / self.original_height


def read_file(path: Path, name: str) -> bytes:
    """The file's bytes, refusing a file larger than ``MAX_FILE_BYTES`` before reading it.

    Raises:
        DecodeError: the file is too large, or there is not enough memory to hold it.
        OSError: the file cannot be read (missing, a folder, no permission).
    """
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DecodeError(
            f"{name}: file is {size:,} bytes; at most {MAX_FILE_BYTES:,} are read (export a smaller image, e.g. a "
            "downscaled level of a whole-slide image)"
        )
    try:
        return path.read_bytes()
    except MemoryError:
        raise DecodeError(f"{name}: not enough memory to read this {size:,}-byte file") from None


def is_dicom(data: bytes) -> bool:
    """Whether ``data`` is a DICOM Part-10 file: 'DICM' right after the 128-byte preamble (PS3.10 7.1). Cheap,
    parses nothing, and needs no pydicom (whose import costs 0.4 s: it is imported only for DICOM files)."""
    return data[128:132] == b"DICM"


def content_hash(data: bytes) -> str:
    """The image's identity: a hash of its bytes, so a renamed copy is the same image and an edited one is not."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Map 16-bit, 32-bit or float pixels to 0..255 with a robust (0.5–99.5 percentile) window."""
    if array.dtype == np.uint8:
        return array
    values = array.astype(np.float32)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, np.uint8)
    low, high = np.percentile(finite, [0.5, 99.5])
    if high <= low:
        high = low + 1.0
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    return np.clip((values - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)


def _bits(mode: str) -> int:
    if mode.startswith("I;16"):
        return 16
    if mode in ("I", "F"):
        return 32
    return 1 if mode == "1" else 8


def _fit(width: int, height: int) -> tuple[int, int]:
    """The size at most ``MAX_SIDE`` on the long side with the same aspect ratio (unchanged when it fits)."""
    factor = MAX_SIDE / max(width, height)
    if factor >= 1.0:
        return width, height
    return max(1, round(width * factor)), max(1, round(height * factor))


def _downscale(pixels: np.ndarray) -> np.ndarray:
    height, width = pixels.shape[:2]
    target = _fit(width, height)
    if target == (width, height):
        return pixels
    return cv2.resize(pixels, target, interpolation=cv2.INTER_AREA)


def _pil_pixels(img: Image.Image) -> np.ndarray:
    """A loaded Pillow image in any mode → uint8 [H, W] or [H, W, 3]."""
    mode = img.mode
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(img.convert("L"))
    if mode.startswith("I") or mode == "F":
        array = np.asarray(img)
        if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and not np.little_endian):
            array = array.astype(array.dtype.newbyteorder("="))
        return _to_uint8(array)
    # P, PA, RGB, RGBA, RGBX, CMYK, YCbCr, LAB, HSV: Pillow converts (Adobe-inverted CMYK JPEGs included).
    rgb = np.asarray(img.convert("RGB"))
    return np.ascontiguousarray(rgb[..., 0]) if _is_gray(rgb) else rgb


def _decode_pil(data: bytes, name: str) -> DecodedImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's other warnings (odd EXIF, palette transparency) are noise
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format or "unknown"  # only the first frame of a GIF or TIFF is read
                width, height = img.size
                if width * height > MAX_PIXELS:  # before decoding, whatever the format's own checks
                    raise DecodeError(_too_large(name, width, height))
                if fmt == "JPEG":
                    # Decode at 1/2, 1/4 or 1/8 scale in the DCT when the image is larger than we keep: less memory.
                    img.draft(img.mode, _fit(width, height))
                img.load()  # decodes now, so a truncated file raises here rather than yielding grey rows
                bits = _bits(img.mode)
                rotated = ImageOps.exif_transpose(img)
                pixels = _pil_pixels(rotated)
                # EXIF orientations 5-8 turn the image by 90°: the file's size, as displayed, has its sides swapped.
                swapped = (rotated.size[0] > rotated.size[1]) != (img.size[0] > img.size[1])
            original_width, original_height = (height, width) if swapped else (width, height)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError(f"{name}: not a readable image (unknown or corrupt format, {len(data)} bytes)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DecodeError(
            f"{name}: image too large: more than {MAX_PIXELS:,} pixels are not read (decompression-bomb protection); "
            "downscale it before the audit"
        ) from None
    except MemoryError:
        raise DecodeError(f"{name}: not enough memory to decode this image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError(f"{name}: could not decode ({exc}); the file is probably truncated or corrupt") from None
    except Exception as exc:  # a hostile file must cost one row in `errors`, never the audit
        raise DecodeError(f"{name}: could not decode ({type(exc).__name__}: {exc})") from None
    return DecodedImage(_downscale(pixels), original_width, original_height, fmt, bits)


def _too_large(name: str, width: int, height: int) -> str:
    return (
        f"{name}: image is {width}x{height} px ({width * height:,} pixels); at most {MAX_PIXELS:,} pixels are "
        "read (decompression-bomb protection); downscale it before the audit"
    )


def read_image(data: bytes, name: str = "<bytes>") -> DecodedImage:
    """Decode an encoded image (any Pillow format, or DICOM by its content) into uint8 pixels and facts.

    Args:
        data: the file's bytes. The format is read from the content, so a PNG named ``.jpg`` is read as PNG.
        name: used in error messages only.

    Returns:
        A :class:`DecodedImage`: pixels uint8 [H, W] or [H, W, 3] (alpha dropped, EXIF rotation applied,
        palette and CMYK converted, 16-bit and float windowed to 8 bits, DICOM windowed and MONOCHROME1
        inverted, downscaled to at most ``MAX_SIDE`` px on the long side).

    Raises:
        DecodeError: empty, truncated, not an image, too small (< ``MIN_SIDE`` px a side), too large
            (> ``MAX_PIXELS``), or a DICOM that cannot be audited (no pixel data, multi-frame, no decoder).
    """
    if not data:
        raise DecodeError(f"{name}: empty file (0 bytes)")
    if is_dicom(data):  # the format is read from the content, not the name
        from audit.data.dicom import decode_dicom  # pydicom only when there is DICOM to read

        try:
            pixels, metadata = decode_dicom(data, name, MAX_PIXELS)
        except DecodeError:
            raise
        except Exception as exc:  # the DICOM module turns its own failures into DecodeError; this is a backstop
            raise DecodeError(f"{name}: could not decode the DICOM file ({type(exc).__name__}: {exc})") from None
        height, width = pixels.shape[:2]
        decoded = DecodedImage(
            _downscale(pixels), width, height, "DICOM", int(metadata.get("bits_stored") or 16), dict(metadata)
        )
        # The spacing of the pixels we audit, to go with the regions' coordinates.
        for key, scale in zip(("pixel_spacing_x_mm", "pixel_spacing_y_mm"), decoded.scale, strict=True):
            if decoded.metadata.get(key) is not None and scale != 1.0:
                decoded.metadata[key] = float(decoded.metadata[key]) / scale
    else:
        decoded = _decode_pil(data, name)
    height, width = decoded.pixels.shape[:2]
    if min(decoded.original_width, decoded.original_height) < MIN_SIDE:
        raise DecodeError(
            f"{name}: image is {decoded.original_width}x{decoded.original_height} px; at least {MIN_SIDE} px per "
            "side is needed"
        )
    if min(height, width) < MIN_SIDE:  # a very long, thin image: its short side after downscaling
        raise DecodeError(
            f"{name}: image is {decoded.original_width}x{decoded.original_height} px; downscaled to {MAX_SIDE} px on "
            f"its long side it would be {width}x{height} px, and at least {MIN_SIDE} px per side is needed"
        )
    if not all(math.isfinite(v) and v > 0 for v in decoded.scale):
        raise DecodeError(f"{name}: could not decode (inconsistent image size)")
    return replace(decoded, pixels=np.ascontiguousarray(decoded.pixels))


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """The pixels of :func:`read_image`: uint8 [H, W] or [H, W, 3]."""
    return read_image(data, name).pixels


def _is_gray(rgb: np.ndarray) -> bool:
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
