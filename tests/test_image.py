"""The image decoding policy: each kind of file is generated here and what happens to it asserted."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedkit import ImagePreprocess, ImageProcessor
from embedkit.inputs.items import ItemFailure

# Identity normalisation (mean 0, std 1/255 * 255 = 1 over 0..255 pixels) keeps values readable.
RAW = ImagePreprocess(crop=(32, 32), resize=32, interpolation="bilinear", mean=(0, 0, 0), std=(1 / 255,) * 3)


def pixels(item, preprocess=RAW, **options) -> np.ndarray:
    return ImageProcessor(preprocess, **options)(item)[0]


def failure(item, **options) -> ItemFailure:
    with pytest.raises(ItemFailure) as info:
        ImageProcessor(RAW, **options)(item)
    return info.value


def photo(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A noisy gradient: a photo's statistics (thousands of colours), not a flat graphic."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def test_rgb_png_path_bytes_pil_and_array_agree(tmp_path: Path):
    array = photo()
    png = encoded(Image.fromarray(array), "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(png)
    expected = pixels(array)
    assert expected.shape == (3, 32, 32) and expected.dtype == np.float32
    for item in (str(path), path, png, bytearray(png), Image.open(io.BytesIO(png))):
        np.testing.assert_array_equal(pixels(item), expected)


def test_normalisation_follows_mean_and_std():
    array = np.full((40, 40, 3), 200, np.uint8)
    array[0, 0] = 0  # keep it from being a blank graphic
    p = ImagePreprocess(crop=(8, 8), resize=40, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    out = pixels(array, p, reject_blank=False)
    np.testing.assert_allclose(out[:, 4, 4], [(200 / 255 - 0.5) / 0.5, (200 / 255 - 0.25) / 0.25, 200 / 255], rtol=1e-5)
    scaled = ImagePreprocess.from_scale_offset(1 / 128, -127 / 128, crop=(8, 8), resize=40)
    np.testing.assert_allclose(pixels(array, scaled, reject_blank=False)[:, 4, 4], (200 - 127) / 128, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_an_error_not_a_grey_image(fmt):
    data = encoded(Image.fromarray(photo(200, 200)), fmt)
    err = failure(data[: len(data) // 2])
    assert err.code == "truncated", err.message
    assert err.stage == "decode"


def test_zero_bytes_and_missing_files(tmp_path: Path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert failure(empty).code == "empty_file"
    assert failure(b"").code == "empty_file"
    assert failure(tmp_path / "nope.jpg").code == "not_found"


def test_random_bytes_are_not_an_image():
    err = failure(np.random.default_rng(0).bytes(4096))
    assert err.code == "not_an_image"


@pytest.mark.parametrize("data,name", [
    (b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n", "PDF"),
    (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>', "SVG"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "EPS"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIC"),
])
def test_unsupported_formats_are_named(data, name):
    err = failure(data)
    assert err.code == "unsupported_format"
    assert name in err.message


def test_formats_with_external_decoders_are_refused():
    # EPS would run Ghostscript; a real EPS header is recognised by PIL but never decoded here.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n"
    assert failure(eps).code == "unsupported_format"


def _png_with_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height``: the bomb is caught before any pixel decodes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_the_header():
    err = failure(_png_with_header(100_000, 100_000))
    assert err.code == "too_large"
    assert "max_pixels" in err.message or "decompression" in err.message.lower()


def test_pixel_limit_is_configurable():
    data = encoded(Image.fromarray(photo(100, 100)), "PNG")
    assert failure(data, max_pixels=9_999).code == "too_large"
    assert pixels(data, max_pixels=10_000).shape == (3, 32, 32)
    assert failure(np.zeros((200, 200, 3), np.uint8), max_pixels=100).code == "too_large"


def test_cmyk_jpeg_decodes_like_its_rgb_conversion():
    cmyk = Image.fromarray(photo()).convert("CMYK")
    data = encoded(cmyk, "JPEG", quality=100)
    expected = pixels(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_allclose(pixels(data), expected, atol=1e-3)


def test_palette_png_decodes_like_rgb():
    image = Image.fromarray(photo()).quantize(64)  # 64 colours, none dominant
    data = encoded(image, "PNG")
    np.testing.assert_allclose(pixels(data), pixels(np.asarray(image.convert("RGB"))), atol=1e-4)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_the_fixed_background(mode):
    rgb = photo()
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[:, rgb.shape[1] // 2:] = 255  # left half transparent, right half opaque
    base = Image.fromarray(rgb) if mode == "RGBA" else Image.fromarray(rgb).convert("L")
    image = base.copy()
    image.putalpha(Image.fromarray(alpha))
    assert image.mode == mode
    black = ImagePreprocess(crop=(48, 64), resize=48, mean=(0, 0, 0), std=(1 / 255,) * 3, background=(0, 0, 0))
    white = ImagePreprocess(crop=(48, 64), resize=48, mean=(0, 0, 0), std=(1 / 255,) * 3, background=(255, 255, 255))
    on_black = pixels(encoded(image, "PNG"), black)
    on_white = pixels(encoded(image, "PNG"), white)
    np.testing.assert_allclose(on_black[:, :, :32], 0, atol=1e-3)
    np.testing.assert_allclose(on_white[:, :, :32], 255, atol=1e-3)
    opaque = np.asarray(base.convert("RGB"), np.float32).transpose(2, 0, 1)[:, :, 33:]
    np.testing.assert_allclose(on_black[:, :, 33:], opaque, atol=1e-3)


def test_half_transparent_pixels_mix_with_the_background():
    image = Image.new("RGBA", (40, 40), (200, 100, 0, 128))
    image.putpixel((0, 0), (0, 0, 255, 255))  # not a flat graphic
    p = ImagePreprocess(crop=(8, 8), resize=40, mean=(0, 0, 0), std=(1 / 255,) * 3, background=(0, 0, 0))
    a = 128 / 255
    np.testing.assert_allclose(pixels(encoded(image, "PNG"), p, reject_blank=False)[:, 4, 4], [200 * a, 100 * a, 0], atol=1e-3)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    grey = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    image = Image.fromarray(grey)
    data = encoded(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    p = ImagePreprocess(crop=(64, 64), resize=64, mean=(0, 0, 0), std=(1 / 255,) * 3)
    out = pixels(data, p)
    np.testing.assert_allclose(out[0], grey / 257.0, atol=1e-2)
    assert out.max() < 255 and out.min() == 0
    assert len(np.unique(out[0])) > 1000  # a naive 8-bit conversion would clip all but 256 values to white
    np.testing.assert_array_equal(out[0], out[1])  # grey -> three equal channels
    np.testing.assert_allclose(pixels(grey, p), out, atol=1e-3)  # uint16 arrays scale the same way


def test_exif_orientation_is_applied():
    array = photo(40, 60)
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encoded(image, "PNG", exif=exif.tobytes())
    p = ImagePreprocess(crop=(60, 40), resize=40, mean=(0, 0, 0), std=(1 / 255,) * 3)
    out = pixels(data, p)
    upright = np.rot90(array, k=-1)  # what a viewer shows: 60 high, 40 wide
    np.testing.assert_allclose(out, upright.transpose(2, 0, 1).astype(np.float32), atol=1e-3)


def test_animated_gif_uses_the_first_frame():
    first = Image.fromarray(photo(seed=1)).quantize(200)
    second = Image.fromarray(photo(seed=2)[::-1]).quantize(200)
    data = encoded(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    np.testing.assert_allclose(pixels(data), pixels(encoded(first, "GIF")), atol=1e-4)


def test_blank_placeholder_graphic_is_an_error_unless_allowed():
    image = Image.new("P", (300, 300), 0)
    image.putpalette([255, 255, 255, 30, 30, 30] + [0] * 762)
    for x in range(100, 200):  # a little "image not found" text: 6 % of the pixels
        for y in range(140, 160):
            if (x + y) % 3:
                image.putpixel((x, y), 1)
    data = encoded(image, "GIF")
    err = failure(data)
    assert err.code == "blank_image"
    assert pixels(data, reject_blank=False).shape == (3, 32, 32)
    assert failure(np.full((50, 50, 3), 255, np.uint8).tobytes()).code == "not_an_image"
    assert failure(encoded(Image.new("RGB", (50, 50), "white"), "JPEG")).code == "blank_image"
    assert failure(np.zeros((50, 50, 3), np.uint8)).code == "blank_image"  # arrays get the same check


@pytest.mark.parametrize("item,code", [
    (None, "not_an_image_input"),
    (42, "not_an_image_input"),
    (np.zeros((4, 4, 5), np.uint8), "invalid_array"),
    (np.zeros((4,), np.uint8), "invalid_array"),
    (np.full((8, 8, 3), 2.0, np.float32), "invalid_range"),
    (np.full((8, 8, 3), np.nan, np.float32), "invalid_range"),
    (np.zeros((8, 8, 3), np.int32), "invalid_array"),
])
def test_wrong_python_inputs_are_typed_errors(item, code):
    assert failure(item).code == code


def test_big_endian_arrays_are_read_as_their_values():
    """A '>u2' array is uint16 and a '>f4' one float: they were refused as an unsupported dtype."""
    array = photo()
    wide = array.astype(np.uint16) * 257
    np.testing.assert_array_equal(pixels(wide.astype(">u2")), pixels(wide))
    unit = array.astype(np.float32) / 255
    np.testing.assert_array_equal(pixels(unit.astype(">f4")), pixels(unit))


def test_float_and_uint8_arrays_agree():
    array = photo()
    np.testing.assert_allclose(pixels(array.astype(np.float32) / 255), pixels(array), atol=1e-3)


def test_resize_and_crop_match_a_torch_reference_on_varied_shapes():
    pytest.importorskip("torch")
    from embedkit.testing import torch_preprocess

    for h, w, interpolation in [(300, 200, "bilinear"), (181, 457, "bicubic"), (224, 224, "bilinear"), (97, 131, "nearest")]:
        p = ImagePreprocess(crop=(64, 64), resize=72, interpolation=interpolation)
        array = photo(h, w, seed=h)
        ref = torch_preprocess(array, p).numpy()
        assert np.abs(pixels(array, p) - ref).max() <= 1e-3, (h, w, interpolation)


def float_tiff(values: np.ndarray) -> bytes:
    image = Image.fromarray(values.astype(np.float32), "F")
    assert image.mode == "F"
    return encoded(image, "TIFF")


def test_a_float_tiff_in_zero_to_one_is_read_as_zero_to_one(tmp_path: Path):
    grey = photo()[:, :, 0]
    path = tmp_path / "photo.tif"
    path.write_bytes(float_tiff(grey / 255.0))
    assert Image.open(path).mode == "F"
    expected = pixels(grey)  # the uint8 photo
    for item in (path, path.read_bytes(), Image.open(path), Image.fromarray((grey / 255.0).astype(np.float32), "F")):
        np.testing.assert_allclose(pixels(item), expected, atol=1e-3)  # was 255 times darker


@pytest.mark.parametrize("values", [photo()[:, :, 0] * 5000.0 / 255, np.full((48, 64), np.nan), photo()[:, :, 0] / -255.0])
def test_a_float_image_outside_zero_to_one_is_an_error_on_every_route(values):
    # A float TIFF file, a PIL 'F' image and a float array: one rule, never a guess at 0..255 or 0..65535.
    for item in (float_tiff(values), Image.fromarray(values.astype(np.float32), "F"), values.astype(np.float32)):
        assert failure(item).code == "invalid_range"


def test_a_32_bit_integer_image_outside_sixteen_bits_is_an_error():
    values = np.arange(64 * 48, dtype=np.int32).reshape(48, 64) * 100  # up to 307,100
    image = Image.fromarray(values, "I")
    assert failure(image).code == "invalid_range"
    assert failure(encoded(image, "TIFF")).code == "invalid_range"
    small = Image.fromarray((values // 100).astype(np.int32), "I")  # 0..3071: 16-bit data in a 32-bit container
    np.testing.assert_allclose(pixels(small)[0], pixels((values // 100).astype(np.uint16))[0], atol=1e-3)


def test_fifos_devices_and_huge_files_are_refused_before_reading(tmp_path: Path):
    import os

    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    with open(tmp_path / "huge.jpg", "wb") as f:
        f.truncate(40 << 20)  # sparse: 40 MiB of zeros
    assert failure(tmp_path / "fifo.jpg").code == "not_a_file"
    assert failure(tmp_path / "zero.jpg").code == "not_a_file"
    assert failure(tmp_path).code == "not_a_file"
    assert failure(tmp_path / "huge.jpg", max_pixels=1000).code == "too_large"  # over 8 B/pixel + 16 MiB
    assert failure(tmp_path / "huge.jpg").code == "not_an_image"
    assert failure("").code == "not_found"
