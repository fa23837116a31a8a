"""Decoding hostile and unusual images; preprocessing."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from moderation.config import ResizeMode
from moderation.errors import BadImageError
from moderation.images import (IMAGENET_MEAN, IMAGENET_STD, decode_image, image_id_from, list_image_files,
                               normalise_batch, preprocess, preprocess_uint8, resize, sha256_hex, to_tensor)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_header_only(w: int, h: int) -> bytes:
    """A syntactically valid PNG claiming ``w x h`` RGB pixels, with (almost) no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def reason_of(data: bytes, **kw) -> str:
    with pytest.raises(BadImageError) as info:
        decode_image(data, **kw)
    return info.value.reason


# -- bad input --------------------------------------------------------------------------------


def test_zero_byte_file():
    assert reason_of(b"") == "empty"


def test_non_image_bytes():
    assert reason_of(b"%PDF-1.7 this is not a picture" * 10) == "not_an_image"
    assert reason_of(b"\x00" * 100) == "not_an_image"


def test_truncated_jpeg_fails_instead_of_grey_padding():
    data = encode(noise(), "JPEG", quality=90)
    assert decode_image(data).size == (64, 48)  # the whole file is fine
    assert reason_of(data[: int(len(data) * 0.6)]) == "truncated"


def test_truncated_png():
    data = encode(noise(), "PNG")
    assert reason_of(data[: len(data) // 2]) == "truncated"


def test_file_size_limit():
    data = encode(noise(), "PNG")
    assert reason_of(data, max_bytes=len(data) - 1) == "too_large_file"
    assert decode_image(data, max_bytes=len(data)).size == (64, 48)


def test_decompression_bomb_header_claiming_huge_dimensions():
    # 100000 x 100000 = 1e10 pixels: refused from the header, before any pixel is decoded
    assert reason_of(png_header_only(100_000, 100_000)) == "decompression_bomb"
    # 9000 x 9000 = 81 MP: above our 64 MP default, below PIL's own warning threshold
    assert reason_of(png_header_only(9000, 9000)) == "decompression_bomb"


def test_decompression_bomb_small_max_pixels():
    data = encode(noise(64, 48), "PNG")
    assert reason_of(data, max_pixels=64 * 48 - 1) == "decompression_bomb"
    assert decode_image(data, max_pixels=64 * 48).size == (64, 48)


def test_error_message_carries_reason_and_detail():
    with pytest.raises(BadImageError) as info:
        decode_image(png_header_only(100, 100), max_pixels=50)
    assert info.value.reason == "decompression_bomb"
    assert "100x100" in info.value.detail and "50" in str(info.value)


# -- unusual but valid input ------------------------------------------------------------------


def _halves(w: int, h: int) -> Image.Image:
    """Left half red, right half blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2:] = (0, 0, 255)
    return Image.fromarray(a)


def _close(px, expected, tol=12):
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(px, expected))


def test_exif_orientation_is_applied():
    img = _halves(40, 20)  # stored landscape: red left, blue right
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    out = decode_image(encode(img, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.mode == "RGB" and out.size == (20, 40)  # portrait now
    # after a clockwise quarter turn the left (red) half is on top
    assert _close(out.getpixel((10, 5)), (255, 0, 0))
    assert _close(out.getpixel((10, 35)), (0, 0, 255))


def test_exif_orientation_180():
    img = _halves(40, 20)
    exif = img.getexif()
    exif[0x0112] = 3
    out = decode_image(encode(img, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.size == (40, 20)
    assert _close(out.getpixel((5, 10)), (0, 0, 255))  # blue is on the left now
    assert _close(out.getpixel((35, 10)), (255, 0, 0))


def test_palette_png_with_transparency_is_composited_on_white():
    img = Image.new("P", (8, 8), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))  # 0 red, 1 green
    for x in range(4, 8):
        for y in range(8):
            img.putpixel((x, y), 1)
    data = encode(img, "PNG", transparency=0)  # index 0 (red) is fully transparent
    out = decode_image(data)
    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == (255, 255, 255)  # transparent -> white, not red or black
    assert out.getpixel((6, 1)) == (0, 255, 0)


def test_rgba_partial_alpha_is_composited_on_white():
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 3] = 128  # black at ~50 % opacity
    out = decode_image(encode(Image.fromarray(a, "RGBA"), "PNG"))
    assert out.mode == "RGB"
    r, g, b = out.getpixel((0, 0))
    assert 125 <= r <= 129 and r == g == b


def test_greyscale_with_alpha():
    a = np.zeros((4, 4, 2), np.uint8)
    a[..., 0] = 0
    a[..., 1] = 0  # fully transparent black
    out = decode_image(encode(Image.fromarray(a, "LA"), "PNG"))
    assert out.getpixel((2, 2)) == (255, 255, 255)


def test_cmyk_jpeg():
    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    out = decode_image(encode(cyan, "JPEG", quality=95))
    assert out.mode == "RGB"
    assert _close(out.getpixel((8, 8)), (0, 255, 255))
    black = Image.new("CMYK", (16, 16), (0, 0, 0, 255))
    assert _close(decode_image(encode(black, "JPEG", quality=95)).getpixel((8, 8)), (0, 0, 0))


def test_16bit_greyscale_png_maps_to_8bit_range():
    # 16-bit v -> 8-bit round(v / 257): 0 -> 0, 32896 -> 128, 65535 -> 255
    a = np.array([[0, 32896, 65535, 2570]], np.uint16)
    img = Image.fromarray(a)
    assert img.mode == "I;16"
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really read back as 16-bit
    out = decode_image(data)
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255),
                                                       (10, 10, 10)]


def test_16bit_greyscale_png_keeps_absolute_brightness():
    # a mid-grey 16-bit image must stay mid-grey, not be stretched to white,
    # and a dark one must stay dark
    mid = np.full((4, 4), 32896, np.uint16)
    assert decode_image(encode(Image.fromarray(mid), "PNG")).getpixel((0, 0)) == (128, 128, 128)
    dark = np.full((4, 4), 257 * 3, np.uint16)
    dark[0, 0] = 200  # every value is far below 8-bit white
    out = decode_image(encode(Image.fromarray(dark), "PNG"))
    assert out.getpixel((1, 1)) == (3, 3, 3)
    assert out.getpixel((0, 0)) == (1, 1, 1)


def test_8bit_greyscale_and_bilevel():
    out = decode_image(encode(Image.new("L", (4, 4), 77), "PNG"))
    assert out.getpixel((0, 0)) == (77, 77, 77)
    out = decode_image(encode(Image.new("1", (4, 4), 1), "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    out = decode_image(buf.getvalue())
    assert out.mode == "RGB" and _close(out.getpixel((4, 4)), (255, 0, 0), tol=2)


# -- preprocessing and helpers ------------------------------------------------------------------


def test_resize_modes():
    img = Image.new("RGB", (200, 100))
    assert resize(img, 64, ResizeMode.SQUARE).size == (64, 64)
    assert resize(img, 64, ResizeMode.SHORT_EDGE).size == (128, 64)
    assert resize(Image.new("RGB", (90, 300)), 30, ResizeMode.SHORT_EDGE).size == (30, 100)


def test_to_tensor_imagenet_normalisation():
    t = to_tensor(Image.new("RGB", (5, 3), (255, 0, 128)))
    assert t.shape == (3, 3, 5) and t.dtype == torch.float32
    expected = [(1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], (0.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1],
                (128 / 255 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]]
    np.testing.assert_allclose(t[:, 1, 2].numpy(), expected, rtol=1e-5)
    assert preprocess(Image.new("RGB", (50, 40)), 32, ResizeMode.SQUARE).shape == (3, 32, 32)


def test_uint8_transfer_then_normalise_equals_float_preprocessing():
    img = decode_image(encode(noise(50, 30), "PNG"))
    u8 = preprocess_uint8(img, 24, ResizeMode.SHORT_EDGE)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 24, 40)
    batch = normalise_batch(u8.unsqueeze(0))
    assert batch.dtype == torch.float32 and batch.shape == (1, 3, 24, 40)
    torch.testing.assert_close(batch[0], preprocess(img, 24, ResizeMode.SHORT_EDGE), rtol=1e-5, atol=1e-5)


def test_ids_hashes_and_listing(tmp_path):
    assert image_id_from("references/cat.photo.jpg") == "cat.photo"
    assert image_id_from("dog.PNG") == "dog"
    assert image_id_from("/abs/path/x") == "x"
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    (tmp_path / "sub").mkdir()
    for name in ("b.JPG", "a.png", "sub/c.webp", "notes.txt", "sub/d.tiff"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_image_files(tmp_path)] == [
        "a.png", "b.JPG", "sub/c.webp", "sub/d.tiff"]
    with pytest.raises(NotADirectoryError, match="not a folder"):
        list_image_files(tmp_path / "a.png")


def test_large_jpeg_decodes_at_reduced_scale_but_never_below_min_size():
    img = Image.new("RGB", (2000, 1500), (200, 10, 10))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    small = decode_image(buf.getvalue(), min_size=320)
    assert small.size == (500, 375)  # 1/4 DCT scale: the smallest that keeps both sides >= 320
    r, g, b = small.getpixel((10, 10))
    assert abs(r - 200) <= 3 and g <= 15 and b <= 15
    assert decode_image(buf.getvalue()).size == (2000, 1500)
    assert decode_image(buf.getvalue(), min_size=1000).size == (2000, 1500)  # 1/2 would be too small
