"""Benchmark: building 16, 32 and 64 px (box) from real ImageNet JPEGs, against the paper's two-stage method and
against decoding alone; the fidelity of --fast; peak memory of a build.

    .venv/bin/python bench/build.py [--sample ../shared/imagenet-sample] [--copies 4] [--runs 3] [--bound-copies 40]
    .venv/bin/python bench/build.py --bound-only          # just the end-to-end build against its kernel bound

The 500 sample JPEGs are laid out as <wnid>/<file> class folders, ``--copies`` times under different names (so
that one-time start-up does not dominate); every method uses the same number of processes (``--workers``,
default: all cores) and is timed end to end, median of ``--runs`` interleaved runs:
  exact:     ``dsimagenet build --sizes 16 32 64 --methods box --formats pickle`` (decode once, three resizes,
             the official pickles written);
  fast:      the same with ``--fast``;
  two-stage: the paper's scripts: per size, decode and resize every image and save a PNG; then read the PNGs
             back, flatten to channel-planar rows and pickle them (both stages over a process pool);
  decode:    Image.open + load of every file and nothing else (the floor);
  and the exact build of 32 px alone (one resize per decode), to show what each extra size costs.
Then the build end to end against its own kernel bound, measured in the same run: ``build(... formats pickle +
native, 16/32/64 box)`` in a fresh interpreter over ``--bound-copies`` copies of the sample (40: 20,000 images,
so that start-up is well under 5%), against ``workers / the per-image time of the exact kernel in one
process``; with its parts (start-up, indexing, decode+resize in the workers, the formats' jobs in the same
workers, meta.json and manifests), and the CPU time of the build and its workers against the kernel's: what the
load of other processes changes least (wall times on a shared machine mean little; its CPU share says how much
work the build does beyond the kernel).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = (16, 32, 64)


def lay_out(sample: Path, dst: Path, copies: int) -> list[Path]:
    files = sorted(sample.glob("*.JPEG"))
    if not files:
        sys.exit(f"{sample}: no .JPEG files (pass --sample)")
    out = []
    for f in files:
        wnid = f.name.split("_")[0]
        (dst / wnid).mkdir(parents=True, exist_ok=True)
        for k in range(copies):
            p = dst / wnid / f"{wnid}_{k}_{f.name}"
            shutil.copyfile(f, p)
            out.append(p)
    return out


def _decode(path: str) -> int:
    with Image.open(path) as im:
        im.load()
        return im.size[0]


def _stage1(args: tuple[str, str, int]) -> None:
    path, outdir, s = args
    img = Image.open(path).convert("RGB")
    img.resize((s, s), Image.BOX).save(Path(outdir) / str(s) / (Path(path).stem + ".png"))


def _stage2(path: str) -> np.ndarray:
    a = np.array(Image.open(path))
    return np.concatenate([a[:, :, 0].flatten(), a[:, :, 1].flatten(), a[:, :, 2].flatten()])


def two_stage(files: list[Path], tmp: Path, workers: int) -> None:
    for s in SIZES:
        (tmp / str(s)).mkdir(parents=True, exist_ok=True)
    with get_context("spawn").Pool(workers) as pool:
        for s in SIZES:  # the paper's scripts made one resolution per run: every JPEG decoded once per size
            pool.map(_stage1, [(str(f), str(tmp), s) for f in files], chunksize=16)
        for s in SIZES:
            pngs = sorted(str(p) for p in (tmp / str(s)).glob("*.png"))
            rows = np.stack(pool.map(_stage2, pngs, chunksize=16))
            labels = [1] * len(rows)
            with open(tmp / f"{s}_data", "wb") as f:
                pickle.dump({"data": rows, "labels": labels, "mean": rows.mean(0)}, f)


def decode_only(files: list[Path], workers: int) -> None:
    with get_context("spawn").Pool(workers) as pool:
        pool.map(_decode, [str(f) for f in files], chunksize=16)


def ours(src: Path, out: Path, workers: int, fast: bool, sizes=SIZES) -> None:
    cmd = [sys.executable, "-m", "dsimagenet", "build", "--train", str(src), "--out", str(out), "--sizes",
           *map(str, sizes), "--methods", "box", "--formats", "pickle", "--workers", str(workers),
           "--allow-partial", "--quiet"] + (["--fast"] if fast else [])
    subprocess.run(cmd, check=True, cwd=ROOT)


def peak_memory(src: Path, out: Path, workers: int) -> float:
    """Peak RSS (GiB) of the largest process of a build (the main one or a worker), from a small parent."""
    code = ("import resource, subprocess, sys\n"
            f"subprocess.run({[sys.executable, '-m', 'dsimagenet', 'build', '--train', str(src), '--out', str(out), '--sizes', *map(str, SIZES), '--methods', 'box', '--formats', 'pickle,native', '--workers', str(workers), '--allow-partial', '--quiet']!r}, check=True, cwd={str(ROOT)!r})\n"  # noqa: E501
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20)")
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                text=True).stdout.split()[-1])


def fidelity(files: list[Path]) -> None:
    from dsimagenet.resize import METHODS, Resize, resize_all

    print("fidelity of --fast against the exact path, over the sample (all sizes 16/32/64 pooled):")
    print("  method     mean |diff|  max |diff|  PSNR (dB)  identical pixels")
    exact_r = Resize(SIZES, tuple(METHODS))
    fast_r = Resize(SIZES, tuple(METHODS), fast=True)
    stats = {m: [0.0, 0, 0.0, 0, 0] for m in METHODS}  # sum |d|, max |d|, sum d^2, identical, count
    for f in files:
        data = f.read_bytes()
        a, _ = resize_all(data, exact_r)
        b, _ = resize_all(data, fast_r)
        for (s, m), x in a.items():
            d = x.astype(np.int64) - b[(s, m)]
            st = stats[m]
            st[0] += np.abs(d).sum()
            st[1] = max(st[1], int(np.abs(d).max()))
            st[2] += (d * d).sum()
            st[3] += int((d == 0).sum())
            st[4] += d.size
    for m, (sa, mx, s2, same, n) in stats.items():
        mse = s2 / n
        psnr = float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
        print(f"  {m:<9}  {sa / n:11.3f}  {mx:10d}  {psnr:9.2f}  {100 * same / n:15.1f}%")


def end_to_end(src: Path, out: Path, workers: int) -> tuple[float, dict[str, float]]:
    """The wall time of a pickle + native build of SIZES in a fresh interpreter, and its phases; its CPU time
    (the build and its workers, user + system) as the phase "cpu"."""
    code = ("import json, time\n"
            "from dsimagenet.build import BuildConfig, build\n"
            "t, t0 = {}, time.perf_counter()\n"
            f"build(BuildConfig(out={str(out)!r}, train={str(src)!r}, sizes={SIZES!r}, methods=('box',), "
            f"formats=('pickle', 'native'), workers={workers}, allow_partial=True, quiet=True), t)\n"
            "t['build'] = time.perf_counter() - t0\n"
            "print(json.dumps(t))")
    before, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
    wall, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime  # workers too: the build joins them
    return wall, {**json.loads(done.stdout.splitlines()[-1]), "cpu": cpu}


def kernel_bound(sample: Path, tmp: Path, copies: int, workers: int, runs: int) -> None:
    """The build end to end against ``workers / per-image time of the exact kernel``, both measured now."""
    from dsimagenet.resize import Resize, resize_all

    files = lay_out(sample, tmp / "bound-src", copies)
    datas = [f.read_bytes() for f in sorted(sample.glob("*.JPEG"))]
    r = Resize(SIZES, ("box",))
    per_image, per_image_cpu, walls = [], [], []
    for _ in range(runs):  # interleaved, so that a busy moment of the machine falls on both
        t, cpu = time.perf_counter(), time.process_time()
        for d in datas:
            resize_all(d, r)
        per_image.append((time.perf_counter() - t) / len(datas))
        per_image_cpu.append((time.process_time() - cpu) / len(datas))
        shutil.rmtree(tmp / "bound-out", ignore_errors=True)
        walls.append(end_to_end(tmp / "bound-src", tmp / "bound-out", workers))
    kernel_s, kernel_cpu = statistics.median(per_image), statistics.median(per_image_cpu)
    wall, parts = sorted(walls, key=lambda w: w[0])[len(walls) // 2]
    cpu = parts.pop("cpu")
    bound, rate = workers / kernel_s, len(files) / wall
    print(f"bound   {len(files):,} JPEGs ({len(files) // copies} real ones x {copies}), sizes 16/32/64 box, "
          f"pickle + native, {workers} processes, median of {runs}:")
    print(f"  end to end {wall:.1f} s = {rate:.0f} images/s; kernel bound {workers} / {1e3 * kernel_s:.2f} ms = "
          f"{bound:.0f} images/s: {100 * rate / bound:.0f}% of the bound")
    startup = wall - parts.pop("build")
    named = {"start-up": startup, "index": parts.pop("index", 0.0),
             "decode+resize (workers, their spawn included)": parts.pop("resize", 0.0), **parts}
    named["other (locking, manifests, clean-up)"] = wall - sum(named.values())
    print("  where the time goes: " + "; ".join(f"{k} {v:.2f} s ({100 * v / wall:.1f}%)" for k, v in named.items()))
    print(f"  the kernel alone would take {len(files) * kernel_s / workers:.1f} s of it")
    # what the load of other processes does not change much: the work the build does beyond the kernel's
    print(f"  CPU (user + system, the build and its workers): {cpu:.1f} s = {1e3 * cpu / len(files):.2f} ms an "
          f"image, the kernel's {1e3 * kernel_cpu:.2f} ms is {100 * kernel_cpu * len(files) / cpu:.0f}% of it; "
          f"cores not used by the build (idle, or taken by other processes): "
          f"{100 * (1 - cpu / (wall * workers)):.0f}% of {workers} x the wall time")


def kernel(files: list[Path], runs: int) -> None:
    """Per-image cost in one process, no start-up: what a full-size build converges to."""
    from dsimagenet.resize import Resize, resize_all

    datas = [f.read_bytes() for f in files]

    def per_image(fn) -> float:
        t = time.perf_counter()
        for d in datas:
            fn(d)
        return (time.perf_counter() - t) / len(datas) * 1e3

    def decode(d: bytes) -> None:
        with Image.open(io.BytesIO(d)) as im:
            im.load()

    cases = {"decode only": decode,
             "exact, 16/32/64": lambda d: resize_all(d, Resize(SIZES, ("box",))),
             "fast, 16/32/64": lambda d: resize_all(d, Resize(SIZES, ("box",), fast=True)),
             "exact, 32 only": lambda d: resize_all(d, Resize((32,), ("box",)))}
    ms = {k: [] for k in cases}
    for _ in range(runs):
        for k, fn in cases.items():
            ms[k].append(per_image(fn))
    med = {k: statistics.median(v) for k, v in ms.items()}
    print(f"kernel  one process, {len(datas)} sample JPEGs, median of {runs} (ms per image; no start-up costs):")
    for k, v in med.items():
        print(f"  {k:<18} {v:6.2f} ms   {100 * med['decode only'] / v:5.0f}% of the decode floor")
    print(f"  fast / exact: {med['exact, 16/32/64'] / med['fast, 16/32/64']:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sample", type=Path, default=ROOT.parent / "shared" / "imagenet-sample")
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--bound-copies", type=int, default=40)
    p.add_argument("--bound-only", action="store_true", help="only the end-to-end build against its kernel bound")
    args = p.parse_args()
    if not args.sample.is_dir():
        print(f"skipped: no sample images at {args.sample}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.bound_only:
            kernel_bound(args.sample, tmp, args.bound_copies, args.workers, args.runs)
            return
        files = lay_out(args.sample, tmp / "src", args.copies)
        n = len(files)
        times = {k: [] for k in ("exact", "fast", "two-stage", "decode", "exact32")}
        for _ in range(args.runs):
            for name, fn in (("exact", lambda: ours(tmp / "src", tmp / "o1", args.workers, False)),
                             ("exact32", lambda: ours(tmp / "src", tmp / "o1", args.workers, False, (32,))),
                             ("fast", lambda: ours(tmp / "src", tmp / "o2", args.workers, True)),
                             ("two-stage", lambda: two_stage(files, tmp / "ts", args.workers)),
                             ("decode", lambda: decode_only(files, args.workers))):
                for d in ("o1", "o2", "ts"):
                    shutil.rmtree(tmp / d, ignore_errors=True)
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        rate = {k: n / statistics.median(v) for k, v in times.items()}
        print(f"build   {n:,} JPEGs ({n // args.copies} real ones x {args.copies}), sizes 16/32/64, box, "
              f"{args.workers} processes each, median of {args.runs}:")
        for k, label in (("exact", "dsimagenet build (exact)"), ("fast", "dsimagenet build --fast"),
                         ("two-stage", "paper's two-stage (PNG per size, then pickle)"),
                         ("decode", "Pillow decode only (floor)"),
                         ("exact32", "dsimagenet build (exact), 32 px only")):
            print(f"  {label:<48} {rate[k]:8.1f} images/s")
        print(f"  exact / two-stage: {rate['exact'] / rate['two-stage']:.2f}x;  exact / decode floor: "
              f"{100 * rate['exact'] / rate['decode']:.0f}%;  fast / exact: {rate['fast'] / rate['exact']:.2f}x;  "
              f"one size / decode floor: {100 * rate['exact32'] / rate['decode']:.0f}%")
        shutil.rmtree(tmp / "o1", ignore_errors=True)
        gib = peak_memory(tmp / "src", tmp / "o1", args.workers)
        print(f"  peak RSS of the largest build process (pickle+native): {gib:.2f} GiB")
        kernel(sorted(args.sample.glob("*.JPEG")), args.runs)
        fidelity(sorted(args.sample.glob("*.JPEG")))
        kernel_bound(args.sample, tmp, args.bound_copies, args.workers, args.runs)


if __name__ == "__main__":
    main()
