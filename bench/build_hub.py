"""Benchmark: building from the Hub's raw ImageNet (ILSVRC/imagenet-1k parquet, timm/imagenet-1k-wds WebDataset)
against building the same JPEGs from the official train tar, in the same run.

    .venv/bin/python bench/build_hub.py [--sample ../shared/imagenet-sample] [--copies 2] [--runs 3] [--workers N]

The sample's JPEGs (real ILSVRC-2012 photos; without the folder, generated 500x375 JPEGs) are laid out
``--copies`` times under different names three ways: ILSVRC2012_img_train.tar (a tar of <wnid>.tar class tars),
``data/train-NNNNN-of-NNNNN.parquet`` (hub.md's schema, snappy, 100 rows a row group as datasets writes image
datasets) and ``imagenet1k-train-NNNN.tar`` WebDataset shards (KEY.cls, KEY.jpg, KEY.json). Each is built with
``build(BuildConfig(train=..., sizes=(16, 32, 64), methods=("box",), formats=("pickle",)))`` and timed end to end
(listing included), the three interleaved in each of ``--runs`` runs; the median img/s of each is printed side by
side, with its ratio to the tar build, and whether the three builds gave identical files. Beside it, the CPU time
of the build and its workers per image (their rusage; the pool's workers end with each build): on a machine
shared with other work, wall times swing with the load, CPU time much less.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the Hub layouts' writers (pyarrow and tarfile only)


def sample_jpegs(sample: Path, copies: int) -> list[tuple[str, str, bytes]]:
    """(original file name, wnid, JPEG bytes): each sample JPEG ``copies`` times under different names."""
    from PIL import Image

    from dsimagenet.labels import IMAGENET

    files = sorted(sample.glob("*.JPEG"))
    if files:
        found = [(f.name.split("_")[0], f.read_bytes()) for f in files]
    else:  # no sample folder: generated photos-like JPEGs (smooth gradients and noise), one per class
        print(f"{sample}: no .JPEG files; using 500 generated 500x375 JPEGs", file=sys.stderr)
        rng = np.random.default_rng(0)
        found = []
        for wnid in IMAGENET.sorted_wnids[:500]:
            y, x = np.mgrid[0:375, 0:500]
            a = (np.stack([x * 0.5, y * 0.6, (x + y) * 0.3], -1) + rng.normal(0, 12, (375, 500, 3))) % 256
            b = io.BytesIO()
            Image.fromarray(a.astype(np.uint8)).save(b, "JPEG", quality=90)
            found.append((wnid, b.getvalue()))
    return [(f"{wnid}_{k}_{i}.JPEG", wnid, data) for k in range(copies) for i, (wnid, data) in enumerate(found)]


def lay_out(items: list[tuple[str, str, bytes]], dst: Path) -> dict[str, Path]:
    from hub_release import tar_of, write_parquet, write_wds

    rng = np.random.default_rng(1)
    shuffled = [items[i] for i in rng.permutation(len(items))]  # the Hub copies are shuffled across shards
    classes: dict[str, dict[str, bytes]] = {}
    for name, wnid, data in items:
        classes.setdefault(wnid, {})[name] = data
    inner = {}
    dst.mkdir(parents=True)
    for wnid, files in sorted(classes.items()):
        tar_of(dst / "class.tar", files)
        inner[f"{wnid}.tar"] = (dst / "class.tar").read_bytes()
    (dst / "class.tar").unlink()
    (dst / "official").mkdir()
    tar = tar_of(dst / "official" / "ILSVRC2012_img_train.tar", inner)
    shards = max(1, len(items) // 250)
    write_parquet(dst / "imagenet-1k", "train", shuffled, shards=shards, row_group_size=100)
    write_wds(dst / "imagenet-1k-wds", "train", shuffled, shards=shards)
    return {"tar": tar, "parquet": dst / "imagenet-1k", "webdataset": dst / "imagenet-1k-wds"}


def _cpu() -> float:
    """CPU seconds of this process and of its ended children (the build's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sample", type=Path, default=ROOT.parent / "shared" / "imagenet-sample")
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    args = ap.parse_args()

    from dsimagenet.build import BuildConfig, build

    items = sample_jpegs(args.sample, args.copies)
    with tempfile.TemporaryDirectory(prefix="bench_hub_") as tmp:
        tmp = Path(tmp)
        layouts = lay_out(items, tmp / "in")
        times: dict[str, list[float]] = {k: [] for k in layouts}
        cpus: dict[str, list[float]] = {k: [] for k in layouts}
        outputs: dict[str, dict[str, bytes]] = {}
        for run in range(args.runs):
            for name, src in layouts.items():
                out = tmp / f"out_{name}"
                shutil.rmtree(out, ignore_errors=True)
                c, t = _cpu(), time.perf_counter()
                build(BuildConfig(out=str(out), train=str(src), sizes=(16, 32, 64), methods=("box",),
                                  formats=("pickle",), workers=args.workers, allow_partial=True, quiet=True))
                times[name].append(time.perf_counter() - t)
                cpus[name].append(_cpu() - c)
                if run == 0:
                    outputs[name] = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
                                     if p.is_file() and p.name != "manifest.json"}
        same = all(outputs[k] == outputs["tar"] for k in outputs)
    n = len(items)
    print(f"{n} images ({args.sample if list(args.sample.glob('*.JPEG')) else 'generated'}), 16/32/64 px box, "
          f"official pickles, {args.workers} workers, median of {args.runs} interleaved runs (listing included)")
    tar_rate, tar_cpu = n / statistics.median(times["tar"]), statistics.median(cpus["tar"]) / n
    for name, ts in times.items():
        rate, cpu = n / statistics.median(ts), statistics.median(cpus[name]) / n
        print(f"  {name:<11} {rate:8.1f} img/s  {rate / tar_rate:5.2f}x the tar build   CPU {1e3 * cpu:6.2f} ms/img "
              f"{cpu / tar_cpu:5.2f}x   runs: " + ", ".join(f"{t:.2f} s" for t in ts))
    print(f"identical files from the three layouts: {same}")


if __name__ == "__main__":
    main()
