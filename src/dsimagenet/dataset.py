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

import glob
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsimagenet import labels as labels_mod
from dsimagenet.errors import ConfigError, FormatError
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


MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
ASSUMED = "assumed ILSVRC-2012 devkit order (no manifest.json beside the files)"


def detect_format(path: str | Path) -> str:
    """"native", "pickle" or "npz", from the files at ``path``."""
    path = Path(path)
    if not os.path.lexists(path) and any(path.parent.glob(f".{glob.escape(path.name)}.new-*")):
        raise FileNotFoundError(f"{path}: missing: a conversion into it was killed between its two renames; "
                                "its complete output waits beside it and the next `dsimagenet convert` into "
                                f"{path.name} puts it in place")
    if path.is_dir() and native.is_native(path):
        return "native"
    kinds = {m.kind for m in official.find_members(path)}
    if not kinds and path.is_file():
        raise official.FormatError(f"{path}: no official batch files in this zip: expected train_data_batch_1..10 "
                                   "and/or val_data (pickles, or .npz), at its top or one folder down")
    if not kinds:
        raise FileNotFoundError(f"{path}: no dataset here: expected meta.json (native format), or official "
                                "batch files train_data_batch_1..10 / val_data (pickle or .npz), or their zips")
    return "npz" if "npz" in kinds else "pickle"


def check_format(format: str | None) -> None:
    """A format argument: one of FORMATS, or None to detect it."""
    if format is not None and format not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS} (or None to detect it), not {format!r}")


def _native_table(meta: dict) -> ClassTable:
    """The class table of a meta.json checked by ``native.read_meta`` (unique WNIDs, names of the same length)."""
    wnids = tuple(meta["wnids"])
    if wnids == IMAGENET.wnids and (not meta["names"] or tuple(meta["names"]) == IMAGENET.names):
        return IMAGENET
    return ClassTable(wnids, tuple(meta["names"] or wnids))  # also ImageNet's WNIDs named otherwise (the demo's)


def _manifest_table(path: Path) -> ClassTable:
    """The class table recorded in a manifest.json: its "wnids" (and "names"), label k being wnids[k - 1];
    from a build manifest without them, ImageNet's for label_order "devkit", or the class folders (sorted, as
    the build labels them) that its per_class counts list."""
    def bad(msg: str) -> official.FormatError:
        return official.FormatError(f"{path}: {msg}")

    try:
        f = native.open_regular(path, official.FormatError)
    except FileNotFoundError:
        raise bad("a link to nothing") from None
    with f:  # read(n) allocates n bytes: no more than it holds
        data = f.read(min(os.fstat(f.fileno()).st_size, MAX_MANIFEST_BYTES) + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise bad(f"larger than {MAX_MANIFEST_BYTES >> 20} MB: not a manifest dsimagenet wrote")
    try:
        m = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise bad("not valid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise bad(f"not valid UTF-8 JSON: {e}") from None
    if not isinstance(m, dict):
        raise bad(f"expected a JSON object, found {type(m).__name__}")

    def strings(key: str, v) -> tuple[str, ...]:
        if not isinstance(v, list) or not v or not all(isinstance(s, str) and s for s in v):
            raise bad(f"{key!r} must be a list of non-empty strings")
        return tuple(v)

    if "wnids" in m:
        wnids = strings("wnids", m["wnids"])
        names = strings("names", m["names"]) if m.get("names") is not None else wnids
        if len(names) != len(wnids) or len(set(wnids)) != len(wnids):
            raise bad(f"'wnids' ({len(wnids)}) must be distinct, and as many as 'names' ({len(names)})")
        imagenet = wnids == IMAGENET.wnids and (m.get("names") is None or names == IMAGENET.names)
        return IMAGENET if imagenet else ClassTable(wnids, names)  # ImageNet's WNIDs may be named otherwise
    order, per_class = m.get("label_order"), m.get("per_class")
    if order == "devkit":  # the build labels a tree of ILSVRC-2012 WNIDs with devkit IDs
        return IMAGENET
    if order != "sorted class folders" or not isinstance(per_class, dict) or not all(
            isinstance(v, dict) for v in per_class.values()):
        raise bad("no class table: neither 'wnids' nor a build's label_order and per_class counts")
    wnids = tuple(sorted({w for counts in per_class.values() for w in counts}))
    strings("per_class", list(wnids))
    return ClassTable(wnids, wnids)


def class_table(path: str | Path, fmt: str, members: list[official.Member] | None = None) -> tuple[ClassTable, str]:
    """The class table of the dataset at ``path`` and where it came from: the native meta.json; for official
    files (which carry none) the manifest.json beside them; else ImageNet's 1000 classes, assumed."""
    path = Path(path)
    if fmt == "native":
        return _native_table(native.read_meta(path)), "native meta"
    folders = {path} if path.is_dir() else set()
    folders |= {Path(m.where).parent for m in members or official.find_members(path) if ".zip:" not in m.where}
    # anything under the name counts (a folder, a FIFO, a link to nothing): it is read, and refused, never
    # skipped for ImageNet's classes
    manifests = sorted(f / MANIFEST for f in folders if os.path.lexists(f / MANIFEST))
    if len(manifests) > 1:
        raise official.FormatError(f"{path}: {len(manifests)} manifests ({', '.join(map(str, manifests))}): which "
                                   "one describes these files is unclear")
    if manifests:
        return _manifest_table(manifests[0]), f"manifest ({manifests[0]})"
    return IMAGENET, ASSUMED


def read_split(path: str | Path, split: str, fmt: str, table: ClassTable,
               selector: _Selector | None = None) -> tuple[RawSplit, np.ndarray | None]:
    """Read a split of format ``fmt`` whose labels index ``table``, keeping only the rows ``selector`` keeps;
    returns it and the new labels (or None)."""
    if fmt == "native":
        return _read_native(Path(path), split, table, selector)
    return _read_official(Path(path), split, fmt, table, selector)


def _read_native(path: Path, split: str, table: ClassTable, selector: _Selector | None):
    meta = native.read_meta(path)
    s = native.open_split(path, split, meta)  # checks headers against meta.json, labels 1..num_classes
    raw = RawSplit(s.images, s.labels, native.read_mean(path, meta), table, "native", meta["image_size"])
    if selector is None:
        return raw, None
    idx, new = selector(raw.labels)
    if len(idx) < len(raw.labels):  # read just those rows: indexing the map would read the whole file ahead
        raw.images = native.read_rows(path / split / "images.npy", s.images_offset, raw.images.shape[1:], idx)
        raw.labels = raw.labels[idx]
    return raw, new


def _read_official(path: Path, split: str, fmt: str, table: ClassTable, selector: _Selector | None):
    """The batches through ``official.read_split`` (every check), transposed into one array as they come."""
    members = official.split_members(official.find_members(path), split, fmt, str(path))
    rows, all_labels, all_new, mean, size = None, [], [], None, None
    for _, b in official.read_split(members, len(table)):
        if size is None:
            size, rows = b.image_size, _Rows(b.image_size)
        if mean is None:
            mean = b.mean
        images = official.planar_to_nhwc(b.data, size)
        if selector is not None:
            idx, new = selector(b.labels)
            if len(idx) < len(b.labels):  # a copy only when rows are dropped; rows.add copies anyway
                images, b.labels = images[idx], b.labels[idx]
            all_new.append(new)
        rows.add(images, expected_total=len(images) * len(members) + len(members) * 16)
        all_labels.append(b.labels)
        del b, images
    mean_img = official.planar_to_nhwc(mean[None], size)[0].copy() if mean is not None else None
    raw = RawSplit(rows.result(), np.concatenate(all_labels), mean_img, table, fmt, size)
    return raw, (np.concatenate(all_new) if selector is not None else None)


class ImageNetDS:
    """A downsampled ImageNet split, torchvision-style: ``ds[i]`` is ``(PIL.Image, int)`` (or what the
    transforms make of them).

    ``order``: "devkit" (the official files' labels minus one) or "sorted" (torchvision's). ``classes``: None,
    N (the first N devkit classes, relabelled 0..N-1, as NAS-Bench-201), or a list of WNIDs. ``max_per_class``
    keeps the first that many images of each class in file order. ``format``: None to detect, or one of
    "native", "pickle", "npz" when a folder holds several.

    Attributes: ``data`` uint8 (N, S, S, 3), ``targets`` int64 (N,), ``classes`` (names in label order),
    ``wnids``, ``class_to_idx`` (WNID -> label), ``image_size``, ``mean`` (the mean training image, float64
    (S, S, 3), in 0..255; None for official val files, which do not carry it), ``format``, ``class_source``
    (where the class table came from: "native meta", "manifest (<path>)", or, for official files without a
    manifest.json beside them, "assumed ILSVRC-2012 devkit order ...").

    Official files carry no class table: a dataset built by ``dsimagenet build`` from a class-folder tree has
    its classes in the manifest.json written beside the files; without one the files are taken for ImageNet's
    1000 classes (their labels are then checked to be 1..1000).
    """

    def __init__(self, root: str | Path, split: str = "train", order: str = "devkit",
                 classes: None | int | Sequence[str] = None, max_per_class: int | None = None,
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 format: str | None = None):
        if split not in ("train", "val"):
            raise ConfigError(f"split must be 'train' or 'val', not {split!r}")
        if max_per_class is not None and (not isinstance(max_per_class, (int, np.integer)) or
                                          isinstance(max_per_class, bool) or max_per_class < 1):
            raise ConfigError(f"max_per_class (--max-per-class) must be an integer of at least 1, or None, not "
                              f"{max_per_class!r:.40}")
        check_format(format)
        self.root, self.split, self.order = Path(root), split, order
        self.transform, self.target_transform = transform, target_transform
        fmt = format or detect_format(root)
        table, self.class_source = class_table(root, fmt)
        sub = labels_mod.subset(classes, order, table)
        raw, new = read_split(root, split, fmt, table, _Selector(sub.lookup, max_per_class))
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


def fingerprint(path: str | Path) -> str:
    """A sha256 hex digest that identifies the data at ``path`` (what a run records and a resume compares).

    Native data: its meta.json (splits, checksums, mean), after ``native.verify`` has re-hashed every array
    against it, a full read of the data at every call (training start, resume, each sweep decision): an image
    changed in place after the build would otherwise train, and resume, unnoticed; training reads all of the
    data anyway. Raises FormatError when an array differs from its meta.json. Official files: each file's
    name, size, first and last MiB (not a full hash)."""
    path = Path(path)
    h = hashlib.sha256()
    if native.is_native(path):
        meta = native.read_meta(path)
        problems = native.verify(path)
        if problems:
            raise FormatError(f"{path}: the data differs from its meta.json ({'; '.join(problems[:3])}"
                              f"{'; ...' if len(problems) > 3 else ''}): rebuild it")
        h.update(json.dumps([meta["splits"], meta.get("mean")], sort_keys=True).encode())
        return h.hexdigest()
    files = sorted({Path(m.where.split(".zip:")[0] + ".zip") if ".zip:" in m.where else Path(m.where)
                    for m in official.find_members(path)})
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read())
    return h.hexdigest()
