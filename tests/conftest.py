"""Shared fixtures: small datasets written exactly as ../shared/reference/format.md describes, by hand
(plain pickle.dump / np.savez), independently of dsimagenet's writers."""

import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest


def make_images(n, size, seed):
    """(n, S, S, 3) uint8 NHWC images, random but reproducible."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def to_rows(images):
    """NHWC -> channel-planar rows, written out the long way: all R row-major, then G, then B."""
    n, s = len(images), images.shape[1]
    rows = np.empty((n, 3 * s * s), np.uint8)
    for i in range(n):
        for c in range(3):
            rows[i, c * s * s:(c + 1) * s * s] = images[i, :, :, c].reshape(-1)
    return rows


def write_official(folder, images, labels, val_images, val_labels, kind="pickle"):
    """Ten train batches (n//10 each, the rest in the last) and val_data, as the official files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(images)
    mean = to_rows(images).astype(np.float64).mean(axis=0)
    step = n // 10
    parts = [(i * step, (i + 1) * step if i < 9 else n) for i in range(10)]
    items = [(f"train_data_batch_{i + 1}", images[a:b], labels[a:b], mean) for i, (a, b) in enumerate(parts)]
    items.append(("val_data", val_images, val_labels, None))
    for name, x, y, m in items:
        d = {"data": to_rows(x), "labels": [int(v) for v in y]}
        if m is not None:
            d["mean"] = m
        if kind == "pickle":
            with open(folder / name, "wb") as f:
                pickle.dump(d, f, protocol=3)
        else:
            d["labels"] = np.asarray(d["labels"])
            np.savez(folder / f"{name}.npz", **d)
    return mean


def mutate(data: bytes, rng) -> bytes:
    """A damaged copy of a file, as fuzzers of the readers make them: a few bytes flipped, the file cut short, or
    8 bytes overwritten with a large number (a length or an offset gone wrong)."""
    m = bytearray(data)
    kind = rng.integers(0, 3)
    if kind == 0:
        for _ in range(rng.integers(1, 20)):
            m[rng.integers(0, len(m))] = rng.integers(0, 256)
    elif kind == 1:
        m = m[: rng.integers(0, len(m))]
    else:
        at = rng.integers(0, len(m) - 8)
        m[at:at + 8] = int(rng.integers(0, 2 ** 63)).to_bytes(8, "little")
    return bytes(m)


def read_mutated(tmp_path, name, data, images, labels, tries, rng, **open_kw) -> dict:
    """Open ``tries`` damaged copies of the file ``name`` (``data``), each alone in a folder: each must read as
    ``images`` and ``labels`` exactly or be one of our errors; returns how many of each."""
    from dsimagenet import open_dataset
    from dsimagenet.errors import DSImageNetError

    outcomes = {"same": 0, "clear": 0}
    for i in range(tries):
        root = tmp_path / f"m{i}"
        root.mkdir()
        (root / name).write_bytes(mutate(data, rng))
        try:
            ds = open_dataset(root, **open_kw)
        except DSImageNetError:
            outcomes["clear"] += 1
            continue
        np.testing.assert_array_equal(ds.data, images, err_msg=f"try {i}: other data read without an error")
        np.testing.assert_array_equal(ds.targets, labels, err_msg=f"try {i}")
        outcomes["same"] += 1
    return outcomes


def zip_folder(folder, zip_path, top, names=None):
    with zipfile.ZipFile(zip_path, "w") as z:
        for f in sorted(Path(folder).iterdir()):
            if names is None or f.name in names:
                z.write(f, f"{top}/{f.name}")
    return zip_path


class Tiny:
    """A small 8 px dataset over 12 classes (devkit IDs 1..12) plus a few of class 449 (tench)."""

    size = 8

    def __init__(self, root):
        rng = np.random.default_rng(1)
        self.labels = rng.choice(np.r_[1:13, 449], size=203).astype(np.int64)
        self.images = make_images(203, self.size, 2)
        self.val_labels = rng.choice(np.r_[1:13, 449], size=37).astype(np.int64)
        self.val_images = make_images(37, self.size, 3)
        self.root = Path(root)

    def official(self, kind="pickle", name=None):
        folder = self.root / (name or kind)
        self.mean = write_official(folder, self.images, self.labels, self.val_images, self.val_labels, kind)
        return folder


@pytest.fixture
def tiny(tmp_path):
    return Tiny(tmp_path)


def learnable_native(root, classes=4, per_class=16, val_per_class=8, size=8, seed=0):
    """A native dataset a tiny network learns in seconds: each class its own colour, plus noise."""
    from dsimagenet.formats.native import NativeWriter
    from dsimagenet.labels import IMAGENET

    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, (classes, 3))

    def split(n):
        labels = np.repeat(np.arange(1, classes + 1), n)
        rng.shuffle(labels)
        noise = rng.normal(0, 25, (len(labels), size, size, 3))
        return np.clip(colours[labels - 1][:, None, None, :] + noise, 0, 255).astype(np.uint8), labels

    with NativeWriter(root, size, list(IMAGENET.wnids), method="synthetic") as w:
        for name, n in (("train", per_class), ("val", val_per_class)):
            x, y = split(n)
            w.split(name).append(x, y)
    return Path(root)


@pytest.fixture
def learnable(tmp_path):
    return learnable_native(tmp_path / "data")
