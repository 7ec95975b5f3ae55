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
    quiet: bool = False  # no progress bars or per-epoch lines (the steps are still said)

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


SHAPES = ("disk", "square", "triangle", "cross", "ring", "diamond", "star", "bars", "checks", "dots")
COLOURS = {"red": (215, 45, 40), "green": (45, 165, 60), "blue": (45, 85, 215), "yellow": (230, 200, 40),
           "magenta": (200, 50, 190), "cyan": (40, 190, 200), "orange": (240, 130, 30), "purple": (120, 60, 180),
           "white": (235, 235, 235), "brown": (130, 80, 40)}
SYNTHETIC = "synthetic"  # the first word of every demo class name: the report says what the classes are


def class_look(label: int) -> tuple[str, str]:
    """(shape, colour) of class ``label`` (devkit ID, from 1). The first ten classes are ten shapes in five
    colours, two shapes to a colour (disk and square red, triangle and cross green, ...): colour alone does not
    tell a class, the shape does. Classes after the hundredth repeat the look of the ones before (a demo needs
    no more)."""
    k = label - 1
    shape = SHAPES[k % 10]
    colour = list(COLOURS)[(k // 10 + k % 10 // 2) % 10]
    return shape, colour


def class_name(label: int) -> str:
    """"synthetic red disk" (and a number after the hundredth class, so that names stay distinct)."""
    shape, colour = class_look(label)
    return f"{SYNTHETIC} {colour} {shape}" + (f" {(label - 1) // 100 + 1}" if label > 100 else "")


def _unit_shape(shape: str) -> list[list[tuple[float, float]]]:
    """The shape as polygons in [-1, 1]^2 (the round ones are drawn apart)."""
    def rect(x0, y0, x1, y1):
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]

    if shape == "square":
        return [rect(-0.75, -0.75, 0.75, 0.75)]
    if shape == "triangle":
        return [[(0, -1), (0.9, 0.65), (-0.9, 0.65)]]
    if shape == "cross":
        return [rect(-1, -0.3, 1, 0.3), rect(-0.3, -1, 0.3, 1)]
    if shape == "diamond":
        return [[(0, -1), (0.6, 0), (0, 1), (-0.6, 0)]]
    if shape == "star":
        return [[(r * np.sin(a), -r * np.cos(a)) for i in range(10)
                 for a, r in [(i * np.pi / 5, 1.0 if i % 2 == 0 else 0.42)]]]
    if shape == "bars":
        return [rect(-1, y - 0.18, 1, y + 0.18) for y in (-0.7, 0, 0.7)]
    if shape == "checks":
        return [rect(-1 + i / 2, -1 + j / 2, -0.5 + i / 2, -0.5 + j / 2) for i in range(4) for j in range(4)
                if (i + j) % 2 == 0]
    return []


def draw_image(label: int, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """A (h, w, 3) uint8 picture of class ``label``: its shape in its colour on a dull textured background, each
    image with its own position, size, rotation, shade, background and noise."""
    from PIL import ImageDraw

    shape, colour = class_look(label)
    bg = rng.uniform(50, 120, 3) * rng.uniform(0.7, 1.1)
    img = Image.new("RGB", (w, h), tuple(int(v) for v in bg))
    d = ImageDraw.Draw(img)
    col = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.normal(0, 18, 3), 0, 255))
    m = min(w, h)
    r = m * rng.uniform(0.25, 0.42)
    cx, cy = w / 2 + rng.uniform(-0.15, 0.15) * m, h / 2 + rng.uniform(-0.15, 0.15) * m
    rot = rng.uniform(0, 2 * np.pi)
    cos, sin = np.cos(rot), np.sin(rot)
    if shape == "disk":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=col, width=max(2, int(r * 0.35)))
    elif shape == "dots":
        for x, y in ((-0.6, -0.6), (0.6, -0.6), (0, 0), (-0.6, 0.6), (0.6, 0.6)):
            px, py = cx + r * (cos * x - sin * y), cy + r * (sin * x + cos * y)
            d.ellipse([px - 0.25 * r, py - 0.25 * r, px + 0.25 * r, py + 0.25 * r], fill=col)
    for poly in _unit_shape(shape):
        d.polygon([(cx + r * (cos * x - sin * y), cy + r * (sin * x + cos * y)) for x, y in poly], fill=col)
    a = np.asarray(img, dtype=np.float32) * rng.uniform(0.8, 1.2)
    a += rng.normal(0, 14, a.shape)  # sensor noise: no two images alike, no single pixel decides
    return np.clip(a, 0, 255).astype(np.uint8)


def class_images(label: int, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` square images of class ``label``, (n, size, size, 3) uint8."""
    return np.stack([draw_image(label, size, size, rng) for _ in range(n)])


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
    from dsimagenet.progress import bar

    rng = np.random.default_rng(c.seed)
    root.mkdir(parents=True, exist_ok=True)
    progress = bar(c.classes * (c.train_per_class + c.val_per_class), "      images", unit="image", quiet=c.quiet,
                   every=5.0)

    def images(label: int, n: int, first: int = 0) -> list[bytes]:
        out = []
        for i in range(first, first + n):
            w, h = (int(v) for v in rng.integers(40, 161, 2))
            out.append(_jpeg(draw_image(label, w, h, rng), "CMYK" if i % 7 == 3 else "L" if i % 5 == 2 else "RGB"))
            progress.update(1)
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
        val[f"ILSVRC2012_val_{i + 1:08d}.JPEG"] = images(int(label), 1, first=i)[0]
    progress.close()
    paths["val"].write_bytes(_tar(val))
    truth = val_ground_truth().astype(np.int64)
    truth[: len(val_labels)] = val_labels
    synsets = np.array([(k + 1, w, class_name(k + 1) if k < c.classes else IMAGENET.names[k], 0)
                        for k, w in enumerate(IMAGENET.wnids)],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    mat = io.BytesIO()
    scipy.io.savemat(mat, {"synsets": synsets})
    paths["devkit"].write_bytes(_tar({
        "ILSVRC2012_devkit_t12/data/meta.mat": mat.getvalue(),
        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": "".join(f"{x}\n" for x in truth).encode(),
    }, "gz"))
    return paths


def name_classes(dataset: Path, names: dict[str, str]) -> None:
    """Record the synthetic class names (WNID -> name) in a built dataset's class table, meta.json and
    manifest.json, in place of ImageNet's (the release used ImageNet's WNIDs for its layout, not their meaning);
    the manifest's digest of meta.json follows. The arrays, and so the data's fingerprint, are untouched."""
    import json

    from dsimagenet.checksum import digest
    from dsimagenet.formats.atomic import atomic_write

    def rename(path: Path) -> None:
        record = json.loads(path.read_text())
        record["names"] = [names.get(w, n) for w, n in zip(record["wnids"], record["names"], strict=True)]
        if "files" in record and "meta.json" in record["files"]:
            record["files"]["meta.json"] = digest(dataset / "meta.json")
        with atomic_write(path, "w") as f:
            json.dump(record, f, indent=1)

    if (dataset / "meta.json").exists():
        rename(dataset / "meta.json")
    rename(dataset / "manifest.json")


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
    # not quiet: a line per epoch of each run and one as each run ends, so that the longest step shows progress
    plan = SweepConfig(out=str(runs_dir), grid={"method": list(c.methods), "lr": list(c.lrs)}, quiet=c.quiet,
                       base={"data": str(built), "size": 16, "depth": 20, "width": 1, "epochs": c.epochs,
                             "milestones": (c.epochs // 2,) if c.epochs >= 2 else (), "seed": c.seed,
                             "classes": c.classes, "log_every": 10**9, "quiet": c.quiet})
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
    from dsimagenet.labels import IMAGENET

    synthetic = {IMAGENET.wnid(k): class_name(k) for k in range(1, c.classes + 1)}
    for dataset in sorted(p for p in built.iterdir() if (p / "manifest.json").exists()):
        name_classes(dataset, synthetic)
    info = describe(built / "16_box", check=True)
    print(f"      {info['splits']['train']:,} train / {info['splits']['val']:,} val images in each of "
          f"{', '.join(sorted(p.name for p in built.iterdir() if p.is_dir() and not p.name.startswith('.')))}; "
          f"checksums {info['checksums']}")
    print(f"[3/4] training WRN-20-1 on 16 px with the paper's recipe, shortened ({c.epochs} epochs, "
          + (f"lr x0.2 after epoch {c.epochs // 2}" if c.epochs >= 2 else "a constant learning rate")
          + f", momentum 0.9, mirrored copies + 4 px shifts), a sweep over methods "
          f"{', '.join(c.methods)} and learning rates {', '.join(map(str, c.lrs))}: {runs_dir}")
    shutil.rmtree(runs_dir, ignore_errors=True)  # fresh runs each time (inside the demo's own folder)
    outcome = sweep(plan)
    bad = {n: v for n, v in outcome.items() if kind(v) != "finished"}
    if bad:  # a run that diverged or failed here is a broken demo, not a result
        raise RuntimeError("runs did not finish: " + "; ".join(f"{n}: {v}" for n, v in bad.items()))
    runs = load_runs([runs_dir])
    for r in runs:  # top-5 of 10 classes or fewer says nothing
        print(f"      {r.path.name:<28} top-1 error {r.result['top1_error']:5.1f}%"
              + (f"  top-5 error {r.result['top5_error']:5.1f}%" if c.classes > 10 else ""))
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
