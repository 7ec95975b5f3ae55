"""Benchmark: training throughput of dsimagenet's trainer.

    .venv/bin/python bench/train.py            # CPU: WRN-28-2, 32 px, batch 128: trainer vs a plain eager loop
    python3 bench/train.py --gpu               # GPU: the Table 1 shapes, projected 40-epoch time vs Titan X days
    python3 bench/train.py --gpu --models 28-2 --compile-modes graph graph+compile reduce-overhead

CPU: the trainer (the Loader's paper augmentation on the device, fp32) against a plain eager fp32 loop over the
same model fed by a torch DataLoader (2 workers) with per-sample PIL crop/flip/normalize; images/s of the second
epoch (the first warms up), median of several runs, interleaved.
GPU: the trainer with its CUDA defaults (bf16 autocast, channels_last, data resident on the GPU, cudnn
benchmark), images/s over the second epoch on synthetic data; the projection is 40 epochs of 2 x 1,281,167
images (the paper's doubled epoch) at that rate. Modes: eager (the baseline); a torch.compile mode (default,
reduce-overhead, max-autotune); graph (``--cuda-graph``: the whole step, loader included, in one CUDA graph, eager
kernels); graph+compile (``--cuda-graph --compile``: the same graph of inductor's kernels). A row that fails is
printed as FAILED with its error and the table goes on; with --csv every row is written as soon as it is measured.
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


def mode_settings(mode: str) -> dict:
    """The TrainConfig settings of a bench mode."""
    if mode == "eager":
        return {}
    if mode == "graph":
        return {"cuda_graph": True}
    if mode == "graph+compile":
        return {"cuda_graph": True, "compile": True}
    return {"compile": True, "compile_mode": mode}


# WRN-28-2 first: the row bound by launches; WRN-28-10 last: its compilation is the longest
SHAPES = [(32, 28, 2), (16, 20, 10), (64, 36, 2), (32, 28, 10)]


def bench_gpu(n: int, out_csv: Path | None, compile_models: list[str], compile_modes: list[str],
              models: list[str] | None = None, eager: bool = True, device: str = "cuda",
              shapes: list[tuple[int, int, float]] = SHAPES, also: list[str] = ()) -> None:
    import torch

    from dsimagenet.model import WideResNet, count_parameters

    table = {(int(r["size"]), int(r["depth"]), float(r["width"])): float(r["titan_x_days"]) for r in
             csv.DictReader(line for line in open(Path(__file__).resolve().parent.parent / "src" / "dsimagenet" /
                                                  "resources" / "paper_table1.csv") if not line.startswith("#"))}
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke test: not a figure)"
    print(f"train   on {name}, torch {torch.__version__}, batch 128, bf16, channels_last", flush=True)
    print("  model        size  params      mode              images/s  40 epochs (h)  Titan X (h)  speed-up")
    fields = ["model", "size", "params", "mode", "images_per_s", "hours_40_epochs", "titan_x_hours", "speedup",
              "device", "error"]
    if out_csv:
        with open(out_csv, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writeheader()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size, depth, width in shapes:
            if models and f"{depth}-{width:g}" not in models:
                continue
            data = synthetic_native(tmp / f"d{size}", n, size)
            params = count_parameters(WideResNet(depth, width, 1000, size))
            titan = table.get((size, depth, float(width)), float("nan")) * 24  # nan: a shape not in Table 1
            key = f"{depth}-{width:g}"
            extra = [a.partition(":")[2] for a in also if a.partition(":")[0] == key]
            for mode in ["eager"] * eager + (compile_modes if key in compile_models else []) + extra:
                row = dict(model=f"WRN-{depth}-{width:g}", size=size, params=params, mode=mode, titan_x_hours=titan,
                           device=name)
                try:
                    rate = trainer_rate(data, tmp / "run", depth, width, device, **mode_settings(mode))
                except Exception as e:  # noqa: BLE001 - one failing mode must not cost the other rows
                    row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
                    print(f"  WRN-{depth}-{width:<4g}  {size:>4}  {params:>10,}  {mode:<16}  FAILED: {row['error']}",
                          flush=True)
                else:
                    hours = 40 * EPOCH_IMAGES / rate / 3600
                    row.update(images_per_s=round(rate), hours_40_epochs=round(hours, 2),
                               speedup=round(titan / hours, 1))
                    print(f"  WRN-{depth}-{width:<4g}  {size:>4}  {params:>10,}  {mode:<16}  {rate:>10,.0f}  "
                          f"{hours:>13.2f}  {titan:>11.1f}  {titan / hours:>7.1f}x", flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
                if out_csv:  # row by row: a session cut short keeps what it measured
                    with open(out_csv, "a", newline="") as f:
                        csv.DictWriter(f, fieldnames=fields, restval="").writerow(row)
            shutil.rmtree(data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="the GPU rows (needs CUDA)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--images", type=int, default=25_600, help="synthetic training images per GPU row")
    p.add_argument("--csv", type=Path, help="also write the GPU rows here")
    p.add_argument("--compile-models", nargs="*", default=["20-10", "28-2", "28-10", "36-2"],
                   help="DEPTH-WIDTH of the GPU rows also run in the --compile-modes")
    p.add_argument("--compile-modes", nargs="*", default=["reduce-overhead"],
                   help="modes after eager: a torch.compile mode, graph (--cuda-graph), graph+compile")
    p.add_argument("--also", nargs="*", default=[], metavar="DEPTH-WIDTH:MODE",
                   help="one more mode for one model, after the others (e.g. 28-2:graph)")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test the GPU table's code")
    p.add_argument("--shape", nargs=3, type=float, metavar=("SIZE", "DEPTH", "WIDTH"),
                   help="one shape of your own instead of Table 1's (a smoke test)")
    p.add_argument("--models", nargs="*", help="only these DEPTH-WIDTH GPU rows (default: all four)")
    p.add_argument("--no-eager", action="store_true", help="leave out the eager GPU rows")
    args = p.parse_args()
    if args.gpu:
        shapes = [(int(args.shape[0]), int(args.shape[1]), args.shape[2])] if args.shape else SHAPES
        bench_gpu(args.images, args.csv, args.compile_models, args.compile_modes, args.models, not args.no_eager,
                  args.device, shapes, args.also)
    else:
        bench_cpu(args.runs)


if __name__ == "__main__":
    main()
