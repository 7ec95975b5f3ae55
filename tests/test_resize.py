"""The kernel against Pillow itself, for every mode the release holds, and the errors it raises."""

import io

import numpy as np
import pytest
from PIL import Image
from release import _img, encode, reference

from dsimagenet.resize import ImageError, Resize, resize_all

MODES = [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG")]


@pytest.mark.parametrize("mode, fmt", MODES)
def test_every_mode_matches_pillow(mode, fmt):
    data = encode(_img(np.random.default_rng(3), 37, 21, mode), fmt)
    r = Resize((5, 16), ("box", "nearest", "bilinear", "bicubic", "hamming", "lanczos"))
    out, note = resize_all(data, r)
    for (s, m), x in out.items():
        np.testing.assert_array_equal(x, reference(data, s, m))
    assert (note is None) == (mode == "RGB" and fmt == "JPEG")


def test_fast_is_close_but_not_exact_on_large_jpegs():
    a = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    big = Image.fromarray(a).resize((800, 600), Image.BICUBIC)  # smooth, like a photograph
    data = encode(big)
    exact, _ = resize_all(data, Resize((16,), ("box",)))
    fast, _ = resize_all(data, Resize((16,), ("box",), fast=True))
    d = exact[(16, "box")].astype(int) - fast[(16, "box")]
    assert 0 < np.abs(d).mean() < 3
    small = encode(big.resize((40, 30)))  # too small to decode at a reduced scale: exact pixels
    assert np.array_equal(resize_all(small, Resize((16,), ("box",), fast=True))[0][(16, "box")],
                          reference(small, 16, "box"))


@pytest.mark.parametrize("data, msg", [(b"", "empty file"), (b"GIF89a nothing", "not an image|damaged"),
                                       (b"hello", "not an image")])
def test_errors(data, msg):
    with pytest.raises(ImageError, match=msg):
        resize_all(data, Resize())


def test_truncated_jpeg_is_an_error_not_grey():
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(ImageError, match="damaged"):
        resize_all(data[: len(data) // 2], Resize())


def test_decompression_bomb(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    b = io.BytesIO()
    Image.new("RGB", (40, 40)).save(b, "PNG")  # 1,600 pixels: over the limit, under twice it (a warning)
    with pytest.raises(ImageError, match="decompression bomb"):
        resize_all(b.getvalue(), Resize())


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown methods"):
        Resize(methods=("cubic",))
    with pytest.raises(ValueError, match="aspect"):
        Resize(aspect="pad")
