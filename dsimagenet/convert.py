"""Convert between the official pickles, official npz and the native format, one batch file at a time, and
describe a dataset.

    dsimagenet convert Imagenet64_train_part1.zip --out im64 --formats native
    dsimagenet info im64 [--verify]

Memory stays at about one input batch: batches are streamed, written in chunks of rows with plain file writes
(no memory map grows), and never concatenated.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsimagenet.dataset import MANIFEST, _check_format, check_mean, class_table, detect_format, find_members
from dsimagenet.errors import ConfigError
from dsimagenet.formats import native, official
from dsimagenet.formats.atomic import atomic_write, fsync_dir
from dsimagenet.labels import ClassTable

OUT_FORMATS = ("native", "pickle", "npz")
_CHUNK_ROWS = 4096
_STAGE = ".convert-"  # the temporary folder beside the destination: .<name>.convert-<pid>


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
    class_source: str  # where the class table came from
    splits: list[str]
    mean: np.ndarray | None  # float64 (S, S, 3)
    first: tuple[str, official.Batch] | None = None  # the batch read to learn size and mean, not read twice

    def batches(self, split: str) -> Iterator[SourceBatch]:
        if self.format == "native":
            yield from _native_batches(self.path, split, self.image_size)
            return
        for m in official.split_members(find_members(self.path), split, self.format, str(self.path)):
            if self.first is not None and self.first[0] == m.where:
                b, self.first = self.first[1], None
            else:
                b = m.read(len(self.table))
            if b.image_size != self.image_size:
                raise official.FormatError(f"{m.where}: {b.image_size} px, the rest are {self.image_size} px")
            if b.mean is not None:
                check_mean(b.mean, m.where)
            yield SourceBatch(m.index, b.data, b.labels)
            del b  # or it stays alive while the next batch is read: two batches in memory


def _read_rows(path: Path, offset: int, row_shape: tuple[int, ...], start: int, stop: int) -> np.ndarray:
    """Rows start..stop of a checked uint8 .npy file (rows from ``offset``) with plain reads (a memory map
    would grow the RSS by what it read)."""
    row_bytes = int(np.prod(row_shape))
    with open(path, "rb") as f:
        f.seek(offset + start * row_bytes)
        out = np.fromfile(f, dtype=np.uint8, count=(stop - start) * row_bytes)
    if out.size != (stop - start) * row_bytes:
        raise native.NativeFormatError(f"{path}: cut short while being read")
    return out.reshape(stop - start, *row_shape)


def _native_batches(root: Path, split: str, size: int) -> Iterator[SourceBatch]:
    s = native.open_split(root, split)  # headers checked against meta.json: rows are read as they were written
    bounds = official.batch_bounds(len(s.labels)) if split == "train" else [(0, len(s.labels))]
    for i, (a, b) in enumerate(bounds):
        rows = np.empty((b - a, 3 * size * size), np.uint8)
        for c in range(a, b, _CHUNK_ROWS):
            d = min(c + _CHUNK_ROWS, b)
            chunk = _read_rows(root / split / "images.npy", s.images_offset, (size, size, 3), c, d)
            rows[c - a: d - a] = official.nhwc_to_planar(chunk)
        yield SourceBatch(i + 1 if split == "train" else 0, rows, s.labels[a:b])
        del rows


def open_source(path: str | Path, format: str | None = None) -> Source:
    path = Path(path)
    _check_format(format)
    fmt = format or detect_format(path)
    if fmt == "native":
        meta = native.read_meta(path)
        table, origin = class_table(path, fmt)
        return Source(path, fmt, meta["image_size"], table, origin, sorted(meta["splits"]),
                      native.read_mean(path, meta))
    members = find_members(path)
    splits = sorted({m.split for m in members if m.kind == fmt})  # "train" sorts before "val"
    if not splits:
        raise official.FormatError(f"{path}: no {fmt} batch files (train_data_batch_1..10, val_data"
                                   f"{'.npz' if fmt == 'npz' else ''}) here")
    table, origin = class_table(path, fmt, members)
    member = official.split_members(members, splits[0], fmt, str(path))[0]
    first = member.read(len(table))
    mean = None
    if splits[0] == "train":  # every train batch carries the mean of all training images
        if first.mean is None:
            raise official.FormatError(f"{member.where}: no 'mean' in a train batch")
        check_mean(first.mean, member.where)
        mean = official.planar_to_nhwc(first.mean[None], first.image_size)[0].copy()
    return Source(path, fmt, first.image_size, table, origin, splits, mean, (member.where, first))


def _append_rows(sw: native.SplitWriter, rows: np.ndarray, labels: np.ndarray, size: int) -> None:
    """Planar rows into a native split, a chunk at a time (a function, so that no view of the batch
    outlives it and keeps the whole batch alive while the next one is read)."""
    for c in range(0, len(rows), _CHUNK_ROWS):
        sw.append(official.planar_to_nhwc(rows[c: c + _CHUNK_ROWS], size), labels[c: c + _CHUNK_ROWS])


def _write(source: Source, src: Path, out: Path, formats: list[str]) -> dict:
    """Every file of the conversion into the empty folder ``out``; returns counts per split."""
    size = source.image_size
    mean_rows = official.nhwc_to_planar(source.mean[None])[0] if source.mean is not None else None
    writer = None
    if "native" in formats:
        writer = native.NativeWriter(out, size, list(source.table.wnids), list(source.table.names),
                                     source=str(src), extra={"converted_from": source.format})
        writer.mean = source.mean
    counts = {}
    for split in source.splits:
        sw = writer.split(split) if writer else None
        n = 0
        for b in source.batches(split):
            if sw is not None:
                _append_rows(sw, b.rows, b.labels, size)
            for kind in ("pickle", "npz"):
                if kind in formats:
                    official.write_batch(out / official.batch_name(split, b.index, kind), b.rows, b.labels,
                                         mean_rows if split == "train" else None, kind)
            n += len(b.rows)
            del b
        counts[split] = n
    if writer:
        writer.close()
    if any(f != "native" for f in formats):  # official files carry no class table: it goes beside them
        with atomic_write(out / MANIFEST, "w") as f:
            json.dump({"dsimagenet_convert": 1, "source": str(src), "converted_from": source.format,
                       "classes_from": source.class_source, "label_base": 1,  # label k is wnids[k - 1]
                       "wnids": list(source.table.wnids), "names": list(source.table.names), "counts": counts},
                      f, indent=1)
    return counts


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_stages(dst: Path) -> None:
    """Staging folders of conversions into ``dst`` that were killed (their process is gone)."""
    prefix = f".{dst.name}{_STAGE}"
    for p in dst.parent.glob(prefix + "*"):
        pid = p.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _commit(stage: Path, dst: Path) -> None:
    """Give the finished files in ``stage`` their final names under ``dst``: one rename of the folder when
    ``dst`` is new; else file by file, meta.json and the manifest last (the old meta.json is removed first,
    so that the folder is never a native dataset of old metadata and new arrays)."""
    with contextlib.suppress(OSError):  # a folder that is not there, or appeared meanwhile: file by file
        os.rename(stage, dst)
        fsync_dir(dst.parent)
        return
    files = sorted((p for p in stage.rglob("*") if p.is_file()), key=lambda p: (p.name in (native.META, MANIFEST),
                                                                               str(p)))
    if (stage / native.META).exists():
        (dst / native.META).unlink(missing_ok=True)
    for p in files:
        target = dst / p.relative_to(stage)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, target)
        fsync_dir(target.parent)
    shutil.rmtree(stage)


def convert(src: str | Path, dst: str | Path, formats: list[str], src_format: str | None = None) -> dict:
    """Write ``src`` (any format) to ``dst`` in each of ``formats``; returns counts per split.

    Every file is written into a folder beside ``dst`` and moved into place only when all are complete: a
    failed or interrupted conversion leaves nothing under a final name (its temporary folder is removed, or,
    after a kill, by the next conversion into ``dst``)."""
    bad = [f for f in formats if f not in OUT_FORMATS]
    if bad or not formats:
        raise ConfigError(f"--formats must be among {OUT_FORMATS}, got {formats}")
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f"{dst}: --out must be a folder, and this is a file")
    if Path(src).is_dir() and Path(src).resolve() in dst.resolve().parents:
        raise ConfigError(f"{dst}: --out inside the source folder {src}: its files would be read as part of the "
                          "source by the next reader; choose a folder outside it")
    source = open_source(src, src_format)
    if dst.exists() and Path(src).resolve() == dst.resolve() and source.format in formats:
        raise ConfigError(f"{dst}: converting a dataset onto itself in its own format would overwrite it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_stages(dst)
    stage = dst.parent / f".{dst.name}{_STAGE}{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        counts = _write(source, Path(src), stage, formats)
        _commit(stage, dst)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return counts


def describe(path: str | Path, check: bool = False) -> dict:
    """What a dataset is: format, image size, splits and counts, label order, classes and where their table
    came from, mean, checksums. Every file's structure is checked; ``check`` also recomputes the checksums."""
    path = Path(path)
    fmt = detect_format(path)
    info: dict = {"path": str(path), "format": fmt}
    if fmt == "native":
        meta = native.read_meta(path)
        for split in meta["splits"]:
            native.open_split(path, split, meta)  # headers and labels, as a reader would find them
        native.read_mean(path, meta)
        info.update(image_size=meta["image_size"], method=meta.get("method"), source=meta.get("source"),
                    format_version=meta["version"], label_order=meta["label_order"],
                    num_classes=meta["num_classes"], classes_from="native meta",
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
    info.update(image_size=source.image_size, label_order="devkit", num_classes=len(classes),
                classes_from=source.class_source, classes_in_table=len(source.table), splits=splits,
                mean_per_channel=[float(v) for v in source.mean.mean(axis=(0, 1))] if source.mean is not None
                else None, checksums="not stored in the official files (each file was read and checked)")
    return info
