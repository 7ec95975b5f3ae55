"""``dsimagenet demo``: the whole flow that exists so far, offline, on a built-in example, in a few minutes.

    dsimagenet demo --out demo-out        # or: make demo

1. writes a small synthetic ILSVRC-2012 release in the real layout: a train tar of per-class tars, the val tar
   and the devkit tar.gz (``meta.mat`` and the ground truth), with learnable classes (each its own stripes and
   colours) in varied sizes, aspect ratios and modes, CMYK and grayscale included;
2. builds it at 16 and 32 px with box and nearest through the same code as real ImageNet (``dsimagenet build``);
3. trains WRN-20-1 on 16 px with the paper's recipe, shortened, as a sweep over both methods and three learning
   rates, and checks that the best run is far above chance (at least 3x chance top-1 accuracy);
4. writes the report (Table 1 beside the paper's, the figures, index.html).
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
    lrs: tuple[float, ...] = (0.01, 0.05, 0.2)
    methods: tuple[str, ...] = ("box", "nearest")

    def __post_init__(self):
        from dsimagenet.errors import ConfigError

        def whole(v, lo, hi=None):
            return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)

        if not isinstance(self.out, str) or not self.out:
            raise ConfigError("--out must be a folder")
        for name, lo, hi in (("classes", 2, 1000), ("train_per_class", 1, None), ("val_per_class", 1, None),
                             ("epochs", 1, None), ("seed", 0, None)):
            if not whole(getattr(self, name), lo, hi):
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= {lo}"
                                  + (f" and <= {hi}" if hi else "") + f", not {getattr(self, name)!r}")
        if not self.lrs or not self.methods:
            raise ConfigError("the demo needs at least one learning rate and one method")


def class_images(label: int, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` images of class ``label``: its own colour pair and stripe angle and frequency, random phase,
    brightness and noise, so that a network has to look at patterns, not one pixel."""
    crng = np.random.default_rng(1000 + label)  # the class's look, the same in train and val
    c1, c2 = crng.uniform(90, 165, 3), crng.uniform(90, 165, 3)  # close colours: colour alone is not enough
    angle, freq = crng.uniform(0, np.pi), crng.uniform(0.5, 2.5)
    yy, xx = np.mgrid[0:size, 0:size] / size * 2 * np.pi
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    jitter = rng.normal(0, 0.5, (n, 1, 1))  # each image's stripes a little off the class's angle
    a = angle + jitter
    wave = 0.5 + 0.5 * np.sin(freq * (np.cos(a) * xx + np.sin(a) * yy) * 2 + phase)
    img = c1 * wave[..., None] + c2 * (1 - wave[..., None])
    img *= rng.uniform(0.6, 1.4, (n, 1, 1, 1))
    img += rng.normal(0, 120, img.shape)
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
    """Run the demo; returns the best run's result; raises RuntimeError if it is not far above chance."""
    from dsimagenet.build import BuildConfig, build
    from dsimagenet.convert import describe
    from dsimagenet.errors import ConfigError
    from dsimagenet.report import report
    from dsimagenet.runs import load_runs
    from dsimagenet.sweep import SweepConfig, kind, sweep

    out = Path(c.out)
    release, built, runs_dir, report_dir = out / "release", out / "built", out / "runs", out / "report"
    # the sweep's settings are checked (by the train command's rules) before anything is written
    plan = SweepConfig(out=str(runs_dir), grid={"method": list(c.methods), "lr": list(c.lrs)}, quiet=True,
                       base={"data": str(built), "size": 16, "depth": 20, "width": 1, "epochs": c.epochs,
                             "milestones": (c.epochs // 2,) if c.epochs >= 2 else (), "seed": c.seed,
                             "classes": c.classes, "log_every": 10**9, "quiet": True})
    marker = out / ".dsimagenet-demo"
    if out.exists() and any(out.iterdir()) and not marker.exists():
        raise ConfigError(f"--out {out}: exists and is not a demo folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    marker.touch()
    t0 = time.perf_counter()
    print(f"[1/4] writing a {c.classes}-class synthetic ILSVRC-2012 release (train tar of class tars, val tar, "
          f"devkit): {release}")
    paths = write_release(release, c)
    print(f"[2/4] building it at 16 and 32 px with box and nearest, as real ImageNet: {built}")
    build(BuildConfig(out=str(built), train=str(paths["train"]), val=str(paths["val"]), devkit=str(paths["devkit"]),
                      sizes=(16, 32), methods=("box", "nearest"), allow_partial=True, quiet=True))
    info = describe(built / "16_box", check=True)
    print(f"      {info['splits']['train']:,} train / {info['splits']['val']:,} val images in each of "
          f"{', '.join(sorted(p.name for p in built.iterdir() if p.is_dir() and not p.name.startswith('.')))}; "
          f"checksums {info['checksums']}")
    print(f"[3/4] training WRN-20-1 on 16 px with the paper's recipe, shortened ({c.epochs} epochs, "
          + (f"lr x0.2 after epoch {c.epochs // 2}" if c.epochs >= 2 else "one learning rate")
          + f", momentum 0.9, mirrored copies + 4 px shifts), a sweep over methods "
          f"{', '.join(c.methods)} and learning rates {', '.join(map(str, c.lrs))}: {runs_dir}")
    shutil.rmtree(runs_dir, ignore_errors=True)  # fresh runs each time (inside the demo's own folder)
    outcome = sweep(plan)
    bad = {n: v for n, v in outcome.items() if kind(v) != "finished"}
    if bad:  # a run that diverged or failed here is a broken demo, not a result
        raise RuntimeError("runs did not finish: " + "; ".join(f"{n}: {v}" for n, v in bad.items()))
    runs = load_runs([runs_dir])
    for r in runs:
        print(f"      {r.path.name:<28} top-1 error {r.result['top1_error']:5.1f}%  top-5 error "
              f"{r.result['top5_error']:5.1f}%")
    print(f"[4/4] the report: tables and figures from these runs: {report_dir}")
    written = report([runs_dir], report_dir)
    best = min(runs, key=lambda r: r.result["top1_error"])
    chance = 100 * (1 - 1 / c.classes)
    print(f"done in {time.perf_counter() - t0:.0f} s: best run {best.path.name}, top-1 error "
          f"{best.result['top1_error']:.1f}% (chance {chance:.0f}%)")
    print(f"look at: {written['index.html']} (the report), {runs_dir}/results.csv, {best.path}/metrics.jsonl, "
          f"{built}/16_box/manifest.json")
    if 100 - best.result["top1_error"] < 3 * (100 - chance):
        raise RuntimeError(f"the demo network reached only {100 - best.result['top1_error']:.1f}% top-1 accuracy, "
                           f"less than 3x chance ({3 * (100 - chance):.0f}%): something is broken")
    return best.result
