"""The kernel: image bytes -> RGB -> uint8 (S, S, 3) for several sizes and methods from one decode. Pure: no I/O.

    >>> out, note = resize_all(jpeg_bytes, Resize(sizes=(16, 32), methods=("box", "nearest")))
    >>> out[(32, "box")].shape
    (32, 32, 3)

The exact path (the default) is the paper's: ``Image.open(f).convert("RGB").resize((S, S), method)`` on the
whole image, byte for byte with the installed Pillow. ``fast`` lets libjpeg decode JPEGs at 1/2, 1/4 or 1/8
scale (``Image.draft``) while both sides stay at least twice the largest output, then resizes as the exact path:
close to, but not the same as, the exact pixels (BENCHMARKS.md gives the difference per method).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from dsimagenet.errors import ConfigError, DSImageNetError

METHODS = {"box": Image.Resampling.BOX, "nearest": Image.Resampling.NEAREST,
           "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
           "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}
ASPECTS = ("squash", "center-crop")
# The only decoders Pillow may try: those of the file names the sources accept (records.IMAGE_EXTENSIONS; MPO,
# a camera JPEG with extra frames, comes through the JPEG decoder). Pillow otherwise tries every plugin it has
# on any bytes, so a file named .jpg could reach the DDS, PSD, FITS or EPS parsers (rarely used, fuzzed less,
# and EPS would start Ghostscript): content in another format is "not an image Pillow can read".
OPEN_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")


class ImageError(DSImageNetError, ValueError):
    """An input that is not a usable image; the message says why."""


@dataclass(frozen=True)
class Resize:
    sizes: tuple[int, ...] = (32,)
    methods: tuple[str, ...] = ("box",)
    aspect: str = "squash"  # the paper squashes the whole image; center-crop takes the central square first
    fast: bool = False
    exif_transpose: bool = False  # the paper and the standard pipelines ignore EXIF orientation

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError(f"--methods: unknown methods {bad}: choose from {sorted(METHODS)}" if bad else
                              f"--methods: give at least one of {sorted(METHODS)}")
        if self.aspect not in ASPECTS:
            raise ConfigError(f"--aspect must be one of {ASPECTS}, not {self.aspect!r}")
        if not self.sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.sizes):
            raise ConfigError(f"--sizes must be positive whole numbers, not {list(self.sizes)}")

    @property
    def combos(self) -> list[tuple[int, str]]:
        return [(s, m) for s in self.sizes for m in self.methods]


def decode(data: bytes, r: Resize) -> tuple[Image.Image, str | None]:
    """Bytes -> an RGB image, all pixels loaded. Returns it and a note on what was converted (None if nothing).

    Raises ImageError for empty, truncated, corrupt or non-image data and for decompression bombs: whatever
    Pillow raises while it parses untrusted bytes is the file's fault, not ours."""
    if not data:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=OPEN_FORMATS)
            fmt, mode = img.format, img.mode
            if r.fast and fmt == "JPEG":
                # decode at 1/2, 1/4 or 1/8 scale while both sides stay at least twice the largest output
                want = 2 * max(r.sizes)
                img.draft("RGB", (want, want))
            img.load()  # a truncated JPEG fails here, not at open
            if r.exif_transpose:
                try:
                    img = ImageOps.exif_transpose(img)
                except Exception as e:  # noqa: BLE001 - Pillow raises many types on bad EXIF
                    raise ImageError(f"unreadable EXIF orientation: {_describe(e)}") from None
            converted = img.mode != "RGB"
            if converted:
                img = img.convert("RGB")  # an exotic mode (a fuzzed TIFF's) may have no conversion
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"not an image Pillow can read (as {', '.join(OPEN_FORMATS)})") from None
    except Exception as e:  # noqa: BLE001 - see below
        # Pillow's plugins parse untrusted bytes in Python: a fuzzed file raises OSError, SyntaxError,
        # ValueError, EOFError, but also struct.error, TypeError, IndexError, ZeroDivisionError,
        # NotImplementedError or MemoryError. Each is this file's fault: a per-file error that --skip-bad
        # skips and lists. KeyboardInterrupt and SystemExit are not Exceptions and pass through.
        raise ImageError(f"damaged image: {_describe(e)}") from None
    notes = []
    if fmt != "JPEG":
        notes.append(f"{fmt} content")
    if converted:
        notes.append(f"mode {mode} converted to RGB")
    if min(img.size) < 1:
        raise ImageError(f"image of size {img.size}")
    return img, "; ".join(notes) or None


def _describe(e: Exception) -> str:
    text = str(e)
    if isinstance(e, OSError | SyntaxError | ValueError | EOFError) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def resize_all(data: bytes, r: Resize) -> tuple[dict[tuple[int, str], np.ndarray], str | None]:
    """Every (size, method) of ``r`` from one decode of ``data``."""
    img, note = decode(data, r)
    if r.aspect == "center-crop":
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    out = {}
    for size, method in r.combos:
        out[(size, method)] = np.asarray(img.resize((size, size), METHODS[method]), dtype=np.uint8)
    return out, note
