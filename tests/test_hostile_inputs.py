"""Fuzzing the whole audit with broken, hostile and unusual files (README, "Supported inputs").

A seeded generator writes 564 files: valid images in every mode and format we claim to read, and broken ones
(truncated, zero bytes, random bytes, wrong extension, a header claiming 100,000 × 100,000 pixels, 1 × 1,
bit-flipped, DICOM without pixel data, multi-frame DICOM, a missing file, a folder, a path out of the dataset
root). ``audit run`` must finish, and every manifest row must be in ``images`` or in ``errors`` (exactly one),
so that the counts add up to the number of inputs. The same run checks that a hostile label and hostile file
names stay inert text in the report.
"""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from audit.store.catalog import query

pydicom = pytest.importorskip("pydicom")

EVIL_LABEL = '<img src=x onerror="alert(1)">'
SAFE_LABEL = "normal"
N_PER_KIND = 20  # × 28 kinds = 560 files, plus 4 manifest rows that are not readable files


def _png(pixels: np.ndarray, mode: str | None = None, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, "PNG", **kwargs)
    return buffer.getvalue()


def _save(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` × ``height`` pixels, with a few bytes of data (a decompression bomb's
    header: decoding it would allocate width × height bytes)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _chunk(b"IEND", b"")
    )


def _jpeg_claiming(rng: np.random.Generator, width: int, height: int) -> bytes:
    data = bytearray(_save(Image.fromarray(rng.integers(0, 255, (32, 32), np.uint8)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _dicom(
    rng: np.random.Generator, *, pixels: bool = True, frames: int = 1, photometric: str = "MONOCHROME2"
) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.BurnedInAnnotation = "YES" if rng.random() < 0.5 else "NO"
    ds.PixelSpacing = [0.2, 0.2]
    if pixels:
        size = int(rng.integers(20, 48))
        array = rng.integers(0, 4096, (frames, size, size) if frames > 1 else (size, size), dtype=np.uint16)
        ds.Rows, ds.Columns = size, size
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = array.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _noise(rng: np.random.Generator, channels: int = 0, dtype: type = np.uint8, high: int = 256) -> np.ndarray:
    h, w = (int(v) for v in rng.integers(24, 64, 2))
    shape = (h, w, channels) if channels else (h, w)
    return rng.integers(0, high, shape, dtype=dtype)


def _exif_rotated(rng: np.random.Generator) -> bytes:
    image = Image.fromarray(_noise(rng, 3))
    exif = image.getexif()
    exif[0x0112] = int(rng.choice([3, 5, 6, 7, 8]))
    return _save(image, "JPEG", exif=exif.tobytes())


def _cmyk(rng: np.random.Generator) -> bytes:
    return _save(Image.fromarray(_noise(rng, 4), "CMYK"), "JPEG")


def _palette(rng: np.random.Generator) -> bytes:
    return _save(Image.fromarray(_noise(rng, 3)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG")


def _animated_gif(rng: np.random.Generator) -> bytes:
    frames = [Image.fromarray(_noise(rng)).resize((40, 40)) for _ in range(3)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:])


def _bit_flipped(rng: np.random.Generator) -> bytes:
    data = bytearray(_png(_noise(rng, 3)))
    for position in rng.integers(40, len(data), 6):
        data[position] ^= 0xFF
    return bytes(data)


# name → (suffix, generator, decodable): decodable = True, False or None (either is fine: bit flips).
KINDS = {
    "gray": (".png", lambda r: _png(_noise(r)), True),
    "rgb": (".png", lambda r: _png(_noise(r, 3)), True),
    "rgba": (".png", lambda r: _png(_noise(r, 4)), True),
    "palette": (".png", _palette, True),
    "bilevel": (".png", lambda r: _save(Image.fromarray(_noise(r)).convert("1"), "PNG"), True),
    "png16": (".png", lambda r: _png(_noise(r, dtype=np.uint16, high=65535)), True),
    "tiff16": (".tif", lambda r: _save(Image.fromarray(_noise(r, dtype=np.uint16, high=4096)), "TIFF"), True),
    "tiff_float": (".tiff", lambda r: _save(Image.fromarray(r.random((30, 40), dtype=np.float32)), "TIFF"), True),
    "cmyk_jpeg": (".jpg", _cmyk, True),
    "exif_rotated": (".jpg", _exif_rotated, True),
    "bmp": (".bmp", lambda r: _save(Image.fromarray(_noise(r, 3)), "BMP"), True),
    "webp": (".webp", lambda r: _save(Image.fromarray(_noise(r, 3)), "WEBP"), True),
    "animated_gif": (".gif", _animated_gif, True),
    "dicom": (".dcm", lambda r: _dicom(r), True),
    "dicom_monochrome1": (".dcm", lambda r: _dicom(r, photometric="MONOCHROME1"), True),
    "png_named_jpg": (".jpg", lambda r: _png(_noise(r)), True),
    "truncated_png": (".png", lambda r: _png(_noise(r, 3))[: int(r.integers(8, 200))], False),
    "truncated_jpeg": (".jpg", lambda r: _save(Image.fromarray(_noise(r, 3)), "JPEG")[:300], False),
    "truncated_dicom": (".dcm", lambda r: _dicom(r)[: int(r.integers(140, 400))], False),
    "zero_bytes": (".png", lambda r: b"", False),
    "random_bytes": (".png", lambda r: r.integers(0, 256, int(r.integers(1, 4000)), dtype=np.uint8).tobytes(), False),
    "text_named_png": (".png", lambda r: b"path,label\nthese are notes\n", False),
    "huge_png_header": (".png", lambda r: _png_claiming(100_000, 100_000), False),
    "huge_jpeg_header": (".jpg", lambda r: _jpeg_claiming(r, 65_000, 65_000), False),
    "one_pixel": (".png", lambda r: _png(np.zeros((1, 1), np.uint8)), False),
    "dicom_no_pixels": (".dcm", lambda r: _dicom(r, pixels=False), False),
    "dicom_multiframe": (".dcm", lambda r: _dicom(r, frames=3), False),
    "bit_flipped": (".png", _bit_flipped, None),
}


def _write_dataset(root: Path) -> tuple[Path, dict[str, bool | None]]:
    """The files, a manifest listing them (plus rows that cannot be read), and what each row should become."""
    rng = np.random.default_rng(20261123)
    data = root / "data"
    rows, expected = [], {}
    for kind, (suffix, make, decodable) in KINDS.items():
        for i in range(N_PER_KIND):
            # Hostile characters in some names: they are shown in the report's error list.
            name = f"{kind}-{i}{'-<b>x</b>' if i == 0 else ''}{suffix}"
            path = data / kind / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(make(rng))  # random pixels: no two files are the same bytes
            relative = path.relative_to(data).as_posix()
            rows.append((relative, EVIL_LABEL if i % 2 else SAFE_LABEL))
            expected[relative] = decodable
    # Rows that are not readable files: missing, a folder, out of the root, a symlink out of the root.
    (data / "a-folder.png").mkdir()
    outside = root / "outside.png"
    outside.write_bytes(_png(np.zeros((32, 32), np.uint8)))
    os.symlink(outside, data / "link-out.png")
    for relative in ("missing/nothing.png", "a-folder.png", "../outside.png", "link-out.png"):
        rows.append((relative, SAFE_LABEL))
        expected[relative] = False
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return manifest, expected


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.fixture(scope="module")
def fuzz_audit(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, bool | None], subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("fuzz")
    manifest, expected = _write_dataset(root)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    command = [
        sys.executable, "-m", "flows.cli", "run", "--no-prefect", "--quiet",
        "--data", str(root / "data"), "--manifest", str(manifest), "--out", str(root / "out"),
        "--probe-size", "32", "--probe-epochs", "2", "--shard-size", "64", "--no-region-cache",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    return root / "out", expected, result


def test_every_input_is_in_images_or_errors(fuzz_audit: tuple[Path, dict, subprocess.CompletedProcess]) -> None:
    out, expected, result = fuzz_audit
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(expected) >= 500
    _, images = query(out, "SELECT path, format FROM images")
    # Errors about the file itself (regions-stage errors are about a detector, and the image is still audited).
    _, errors = query(out, "SELECT path, stage, message FROM errors WHERE stage <> 'regions'")
    audited = [path for path, _ in images]
    failed = [path for path, _, _ in errors]
    assert len(audited) == len(set(audited)) and len(failed) == len(set(failed)), "a file was counted twice"
    assert not set(audited) & set(failed), "a file is both audited and an error"
    assert set(audited) | set(failed) == set(expected)
    assert len(audited) + len(failed) == len(expected)
    for path, should_decode in expected.items():
        if should_decode is True:
            assert path in audited, f"{path} should have been audited: {[e for e in errors if e[0] == path]}"
        elif should_decode is False:
            assert path in failed, f"{path} should be an error"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["errors"] >= len(failed)
    assert summary["counts"]["images"] == len(audited)


def test_error_messages_say_what_went_wrong(fuzz_audit: tuple[Path, dict, subprocess.CompletedProcess]) -> None:
    out, _, _ = fuzz_audit
    _, rows = query(out, "SELECT path, stage, message FROM errors")
    by_path = {path: (stage, message) for path, stage, message in rows}
    expectations = {
        "zero_bytes/zero_bytes-1.png": ("decode", "empty file"),
        "huge_png_header/huge_png_header-1.png": ("decode", "decompression-bomb"),
        "huge_jpeg_header/huge_jpeg_header-1.jpg": ("decode", "decompression-bomb"),
        "one_pixel/one_pixel-1.png": ("decode", "at least 16 px"),
        "dicom_multiframe/dicom_multiframe-1.dcm": ("decode", "frame"),
        "dicom_no_pixels/dicom_no_pixels-1.dcm": ("decode", "ixel"),
        "missing/nothing.png": ("read", "not found"),
        "a-folder.png": ("read", "folder"),
        "../outside.png": ("manifest", "dataset root"),
        "link-out.png": ("manifest", "outside the dataset root"),
    }
    for path, (stage, fragment) in expectations.items():
        assert path in by_path, path
        assert by_path[path][0] == stage, (path, by_path[path])
        assert fragment in by_path[path][1], (path, by_path[path])


def test_formats_and_dicom_facts_are_recorded(fuzz_audit: tuple[Path, dict, subprocess.CompletedProcess]) -> None:
    out, _, _ = fuzz_audit
    _, rows = query(
        out,
        "SELECT split_part(path, '/', 1) AS kind, any_value(format), max(bits), count(*), "
        "count(burned_in_annotation), min(pixel_spacing_x_mm), any_value(modality) FROM images GROUP BY kind",
    )
    facts = {kind: rest for kind, *rest in rows}
    assert facts["png_named_jpg"][0] == "PNG"  # the content decides, not the name
    assert facts["png16"][1] == 16 and facts["tiff16"][1] == 16
    assert facts["cmyk_jpeg"][0] == "JPEG"
    dicom = facts["dicom"]
    assert dicom[0] == "DICOM" and dicom[1] == 12 and dicom[2] == N_PER_KIND
    assert dicom[3] == N_PER_KIND  # every file's Burned In Annotation flag is kept
    assert dicom[4] == pytest.approx(0.2) and dicom[5] == "OT"
    assert facts["gray"][3] == 0 and facts["gray"][4] is None  # not DICOM: no header facts


def test_hostile_label_and_names_are_inert_in_the_report(
    fuzz_audit: tuple[Path, dict, subprocess.CompletedProcess],
) -> None:
    out, _, _ = fuzz_audit
    page = (out / "index.html").read_text(encoding="utf-8")
    parser = _Tags()
    parser.feed(page)
    assert EVIL_LABEL in "".join(parser.text), "the label should be shown, as text"
    handlers = [(tag, name) for tag, attrs in parser.tags for name, _ in attrs if name.lower().startswith("on")]
    assert not handlers, f"event-handler attributes in the page: {handlers[:5]}"
    assert not [attrs for tag, attrs in parser.tags if tag == "img" and ("src", "x") in attrs]
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page  # a file name shown in the error list
