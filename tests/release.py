"""A miniature ILSVRC-2012 release written with Pillow, in every layout the builder reads: the train tar of
per-class tars, the val tar, the devkit tar.gz (meta.mat via scipy, ground truth), extracted folders and the
Kaggle layout. Images cover the quirks: CMYK, grayscale, palette, RGBA, 16-bit, a PNG named .JPEG, 1xN and
large images."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dsimagenet.labels import IMAGENET, val_ground_truth

CLASSES = ["n02119789", "n02100735", "n01440764"]  # devkit IDs 1, 2 and 449


def _img(rng, w, h, mode="RGB"):
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    a[: h // 2] //= 2  # some structure, so that methods differ
    img = Image.fromarray(a)
    if mode == "L":
        return img.convert("L")
    if mode == "P":
        return img.convert("P", palette=Image.Palette.ADAPTIVE)
    if mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
        return img
    if mode == "CMYK":
        return img.convert("CMYK")
    if mode == "I;16":
        return Image.fromarray(a[..., 0].astype(np.uint16) * 257)
    return img


def encode(img, fmt="JPEG") -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return b.getvalue()


def class_images(rng, wnid: str) -> dict[str, bytes]:
    kinds = [("RGB", 40, 30, "JPEG"), ("RGB", 23, 57, "JPEG"), ("L", 33, 33, "JPEG"), ("CMYK", 50, 20, "JPEG"),
             ("P", 20, 20, "PNG"), ("RGBA", 31, 17, "PNG"), ("RGB", 1, 40, "JPEG"), ("RGB", 300, 200, "JPEG"),
             ("I;16", 24, 24, "PNG")]
    return {f"{wnid}_{i + 1}.JPEG": encode(_img(rng, w, h, mode), fmt) for i, (mode, w, h, fmt) in enumerate(kinds)}


def tar_bytes(files: dict[str, bytes]) -> bytes:
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return b.getvalue()


def devkit_targz(path: Path, shuffle_ids: bool = False, gt_lines: int = 50_000) -> Path:
    """meta.mat (1000 leaves plus one inner node) and the ground truth. With ``shuffle_ids`` the devkit's
    IDs are a permutation of ours (a meta.mat "in another order"), and the ground truth uses those IDs."""
    import scipy.io

    rng = np.random.default_rng(7)
    ids = rng.permutation(1000) + 1 if shuffle_ids else np.arange(1, 1001)  # ids[k] is the devkit ID of class k+1
    recs = [(int(ids[k]), w, IMAGENET.names[k], 0) for k, w in enumerate(IMAGENET.wnids)]
    recs.append((1001, "n00001740", "entity", 1000))  # an inner node: not a class
    order = rng.permutation(len(recs))  # rows in no particular order
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.array([recs[i] for i in order], dtype=dtype)
    mb = io.BytesIO()
    scipy.io.savemat(mb, {"synsets": synsets})
    gt = ids[val_ground_truth()[:gt_lines].astype(int) - 1]
    files = {"ILSVRC2012_devkit_t12/data/meta.mat": mb.getvalue(),
             "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt":
                 "".join(f"{x}\n" for x in gt).encode()}
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    path.write_bytes(b.getvalue())
    return path


@dataclass
class Release:
    root: Path
    train: dict[str, bytes] = field(default_factory=dict)  # "wnid/name" -> bytes
    val: dict[str, bytes] = field(default_factory=dict)  # "ILSVRC2012_val_%08d.JPEG" -> bytes

    @property
    def train_tar(self) -> Path:
        return self.root / "ILSVRC2012_img_train.tar"

    @property
    def val_tar(self) -> Path:
        return self.root / "ILSVRC2012_img_val.tar"

    @property
    def devkit(self) -> Path:
        return self.root / "ILSVRC2012_devkit_t12.tar.gz"

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def val_dir(self) -> Path:
        return self.root / "val"

    @property
    def kaggle(self) -> Path:
        return self.root / "kaggle"


def make_release(root: Path, seed: int = 0) -> Release:
    rng = np.random.default_rng(seed)
    rel = Release(Path(root))
    rel.root.mkdir(parents=True, exist_ok=True)
    per_class = {w: class_images(rng, w) for w in CLASSES}
    rel.train = {f"{w}/{n}": d for w, files in per_class.items() for n, d in files.items()}
    rel.train_tar.write_bytes(tar_bytes({f"{w}.tar": tar_bytes(files) for w, files in per_class.items()}))
    rel.val = {f"ILSVRC2012_val_{i:08d}.JPEG": encode(_img(rng, int(rng.integers(10, 60)),
                                                              int(rng.integers(10, 60)))) for i in range(1, 13)}
    rel.val[f"ILSVRC2012_val_{13:08d}.JPEG"] = encode(_img(rng, 30, 30, "CMYK"))
    rel.val_tar.write_bytes(tar_bytes(rel.val))
    devkit_targz(rel.devkit)
    for key, data in rel.train.items():
        for base in (rel.train_dir, rel.kaggle / "ILSVRC/Data/CLS-LOC/train"):
            (base / key).parent.mkdir(parents=True, exist_ok=True)
            (base / key).write_bytes(data)
    kval = rel.kaggle / "ILSVRC/Data/CLS-LOC/val"
    for base in (rel.val_dir, kval):
        base.mkdir(parents=True, exist_ok=True)
        for name, data in rel.val.items():
            (base / name).write_bytes(data)
    truth = val_ground_truth()
    rows = [f"{n[:-5]},{IMAGENET.wnid(int(truth[int(n[15:23]) - 1]))} 1 2 3 4" for n in rel.val]
    (rel.kaggle / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return rel


def reference(data: bytes, size: int, method: str) -> np.ndarray:
    """The paper's pixels, computed independently: Image.open(f).convert("RGB").resize((S, S), M)."""
    methods = {"box": Image.BOX, "nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
               "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), methods[method]))
