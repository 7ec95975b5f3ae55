"""Open any downsampled-ImageNet dataset in one line: official pickles, official npz, the official zips, or
dsimagenet's native format; whole, or as class subsets, in devkit or sorted label order.

    >>> ds = open_dataset("Imagenet16_train.zip", classes=120)       # NAS-Bench-201's ImageNet16-120
    >>> ds.data.shape, ds.targets[:3], ds.wnids[0]                   # (151700, 16, 16, 3), labels 0..119
    >>> ds = ImageNetDS("out/32_box", split="val", order="sorted")    # torchvision's label order
    >>> img, label = ds[0]                                            # (PIL.Image, int)

Native datasets open as memory maps in milliseconds; the official files are unpickled safely into one array
(each batch is transposed into place, so the peak is the data plus one batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsimagenet import labels as labels_mod
from dsimagenet.formats import native, official
from dsimagenet.labels import IMAGENET, ClassTable

FORMATS = ("native", "pickle", "npz")


@dataclass
class RawSplit:
    """One split as stored: ``labels`` are the files' 1-based IDs into ``table``."""

    images: np.ndarray  # (N, S, S, 3) uint8: np.memmap for native data
    labels: np.ndarray  # int64 (N,)
    mean: np.ndarray | None  # float64 (S, S, 3) mean training image, when the files carry it
    table: ClassTable
    format: str
    image_size: int


class _Selector:
    """Keeps rows whose class is kept, at most ``cap`` per class in file order; maps them to new labels."""

    def __init__(self, lookup: np.ndarray, cap: int | None):
        self.lookup, self.cap = lookup, cap
        self.seen = np.zeros(len(lookup), np.int64)

    def __call__(self, raw_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        new = self.lookup[raw_labels]
        keep = new >= 0
        if self.cap is not None:
            # rank of each row among earlier rows of its class (stable), plus those seen in earlier batches
            order = np.argsort(raw_labels, kind="stable")
            sorted_labels = raw_labels[order]
            starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
            rank = np.empty_like(order)
            rank[order] = np.arange(len(order)) - starts
            keep &= rank + self.seen[raw_labels] < self.cap
            np.add.at(self.seen, raw_labels, 1)
        idx = np.flatnonzero(keep)
        return idx, new[idx]


class _Rows:
    """A growing (n, S, S, 3) uint8 array filled batch by batch without a final concatenation."""

    def __init__(self, size: int):
        self.size, self.n = size, 0
        self.buf = np.empty((0, size, size, 3), np.uint8)

    def add(self, images: np.ndarray, expected_total: int) -> None:
        need = self.n + len(images)
        if need > len(self.buf):
            grown = np.empty((max(need, expected_total), self.size, self.size, 3), np.uint8)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n: need] = images
        self.n = need

    def result(self) -> np.ndarray:
        return self.buf[: self.n] if self.n * 2 > len(self.buf) else self.buf[: self.n].copy()


def detect_format(path: str | Path) -> str:
    """"native", "pickle" or "npz", from the files at ``path``."""
    path = Path(path)
    if path.is_dir() and native.is_native(path):
        return "native"
    kinds = {m.kind for m in official.find_members(path)}
    if not kinds:
        raise FileNotFoundError(f"{path}: no dataset here: expected meta.json (native format), or official "
                                "batch files train_data_batch_1..10 / val_data (pickle or .npz), or their zips")
    return "npz" if "npz" in kinds else "pickle"


def _native_table(meta: dict) -> ClassTable:
    wnids = tuple(meta["wnids"])
    if wnids == IMAGENET.wnids:
        return IMAGENET
    return ClassTable(wnids, tuple(meta["names"] or wnids))


def read_split(path: str | Path, split: str, format: str | None = None, selector: _Selector | None = None,
               num_classes: int = 1000) -> tuple[RawSplit, np.ndarray | None]:
    """Read a split, keeping only the rows ``selector`` keeps; returns it and the new labels (or None)."""
    path = Path(path)
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    if fmt == "native":
        meta = native.read_meta(path)
        s = native.open_split(path, split, meta)
        table = _native_table(meta)
        raw = RawSplit(s.images, s.labels, native.read_mean(path, meta), table, "native", meta["image_size"])
        _check_label_range(raw.labels, len(table), f"{path}/{split}/labels.npy")
        if selector is None:
            return raw, None
        idx, new = selector(raw.labels)
        if len(idx) < len(raw.labels):
            raw.images, raw.labels = raw.images[idx], raw.labels[idx]
        return raw, new
    members = official.split_members(official.find_members(path), split, fmt, str(path))
    rows, all_labels, all_new, mean, size = None, [], [], None, None
    for m in members:
        b = m.read(num_classes)
        if size is None:
            size, rows = b.image_size, _Rows(b.image_size)
        elif b.image_size != size:
            raise official.FormatError(f"{m.where}: {b.image_size} px images, but {members[0].where} has {size} px")
        if b.mean is not None:
            if mean is None:
                mean = b.mean
            elif not np.array_equal(mean, b.mean):
                raise official.FormatError(f"{m.where}: its 'mean' differs from {members[0].where}'s: "
                                           "the batches come from different datasets")
        images = official.planar_to_nhwc(b.data, size)
        if selector is not None:
            idx, new = selector(b.labels)
            if len(idx) < len(b.labels):  # a copy only when rows are dropped; rows.add copies anyway
                images, b.labels = images[idx], b.labels[idx]
            all_new.append(new)
        rows.add(images, expected_total=len(images) * len(members) + len(members) * 16)
        all_labels.append(b.labels)
        del b
    mean_img = official.planar_to_nhwc(mean[None], size)[0].copy() if mean is not None else None
    raw = RawSplit(rows.result(), np.concatenate(all_labels), mean_img, IMAGENET, fmt, size)
    return raw, (np.concatenate(all_new) if selector is not None else None)


def _check_label_range(lab: np.ndarray, num_classes: int, where: str) -> None:
    if lab.size and (lab.min() < 1 or lab.max() > num_classes):
        raise official.FormatError(f"{where}: labels must be 1..{num_classes}, found {lab.min()}..{lab.max()}")


class ImageNetDS:
    """A downsampled ImageNet split, torchvision-style: ``ds[i]`` is ``(PIL.Image, int)`` (or what the
    transforms make of them).

    ``order``: "devkit" (the official files' labels minus one) or "sorted" (torchvision's). ``classes``: None,
    N (the first N devkit classes, relabelled 0..N-1, as NAS-Bench-201), or a list of WNIDs. ``max_per_class``
    keeps the first that many images of each class in file order. ``format``: None to detect, or one of
    "native", "pickle", "npz" when a folder holds several.

    Attributes: ``data`` uint8 (N, S, S, 3), ``targets`` int64 (N,), ``classes`` (names in label order),
    ``wnids``, ``class_to_idx`` (WNID -> label), ``image_size``, ``mean`` (the mean training image, float64
    (S, S, 3), in 0..255; None for official val files, which do not carry it), ``format``.
    """

    def __init__(self, root: str | Path, split: str = "train", order: str = "devkit",
                 classes: None | int | Sequence[str] = None, max_per_class: int | None = None,
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 format: str | None = None):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        if max_per_class is not None and max_per_class < 1:
            raise ValueError(f"max_per_class must be at least 1, not {max_per_class}")
        self.root, self.split, self.order = Path(root), split, order
        self.transform, self.target_transform = transform, target_transform
        fmt = format or detect_format(root)
        table = _native_table(native.read_meta(root)) if fmt == "native" else IMAGENET
        sub = labels_mod.subset(classes, order, table)
        raw, new = read_split(root, split, fmt, _Selector(sub.lookup, max_per_class), len(table))
        self.data: np.ndarray = raw.images
        self.targets: np.ndarray = new
        self.mean, self.format, self.image_size = raw.mean, raw.format, raw.image_size
        self.wnids: list[str] = list(sub.wnids)
        self.classes: list[str] = [table.name(w) for w in sub.wnids]
        self.class_to_idx = {w: i for i, w in enumerate(sub.wnids)}
        self.devkit_labels = raw.labels  # the files' own 1-based labels of the rows kept

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        from PIL import Image

        img, target = Image.fromarray(np.asarray(self.data[i])), int(self.targets[i])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def __repr__(self) -> str:
        return (f"ImageNetDS({str(self.root)!r}, split={self.split!r}, order={self.order!r}: {len(self)} images "
                f"of {self.image_size}x{self.image_size}, {len(self.wnids)} classes, {self.format})")


def open_dataset(path: str | Path, split: str = "train", order: str = "devkit",
                 classes: None | int | Sequence[str] = None, max_per_class: int | None = None,
                 format: str | None = None) -> ImageNetDS:
    """Open a dataset of any supported format; see ``ImageNetDS``."""
    return ImageNetDS(path, split, order, classes, max_per_class, format=format)
