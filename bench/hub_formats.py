"""Benchmark: writing and reading the Hub formats (parquet, WebDataset) against the official pickles and the
native arrays, on the same images in the same run.

    .venv/bin/python bench/hub_formats.py [--images 20000] [--size 32] [--runs 3]

A native dataset of ``--images`` train images (smooth synthetic images: PNG compresses them about as it does
downsampled photos) and a tenth as many val images is converted to each format (``dsimagenet.convert``, one
process, timed end to end, median of ``--runs``), then read back whole with ``open_dataset`` (every pixel
touched; native's memory map is copied into memory so that it too reads every byte). Prints images per second
of CPU time (the process's own: what the load of other processes on a shared machine changes least) and of
wall time, and bytes per image, for each; the pickle and native figures are the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _images(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth images: a 4x4 random grid upsampled, plus a little noise."""
    from PIL import Image

    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        out[i] = np.asarray(small.resize((size, size), Image.BILINEAR))
    return np.clip(out.astype(np.int16) + rng.integers(-3, 4, out.shape), 0, 255).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    from dsimagenet import convert, open_dataset
    from dsimagenet.formats.native import NativeWriter
    from dsimagenet.labels import IMAGENET

    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-hub-"))
    src = tmp / "native"
    n_val = max(1, args.images // 10)
    with NativeWriter(src, args.size, list(IMAGENET.wnids), method="synthetic") as w:
        for split, n in (("train", args.images), ("val", n_val)):
            w.split(split).append(_images(n, args.size, rng), rng.integers(1, 1001, n))
    total = args.images + n_val
    print(f"{total:,} images of {args.size} px ({args.images:,} train), median of {args.runs} runs, one process")
    print(f"{'format':<11} {'write img/s (CPU, wall)':>24} {'read img/s (CPU, wall)':>24} {'bytes/img':>10}")
    for fmt in ("native", "pickle", "parquet", "webdataset"):
        times = {"write": [], "read": []}
        for r in range(args.runs):
            out = tmp / f"{fmt}{r}"
            c0, t0 = time.process_time(), time.perf_counter()
            convert(src, out, [fmt])
            times["write"].append((time.process_time() - c0, time.perf_counter() - t0))
            c0, t0 = time.process_time(), time.perf_counter()
            for split in ("train", "val"):
                ds = open_dataset(out, split, format=fmt)
                np.asarray(ds.data).copy()
            times["read"].append((time.process_time() - c0, time.perf_counter() - t0))
        size = sum(p.stat().st_size for p in (tmp / f"{fmt}0").rglob("*") if p.is_file())
        rates = {k: tuple(total / statistics.median(t[i] for t in v) for i in (0, 1)) for k, v in times.items()}
        print(f"{fmt:<11} {rates['write'][0]:>13,.0f} {rates['write'][1]:>10,.0f} {rates['read'][0]:>13,.0f} "
              f"{rates['read'][1]:>10,.0f} {size / total:>10,.0f}")


if __name__ == "__main__":
    main()
