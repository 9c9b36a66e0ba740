"""Tests of decoding one file into uint8 pixels, and of the content hash."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from audit.data.decode import MAX_SIDE, MIN_SIDE, content_hash, decode_image, read_image
from audit.errors import DecodeError

RNG = np.random.default_rng(0)


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_gray_png() -> None:
    pixels = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
    decoded = decode_image(_encode(Image.fromarray(pixels, "L")))
    assert decoded.dtype == np.uint8
    assert decoded.shape == (20, 30)
    np.testing.assert_array_equal(decoded, pixels)


def test_rgb_png() -> None:
    pixels = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    decoded = decode_image(_encode(Image.fromarray(pixels, "RGB")))
    assert decoded.shape == (20, 30, 3)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, pixels)


def test_rgb_with_equal_channels_becomes_gray() -> None:
    gray = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
    decoded = decode_image(_encode(Image.fromarray(np.stack([gray] * 3, axis=-1), "RGB")))
    assert decoded.shape == (20, 30)
    np.testing.assert_array_equal(decoded, gray)
    assert decoded.flags["C_CONTIGUOUS"]


def test_rgba_alpha_dropped() -> None:
    pixels = RNG.integers(0, 256, (20, 24, 4), dtype=np.uint8)
    decoded = decode_image(_encode(Image.fromarray(pixels, "RGBA")))
    assert decoded.shape == (20, 24, 3)
    np.testing.assert_array_equal(decoded, pixels[..., :3])


def test_gray_with_alpha() -> None:
    pixels = RNG.integers(0, 256, (20, 24, 2), dtype=np.uint8)
    decoded = decode_image(_encode(Image.fromarray(pixels, "LA")))
    assert decoded.shape == (20, 24)
    np.testing.assert_array_equal(decoded, pixels[..., 0])


def test_palette_expanded() -> None:
    image = Image.new("P", (20, 16), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    image.paste(1, (0, 0, 10, 16))  # left half red
    decoded = decode_image(_encode(image))
    assert decoded.shape == (16, 20, 3)
    np.testing.assert_array_equal(decoded[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(decoded[0, 19], [0, 0, 0])


def test_gray_palette_becomes_2d() -> None:
    image = Image.new("P", (20, 16), 1)
    image.putpalette([0, 0, 0, 128, 128, 128] + [0] * (256 * 3 - 6))
    decoded = decode_image(_encode(image))
    assert decoded.shape == (16, 20)
    assert (decoded == 128).all()


def test_16_bit_png_windowed_to_full_uint8_range() -> None:
    pixels = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 40 + 1000).astype(np.uint16)
    image = Image.fromarray(pixels)
    assert image.mode.startswith("I")  # really a 16-bit image
    decoded = decode_image(_encode(image))
    assert decoded.dtype == np.uint8
    assert decoded.shape == (30, 40)
    assert decoded.min() == 0
    assert decoded.max() == 255
    # The window keeps the order of intensities.
    assert (np.diff(decoded.ravel().astype(int)) >= 0).all()
    assert len(np.unique(decoded)) > 200


def test_constant_16_bit_image_does_not_divide_by_zero() -> None:
    decoded = decode_image(_encode(Image.fromarray(np.full((20, 20), 3000, np.uint16))))
    assert decoded.dtype == np.uint8
    assert np.isfinite(decoded.astype(float)).all()
    assert (decoded == decoded[0, 0]).all()


def test_truncated_jpeg() -> None:
    data = _encode(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG", quality=90)
    with pytest.raises(DecodeError, match=r"cut\.jpg: .*(truncated|could not decode)"):
        decode_image(data[: len(data) // 2], "cut.jpg")


def test_text_file_named_png() -> None:
    with pytest.raises(DecodeError, match=r"notes\.png: not a readable image"):
        decode_image(b"these are my notes, not pixels\n", "notes.png")


def test_empty_bytes() -> None:
    with pytest.raises(DecodeError, match="empty"):
        decode_image(b"", "zero.png")


def test_too_small_image() -> None:
    with pytest.raises(DecodeError, match=rf"8x8 px; at least {MIN_SIDE} px"):
        decode_image(_encode(Image.new("L", (8, 8))))


def test_thin_image_too_small() -> None:
    with pytest.raises(DecodeError, match=r"100x4 px"):
        decode_image(_encode(Image.new("RGB", (100, 4), (1, 2, 3))))


def test_minimum_size_accepted() -> None:
    assert decode_image(_encode(Image.new("L", (MIN_SIDE, MIN_SIDE)))).shape == (MIN_SIDE, MIN_SIDE)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_honoured(fmt: str) -> None:
    image = Image.new("RGB", (40, 20), (10, 200, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    decoded = decode_image(_encode(image, fmt, exif=exif.tobytes()))
    assert decoded.shape == (40, 20, 3)


def test_exif_orientation_moves_pixels() -> None:
    pixels = np.zeros((20, 40), np.uint8)
    pixels[:, :10] = 255  # left stripe
    image = Image.fromarray(pixels, "L")
    exif = image.getexif()
    exif[0x0112] = 6
    decoded = decode_image(_encode(image, "PNG", exif=exif.tobytes()))
    assert decoded.shape == (40, 20)
    # Rotating 90° clockwise puts the left stripe at the top.
    assert (decoded[:10] == 255).all()
    assert (decoded[10:] == 0).all()


def test_content_hash_stable_and_distinct() -> None:
    data = _encode(Image.new("L", (20, 20), 7))
    assert content_hash(data) == content_hash(bytes(data))
    assert len(content_hash(data)) == 32
    assert all(c in "0123456789abcdef" for c in content_hash(data))
    assert content_hash(data) != content_hash(data + b"\x00")
    assert content_hash(b"a") != content_hash(b"b")
    # Known value: the image identity must not change between versions (it keys the region cache).
    assert content_hash(b"") == "cae66941d9efbd404e4d88758ea67670"


def test_cmyk_jpeg_colours_converted() -> None:
    red = Image.new("CMYK", (32, 32), (0, 255, 255, 0))
    decoded = read_image(_encode(red, "JPEG", quality=95), "red.jpg")
    assert decoded.format == "JPEG"
    r, g, b = decoded.pixels[16, 16].astype(int)
    assert r > 230 and g < 30 and b < 30


def test_palette_with_colours_stays_rgb() -> None:
    pixels = np.zeros((20, 20, 3), np.uint8)
    pixels[:, 10:] = (0, 0, 255)
    image = Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    decoded = decode_image(_encode(image))
    assert decoded.shape == (20, 20, 3)
    assert tuple(decoded[5, 15]) == (0, 0, 255) and tuple(decoded[5, 2]) == (0, 0, 0)


def test_16_bit_facts_recorded() -> None:
    decoded = read_image(_encode(Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50)))
    assert (decoded.format, decoded.bits, decoded.original_width, decoded.original_height) == ("PNG", 16, 40, 30)
    assert decoded.scale == (1.0, 1.0)


def test_large_image_downscaled_to_the_long_side_limit() -> None:
    pixels = np.zeros((300, 6000), np.uint8)
    pixels[:, 3000:] = 200  # right half bright
    decoded = read_image(_encode(Image.fromarray(pixels)), "wide.png")
    assert decoded.pixels.shape == (round(300 * MAX_SIDE / 6000), MAX_SIDE)
    assert (decoded.original_width, decoded.original_height) == (6000, 300)
    assert decoded.scale == pytest.approx((MAX_SIDE / 6000, round(300 * MAX_SIDE / 6000) / 300))
    # Content keeps its place: the bright half is still the right half.
    assert decoded.pixels[:, : MAX_SIDE // 2 - 2].max() == 0 and decoded.pixels[:, MAX_SIDE // 2 + 2 :].min() == 200


def test_large_jpeg_decoded_at_reduced_scale() -> None:
    image = Image.new("L", (5000, 4000), 90)
    decoded = read_image(_encode(image, "JPEG"), "big.jpg")
    assert max(decoded.pixels.shape) == MAX_SIDE
    assert (decoded.original_width, decoded.original_height) == (5000, 4000)
    assert abs(int(decoded.pixels.mean()) - 90) <= 2


def test_exif_rotation_reports_the_displayed_size() -> None:
    image = Image.new("RGB", (40, 20), (10, 200, 30))
    exif = image.getexif()
    exif[0x0112] = 8
    decoded = read_image(_encode(image, "JPEG", exif=exif.tobytes()))
    assert decoded.pixels.shape[:2] == (40, 20)
    assert (decoded.original_width, decoded.original_height) == (20, 40)


def test_header_claiming_too_many_pixels_refused_before_decoding() -> None:
    data = bytearray(_encode(Image.new("L", (32, 32)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2
    with pytest.raises(DecodeError, match="decompression-bomb protection"):
        decode_image(bytes(data), "bomb.jpg")


def test_float_image_with_nan_windowed() -> None:
    values = np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20)
    values[0, 0] = np.nan
    decoded = decode_image(_encode(Image.fromarray(values), "TIFF"))
    assert decoded.dtype == np.uint8 and decoded.max() == 255 and decoded[0, 0] == 0


def test_user_boxes_follow_a_downscaled_image() -> None:
    from audit.pipeline import _scaled
    from audit.regions.base import Detection

    box = Detection("marker", 4000, 100, 4600, 300, 1.0, "user-boxes", "1")
    sx, sy = MAX_SIDE / 6000, 0.7  # x and y scale differ: each side is rounded on its own
    scaled = _scaled(box, (sx, sy))
    assert (scaled.x0, scaled.y0) == (int(4000 * sx), int(100 * sy))
    assert (scaled.x1, scaled.y1) == (round(4600 * sx), round(300 * sy))
    assert _scaled(box, (1.0, 1.0)) is box
    tiny = _scaled(Detection("dot", 10, 10, 11, 11, 1.0, "user-boxes", "1"), (0.1, 0.1))
    assert tiny.x1 > tiny.x0 and tiny.y1 > tiny.y0  # a box never vanishes


def test_thin_image_refused_when_downscaling_would_make_it_too_narrow() -> None:
    with pytest.raises(DecodeError, match=r"20000x16 px; downscaled .* would be 4096x3 px"):
        decode_image(_encode(Image.new("L", (20000, 16), 50)), "strip.png")


def test_file_over_the_size_limit_refused_before_reading(tmp_path, monkeypatch) -> None:
    import audit.data.decode as decode

    path = tmp_path / "slide.tif"
    path.write_bytes(b"\0" * 5000)
    monkeypatch.setattr(decode, "MAX_FILE_BYTES", 4096)
    with pytest.raises(DecodeError, match=r"slide\.tif: file is 5,000 bytes; at most 4,096"):
        decode.read_file(path, "slide.tif")
    monkeypatch.setattr(decode, "MAX_FILE_BYTES", 10_000)
    assert decode.read_file(path, "slide.tif") == b"\0" * 5000
