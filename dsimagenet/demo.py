"""``dsimagenet demo``: the whole flow that exists so far, offline, on a built-in example, in a few minutes.

    dsimagenet demo --out demo-out        # or: make demo

1. writes a small synthetic ILSVRC-2012 release in the real layout: a train tar of per-class tars, the val tar
   and the devkit tar.gz (``meta.mat`` and the ground truth), with learnable classes (each its own stripes and
   colours) in varied sizes, aspect ratios and modes, CMYK and grayscale included;
2. builds it at 16 and 32 px with box and nearest through the same code as real ImageNet (``dsimagenet build``);
3. trains WRN-20-1 on 16 px box with the paper's recipe, shortened, and checks that it is far above chance.

Sweeps and the HTML report join this demo as their issue lands.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


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


def _tar(files: dict[str, bytes], compress: str = "") -> bytes:
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w:" + compress) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return b.getvalue()


def _jpeg(a: np.ndarray, mode: str) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).convert(mode).save(b, "JPEG", quality=92)
    return b.getvalue()


def write_release(root: Path, c: DemoConfig) -> dict[str, Path]:
    """A synthetic ILSVRC-2012 release: classes are devkit IDs 1..c.classes; every 7th image is CMYK and every
    5th grayscale; sizes from 40 to 160 px a side, any aspect ratio. Val images are ILSVRC2012_val_00000001..,
    labelled by the devkit's ground truth (the first lines; the rest keep valid IDs)."""
    import scipy.io

    from dsimagenet.labels import IMAGENET, val_ground_truth

    rng = np.random.default_rng(c.seed)
    root.mkdir(parents=True, exist_ok=True)

    def images(label: int, n: int) -> list[bytes]:
        out = []
        for i in range(n):
            w, h = (int(v) for v in rng.integers(40, 161, 2))
            big = class_images(label, 1, max(w, h), rng)[0][:h, :w]
            out.append(_jpeg(big, "CMYK" if i % 7 == 3 else "L" if i % 5 == 2 else "RGB"))
        return out

    class_tars = {}
    for k in range(1, c.classes + 1):
        wnid = IMAGENET.wnid(k)
        files = images(k, c.train_per_class)
        class_tars[f"{wnid}.tar"] = _tar({f"{wnid}_{i + 1}.JPEG": d for i, d in enumerate(files)})
    paths = {"train": root / "ILSVRC2012_img_train.tar", "val": root / "ILSVRC2012_img_val.tar",
             "devkit": root / "ILSVRC2012_devkit_t12.tar.gz"}
    paths["train"].write_bytes(_tar(class_tars))
    val_labels = rng.permutation(np.repeat(np.arange(1, c.classes + 1), c.val_per_class))
    val = {}
    for i, label in enumerate(val_labels):
        val[f"ILSVRC2012_val_{i + 1:08d}.JPEG"] = images(int(label), 1)[0]
    paths["val"].write_bytes(_tar(val))
    truth = val_ground_truth().astype(np.int64)
    truth[: len(val_labels)] = val_labels
    synsets = np.array([(k + 1, w, IMAGENET.names[k], 0) for k, w in enumerate(IMAGENET.wnids)],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    mat = io.BytesIO()
    scipy.io.savemat(mat, {"synsets": synsets})
    paths["devkit"].write_bytes(_tar({
        "ILSVRC2012_devkit_t12/data/meta.mat": mat.getvalue(),
        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": "".join(f"{x}\n" for x in truth).encode(),
    }, "gz"))
    return paths


def demo(c: DemoConfig = DemoConfig()) -> dict:
    """Run the demo; raises RuntimeError if the trained network is not far above chance."""
    from dsimagenet.build import BuildConfig, build
    from dsimagenet.convert import describe
    from dsimagenet.train import TrainConfig, train

    out = Path(c.out)
    marker = out / ".dsimagenet-demo"
    if out.exists() and any(out.iterdir()) and not marker.exists():
        raise FileExistsError(f"{out}: exists and is not a demo folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    marker.touch()
    t0 = time.perf_counter()
    release, built, run = out / "release", out / "built", out / "runs" / "wrn-20-1"
    print(f"[1/3] writing a {c.classes}-class synthetic ILSVRC-2012 release (train tar of class tars, val tar, "
          f"devkit): {release}")
    paths = write_release(release, c)
    print(f"[2/3] building it at 16 and 32 px with box and nearest, as real ImageNet: {built}")
    build(BuildConfig(out=str(built), train=str(paths["train"]), val=str(paths["val"]), devkit=str(paths["devkit"]),
                      sizes=(16, 32), methods=("box", "nearest"), allow_partial=True, quiet=True))
    info = describe(built / "16_box", check=True)
    print(f"      {info['splits']['train']:,} train / {info['splits']['val']:,} val images in each of "
          f"{', '.join(sorted(p.name for p in built.iterdir() if p.is_dir() and not p.name.startswith('.')))}; "
          f"checksums {info['checksums']}")
    native_dir = built / "16_box"
    tc = TrainConfig(data=str(native_dir), out=str(run), depth=20, width=1, epochs=c.epochs, lr=0.05,
                     milestones=(c.epochs // 2,), seed=c.seed, log_every=10**9, classes=c.classes)
    print(f"[3/3] training WRN-20-1 with the paper's recipe, shortened: {tc.epochs} epochs, lr {tc.lr} x{tc.gamma} "
          f"after epoch {tc.milestones[0]}, momentum {tc.momentum}, mirrored copies + 4 px shifts: {run}")
    shutil.rmtree(run, ignore_errors=True)  # a fresh run each time (inside the demo's own folder)
    result = train(tc)
    chance = 100 * (1 - 1 / c.classes)
    print(f"done in {time.perf_counter() - t0:.0f} s: top-1 error {result['top1_error']:.1f}% "
          f"(chance {chance:.0f}%), top-5 error {result['top5_error']:.1f}%")
    print(f"look at: {run}/metrics.jsonl, {run}/result.json, {run}/per_class.csv, {native_dir}/manifest.json; "
          f"open the data with dsimagenet.open_dataset('{native_dir}')")
    if 100 - result["top1_error"] < 3 * (100 - chance):
        raise RuntimeError(f"the demo network reached only {100 - result['top1_error']:.1f}% top-1 accuracy, "
                           f"less than 3x chance ({3 * (100 - chance):.0f}%): something is broken")
    return result
