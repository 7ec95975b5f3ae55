"""``dsimagenet demo``: the whole flow that exists so far, offline, on a built-in example, in about a minute.

    dsimagenet demo --out demo-out        # or: make demo

1. writes a small learnable dataset exactly in the official downsampled-ImageNet format (ten pickled train
   batches and val_data, labels as devkit IDs, the mean image), as if downloaded;
2. opens it safely (no pickle.load), converts it to the native format and checks it (``dsimagenet info``);
3. trains WRN-20-1 on it with the paper's recipe, shortened, and checks that it is far above chance.

Building from the raw ILSVRC-2012 layout, sweeps and the HTML report join this demo as their issues land.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsimagenet.formats import official


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo-out"
    classes: int = 10
    train_per_class: int = 160
    val_per_class: int = 40
    size: int = 16
    epochs: int = 6
    seed: int = 0


def class_images(label: int, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` images of class ``label``: its own colour pair and stripe angle and frequency, random phase,
    brightness and noise, so that a network has to look at patterns, not one pixel."""
    crng = np.random.default_rng(1000 + label)  # the class's look, the same in train and val
    c1, c2 = crng.uniform(30, 225, 3), crng.uniform(30, 225, 3)
    angle, freq = crng.uniform(0, np.pi), crng.uniform(0.5, 2.5)
    yy, xx = np.mgrid[0:size, 0:size] / size * 2 * np.pi
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    wave = 0.5 + 0.5 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy)[None] * 2 + phase)
    img = c1 * wave[..., None] + c2 * (1 - wave[..., None])
    img *= rng.uniform(0.7, 1.3, (n, 1, 1, 1))
    img += rng.normal(0, 40, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_example(folder: Path, c: DemoConfig) -> None:
    """A dataset in the official format: devkit IDs 1..classes, shuffled, ten train batches and val_data."""
    rng = np.random.default_rng(c.seed)
    splits = {}
    for split, per in (("train", c.train_per_class), ("val", c.val_per_class)):
        labels = np.repeat(np.arange(1, c.classes + 1), per)
        images = np.concatenate([class_images(k, per, c.size, rng) for k in range(1, c.classes + 1)])
        order = rng.permutation(len(labels)) if split == "train" else np.arange(len(labels))
        splits[split] = images[order], labels[order]
    folder.mkdir(parents=True, exist_ok=True)
    x, y = splits["train"]
    mean = official.nhwc_to_planar(x).mean(axis=0)
    for i, (a, b) in enumerate(official.batch_bounds(len(y))):
        official.write_batch(folder / f"train_data_batch_{i + 1}", official.nhwc_to_planar(x[a:b]), y[a:b], mean,
                             "pickle")
    x, y = splits["val"]
    official.write_batch(folder / "val_data", official.nhwc_to_planar(x), y, None, "pickle")


def demo(c: DemoConfig = DemoConfig()) -> dict:
    """Run the demo; raises RuntimeError if the trained network is not far above chance."""
    from dsimagenet.convert import convert, describe
    from dsimagenet.train import TrainConfig, train

    out = Path(c.out)
    marker = out / ".dsimagenet-demo"
    if out.exists() and any(out.iterdir()) and not marker.exists():
        raise FileExistsError(f"{out}: exists and is not a demo folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    marker.touch()
    t0 = time.perf_counter()
    official_dir, native_dir, run = out / "official", out / "native", out / "runs" / "wrn-20-1"
    print(f"[1/3] writing a {c.classes}-class {c.size}x{c.size} example in the official pickle format: "
          f"{official_dir}")
    write_example(official_dir, c)
    print(f"[2/3] converting it to the native format (safe unpickling, checksums): {native_dir}")
    convert(official_dir, native_dir, ["native"])
    info = describe(native_dir, check=True)
    print(f"      {info['splits']['train']:,} train / {info['splits']['val']:,} val images, "
          f"{info['image_size']} px, checksums {info['checksums']}")
    tc = TrainConfig(data=str(native_dir), out=str(run), depth=20, width=1, epochs=c.epochs, lr=0.05,
                     milestones=(c.epochs // 2,), seed=c.seed, log_every=10**9, classes=c.classes)
    print(f"[3/3] training WRN-20-1 with the paper's recipe, shortened: {tc.epochs} epochs, lr {tc.lr} x{tc.gamma} "
          f"after epoch {tc.milestones[0]}, momentum {tc.momentum}, mirrored copies + 4 px shifts: {run}")
    shutil.rmtree(run, ignore_errors=True)  # a fresh run each time (inside the demo's own folder)
    result = train(tc)
    chance = 100 * (1 - 1 / c.classes)
    print(f"done in {time.perf_counter() - t0:.0f} s: top-1 error {result['top1_error']:.1f}% "
          f"(chance {chance:.0f}%), top-5 error {result['top5_error']:.1f}%")
    print(f"look at: {run}/metrics.jsonl, {run}/result.json, {run}/per_class.csv; open the data with "
          f"dsimagenet.open_dataset('{native_dir}')")
    if 100 - result["top1_error"] < 3 * (100 - chance):
        raise RuntimeError(f"the demo network reached only {100 - result['top1_error']:.1f}% top-1 accuracy, "
                           f"less than 3x chance ({3 * (100 - chance):.0f}%): something is broken")
    return result
