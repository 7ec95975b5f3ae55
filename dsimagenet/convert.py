"""Convert between the official pickles, official npz and the native format, one batch file at a time, and
describe a dataset.

    dsimagenet convert Imagenet64_train_part1.zip --out im64 --formats native
    dsimagenet info im64 [--verify]

Memory stays at about one input batch: batches are streamed, written in chunks of rows with plain file writes
(no memory map grows), and never concatenated.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsimagenet.dataset import _native_table, detect_format
from dsimagenet.formats import native, official
from dsimagenet.labels import IMAGENET, ClassTable

OUT_FORMATS = ("native", "pickle", "npz")
_CHUNK_ROWS = 4096


@dataclass
class SourceBatch:
    index: int  # 1..10 for train, 0 for val
    rows: np.ndarray  # (n, 3*S*S) uint8 channel-planar
    labels: np.ndarray  # int64 1-based


@dataclass
class Source:
    path: Path
    format: str
    image_size: int
    table: ClassTable
    splits: list[str]
    mean: np.ndarray | None  # float64 (S, S, 3)
    first: tuple[str, official.Batch] | None = None  # the batch read to learn size and mean, not read twice

    def batches(self, split: str) -> Iterator[SourceBatch]:
        if self.format == "native":
            yield from _native_batches(self.path, split, self.image_size)
            return
        for m in official.split_members(official.find_members(self.path), split, self.format, str(self.path)):
            if self.first is not None and self.first[0] == m.where:
                b, self.first = self.first[1], None
            else:
                b = m.read(len(self.table))
            if b.image_size != self.image_size:
                raise official.FormatError(f"{m.where}: {b.image_size} px, the rest are {self.image_size} px")
            yield SourceBatch(m.index, b.data, b.labels)
            del b  # or it stays alive while the next batch is read: two batches in memory


def _read_rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows start..stop of an .npy file with plain reads (a memory map would grow the RSS by what it read)."""
    arr = np.load(path, mmap_mode="r")
    row_bytes = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
    with open(path, "rb") as f:
        f.seek(arr.offset + start * row_bytes)
        out = np.fromfile(f, dtype=arr.dtype, count=(stop - start) * row_bytes // arr.dtype.itemsize)
    return out.reshape(stop - start, *arr.shape[1:])


def _native_batches(root: Path, split: str, size: int) -> Iterator[SourceBatch]:
    s = native.open_split(root, split)
    bounds = official.batch_bounds(len(s.labels)) if split == "train" else [(0, len(s.labels))]
    for i, (a, b) in enumerate(bounds):
        rows = np.empty((b - a, 3 * size * size), np.uint8)
        for c in range(a, b, _CHUNK_ROWS):
            d = min(c + _CHUNK_ROWS, b)
            rows[c - a: d - a] = official.nhwc_to_planar(_read_rows(root / split / "images.npy", c, d))
        yield SourceBatch(i + 1 if split == "train" else 0, rows, s.labels[a:b])
        del rows


def open_source(path: str | Path, format: str | None = None) -> Source:
    path = Path(path)
    fmt = format or detect_format(path)
    if fmt == "native":
        meta = native.read_meta(path)
        return Source(path, fmt, meta["image_size"], _native_table(meta), sorted(meta["splits"]),
                      native.read_mean(path, meta))
    members = official.find_members(path)
    splits = sorted({m.split for m in members if m.kind == fmt})  # "train" sorts before "val"
    member = official.split_members(members, splits[0], fmt, str(path))[0]
    first = member.read()
    mean = None
    if splits[0] == "train":  # every train batch carries the mean of all training images
        if first.mean is None:
            raise official.FormatError(f"{member.where}: no 'mean' in a train batch")
        mean = official.planar_to_nhwc(first.mean[None], first.image_size)[0].copy()
    return Source(path, fmt, first.image_size, IMAGENET, splits, mean, (member.where, first))


def _append_rows(sw: native.SplitWriter, rows: np.ndarray, labels: np.ndarray, size: int) -> None:
    """Planar rows into a native split, a chunk at a time (a function, so that no view of the batch
    outlives it and keeps the whole batch alive while the next one is read)."""
    for c in range(0, len(rows), _CHUNK_ROWS):
        sw.append(official.planar_to_nhwc(rows[c: c + _CHUNK_ROWS], size), labels[c: c + _CHUNK_ROWS])


def convert(src: str | Path, dst: str | Path, formats: list[str], src_format: str | None = None) -> dict:
    """Write ``src`` (any format) to ``dst`` in each of ``formats``; returns counts per split."""
    bad = [f for f in formats if f not in OUT_FORMATS]
    if bad or not formats:
        raise ValueError(f"formats must be among {OUT_FORMATS}, got {formats}")
    dst = Path(dst)
    source = open_source(src, src_format)
    if Path(src).resolve() == dst.resolve() and source.format in formats:
        raise ValueError(f"{dst}: converting a dataset onto itself in its own format would overwrite it")
    dst.mkdir(parents=True, exist_ok=True)
    size = source.image_size
    mean_rows = official.nhwc_to_planar(source.mean[None])[0] if source.mean is not None else None
    writer = None
    if "native" in formats:
        writer = native.NativeWriter(dst, size, list(source.table.wnids), list(source.table.names),
                                     source=str(src), extra={"converted_from": source.format})
        writer.mean = source.mean
    counts = {}
    try:
        for split in source.splits:
            sw = writer.split(split) if writer else None
            n = 0
            for b in source.batches(split):
                if sw is not None:
                    _append_rows(sw, b.rows, b.labels, size)
                for kind in ("pickle", "npz"):
                    if kind in formats:
                        official.write_batch(dst / official.batch_name(split, b.index, kind), b.rows, b.labels,
                                             mean_rows if split == "train" else None, kind)
                n += len(b.rows)
                del b
            counts[split] = n
        if writer:
            writer.close()
    except BaseException:
        if writer:
            for s in writer.splits.values():
                s.abort()
        raise
    return counts


def describe(path: str | Path, check: bool = False) -> dict:
    """What a dataset is: format, image size, splits and counts, label order, classes, mean, checksums."""
    path = Path(path)
    fmt = detect_format(path)
    info: dict = {"path": str(path), "format": fmt}
    if fmt == "native":
        meta = native.read_meta(path)
        info.update(image_size=meta["image_size"], method=meta.get("method"), source=meta.get("source"),
                    format_version=meta["version"], label_order=meta["label_order"],
                    num_classes=meta["num_classes"],
                    splits={k: v["count"] for k, v in meta["splits"].items()},
                    mean_per_channel=meta.get("mean", {}).get("per_channel"))
        if check:
            problems = native.verify(path)
            info["checksums"] = "ok" if not problems else problems
        return info
    source = open_source(path, fmt)
    splits, classes = {}, set()
    for split in source.splits:
        n = 0
        for b in source.batches(split):  # reading every batch checks every file's structure and labels
            n += len(b.rows)
            classes.update(np.unique(b.labels).tolist())
        splits[split] = n
    info.update(image_size=source.image_size, label_order="devkit", num_classes=len(classes), splits=splits,
                mean_per_channel=[float(v) for v in source.mean.mean(axis=(0, 1))] if source.mean is not None
                else None, checksums="not stored in the official files (each file was read and checked)")
    return info
