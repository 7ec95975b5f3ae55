"""The kernel against Pillow itself, for every mode the release holds, and the errors it raises."""

import io
import struct

import numpy as np
import pytest
from PIL import Image
from release import _img, encode, reference

from dsimagenet.errors import ConfigError
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
    with pytest.raises(ConfigError, match="--methods: unknown methods"):
        Resize(methods=("cubic",))
    with pytest.raises(ConfigError, match="--aspect"):
        Resize(aspect="pad")
    with pytest.raises(ConfigError, match="--sizes must be positive whole numbers"):
        Resize(sizes=(0,))
    with pytest.raises(ConfigError, match="--sizes"):
        Resize(sizes=(8.5,))


def dds_with_unknown_pixel_format() -> bytes:
    """A DDS file as Pillow writes it, its pixel-format flags (header offset 80) set to a value no DDS
    reader knows: Pillow's DDS plugin raises NotImplementedError on it (found by fuzzing)."""
    b = io.BytesIO()
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(b, "DDS")
    data = bytearray(b.getvalue())
    data[80:84] = (0xC900).to_bytes(4, "little")
    return bytes(data)


def tiff_with_float_strip_offsets() -> bytes:
    """A TIFF whose StripOffsets tag (273) claims the FLOAT type: Pillow's TIFF plugin seeks to a float and
    raises TypeError (found by fuzzing)."""
    b = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(b, "TIFF")
    data = b.getvalue()
    assert data.count(b"\x11\x01\x04\x00") == 1  # tag 273, type LONG, little-endian
    return data.replace(b"\x11\x01\x04\x00", b"\x11\x01\x0b\x00")


def test_a_dds_file_named_jpg_is_never_given_to_the_dds_decoder():
    b = io.BytesIO()
    Image.new("RGBA", (8, 8)).save(b, "DDS")
    for data in (b.getvalue(), dds_with_unknown_pixel_format()):  # valid or fuzzed: not one of our formats
        with pytest.raises(ImageError, match="not an image Pillow can read"):
            resize_all(data, Resize())


def test_a_fuzzed_tiff_is_a_per_file_error():
    with pytest.raises(ImageError, match="damaged image: TypeError"):
        resize_all(tiff_with_float_strip_offsets(), Resize())


@pytest.mark.parametrize("exc", [struct.error("unpack requires a buffer of 4 bytes"), ZeroDivisionError(),
                                 IndexError("list index out of range"), MemoryError(), RecursionError(),
                                 NotImplementedError("Unknown pixel format"), TypeError("'float' object"),
                                 KeyError(7), AttributeError("x")])
def test_any_exception_a_decoder_raises_is_an_image_error(monkeypatch, exc):
    from PIL import ImageFile

    def load(self):
        raise exc

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)  # every plugin's decoding goes through it
    data = encode(_img(np.random.default_rng(0), 9, 9), "PNG")
    with pytest.raises(ImageError, match=f"damaged image: .*{type(exc).__name__}|damaged image: {exc}"):
        resize_all(data, Resize())


def test_an_interrupt_while_decoding_is_not_swallowed(monkeypatch):
    from PIL import ImageFile

    def load(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with pytest.raises(KeyboardInterrupt):
        resize_all(encode(_img(np.random.default_rng(0), 9, 9)), Resize())


@pytest.mark.reliability
def test_fuzzed_images_give_pixels_or_an_image_error():
    """Mutated files of every format we read (and DDS, TGA, ICO named as ours): 3,000 tries each; each decodes or
    raises ImageError; nothing else escapes."""
    import random
    import warnings

    rng = random.Random(12)
    img = _img(np.random.default_rng(4), 24, 17)
    samples = [encode(img, fmt) for fmt in ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")]
    samples += [encode(img.convert("RGBA"), "DDS"), encode(img, "TGA"), encode(img, "ICO")]
    outcomes = {"decoded": 0, "error": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about many of the damaged files
        for data in samples:
            for _ in range(3000):
                d = bytearray(data)
                for _ in range(rng.randint(1, 8)):
                    d[rng.randrange(min(len(d), 200))] = rng.randrange(256)
                if rng.random() < 0.2:
                    d = d[: rng.randrange(len(d))]
                try:
                    resize_all(bytes(d), Resize((8,), ("box", "lanczos")))
                    outcomes["decoded"] += 1
                except ImageError:
                    outcomes["error"] += 1
    assert outcomes["error"] > 0 and outcomes["decoded"] > 0
