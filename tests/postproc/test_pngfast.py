"""The fast PNG decoder against Pillow, on every row filter and the shapes that fall back."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from postproc.pngfast import SIGNATURE, _chunk, decode_rgb8, encode_rgb8
from postproc.predio import decode_prob_png


def png_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **kw)
    return buf.getvalue()


@pytest.mark.parametrize("compress_level", [0, 1, 6, 9])
def test_matches_pillow_on_smooth_and_noisy_images(compress_level):
    rng = np.random.default_rng(compress_level)
    yy, xx = np.mgrid[0:37, 0:53]
    smooth = np.stack([xx * 4, yy * 6, (xx + yy) * 2], -1).astype(np.uint8)
    noisy = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for arr in (smooth, noisy, np.zeros((1, 1, 3), np.uint8)):
        data = png_bytes(arr, compress_level=compress_level)
        np.testing.assert_array_equal(decode_rgb8(data), arr)


def _filtered_png(arr: np.ndarray, filters: list[int], interlace: int = 0,
                 raw: bytes | None = None) -> bytes:
    """An 8-bit RGB PNG built by hand with the given row filter on each row (Pillow picks
    filters itself); ``raw`` replaces the filtered scanlines (for an interlaced image)."""
    h, w, _ = arr.shape
    if raw is None:
        out = bytearray()
        prev = np.zeros(w * 3, np.int32)
        for y, f in enumerate(filters):
            line = arr[y].reshape(-1).astype(np.int32)
            left = np.concatenate([np.zeros(3, np.int32), line[:-3]])
            upleft = np.concatenate([np.zeros(3, np.int32), prev[:-3]])
            if f == 0:
                enc = line
            elif f == 1:
                enc = line - left
            elif f == 2:
                enc = line - prev
            elif f == 3:
                enc = line - (left + prev) // 2
            else:
                p = left + prev - upleft
                pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
                pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
                enc = line - pred
            out += bytes([f]) + bytes((enc & 255).astype(np.uint8))
            prev = line
        raw = bytes(out)
    return (SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, interlace))
            + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))


def test_every_filter_type():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    data = _filtered_png(arr, list(range(5)))
    np.testing.assert_array_equal(decode_rgb8(data), arr)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), arr)


def test_paeth_ties_pick_left_then_up_as_the_png_spec_says():
    """Paeth breaks a tie (equal distances) towards left, then up: flat probability maps are
    full of ties, and a wrong choice shifts every later pixel of the row."""
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 4, (12, 10, 3), dtype=np.uint8)  # few values: many ties
    data = _filtered_png(arr, [4] * 12)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), arr)
    np.testing.assert_array_equal(decode_rgb8(data), arr)


def test_an_interlaced_rgb_png_decodes_through_pillow():
    """Adam7 is not the fast path's: it must hand the PNG to Pillow (None), not misread it."""
    arr = np.arange(12, dtype=np.uint8).reshape(2, 2, 3) * 20
    # Adam7 passes of a 2x2 image: pass 1 (0, 0), pass 6 (0, 1), pass 7 row 1; filter 0
    raw = (b"\0" + arr[0, 0].tobytes() + b"\0" + arr[0, 1].tobytes() + b"\0"
           + arr[1].tobytes())
    data = _filtered_png(arr, [], interlace=1, raw=raw)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), arr)
    assert decode_rgb8(data) is None
    np.testing.assert_array_equal(decode_prob_png(data), arr)


def test_other_flavours_fall_back_or_fail_clearly():
    grey = png_bytes(np.zeros((4, 4), np.uint8))
    assert decode_rgb8(grey) is None
    with pytest.raises(ValueError, match="RGB"):
        decode_prob_png(grey)
    rgba = png_bytes(np.zeros((4, 4, 4), np.uint8))
    assert decode_rgb8(rgba) is None
    good = png_bytes(np.zeros((30, 30, 3), np.uint8))
    with pytest.raises(ValueError, match="signature"):
        decode_rgb8(b"GIF89a" + good[6:])
    with pytest.raises(ValueError):
        decode_rgb8(good[: len(good) // 2])


def test_encoder_writes_standard_png():
    rng = np.random.default_rng(2)
    for arr in (rng.integers(0, 256, (31, 17, 3), dtype=np.uint8), np.zeros((1, 5, 3), np.uint8)):
        data = encode_rgb8(arr)
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # CRCs and structure, as any viewer would check them
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), arr)
        np.testing.assert_array_equal(decode_rgb8(data), arr)
