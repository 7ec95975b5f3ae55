"""Open any downsampled-ImageNet dataset in one line: official pickles, official npz, the official zips, or
dsimagenet's native format; whole, or as class subsets, in devkit or sorted label order.

    >>> ds = open_dataset("Imagenet16_train.zip", classes=120)       # NAS-Bench-201's ImageNet16-120
    >>> ds.data.shape, ds.targets[:3], ds.wnids[0]                   # (151700, 16, 16, 3), labels 0..119
    >>> ds = ImageNetDS("out/32_box", split="val", order="sorted")    # torchvision's label order
    >>> ds = open_dataset("Imagenet16", "x-valid", classes=120)       # NAS-Bench-201's x-valid: 3,000 images
    >>> ds = ImageNetDS("out/32_box", train=False, classes="present")  # val, over the classes train has
    >>> img, label = ds[0]                                            # (PIL.Image, int)

Native datasets open as memory maps in milliseconds; the official files are unpickled safely into one array
(each batch is transposed into place, so the peak is the data plus one batch).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsimagenet import labels as labels_mod
from dsimagenet import splits as splits_mod
from dsimagenet.errors import ConfigError, FormatError
from dsimagenet.formats import hub, native, official, provenance
from dsimagenet.labels import IMAGENET, ClassTable
from dsimagenet.sources.imagenet import release_kind

FORMATS = ("native", "pickle", "npz", *hub.FORMATS)
PRESENT = "present"  # classes="present": the classes that occur in train


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
    if (raw := release_kind(path)) is not None:
        raise FormatError(f"{path}: {raw}, not a downsampled dataset: `dsimagenet build --train ... --val ... "
                          "--out OUT` makes one from it")
    if path.is_file() and path.suffix == ".parquet":
        return "parquet"
    if (pixelrnn := provenance.pixelrnn(path, look_inside=False)) is not None:
        raise FormatError(f"{path}: {pixelrnn}")
    kinds = {m.kind for m in official.find_members(path)}
    if not kinds and (hub_format := hub.detect(path)) is not None:
        return hub_format
    if not kinds and (pixelrnn := provenance.pixelrnn(path)) is not None:
        raise FormatError(f"{path}: {pixelrnn}")
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


def class_table(path: str | Path, fmt: str, members: list[official.Member] | None = None,
                labels_in: str | None = None) -> tuple[ClassTable, str]:
    """The class table of the dataset at ``path`` and where it came from: the native meta.json; for official
    files (which carry none) the manifest.json beside them; else ImageNet's 1000 classes, assumed. Hub-layout
    shards (parquet, webdataset): their ClassLabel names or our metadata, else ``labels_in`` (hub.open_hub)."""
    path = Path(path)
    _check_labels_in(fmt, labels_in)
    if fmt in hub.FORMATS:
        labels = hub.open_hub(path, fmt, labels_in).labels
        return labels.table, labels.source
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


def _check_labels_in(fmt: str, labels_in: str | None) -> None:
    if labels_in is not None and fmt not in hub.FORMATS:
        raise ConfigError(f"--labels-in {labels_in}: only Hub-layout shards (parquet, webdataset) need it; "
                          f"{fmt} files say their own label order")


def read_split(path: str | Path, split: str, fmt: str, table: ClassTable,
               selector: _Selector | None = None, labels_in: str | None = None) -> tuple[RawSplit, np.ndarray | None]:
    """Read a split of format ``fmt`` whose labels index ``table``, keeping only the rows ``selector`` keeps;
    returns it and the new labels (or None). ``labels_in``: the stored order of Hub-layout shards."""
    if fmt in hub.FORMATS:
        return _read_hub(Path(path), split, fmt, table, selector, labels_in)
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


def _read_hub(path: Path, split: str, fmt: str, table: ClassTable, selector: _Selector | None,
              labels_in: str | None):
    """Parquet or WebDataset shards, streamed (row group by row group, member by member) into one array; the
    mean training image is summed exactly on the way (the shards do not carry it)."""
    src = hub.open_hub(path, fmt, labels_in)
    size = src.image_size
    rows, all_labels, all_new = _Rows(size), [], []
    sums, n = (np.zeros((size, size, 3), np.int64), 0) if split == "train" else (None, 0)
    for images, labels in src.batches(split):
        if sums is not None:
            sums += images.sum(axis=0, dtype=np.int64)
            n += len(images)
        if selector is not None:
            idx, new = selector(labels)
            if len(idx) < len(labels):
                images, labels = images[idx], labels[idx]
            all_new.append(new)
        rows.add(images, expected_total=src.counts.get(split, 0))
        all_labels.append(labels)
        del images
    empty = np.empty(0, np.int64)
    raw = RawSplit(rows.result(), np.concatenate(all_labels) if all_labels else empty,
                   sums / n if n else None, table, fmt, size)
    return raw, (np.concatenate(all_new) if all_new else empty) if selector is not None else None


class ImageNetDS:
    """A downsampled ImageNet split, torchvision-style: ``ds[i]`` is ``(PIL.Image, int)`` (or what the
    transforms make of them).

    ``split``: "train" or "val" ("validation" too, TFDS's and Hugging Face's name); NAS-Bench-201's "x-valid" and
    "x-test" (halves of ImageNet16-120's val) or "search-train" and "search-valid" (halves of its train), with
    ``classes=120`` (see dsimagenet.splits). ``train``: torchvision's train=True/False, for split "train"/"val"
    (given with ``split``, the two must agree). ``order``: "devkit" (the official files' labels minus one) or
    "sorted" (torchvision's). ``classes``: None (every class of the dataset's table), N (the first N devkit
    classes, relabelled 0..N-1, as NAS-Bench-201), a list of WNIDs, or "present": the classes that occur in the
    train split (a dataset built from 10 ImageNet class folders has 10, where its table has ImageNet's 1000; a
    val image of another class is then an error). ``max_per_class``
    keeps the first that many images of each class in file order. ``format``: None to detect, or one of
    "native", "pickle", "npz", "parquet", "webdataset" when a folder holds several. ``labels_in``: for Hub
    parquet/WebDataset copies whose files do not name their classes, the order of the stored integers
    ("devkit": the official labels minus one, TFDS's; "sorted": sorted WNIDs, torchvision's); never guessed.

    Attributes: ``data`` uint8 (N, S, S, 3), ``targets`` int64 (N,), ``classes`` (names in label order),
    ``wnids``, ``class_to_idx`` (WNID -> label), ``image_size``, ``mean`` (the mean training image, float64
    (S, S, 3), in 0..255; None for official val files, which do not carry it), ``format``, ``class_source``
    (where the class table came from: "native meta", "manifest (<path>)", or, for official files without a
    manifest.json beside them, "assumed ILSVRC-2012 devkit order ...").

    Official files carry no class table: a dataset built by ``dsimagenet build`` from a class-folder tree has
    its classes in the manifest.json written beside the files; without one the files are taken for ImageNet's
    1000 classes (their labels are then checked to be 1..1000).
    """

    def __init__(self, root: str | Path, split: str | None = None, order: str = "devkit",
                 classes: None | int | str | Sequence[str] = None, max_per_class: int | None = None,
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 format: str | None = None, labels_in: str | None = None, *, train: bool | None = None):
        split = splits_mod.resolve(split, train)  # "validation" is "val"; train=True/False as torchvision's
        stored = splits_mod.stored_split(split)
        if max_per_class is not None and (not isinstance(max_per_class, (int, np.integer)) or
                                          isinstance(max_per_class, bool) or max_per_class < 1):
            raise ConfigError(f"max_per_class (--max-per-class) must be an integer of at least 1, or None, not "
                              f"{max_per_class!r:.40}")
        check_format(format)
        self.root, self.split, self.order = Path(root), split, order
        self.transform, self.target_transform = transform, target_transform
        fmt = format or detect_format(root)
        table, self.class_source = class_table(root, fmt, labels_in=labels_in)
        present = isinstance(classes, str) and classes == PRESENT
        sub = labels_mod.subset(None if present else classes, order, table)
        raw, new = read_split(root, stored, fmt, table, _Selector(sub.lookup, max_per_class), labels_in=labels_in)
        if present:  # the classes that occur in train, relabelled 0..C-1 in ``order``
            wnids = _present(raw.labels, table) if stored == "train" else \
                train_classes(root, fmt, table, labels_in=labels_in)
            if not wnids:
                raise ConfigError(f"{root}: its train split has no images, so no classes occur in it (classes="
                                  "'present'): choose them (classes=N or a list of WNIDs)")
            sub, new = _relabel(raw.labels, wnids, order, table, f"{root} {split}")
        if split in splits_mod.NASBENCH201:
            rows = splits_mod.nasbench201_rows(split, sub.wnids, len(new), table is IMAGENET, str(root))
            raw.images, raw.labels, new = raw.images[rows], raw.labels[rows], new[rows]
        self.data: np.ndarray = raw.images
        self.targets: np.ndarray = new
        self.mean, self.format, self.image_size = raw.mean, raw.format, raw.image_size
        self.wnids: list[str] = list(sub.wnids)
        self.classes: list[str] = [table.name(w) for w in sub.wnids]
        self.class_to_idx = {w: i for i, w in enumerate(sub.wnids)}
        self.devkit_labels = raw.labels  # the files' own 1-based labels of the rows kept
        self.table = table
        self.selection: dict | None = None  # how rows were chosen, when not by a stored split (``take_rows``)

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


def open_dataset(path: str | Path, split: str | None = None, order: str = "devkit",
                 classes: None | int | str | Sequence[str] = None, max_per_class: int | None = None,
                 format: str | None = None, labels_in: str | None = None, *,
                 train: bool | None = None) -> ImageNetDS:
    """Open a dataset of any supported format; see ``ImageNetDS``."""
    return ImageNetDS(path, split, order, classes, max_per_class, format=format, labels_in=labels_in, train=train)


def _present(devkit_labels: np.ndarray, table: ClassTable) -> list[str]:
    return [table.wnids[k - 1] for k in np.unique(devkit_labels).tolist()]


def _relabel(devkit_labels: np.ndarray, wnids: Sequence[str], order: str, table: ClassTable,
             where: str) -> tuple[labels_mod.ClassSubset, np.ndarray]:
    """The subset of ``wnids`` and the new labels of rows whose files' labels are ``devkit_labels``; ConfigError
    naming ``where`` when a row is of another class (an image of a class the model never trains on)."""
    sub = labels_mod.subset(list(wnids), order, table)
    new = sub.lookup[devkit_labels]
    if (new < 0).any():
        other = _present(devkit_labels[new < 0], table)
        raise ConfigError(f"{where}: {int((new < 0).sum())} images of {len(other)} class(es) that train does not "
                          f"have ({', '.join(other[:5])}{', ...' if len(other) > 5 else ''}): a model trained on "
                          "train's classes cannot predict them; choose the classes (classes=[...], --classes)")
    return sub, new


def train_classes(path: str | Path, fmt: str | None = None, table: ClassTable | None = None,
                  labels_in: str | None = None) -> list[str]:
    """The WNIDs of the classes that occur in the train split, in the table's (devkit) order: what
    ``classes="present"`` keeps. Native data: its labels.npy; official files: every train batch's labels
    (each file is read, one at a time)."""
    fmt = fmt or detect_format(path)
    if table is None:
        table = class_table(path, fmt, labels_in=labels_in)[0]
    if fmt == "native":
        return _present(native.open_split(path, "train").labels, table)
    if fmt in hub.FORMATS:  # shards: read train (a row group or a shard at a time) for its labels
        return _present(read_split(path, "train", fmt, table, labels_in=labels_in)[0].labels, table)
    members = official.split_members(official.find_members(Path(path)), "train", fmt, str(path))
    seen = np.zeros(len(table) + 1, bool)
    for _, b in official.read_split(members, len(table)):
        seen[b.labels] = True
    return [table.wnids[k - 1] for k in np.flatnonzero(seen).tolist()]


def has_split(path: str | Path, split: str, format: str | None = None) -> bool:
    """Whether the dataset at ``path`` stores the split a name draws from (``splits.stored_split``)."""
    stored = splits_mod.stored_split(split)
    fmt = format or detect_format(path)
    if fmt == "native":
        return stored in native.read_meta(path)["splits"]
    if fmt in hub.FORMATS:
        return stored in hub.open_hub(path, fmt, need_labels=False).splits
    return any(m.split == stored and m.kind == fmt for m in official.find_members(Path(path)))


def take_rows(ds: ImageNetDS, rows: np.ndarray, split: str, selection: dict | None = None) -> ImageNetDS:
    """A copy of ``ds`` holding only ``rows`` (ascending), named ``split``: a part of a split, such as the held-out
    part of train (its images read into memory; the classes, mean and table are ``ds``'s). ``selection``: how
    the rows were chosen, kept as ``.selection`` (a run records it)."""
    import copy

    part = copy.copy(ds)
    rows = np.asarray(rows, np.int64)
    part.data, part.targets, part.devkit_labels = ds.data[rows], ds.targets[rows], ds.devkit_labels[rows]
    part.split, part.selection = split, selection
    return part


def with_classes(ds: ImageNetDS, wnids: Sequence[str]) -> ImageNetDS:
    """A copy of ``ds`` (the same images) relabelled 0..len-1 over the classes ``wnids`` in its order, such as a
    val split over the classes its train split has; ConfigError when an image is of another class."""
    import copy

    out = copy.copy(ds)
    sub, out.targets = _relabel(ds.devkit_labels, wnids, ds.order, ds.table, f"{ds.root} {ds.split}")
    out.wnids = list(sub.wnids)
    out.classes = [ds.table.name(w) for w in sub.wnids]
    out.class_to_idx = {w: i for i, w in enumerate(sub.wnids)}
    return out


_VERIFIED: dict[str, tuple[tuple, str]] = {}  # folder -> (the states of its files, the digest verified then)
_SETTLED_NS = 2 * 10**9  # a folder written to in the last 2 s is hashed again at each call


def _file_states(path: Path) -> tuple:
    """(the folder, then (path, size, inode, mtime, ctime) of each file in it and in its split folders, by
    path): what a change to any of them changes (ctime moves with every write, and no tool sets it back)."""
    root = str(path.resolve())
    states = []
    for folder, dirs, files in os.walk(root):
        if folder != root:
            dirs.clear()  # meta.json and mean.npy at the top, each split's arrays one folder down
        for name in files:
            st = os.stat(os.path.join(folder, name))
            states.append((os.path.join(folder, name), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns))
    return (root, *sorted(states))


def fingerprint(path: str | Path) -> str:
    """A sha256 hex digest that identifies the data at ``path`` (what a run records and a resume compares).

    Native data: its meta.json (splits, checksums, mean), after ``native.verify`` has re-hashed every array
    against it, a full read of the data (training start, resume): an image changed in place after the build
    would otherwise train, and resume, unnoticed; training reads all of the data anyway. Raises FormatError when
    an array differs from its meta.json. A process hashes a dataset once: later calls (a sweep's decisions,
    tune's trials, the objective's reuse checks) get the digest it verified while no file of the folder has
    changed since (``_file_states``: size, inode, mtime and ctime, which every write moves; a folder written in
    the last 2 s is hashed again). Official files: each file's name, size, first and last MiB (not a full
    hash)."""
    path = Path(path)
    h = hashlib.sha256()
    if native.is_native(path):
        states = _file_states(path)
        known, digest = _VERIFIED.get(states[0], (None, None))
        if known == states:
            return digest
        meta = native.read_meta(path)
        problems = native.verify(path)
        if problems:
            raise FormatError(f"{path}: the data differs from its meta.json ({'; '.join(problems[:3])}"
                              f"{'; ...' if len(problems) > 3 else ''}): rebuild it")
        h.update(json.dumps([meta["splits"], meta.get("mean")], sort_keys=True).encode())
        newest = max((s[4] for s in states[1:]), default=0)
        # remembered if nothing changed while it was read, and its last write is older than a file time's
        # resolution can hide (a write in the same tick as the one before it could leave every state as it was)
        if _file_states(path) == states and time.time_ns() - newest > _SETTLED_NS:
            _VERIFIED[states[0]] = states, h.hexdigest()
        return h.hexdigest()
    hub_format = hub.detect(path) if not (path.is_dir() and any(official.find_members(path))) else None
    if hub_format is not None:  # every shard, in name order (parquet.find_shards / webdataset.find_shards)
        finder = hub.parquet.find_shards if hub_format == "parquet" else hub.webdataset.find_shards
        files = sorted(p for group in finder(path).values() for p in group)
    else:
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
