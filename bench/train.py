"""Benchmark: training throughput of dsimagenet's trainer.

    .venv/bin/python bench/train.py            # CPU: WRN-28-2, 32 px, batch 128: trainer vs a plain eager loop
    python3 bench/train.py --gpu               # GPU: the Table 1 shapes, projected 40-epoch time vs Titan X days

CPU: the trainer (the Loader's paper augmentation on the device, fp32) against a plain eager fp32 loop over the
same model fed by a torch DataLoader (2 workers) with per-sample PIL crop/flip/normalize; images/s of the second
epoch (the first warms up), median of several runs, interleaved.
GPU: the trainer with its CUDA defaults (bf16 autocast, channels_last, data resident on the GPU, cudnn
benchmark), images/s over the second epoch on synthetic data; the projection is 40 epochs of 2 x 1,281,167
images (the paper's doubled epoch) at that rate.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EPOCH_IMAGES = 2 * 1_281_167


def synthetic_native(root: Path, n: int, size: int, classes: int = 1000, seed: int = 0) -> Path:
    from dsimagenet.formats.native import NativeWriter
    from dsimagenet.labels import IMAGENET

    rng = np.random.default_rng(seed)
    with NativeWriter(root, size, list(IMAGENET.wnids), method="synthetic") as w:
        for split, count in (("train", n), ("val", max(n // 20, 100))):
            s = w.split(split)
            for a in range(0, count, 8192):
                b = min(a + 8192, count)
                s.append(rng.integers(0, 256, (b - a, size, size, 3), dtype=np.uint8),
                         rng.integers(1, classes + 1, b - a))
    return root


def trainer_rate(data: Path, out: Path, depth: int, width: float, device: str, **kw) -> float:
    """images/s of the trainer's second epoch."""
    from dsimagenet.train import TrainConfig, train

    shutil.rmtree(out, ignore_errors=True)
    train(TrainConfig(data=str(data), out=str(out), depth=depth, width=width, epochs=2, device=device, quiet=True,
                      log_every=10**9, **kw))
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    images = m[1]["images_per_s"] * m[1]["train_seconds"] - m[0]["images_per_s"] * m[0]["train_seconds"]
    return images / (m[1]["train_seconds"] - m[0]["train_seconds"])


def plain_rate(data: Path, depth: int, width: float, steps: int) -> float:
    """A plain eager fp32 loop: DataLoader(2 workers, PIL transforms) -> model -> SGD."""
    import torch
    from load import PILDataset

    from dsimagenet import open_dataset
    from dsimagenet.model import WideResNet

    ds = open_dataset(data)
    loader = torch.utils.data.DataLoader(PILDataset(np.asarray(ds.data), ds.targets, [0.5] * 3, [0.25] * 3),
                                         batch_size=128, shuffle=True, num_workers=2, drop_last=True,
                                         persistent_workers=True)
    torch.manual_seed(0)
    model = WideResNet(depth, width, 1000, ds.image_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)
    def batches():
        while True:
            yield from loader

    it = batches()
    t = None
    for i in range(steps + 1):
        if i == 1:
            t = time.perf_counter()  # after one warm-up step
        x, y = next(it)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * 128 / (time.perf_counter() - t)


def bench_cpu(runs: int) -> None:
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = synthetic_native(tmp / "data", 640, 32)  # 1,280 samples an epoch with the paper's doubling
        ours, theirs = [], []
        for _ in range(runs):
            ours.append(trainer_rate(data, tmp / "run", 28, 2, "cpu"))
            theirs.append(plain_rate(data, 28, 2, 10))
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"train   WRN-28-2, 32 px, batch 128, CPU (2 threads), fp32, median of {runs}:")
    print(f"  dsimagenet trainer (Loader, paper augmentation):       {a:8.1f} images/s")
    print(f"  plain eager loop + DataLoader (2 workers, PIL transforms): {b:8.1f} images/s")
    print(f"  ratio: {a / b:.2f}x")


def bench_gpu(n: int, out_csv: Path | None, compile_models: list[str], compile_modes: list[str],
              models: list[str] | None = None, eager: bool = True) -> None:
    import torch

    from dsimagenet.model import WideResNet, count_parameters

    table = {(int(r["size"]), int(r["depth"]), float(r["width"])): float(r["titan_x_days"]) for r in
             csv.DictReader(line for line in open(Path(__file__).resolve().parent.parent / "src" / "dsimagenet" /
                                                  "resources" / "paper_table1.csv") if not line.startswith("#"))}
    rows = []
    print(f"train   on {torch.cuda.get_device_name()}, torch {torch.__version__}, batch 128, bf16, channels_last")
    print("  model        size  params      mode              images/s  40 epochs (h)  Titan X (h)  speed-up")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size, depth, width in [(16, 20, 10), (32, 28, 2), (32, 28, 10), (64, 36, 2)]:
            if models and f"{depth}-{width:g}" not in models:
                continue
            data = synthetic_native(tmp / f"d{size}", n, size)
            for mode in ["eager"] * eager + (compile_modes if f"{depth}-{width:g}" in compile_models else []):
                kw = {} if mode == "eager" else {"compile": True, "compile_mode": mode}
                rate = trainer_rate(data, tmp / "run", depth, width, "cuda", **kw)
                hours = 40 * EPOCH_IMAGES / rate / 3600
                titan = table[(size, depth, float(width))] * 24
                params = count_parameters(WideResNet(depth, width, 1000, size))
                rows.append(dict(model=f"WRN-{depth}-{width:g}", size=size, params=params, mode=mode,
                                 images_per_s=round(rate), hours_40_epochs=round(hours, 2), titan_x_hours=titan,
                                 speedup=round(titan / hours, 1)))
                print(f"  WRN-{depth}-{width:<4g}  {size:>4}  {params:>10,}  {mode:<16}  {rate:>10,.0f}  "
                      f"{hours:>13.2f}  {titan:>11.1f}  {titan / hours:>7.1f}x", flush=True)
            shutil.rmtree(data)
    if out_csv:
        with open(out_csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="the GPU rows (needs CUDA)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--images", type=int, default=25_600, help="synthetic training images per GPU row")
    p.add_argument("--csv", type=Path, help="also write the GPU rows here")
    p.add_argument("--compile-models", nargs="*", default=["20-10", "28-2", "36-2"],
                   help="DEPTH-WIDTH of the GPU rows also run with torch.compile")
    p.add_argument("--compile-modes", nargs="*", default=["reduce-overhead"])
    p.add_argument("--models", nargs="*", help="only these DEPTH-WIDTH GPU rows (default: all four)")
    p.add_argument("--no-eager", action="store_true", help="leave out the eager GPU rows")
    args = p.parse_args()
    if args.gpu:
        bench_gpu(args.images, args.csv, args.compile_models, args.compile_modes, args.models, not args.no_eager)
    else:
        bench_cpu(args.runs)


if __name__ == "__main__":
    main()
