"""Tests of reading DICOM files: the grayscale display pipeline, colour, metadata, and refusal of hostile files."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels import convert_color_space
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from audit.data.dicom import DICOM_SUFFIXES, decode_dicom, is_dicom
from audit.errors import DecodeError

RNG = np.random.default_rng(0)
MAX_PIXELS = 16384 * 16384
RG1_PATH = Path(__file__).resolve().parents[3] / "shared/data/cxr-real/dicom/RG1_J2KI.dcm"
# Boxes on RG1 as (top, bottom, left, right) fractions of the image, chosen by looking at the decoded image: the
# upper zone of each lung between the ribs' densest parts, the mediastinum over the spine, and the abdomen below
# the diaphragm.
RIGHT_LUNG = (0.12, 0.30, 0.20, 0.38)  # the patient's right: image left
LEFT_LUNG = (0.20, 0.32, 0.60, 0.78)
MEDIASTINUM = (0.30, 0.60, 0.45, 0.55)
BELOW_DIAPHRAGM = (0.82, 0.95, 0.20, 0.80)
PATIENT_NAME, PATIENT_ID, BIRTH_DATE, STUDY_DATE = "Doe^Jane", "PID-73519", "19400305", "20240117"
METADATA_KEYS = {
    "format",
    "bits_stored",
    "photometric",
    "modality",
    "pixel_spacing_y_mm",
    "pixel_spacing_x_mm",
    "burned_in_annotation",
}


def _save(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _dataset(
    pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None, **elements: object
) -> Dataset:
    """A Digital X-Ray data set holding ``pixels`` uncompressed, with patient fields that must never leak."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = DigitalXRayImageStorageForPresentation
    dataset.Modality = "DX"
    dataset.PatientName = PATIENT_NAME
    dataset.PatientID = PATIENT_ID
    dataset.PatientBirthDate = BIRTH_DATE
    dataset.StudyDate = STUDY_DATE
    dataset.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    return dataset


def _dicom(
    pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None, **elements: object
) -> bytes:
    return _save(_dataset(pixels, photometric, bits_stored, **elements))


def _gradient_12bit() -> np.ndarray:
    """uint16 [64, 64] holding each 12-bit value 0..4095 once, row by row."""
    return np.arange(4096, dtype=np.uint16).reshape(64, 64)


def _mean(image: np.ndarray, box: tuple[float, float, float, float]) -> float:
    top, bottom, left, right = box
    height, width = image.shape
    return float(image[int(top * height) : int(bottom * height), int(left * width) : int(right * width)].mean())


@pytest.fixture(scope="module")
def rg1_bytes() -> bytes:
    if not RG1_PATH.is_file():
        pytest.skip(f"the real DICOM sample is not present at {RG1_PATH} (shared data not checked out)")
    return RG1_PATH.read_bytes()


@pytest.fixture(scope="module")
def rg1(rg1_bytes: bytes) -> tuple[np.ndarray, dict[str, object]]:
    return decode_dicom(rg1_bytes, "RG1_J2KI.dcm", MAX_PIXELS)


# --- the real radiograph: JPEG 2000, MONOCHROME1, 15 bits --------------------------------------------------------


def test_rg1_lungs_are_dark(rg1: tuple[np.ndarray, dict[str, object]]) -> None:
    image, _ = rg1
    assert image.dtype == np.uint8
    assert image.shape == (1955, 1841)
    lungs = [_mean(image, RIGHT_LUNG), _mean(image, LEFT_LUNG)]
    dense = [_mean(image, MEDIASTINUM), _mean(image, BELOW_DIAPHRAGM)]
    assert max(lungs) + 40 <= min(dense), f"lung means {lungs}, mediastinum and abdomen means {dense}"


def test_rg1_without_inversion_has_bright_lungs(rg1_bytes: bytes) -> None:
    """The same pixels declared MONOCHROME2 give the reverse order: the inversion is what makes the lungs dark."""
    dataset = pydicom.dcmread(io.BytesIO(rg1_bytes))
    dataset.PhotometricInterpretation = "MONOCHROME2"
    image, metadata = decode_dicom(_save(dataset), "RG1_as_MONOCHROME2.dcm", MAX_PIXELS)
    assert metadata["photometric"] == "MONOCHROME2"
    lungs = [_mean(image, RIGHT_LUNG), _mean(image, LEFT_LUNG)]
    dense = [_mean(image, MEDIASTINUM), _mean(image, BELOW_DIAPHRAGM)]
    assert min(lungs) >= max(dense) + 40, f"lung means {lungs}, mediastinum and abdomen means {dense}"


def test_rg1_metadata(rg1: tuple[np.ndarray, dict[str, object]]) -> None:
    _, metadata = rg1
    assert metadata == {
        "format": "DICOM",
        "bits_stored": 15,
        "photometric": "MONOCHROME1",
        "modality": "CR",
        # RG1 writes PixelSpacing as '0.000\0.000' and has no ImagerPixelSpacing: unknown, not zero.
        "pixel_spacing_y_mm": None,
        "pixel_spacing_x_mm": None,
        "burned_in_annotation": None,  # (0028,0301) is absent from RG1's header
    }


# --- synthetic files: the display pipeline ------------------------------------------------------------------------


def test_window_is_applied() -> None:
    stored = _gradient_12bit()
    image, metadata = decode_dicom(_dicom(stored, bits_stored=12, WindowCenter=2048, WindowWidth=1024), "w", MAX_PIXELS)
    assert image.dtype == np.uint8 and image.shape == stored.shape
    # LINEAR window (PS3.3 C.11.2.1.2.1): centre 2047.5, width 1023, so 1536 and below is black, 2560 up white.
    assert (image[stored <= 1536] == 0).all()
    assert (image[stored >= 2560] == 255).all()
    assert 126 <= image[stored == 2048].item() <= 129
    assert (np.diff(image.ravel().astype(int)) >= 0).all()  # the gradient stays monotonic
    assert metadata["bits_stored"] == 12 and metadata["photometric"] == "MONOCHROME2"


def test_monochrome1_is_inverted() -> None:
    stored = _gradient_12bit()
    window = {"WindowCenter": 2048, "WindowWidth": 1024}
    normal, _ = decode_dicom(_dicom(stored, "MONOCHROME2", 12, **window), "m2", MAX_PIXELS)
    inverted, metadata = decode_dicom(_dicom(stored, "MONOCHROME1", 12, **window), "m1", MAX_PIXELS)
    np.testing.assert_array_equal(inverted, 255 - normal)
    assert metadata["photometric"] == "MONOCHROME1"


def test_monochrome1_without_window_is_inverted() -> None:
    stored = _gradient_12bit()
    image, _ = decode_dicom(_dicom(stored, "MONOCHROME1", 12), "m1", MAX_PIXELS)
    assert image[0, 0] == 255 and image[-1, -1] == 0  # lowest stored value is white in MONOCHROME1


def test_percentile_window_without_voi() -> None:
    stored = _gradient_12bit()
    stored[0, 0], stored[-1, -1] = 0, 4095  # already extremes; the window ignores the outer 0.5 % either side
    image, _ = decode_dicom(_dicom(stored, bits_stored=12), "p", MAX_PIXELS)
    assert image.min() == 0 and image.max() == 255
    assert (image[stored <= 20] == 0).all() and (image[stored >= 4075] == 255).all()  # 0.5 % of 4096 is ~20
    assert 125 <= image[stored == 2048].item() <= 130


def test_rescale_is_applied_before_the_window() -> None:
    stored = _gradient_12bit()
    # Rescaled value = 2 * stored - 1024; the window [-1000, 1000] in rescaled units is stored [12, 1012].
    elements = {"RescaleSlope": 2, "RescaleIntercept": -1024, "WindowCenter": 0, "WindowWidth": 2000}
    image, _ = decode_dicom(_dicom(stored, bits_stored=12, **elements), "r", MAX_PIXELS)
    assert (image[stored <= 11] == 0).all()
    assert (image[stored >= 1013] == 255).all()
    assert 125 <= image[stored == 512].item() <= 130  # rescaled 0: the window centre


@pytest.mark.parametrize("data_bits", [16, 12])
def test_voi_lut_sequence_is_applied(data_bits: int) -> None:
    """A VOI LUT maps 0..4095 to its range; a LUT declared 16-bit but filled with 12-bit data gets the same image."""
    stored = _gradient_12bit()
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor: entries, first mapped value, bits per entry
    item.add_new(0x00283006, "US", [value << (data_bits - 12) for value in range(4096)])  # LUT Data: a ramp
    dataset = _dataset(stored, bits_stored=12, WindowCenter=100, WindowWidth=10)  # the LUT takes precedence
    dataset.VOILUTSequence = [item]
    image, _ = decode_dicom(_save(dataset), "lut", MAX_PIXELS)
    expected = stored.astype(float) * 255 / 4095
    assert np.abs(image - expected).max() <= 1.0


def test_malformed_window_falls_back_to_the_percentile_window() -> None:
    stored = _gradient_12bit()
    image, _ = decode_dicom(_dicom(stored, bits_stored=12, WindowCenter=2048, WindowWidth=0), "w0", MAX_PIXELS)
    assert image.min() == 0 and image.max() == 255 and 125 <= image[stored == 2048].item() <= 130


def test_8bit_grayscale_without_window_is_kept_as_stored() -> None:
    stored = RNG.integers(40, 200, (32, 32), dtype=np.uint8)
    image, _ = decode_dicom(_dicom(stored), "g8", MAX_PIXELS)
    np.testing.assert_array_equal(image, stored)


def test_rgb_8bit() -> None:
    rgb = RNG.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    image, metadata = decode_dicom(_dicom(rgb, "RGB"), "rgb", MAX_PIXELS)
    np.testing.assert_array_equal(image, rgb)
    assert metadata["photometric"] == "RGB"


def test_ybr_full_is_converted_to_rgb() -> None:
    rgb = RNG.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    image, metadata = decode_dicom(_dicom(ybr, "YBR_FULL"), "ybr", MAX_PIXELS)
    assert image.shape == rgb.shape and image.dtype == np.uint8
    assert np.abs(image.astype(int) - rgb).max() <= 2  # YCbCr round trip in 8 bits
    assert metadata["photometric"] == "YBR_FULL"


def test_rgb_16bit_is_windowed_keeping_channel_order() -> None:
    rgb = np.zeros((32, 32, 3), dtype=np.uint16)
    rgb[:16, :, 0] = 60000  # red on top
    rgb[16:, :, 2] = 60000  # blue below
    image, _ = decode_dicom(_dicom(rgb, "RGB"), "rgb16", MAX_PIXELS)
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
    assert (image[:16, :, 0] == 255).all() and (image[:16, :, 1:] == 0).all()
    assert (image[16:, :, 2] == 255).all() and (image[16:, :, :2] == 0).all()


def test_palette_colour_is_expanded_to_rgb() -> None:
    indices = np.arange(256, dtype=np.uint8).reshape(16, 16)
    dataset = _dataset(indices, "PALETTE COLOR", 8)
    ramp = np.arange(256, dtype=np.uint16) * 257  # 16-bit entries
    for colour, table in (("Red", ramp), ("Green", np.zeros(256, np.uint16)), ("Blue", ramp[::-1])):
        dataset.add_new(f"{colour}PaletteColorLookupTableDescriptor", "US", [256, 0, 16])
        dataset.add_new(f"{colour}PaletteColorLookupTableData", "OW", table.astype("<u2").tobytes())
    image, metadata = decode_dicom(_save(dataset), "palette", MAX_PIXELS)
    assert image.shape == (16, 16, 3) and metadata["photometric"] == "PALETTE COLOR"
    np.testing.assert_array_equal(image[..., 0], indices)
    np.testing.assert_array_equal(image[..., 1], 0)
    np.testing.assert_array_equal(image[..., 2], 255 - indices)


def test_deflated_file_decodes() -> None:
    stored = _gradient_12bit()
    dataset = _dataset(stored, bits_stored=12, WindowCenter=2048, WindowWidth=1024)
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    image, _ = decode_dicom(_save(dataset), "deflated", MAX_PIXELS)
    assert (image[stored <= 1536] == 0).all() and (image[stored >= 2560] == 255).all()


def test_raw_data_set_without_preamble_decodes() -> None:
    stored = _gradient_12bit()
    dataset = _dataset(stored, bits_stored=12)
    dataset.file_meta = FileMetaDataset()
    buffer = io.BytesIO()
    dataset.save_as(buffer, implicit_vr=True, little_endian=True)  # no preamble, no file meta
    data = buffer.getvalue()
    assert not is_dicom(data)
    image, _ = decode_dicom(data, "raw", MAX_PIXELS)
    assert image.shape == stored.shape and image[0, 0] == 0 and image[-1, -1] == 255


# --- metadata -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("elements", "expected"),
    [
        ({"PixelSpacing": "0.139\\0.139"}, (0.139, 0.139)),
        ({"PixelSpacing": "0.2\\0.1"}, (0.2, 0.1)),  # row spacing (y) first
        ({"PixelSpacing": "0\\0"}, (None, None)),
        ({"PixelSpacing": "-0.1\\0.1"}, (None, None)),
        ({"PixelSpacing": "0.1"}, (None, None)),  # one value: malformed
        ({"ImagerPixelSpacing": "0.15\\0.16"}, (0.15, 0.16)),
        ({"PixelSpacing": "0\\0", "ImagerPixelSpacing": "0.15\\0.15"}, (0.15, 0.15)),
        ({"PixelSpacing": "0.1\\0.1", "ImagerPixelSpacing": "0.15\\0.15"}, (0.1, 0.1)),
        ({}, (None, None)),
    ],
)
def test_pixel_spacing(elements: dict[str, str], expected: tuple[float | None, float | None]) -> None:
    _, metadata = decode_dicom(_dicom(_gradient_12bit(), bits_stored=12, **elements), "s", MAX_PIXELS)
    assert (metadata["pixel_spacing_y_mm"], metadata["pixel_spacing_x_mm"]) == expected


@pytest.mark.parametrize(("value", "expected"), [("YES", True), ("NO", False), (None, None), ("MAYBE", None)])
def test_burned_in_annotation(value: str | None, expected: bool | None) -> None:
    elements = {} if value is None else {"BurnedInAnnotation": value}
    _, metadata = decode_dicom(_dicom(_gradient_12bit(), bits_stored=12, **elements), "b", MAX_PIXELS)
    assert metadata["burned_in_annotation"] is expected


def test_metadata_has_exactly_the_documented_keys_and_no_patient_fields() -> None:
    data = _dicom(_gradient_12bit(), bits_stored=12, PixelSpacing="0.139\\0.139", BurnedInAnnotation="NO")
    assert PATIENT_ID.encode() in data  # the identifiers are in the file...
    _, metadata = decode_dicom(data, "p", MAX_PIXELS)
    assert set(metadata) == METADATA_KEYS
    text = repr(metadata)
    for identifier in (PATIENT_NAME, "Doe", PATIENT_ID, BIRTH_DATE, STUDY_DATE):
        assert identifier not in text  # ...but not in the metadata
    assert metadata["modality"] == "DX" and metadata["format"] == "DICOM"


# --- refusals -----------------------------------------------------------------------------------------------------


def _refused(data: bytes, fragment: str, max_pixels: int = MAX_PIXELS) -> str:
    with pytest.raises(DecodeError) as caught:
        decode_dicom(data, "bad.dcm", max_pixels)
    message = str(caught.value)
    assert message.startswith("bad.dcm: ")
    assert fragment in message
    return message


def test_refuses_empty_file() -> None:
    _refused(b"", "empty file")


def test_refuses_random_bytes() -> None:
    _refused(RNG.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "not a DICOM image")


def test_refuses_random_bytes_behind_a_dicom_preamble() -> None:
    data = bytes(128) + b"DICM" + RNG.integers(0, 256, 5000, dtype=np.uint8).tobytes()
    with pytest.raises(DecodeError, match=r"^bad\.dcm: "):
        decode_dicom(data, "bad.dcm", MAX_PIXELS)


def test_refuses_png() -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(200)
    _refused(png, "not a DICOM image")


def test_refuses_a_file_without_pixel_data() -> None:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = BasicTextSRStorage
    dataset.SOPInstanceUID = generate_uid()
    dataset.Modality = "SR"
    message = _refused(_save(dataset), "no Pixel Data")
    assert "Basic Text SR Storage" in message and "structured report" in message


def test_refuses_multi_frame() -> None:
    frames = np.zeros((3, 32, 32), dtype=np.uint8)
    message = _refused(_dicom(frames), "multi-frame DICOM (3 frames)")
    assert "single-frame" in message and "one file per frame" in message


@pytest.mark.parametrize(("rows", "columns", "vr"), [(100000, 100000, "UL"), (65535, 65535, "US")])
def test_refuses_huge_header_before_decoding(rows: int, columns: int, vr: str) -> None:
    """Rows × Columns is checked from the header: the tiny Pixel Data would otherwise be refused as truncated."""
    dataset = _dataset(np.zeros((4, 4), dtype=np.uint8))
    dataset.add_new(0x00280010, vr, rows)
    dataset.add_new(0x00280011, vr, columns)
    message = _refused(_save(dataset), "above the pixel limit")
    assert "refused before decoding" in message and "truncated" not in message


def test_refuses_unusual_samples_per_pixel_before_decoding() -> None:
    dataset = _dataset(np.zeros((16, 16), dtype=np.uint8))
    dataset.SamplesPerPixel = 60000
    _refused(_save(dataset), "60000 samples per pixel")


def test_refuses_image_just_above_a_small_limit() -> None:
    _refused(_dicom(np.zeros((32, 32), dtype=np.uint8)), "above the pixel limit", max_pixels=32 * 32 - 1)
    image, _ = decode_dicom(_dicom(np.zeros((32, 32), dtype=np.uint8)), "ok", 32 * 32)
    assert image.shape == (32, 32)


def test_refuses_truncated_real_file(rg1_bytes: bytes) -> None:
    _refused(rg1_bytes[: len(rg1_bytes) // 2], "truncated")


def test_refuses_truncated_uncompressed_file() -> None:
    data = _dicom(_gradient_12bit(), bits_stored=12)
    _refused(data[: len(data) // 2], "truncated")


@pytest.mark.parametrize("cut", [1, 131, 132, 200, 1000, 3000, -2000, -10])
def test_any_truncation_of_the_real_file_is_a_decode_error(rg1_bytes: bytes, cut: int) -> None:
    with pytest.raises(DecodeError, match=r"^bad\.dcm: "):
        decode_dicom(rg1_bytes[:cut], "bad.dcm", MAX_PIXELS)


def _with_codestream(rg1_bytes: bytes, codestream: bytes) -> bytes:
    dataset = pydicom.dcmread(io.BytesIO(rg1_bytes))
    dataset.PixelData = encapsulate([codestream])
    return _save(dataset)


def _rg1_codestream(rg1_bytes: bytes) -> bytes:
    return get_frame(pydicom.dcmread(io.BytesIO(rg1_bytes)).PixelData, 0, number_of_frames=1)


def test_refuses_garbage_jpeg2000_codestream(rg1_bytes: bytes) -> None:
    garbage = RNG.integers(0, 256, 20000, dtype=np.uint8).tobytes()
    _refused(_with_codestream(rg1_bytes, garbage), "truncated or corrupt")


def test_refuses_jpeg2000_codestream_with_a_valid_header_and_garbage_body(rg1_bytes: bytes) -> None:
    codestream = _rg1_codestream(rg1_bytes)
    garbage = codestream[:200] + RNG.integers(0, 256, 20000, dtype=np.uint8).tobytes()
    _refused(_with_codestream(rg1_bytes, garbage), "truncated or corrupt")


def test_refuses_jpeg2000_codestream_larger_than_the_header(rg1_bytes: bytes) -> None:
    """A codestream declaring 60000 × 60000 behind a 1841 × 1955 header would make openjpeg allocate gigabytes."""
    codestream = bytearray(_rg1_codestream(rg1_bytes))
    siz = codestream.find(b"\xff\x4f\xff\x51")
    struct.pack_into(">II", codestream, siz + 8, 60000, 60000)  # Xsiz, Ysiz
    _refused(_with_codestream(rg1_bytes, bytes(codestream)), "codestream declares 60000x60000 px")


def test_refuses_transfer_syntax_without_decoder() -> None:
    dataset = _dataset(np.zeros((16, 16), dtype=np.uint8))
    dataset.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2 video
    dataset.PixelData = encapsulate([bytes(64)])
    _refused(_save(dataset), "transfer syntax 'MPEG2 Main Profile / Main Level'")


def test_refuses_when_no_plugin_is_installed(rg1_bytes: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    _refused(rg1_bytes, "no decoder is installed for transfer syntax 'JPEG 2000 Image Compression'")


def test_refuses_deflate_bomb() -> None:
    """3000 × 3000 zeros deflate to a few kilobytes; the inflated size is bounded before pydicom inflates it all."""
    dataset = _dataset(np.zeros((3000, 3000), dtype=np.uint16))
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = _save(dataset)
    assert len(data) < 100_000
    _refused(data, "inflates to more than", max_pixels=1000)


def test_mutated_headers_never_raise_anything_but_decode_error() -> None:
    """Hostile files: random bytes overwritten in the header of a valid file give an image or a DecodeError."""
    data = _dicom(_gradient_12bit(), bits_stored=12, WindowCenter=2048, WindowWidth=1024, PixelSpacing="0.1\\0.1")
    header_end = data.index(b"\xe0\x7f\x10\x00")  # the Pixel Data tag
    rng = np.random.default_rng(1)
    outcomes = {"decoded": 0, "refused": 0}
    for _ in range(300):
        mutated = bytearray(data)
        for position in rng.integers(0, header_end + 12, 3):
            mutated[position] = int(rng.integers(0, 256))
        try:
            image, metadata = decode_dicom(bytes(mutated), "fuzz.dcm", MAX_PIXELS)
        except DecodeError as error:
            assert str(error).startswith("fuzz.dcm: ")
            outcomes["refused"] += 1
        else:
            assert image.dtype == np.uint8 and image.ndim in (2, 3) and set(metadata) == METADATA_KEYS
            outcomes["decoded"] += 1
    assert outcomes["decoded"] > 0 and outcomes["refused"] > 0


# --- is_dicom -----------------------------------------------------------------------------------------------------


def test_is_dicom() -> None:
    assert is_dicom(_dicom(np.zeros((16, 16), dtype=np.uint8)))
    assert not is_dicom(b"\x89PNG\r\n\x1a\n" + bytes(200))
    assert not is_dicom(b"")
    assert not is_dicom(bytes(128) + b"DIC")  # cut inside the magic
    assert {".dcm", ".dicom"} == DICOM_SUFFIXES


@pytest.mark.parametrize("padding", [0, 5000])
def test_deflate_bomb_refused_with_little_memory_even_behind_a_padded_meta_group(padding: int) -> None:
    import tracemalloc

    from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.FileMetaInformationVersion = b"\x00\x01" + b"\x00" * padding  # pushes the UID past the first 4 KB
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows = ds.Columns = 4000
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.zeros((4000, 4000), np.uint16).tobytes()  # 32 MB that deflate to a few KB
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    assert len(data) < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="inflates to more than"):
            decode_dicom(data, "bomb.dcm", max_pixels=1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"measuring the bomb took {peak:,} bytes"
