"""Benchmark: the Loader vs the common PIL + DataLoader pipeline; opening a full-size 32 px train set native vs
pickle.load; peak memory of converting the 64 px train set.

    .venv/bin/python bench/load.py loader        # 32 px, batch 128, CPU, median of 5 runs each
    .venv/bin/python bench/load.py open          # 1,281,167 generated rows (writes ~8 GB under bench/out)
    .venv/bin/python bench/load.py convert       # ten 64 px batches of the real shapes (writes ~32 GB)
    .venv/bin/python bench/load.py               # loader only (what `make bench` runs)
    .venv/bin/python bench/load.py loader --images 2000 --runs 1 --batches 5   # a quick check that it runs

Each prints the figure and its baseline, measured side by side in the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out"
N_FULL = 1_281_167


class ArrayDS:
    def __init__(self, data, targets, mean):
        self.data, self.targets, self.mean = data, targets, mean

    def __len__(self):
        return len(self.data)


class PILDataset:
    """The common approach: a Dataset that returns PIL images through per-sample transforms (torchvision's
    RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize, written with the same PIL ops)."""

    def __init__(self, data, targets, mean, std):
        import torch

        self.data, self.targets = data, targets
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        import random

        import torch
        from PIL import Image, ImageOps

        img = Image.fromarray(self.data[i])
        img = ImageOps.expand(img, border=4, fill=0)
        x, y = random.randint(0, 8), random.randint(0, 8)
        s = self.data.shape[1]
        img = img.crop((x, y, x + s, y + s))
        if random.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        t = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        return (t - self.mean) / self.std, int(self.targets[i])


def bench_loader(runs: int, batches: int, n: int = 50_000) -> None:
    import torch

    from dsimagenet.data import Loader

    torch.set_num_threads(2)
    s = 32
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8)
    targets = rng.integers(0, 1000, n)
    ds = ArrayDS(data, targets, data.mean(0, dtype=np.float64))
    loader = Loader(ds, 128, "cpu", augment="paper", seed=0)
    pil = torch.utils.data.DataLoader(PILDataset(data, targets, [0.48, 0.45, 0.40], [0.27, 0.26, 0.28]),
                                      batch_size=128, shuffle=True, num_workers=2, drop_last=True,
                                      persistent_workers=True)

    def ours() -> float:
        it = loader.epoch(0)
        next(it)  # the epoch's plan made, as the baseline's sampler has made its permutation
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches * 128 / (time.perf_counter() - t)

    def theirs() -> float:
        it = iter(pil)
        next(it)  # workers started and warm
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        rate = batches * 128 / (time.perf_counter() - t)
        del it
        time.sleep(1.0)  # let the workers finish the batches they prefetched: ours must not share the CPUs
        return rate

    a, b = [], []
    for _ in range(runs):  # interleaved, so both see the same machine load
        a.append(ours())
        b.append(theirs())
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"loader  32 px, {n:,} images, batch 128, CPU, {batches} batches, median of {runs}:")
    print(f"  dsimagenet Loader, augment='paper' (2 threads):           {ma:12,.0f} images/s")
    print(f"  PIL Dataset + DataLoader (2 workers), crop+flip+normalize: {mb:12,.0f} images/s")
    print(f"  ratio: {ma / mb:.1f}x")


def _measure(code: str, setup: str = "") -> tuple[float, float]:
    """Run ``setup`` then ``code`` in a fresh interpreter; returns (seconds of ``code``, peak RSS in GiB)."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so it would report the parent's peak
    wrapper = ("import time\n" + setup + "\nt = time.perf_counter()\n" + code +
               "\nhwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]"
               "\nprint(time.perf_counter() - t, int(hwm) / 2**20)")
    out = subprocess.run([sys.executable, "-c", wrapper], check=True, capture_output=True, text=True).stdout
    secs, gib = out.split()[-2:]
    return float(secs), float(gib)


def _write_pickles(folder: Path, n: int, size: int) -> None:
    """Official-format pickle batches of the real shapes; a cheap pixel pattern (content does not matter)."""
    from dsimagenet.formats import official

    folder.mkdir(parents=True, exist_ok=True)
    d = 3 * size * size
    mean = np.full(d, 127.5)
    for i, (a, b) in enumerate(official.batch_bounds(n)):
        rows = np.empty((b - a, d), np.uint8)
        rows[:] = (np.arange(d) % 251).astype(np.uint8)
        rows[:, 0] = np.arange(a, b) % 256
        labels = np.arange(a, b) % 1000 + 1
        official.write_batch(folder / f"train_data_batch_{i + 1}", rows, labels, mean, "pickle")
        del rows
    official.write_batch(folder / "val_data", np.zeros((1000, d), np.uint8), np.arange(1000) + 1, None, "pickle")


def bench_open(runs: int) -> None:
    from dsimagenet import convert

    pk, nat = OUT / "open32_pickle", OUT / "open32_native"
    if not (pk / "val_data").exists():
        _write_pickles(pk, N_FULL, 32)
    if not (nat / "meta.json").exists():
        convert(pk, nat, ["native"])
    native_code = (f"ds = open_dataset({str(nat)!r})\n"
                   "assert ds.data.shape == (1281167, 32, 32, 3)")
    pickle_code = (f"xs, ys = [], []\n"
                   f"for i in range(1, 11):\n"
                   f"    with open('{pk}/train_data_batch_%d' % i, 'rb') as f:\n"
                   f"        d = pickle.load(f, encoding='latin1')\n"
                   f"    xs.append(d['data']); ys += d['labels']\n"
                   f"x = np.concatenate(xs).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)\n"
                   f"assert x.shape == (1281167, 32, 32, 3)")
    a = [_measure(native_code, "from dsimagenet import open_dataset") for _ in range(runs)]
    b = [_measure(pickle_code, "import pickle\nimport numpy as np") for _ in range(runs)]
    print(f"open    full-size 32 px train set (1,281,167 rows, 3.9 GB; files in the page cache), median of {runs}:")
    print(f"  dsimagenet open_dataset (native, memory map): {statistics.median(x[0] for x in a):8.3f} s "
          f"  peak RSS {statistics.median(x[1] for x in a):6.2f} GiB")
    print(f"  pickle.load of the ten batches + concatenate: {statistics.median(x[0] for x in b):8.3f} s "
          f"  peak RSS {statistics.median(x[1] for x in b):6.2f} GiB")


def bench_convert() -> None:
    pk, nat = OUT / "conv64_pickle", OUT / "conv64_native"
    if not (pk / "val_data").exists():
        _write_pickles(pk, N_FULL, 64)
    shutil.rmtree(nat, ignore_errors=True)
    batch_gib = os.path.getsize(pk / "train_data_batch_10") / 2**30
    secs, gib = _measure(f"from dsimagenet import convert\nconvert({str(pk)!r}, {str(nat)!r}, ['native'])")
    print("convert 64 px official pickles (ten train batches of the real shapes + val) -> native:")
    print(f"  largest input batch file: {batch_gib:.2f} GiB; peak RSS of the conversion: {gib:.2f} GiB "
          f"({gib / batch_gib:.2f}x); {secs:.0f} s")
    shutil.rmtree(nat, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="*", default=["loader"], choices=["loader", "open", "convert"])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--images", type=int, default=50_000, help="images in the loader benchmark's split")
    p.add_argument("--keep", action="store_true", help="keep the generated files under bench/out")
    args = p.parse_args()
    try:
        for w in args.what:
            {"loader": lambda: bench_loader(args.runs, args.batches, args.images),
             "open": lambda: bench_open(args.runs), "convert": bench_convert}[w]()
    finally:
        if not args.keep:
            shutil.rmtree(OUT, ignore_errors=True)


if __name__ == "__main__":
    main()
