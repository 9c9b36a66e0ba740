"""Reading one DICOM file into a display-ready uint8 image, with the few header fields the audit may use.

The pixels go through the DICOM grayscale pipeline (PS3.4 N.2): stored values → Modality LUT or rescale → VOI LUT
or window → display, so that the image the audit sees is the one a radiologist's viewer would show. MONOCHROME1
images are inverted so that, in every image, a bright pixel means dense tissue.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, as_pixel_options, get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from audit.data.decode import is_dicom
from audit.errors import DecodeError

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})

# PS3.10 7.1: a Part-10 file starts with a 128-byte preamble, then the magic 'DICM'.
_PREAMBLE_LENGTH = 128
_MAGIC = b"DICM"
_DEFLATED_UID = b"1.2.840.10008.1.2.1.99"
# A deflated data set is inflated whole by pydicom before any header can be read, so its inflated size is
# bounded first: the largest image allowed (8 bytes a pixel covers 3 × 16-bit samples) plus room for the header.
_INFLATE_BYTES_PER_PIXEL = 8
_INFLATE_HEADER_ROOM = 16 * 2**20
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# JPEG start-of-frame markers (T.81 B.1.1.3: C0–CF except DHT C4, JPG C8, DAC CC) and JPEG-LS SOF55 (T.87).
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_JPEG_STANDALONE_MARKERS = frozenset(range(0xD0, 0xDA)) | {0x01}


def decode_dicom(data: bytes, name: str, max_pixels: int) -> tuple[np.ndarray, dict[str, object]]:
    """Decode a single-frame DICOM image into display-ready uint8 pixels.

    Grayscale images get the Modality LUT or rescale, then the VOI LUT or the first window in the header (or, when
    there is neither, a 0.5–99.5 percentile window; 8-bit data without either is kept as stored), then MONOCHROME1
    is inverted so that bone is white and lungs are dark. Colour images (RGB, YBR_*, PALETTE COLOR) are converted
    to RGB; 16-bit colour gets the percentile window.

    Args:
        data: the file's bytes (a Part-10 file, or a raw data set without the preamble).
        name: used in error messages only.
        max_pixels: largest Rows × Columns accepted, checked from the header before any pixel is decoded.

    Returns:
        ``(pixels, metadata)``: pixels are uint8 [H, W] for grayscale, [H, W, 3] RGB for colour. metadata has
        exactly the keys ``format`` ("DICOM"), ``bits_stored``, ``photometric`` (as in the header), ``modality``,
        ``pixel_spacing_y_mm``, ``pixel_spacing_x_mm`` and ``burned_in_annotation``; no patient identifiers,
        because it is stored in tables that users share.

    Raises:
        DecodeError: for anything that is not a whole single-frame image this module can decode; any exception of
            pydicom or of its decoders is turned into one.
    """
    if not data:
        raise DecodeError(f"{name}: empty file (0 bytes)")
    try:
        # pydicom warns about every oddity of a header; what matters reaches the user as the result or the error.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = _read_dataset(data, name, max_pixels)
            metadata = _metadata(dataset)
            stored, photometric = _decode_pixels(dataset, name, max_pixels)
            pixels = _to_display(stored, photometric, dataset, name)
    except DecodeError:
        raise
    except MemoryError:
        raise DecodeError(
            f"{name}: not enough memory to decode this DICOM image; lower the pixel limit or free memory"
        ) from None
    except Exception as exc:  # a hostile file must surface as a DecodeError, never as pydicom's exception
        raise DecodeError(f"{name}: could not decode the DICOM file ({_brief(exc)}); it is probably corrupt") from None
    return np.ascontiguousarray(pixels), metadata


def _read_dataset(data: bytes, name: str, max_pixels: int) -> Dataset:
    part10 = is_dicom(data)
    if part10:
        _check_inflated_size(data, name, max_pixels)
    try:
        # Without the preamble pydicom can still read a raw data set (force=True); the Pixel Data check below
        # tells such a file from arbitrary bytes.
        dataset = pydicom.dcmread(io.BytesIO(data), force=not part10)
    except Exception as exc:
        if part10:
            raise DecodeError(
                f"{name}: the DICOM header could not be parsed ({_brief(exc)}); the file is probably truncated or "
                "corrupt, export it again from the archive"
            ) from None
        raise DecodeError(_not_dicom_message(name, data)) from None
    if "PixelData" not in dataset:
        if not part10:
            raise DecodeError(_not_dicom_message(name, data))
        try:
            sop_class = _uid_name(dataset.get("SOPClassUID") or dataset.file_meta.get("MediaStorageSOPClassUID"))
        except Exception:  # an element with a corrupt VR raises when read
            sop_class = "unknown"
        # pydicom drops an element cut short by the end of the file (with a warning), so a truncated image reads
        # as a data set without Pixel Data, often with no elements at all: tell it from a non-image object.
        if len(dataset) == 0 or "Rows" in dataset or "Image Storage" in sop_class:
            raise DecodeError(
                f"{name}: the DICOM file ends before its Pixel Data (7FE0,0010) although it is an image (SOP class "
                f"'{sop_class}'); the file is truncated, copy or export it again from the archive"
            )
        raise DecodeError(
            f"{name}: the DICOM file has no Pixel Data (7FE0,0010), so it is not an image (SOP class "
            f"'{sop_class}'; e.g. a structured report or presentation state); remove non-image "
            "DICOM objects from the dataset, or export the image they refer to"
        )
    if not dataset.file_meta.get("TransferSyntaxUID"):
        # A raw data set has no file meta; the encoding pydicom detected is the transfer syntax.
        implicit_vr, little_endian = dataset.original_encoding
        dataset.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian if little_endian else ExplicitVRBigEndian
        )
    return dataset


def _uid_name(value: object) -> str:
    """A UID's name for a message; a malformed one is not echoed, as in a corrupt header it may hold other fields."""
    uid = UID(str(value or ""))
    if not uid:
        return "unknown"
    return uid.name if uid.is_valid else "malformed UID"


def _not_dicom_message(name: str, data: bytes) -> str:
    return (
        f"{name}: not a DICOM image (no 'DICM' marker at byte {_PREAMBLE_LENGTH}, and no Pixel Data when read as a "
        f"raw DICOM data set; {len(data)} bytes); give DICOM files as Part-10 files (.dcm)"
    )


def _check_inflated_size(data: bytes, name: str, max_pixels: int) -> None:
    """Refuse a Deflated Explicit VR Little Endian file that would inflate beyond what ``max_pixels`` allows.

    pydicom inflates the whole data set before reading Rows and Columns, so without this a few kilobytes could
    allocate gigabytes (a zip bomb). The deflate stream starts after the file meta group, whose length is the
    first element after 'DICM': (0002,0000) UL.
    """
    meta_start = _PREAMBLE_LENGTH + len(_MAGIC)
    if data[meta_start : meta_start + 6] != b"\x02\x00\x00\x00UL":
        # Without a group length the meta group's end is unknown: look for the UID anywhere before refusing.
        if _DEFLATED_UID in data:
            raise DecodeError(
                f"{name}: deflated DICOM file without a File Meta Information Group Length (0002,0000), so its "
                "inflated size cannot be bounded; convert it to an uncompressed transfer syntax"
            )
        return
    (group_length,) = struct.unpack_from("<I", data, meta_start + 8)
    body = meta_start + 12 + group_length
    if _DEFLATED_UID not in data[meta_start:body]:  # the whole meta group, however it is padded
        return
    limit = max_pixels * _INFLATE_BYTES_PER_PIXEL + _INFLATE_HEADER_ROOM
    # Inflate in 1 MiB pieces, counting and discarding them: measuring must not cost the memory it guards against.
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size, pending = 0, data[body:]
    try:
        while pending and not inflater.eof:
            size += len(inflater.decompress(pending, 1 << 20))
            pending = inflater.unconsumed_tail
            if size > limit:
                raise DecodeError(
                    f"{name}: the deflated DICOM data set inflates to more than {limit} bytes, above what the pixel "
                    f"limit of {max_pixels} px allows; raise the limit if the image is genuine"
                )
    except zlib.error as exc:
        raise DecodeError(f"{name}: the deflated DICOM data set is corrupt ({exc})") from None


def _metadata(dataset: Dataset) -> dict[str, object]:
    spacing_y, spacing_x = _pixel_spacing(dataset)
    burned_in = _text(dataset, "BurnedInAnnotation")
    return {
        "format": "DICOM",
        "bits_stored": _integer(dataset, "BitsStored"),
        "photometric": _text(dataset, "PhotometricInterpretation"),
        "modality": _text(dataset, "Modality"),
        "pixel_spacing_y_mm": spacing_y,
        "pixel_spacing_x_mm": spacing_x,
        # Only the two values the standard defines; anything else is as good as absent.
        "burned_in_annotation": {"YES": True, "NO": False}.get((burned_in or "").upper()),
    }


def _text(dataset: Dataset, keyword: str) -> str | None:
    try:
        value = dataset.get(keyword)
        text = "" if value is None else str(value).strip()
        return text or None
    except Exception:  # a malformed value is reported as absent rather than losing the image
        return None


def _integer(dataset: Dataset, keyword: str) -> int | None:
    try:
        value = dataset.get(keyword)
        return int(value) if value is not None and value != "" else None
    except Exception:
        return None


def _pixel_spacing(dataset: Dataset) -> tuple[float | None, float | None]:
    """Row and column spacing in mm: PixelSpacing (0028,0030), else ImagerPixelSpacing (0018,1164).

    PixelSpacing is calibrated in the patient plane and preferred; ImagerPixelSpacing (at the detector) is the
    usual field of projection radiographs. A missing, malformed or non-positive value is skipped: some
    modalities write '0\\0' (RG1 does) for "unknown".
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            values = dataset.get(keyword)
            if values is None or isinstance(values, str | bytes) or len(values) != 2:
                continue
            row_spacing, column_spacing = float(values[0]), float(values[1])
        except Exception:
            continue
        if all(math.isfinite(value) and value > 0 for value in (row_spacing, column_spacing)):
            return row_spacing, column_spacing
    return None, None


def _header_count(dataset: Dataset, keyword: str, name: str, default: int | None = None) -> int:
    try:
        value = dataset.get(keyword)
        count = default if value is None or value == "" else int(value)
    except Exception:
        count = None
    if count is None or count < 0:
        # The value is not quoted: in a corrupt header it may run on into other elements, patient fields included.
        raise DecodeError(
            f"{name}: the DICOM header's {keyword} is missing or malformed; the file is corrupt, export it again "
            "from the archive"
        )
    return count


def _decode_pixels(dataset: Dataset, name: str, max_pixels: int) -> tuple[np.ndarray, str]:
    """Decode the stored values, after the header checks that guard memory.

    Returns:
        ``(stored, photometric)``: stored values [H, W] or [H, W, samples] as pydicom returns them (YBR already
        converted to RGB), and the photometric interpretation of that array.
    """
    rows = _header_count(dataset, "Rows", name)
    columns = _header_count(dataset, "Columns", name)
    frames = _header_count(dataset, "NumberOfFrames", name, default=1)
    if frames > 1:
        raise DecodeError(
            f"{name}: multi-frame DICOM ({frames} frames); the audit takes single-frame images, so export the "
            "frames you want to audit as separate files (one file per frame)"
        )
    samples = _header_count(dataset, "SamplesPerPixel", name, default=1)
    if samples not in (1, 3):
        # Decoders allocate Rows × Columns × SamplesPerPixel before decoding; images have 1 or 3 samples.
        raise DecodeError(
            f"{name}: the DICOM header declares {samples} samples per pixel; the audit reads grayscale (1) or colour "
            "(3) images"
        )
    if rows * columns > max_pixels:
        raise DecodeError(
            f"{name}: the DICOM header declares {columns}x{rows} = {rows * columns} px, above the pixel limit of "
            f"{max_pixels} px; refused before decoding. Raise the limit if the image is genuine"
        )
    if rows == 0 or columns == 0:
        raise DecodeError(f"{name}: the DICOM header declares an empty image ({columns}x{rows} px)")

    transfer_syntax = UID(str(dataset.file_meta.TransferSyntaxUID))
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError:
        raise DecodeError(
            f"{name}: transfer syntax '{_uid_name(transfer_syntax)}' has no pixel decoder in pydicom; "
            "convert the file to an uncompressed or JPEG 2000 transfer syntax (e.g. `gdcmconv --raw in.dcm out.dcm`)"
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise DecodeError(
            f"{name}: no decoder is installed for transfer syntax '{transfer_syntax.name}'; install one of: {missing}"
        )
    if transfer_syntax.is_encapsulated:
        _check_codestream_size(dataset, transfer_syntax, rows, columns, name)
    try:
        # as_rgb: pydicom converts YBR_FULL(_422) to RGB and reports the array's colour space in the info dict
        # (which ds.pixel_array does not); decoders already return JPEG 2000's YBR_ICT/RCT as RGB.
        stored, info = decoder.as_array(dataset, validate=True, **as_pixel_options(dataset, as_rgb=True))
    except MemoryError:
        raise
    except Exception as exc:
        raise DecodeError(
            f"{name}: the DICOM pixel data is truncated or corrupt ({_brief(exc)}); export the file again from the "
            "archive"
        ) from None
    return stored, str(info.get("photometric_interpretation", dataset.get("PhotometricInterpretation", "")))


def _check_codestream_size(dataset: Dataset, transfer_syntax: UID, rows: int, columns: int, name: str) -> None:
    """Refuse a JPEG or JPEG 2000 codestream that declares a larger image than the header's Rows × Columns.

    The decoders allocate what the codestream declares, and pydicom compares with the header only afterwards:
    a 339-byte JPEG 2000 codestream declaring 8000 × 8000 makes openjpeg allocate 128 MB before pydicom fails.
    """
    if transfer_syntax in JPEG2000TransferSyntaxes:
        parse = _j2k_size
    elif transfer_syntax in JPEGTransferSyntaxes or transfer_syntax in JPEGLSTransferSyntaxes:
        parse = _jpeg_size
    else:
        return  # RLE and the others decode into a buffer sized from the header
    try:
        size = parse(get_frame(dataset.PixelData, 0, number_of_frames=1))
    except Exception:
        size = None
    if size is None or size[0] * size[1] == 0:
        raise DecodeError(
            f"{name}: the DICOM pixel data is truncated or corrupt (no readable {transfer_syntax.name} codestream "
            "header); export the file again from the archive"
        )
    if size[0] * size[1] > rows * columns:
        raise DecodeError(
            f"{name}: the DICOM pixel data is corrupt: its codestream declares {size[0]}x{size[1]} px but the header "
            f"{columns}x{rows} px; refused before decoding"
        )


def _j2k_size(codestream: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG 2000 SIZ segment (T.800 A.5.1), which directly follows the SOC marker."""
    start = codestream.find(b"\xff\x4f\xff\x51", 0, 1024)  # SOC + SIZ; a JP2 wrapper puts boxes before them
    if start < 0:
        return None
    x_size, y_size, x_offset, y_offset = struct.unpack_from(">IIII", codestream, start + 8)
    return x_size - x_offset, y_size - y_offset


def _jpeg_size(codestream: bytes) -> tuple[int, int] | None:
    """(width, height) from the start-of-frame segment of a JPEG (T.81 B.2.2) or JPEG-LS (T.87) codestream."""
    if codestream[:2] != b"\xff\xd8":
        return None
    position = 2
    while position + 4 <= len(codestream):
        if codestream[position] != 0xFF:
            return None
        marker = codestream[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
        elif marker in _JPEG_SOF_MARKERS:
            height, width = struct.unpack_from(">HH", codestream, position + 5)
            return width, height
        elif marker in _JPEG_STANDALONE_MARKERS:
            position += 2
        else:
            position += 2 + struct.unpack_from(">H", codestream, position + 2)[0]
    return None


def _to_display(stored: np.ndarray, photometric: str, dataset: Dataset, name: str) -> np.ndarray:
    """Map stored values [H, W] or [H, W, samples] to display pixels: uint8 [H, W] or RGB [H, W, 3]."""
    if stored.ndim == 2 and photometric in _MONOCHROME:
        return _grayscale_display(stored, photometric, dataset, name)
    if stored.ndim == 2 and photometric == "PALETTE COLOR":
        rgb = apply_color_lut(stored, dataset)
        # The palette's entries span their full bit depth (8 or 16 bits), so scale by it rather than by percentiles.
        return rgb if rgb.dtype == np.uint8 else _scale_to_uint8(rgb, 0.0, float(np.iinfo(rgb.dtype).max))
    if stored.ndim == 3 and stored.shape[2] == 3 and photometric == "RGB":
        return _colour_display(stored)
    raise DecodeError(
        f"{name}: cannot display DICOM pixels of shape {stored.shape} with photometric interpretation "
        f"'{photometric}'; expected [H, W] MONOCHROME1/2 or PALETTE COLOR, or [H, W, 3] RGB or YBR_FULL(_422)"
    )


def _grayscale_display(stored: np.ndarray, photometric: str, dataset: Dataset, name: str) -> np.ndarray:
    try:
        values = apply_modality_lut(stored, dataset)  # e.g. rescale to Hounsfield units or optical density
    except Exception as exc:
        raise DecodeError(
            f"{name}: the DICOM Modality LUT or Rescale Slope/Intercept is malformed ({_brief(exc)})"
        ) from None
    try:
        voi_kind = _voi_kind(dataset)
        display = None if voi_kind is None else _apply_voi(values, dataset, voi_kind)
    except Exception:
        display = None  # a malformed window (e.g. width 0) should not cost the image: use the robust window
    if display is None:
        # 8-bit data with no window is display-ready (e.g. a secondary capture), as an 8-bit PNG would be.
        display = values if values.dtype == np.uint8 else _scale_to_uint8(values, *_percentile_window(values))
    if photometric == "MONOCHROME1":
        # MONOCHROME1: the lowest value is white (PS3.3 C.7.6.3.1.2). Neither the Modality nor the VOI step
        # inverts (apply_voi_lut leaves that to the Presentation LUT), so invert here: bright = dense everywhere.
        display = 255 - display
    return display


def _voi_kind(dataset: Dataset) -> str | None:
    """Which VOI transform apply_voi_lut (prefer_lut=True) applies: "lut", "window" or None."""
    sequence = dataset.get("VOILUTSequence")
    if sequence and None not in (sequence[0].get("LUTDescriptor"), sequence[0].get("LUTData")):
        return "lut"
    if None not in (dataset.get("WindowCenter"), dataset.get("WindowWidth")):
        return "window"
    return None


def _apply_voi(values: np.ndarray, dataset: Dataset, voi_kind: str) -> np.ndarray:
    """Apply the VOI LUT or the first window (values [H, W] → uint8 [H, W]), scaled from its output range.

    The output range is not 0..255: a window maps to the full range of the modality output (0..2**BitsStored - 1
    for unsigned data without rescale, in rescaled units otherwise), a VOI LUT to its entries' bit depth.
    """
    if voi_kind == "lut":
        values = np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values  # a LUT indexes integers
        descriptor = dataset.VOILUTSequence[0].LUTDescriptor
        entries, first_mapped, entry_bits = int(descriptor[0]) or 2**16, int(descriptor[1]), int(descriptor[2])
        table = apply_voi_lut(np.arange(first_mapped, first_mapped + entries, dtype=np.int64), dataset)
        # Some writers declare 16 bits per entry but fill only 12; the entries' actual bit depth gives the range.
        low, high = 0.0, float(2 ** min(entry_bits, int(table.max()).bit_length()) - 1)
    else:
        # Windowing two extreme values yields exactly the bottom and top of the output range (pydicom's y_min and
        # y_max); with a negative rescale slope the top is the smaller number, which the scaling below keeps.
        with np.errstate(over="ignore"):
            low, high = (float(bound) for bound in apply_voi_lut(np.array([-1e300, 1e300]), dataset))
    return _scale_to_uint8(apply_voi_lut(values, dataset), low, high if high != low else low + 1.0)


def _percentile_window(values: np.ndarray) -> tuple[float, float]:
    """The robust window: 0.5 and 99.5 percentiles, so a few saturated or dead pixels do not set the contrast."""
    low, high = (float(bound) for bound in np.percentile(values, [0.5, 99.5]))
    return low, high if high > low else low + 1.0


def _scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``low`` → 0 and ``high`` → 255 linearly (either may be the larger), clipped, rounded, as uint8."""
    scaled = (values.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)


def _colour_display(rgb: np.ndarray) -> np.ndarray:
    """RGB [H, W, 3] of any integer type → uint8; wider samples get one percentile window for all channels, which
    keeps the colour balance."""
    return rgb if rgb.dtype == np.uint8 else _scale_to_uint8(rgb, *_percentile_window(rgb))


def _brief(exc: BaseException) -> str:
    """One line of an exception for a message: pydicom's plugin failures span several lines."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
