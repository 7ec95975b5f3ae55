"""Benchmark: one sweep of small runs, one run at a time against several runs sharing one GPU.

    python3 bench/sweep_throughput.py                       # GPU 0: 8 runs of WRN-28-2, 32 px, K = 1 2 4 8
    python3 bench/sweep_throughput.py --runs-per-gpu 1 4 --train-flags cuda_graph=true
    .venv/bin/python bench/sweep_throughput.py --cpu        # tiny, on the CPU (one fake GPU slot): tests the bench

The same grid (``seed=0..R-1``, the paper's recipe otherwise: batch 128, bf16 autocast, channels_last, a few
epochs on synthetic 32 px data) is run by ``dsimagenet.sweep`` with ``--gpus 0 --runs-per-gpu K`` for each K, each
sweep into a fresh folder; K=1 (one run at a time) is the baseline, measured in the same call. Printed per K: the
sweep's wall time (start to results.csv: worker start-up, data loading, evaluation and checkpoints included) and
its speed-up against K=1; the images the runs trained divided by that wall time; and the GPU's training rate,
the images/s summed over the runs training at once (min(K, R) x the runs' mean rate from result.json
``train_images_per_s``, which counts each run's training time only), with its speed-up against K=1. Without MPS
the processes sharing a GPU take turns on it, which still fills the gaps each leaves while its host launches
work. The runs here are short, so each run's fixed cost (about 2.5 s on an H200: data to the GPU, the model,
evaluation, checkpoints) weighs on the wall time far more than in a real sweep of 40-epoch runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def parse_flags(items: list[str]) -> dict:
    """``name=value`` TrainConfig settings, typed as the sweep's grid values are."""
    from dsimagenet.grid import parse_grid

    return {k: v[0] for k, v in parse_grid(" ".join(items)).items()} if items else {}


def one_sweep(data: Path, out: Path, runs: int, k: int, base: dict) -> dict:
    from dsimagenet.sweep import SweepConfig, sweep

    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    outcome = sweep(SweepConfig(out=str(out), grid={"seed": list(range(runs))}, base={**base, "data": str(data)},
                                gpus="0", runs_per_gpu=k, quiet=True))
    wall = time.perf_counter() - t
    bad = {n: v for n, v in outcome.items() if v != "ran"}
    if bad:
        raise SystemExit(f"sweep_throughput: runs did not finish: {bad}")
    results = [json.loads((out / f"seed={s}" / "result.json").read_text()) for s in range(runs)]
    images = sum(r["train_images_per_s"] * r["train_seconds"] for r in results)
    rates = [r["train_images_per_s"] for r in results]
    return {"runs_per_gpu": k, "runs": runs, "wall_s": round(wall, 2), "images_per_wall_s": round(images / wall),
            "gpu_images_per_s": round(min(k, runs) * sum(rates) / runs),
            "sum_run_images_per_s": round(sum(rates)),
            "gpu": results[0].get("gpu_name") or "CPU", "device": results[0]["device"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=8, help="runs in the grid")
    p.add_argument("--runs-per-gpu", type=int, nargs="+", default=[1, 2, 4, 8], help="the K to compare; 1 first")
    p.add_argument("--images", type=int, default=5120, help="synthetic training images")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--depth", type=int, default=28)
    p.add_argument("--width", type=float, default=2)
    p.add_argument("--train-flags", nargs="*", default=[], help="more TrainConfig settings, name=value")
    p.add_argument("--cpu", action="store_true", help="tiny runs on the CPU through one fake GPU slot")
    p.add_argument("--csv", type=Path, help="also write the rows here")
    args = p.parse_args()
    from train import synthetic_native

    base = {"epochs": args.epochs, "depth": args.depth, "width": args.width, "log_every": 10**9, "quiet": True,
            "checkpoint_minutes": 1e9, **parse_flags(args.train_flags)}
    if args.cpu:  # the placement sees one (fake) GPU; the runs train on the CPU, 1 thread each
        os.environ["DSIMAGENET_FAKE_GPUS"] = "1"
        base["device"] = "cpu"
    else:
        base["device"] = "cuda"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = synthetic_native(tmp / "data", args.images, args.size)
        print(f"sweep   {args.runs} runs of WRN-{args.depth}-{args.width:g}, {args.size} px, {args.epochs} epochs of "
              f"{args.images:,} images (x2 mirrored), batch 128, one GPU ({base['device']})", flush=True)
        print("  runs/GPU   wall s   speed-up   images/wall s   GPU images/s (runs at once)   speed-up", flush=True)
        for k in args.runs_per_gpu:
            row = one_sweep(data, tmp / f"k{k}", args.runs, k, base)
            rows.append(row)
            row["speedup"] = round(rows[0]["wall_s"] / row["wall_s"], 2)
            row["gpu_speedup"] = round(row["gpu_images_per_s"] / rows[0]["gpu_images_per_s"], 2)
            print(f"  {k:>8}  {row['wall_s']:>7.1f}  {row['speedup']:>8.2f}x  {row['images_per_wall_s']:>14,}  "
                  f"{row['gpu_images_per_s']:>28,}  {row['gpu_speedup']:>7.2f}x", flush=True)
    print(f"  on {rows[0]['gpu']}; baseline: K={rows[0]['runs_per_gpu']} in the same call")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
