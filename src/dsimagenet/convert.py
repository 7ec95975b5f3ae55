"""Convert between the official pickles, official npz and the native format, one batch file at a time, and
describe a dataset.

    dsimagenet convert Imagenet64_train_part1.zip --out im64 --formats native
    dsimagenet info im64 [--verify]

Memory stays at about one input batch: batches are streamed, written in chunks of rows with plain file writes
(no memory map grows), and never concatenated.

``--out`` is all or nothing: it is new, empty, or a dataset folder dsimagenet wrote, and is replaced whole by
a folder written beside it (see ``recover`` for what a kill at any step leaves, and how it is finished).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsimagenet.dataset import MANIFEST, check_format, class_table, detect_format
from dsimagenet.errors import ConfigError, FormatError
from dsimagenet.formats import hub, native, official, parquet, provenance, webdataset
from dsimagenet.formats.atomic import atomic_write, fsync_dir
from dsimagenet.labels import ClassTable

OUT_FORMATS = ("native", "pickle", "npz", parquet.FORMAT, webdataset.FORMAT)
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
    # the first split's reader, its first batch already read (to learn the size and mean), so never read twice
    pending: tuple[str, Iterator[tuple[official.Member, official.Batch]]] | None = None
    hub: hub.HubSource | None = None  # parquet or WebDataset shards

    def batches(self, split: str) -> Iterator[SourceBatch]:
        if self.hub is not None:
            yield from _hub_batches(self.hub, split)
            return
        if self.format == "native":
            yield from _native_batches(self.path, split, self.image_size)
            return
        if self.pending is not None and self.pending[0] == split:
            batches, self.pending = self.pending[1], None
        else:
            members = official.split_members(official.find_members(self.path), split, self.format, str(self.path))
            batches = official.read_split(members, len(self.table), self.image_size)
        for m, b in batches:
            out = SourceBatch(m.index, b.data, b.labels)
            del b  # or it stays alive while the next batch is read: two batches in memory
            yield out
            del out


def _prepend(first, rest: Iterator) -> Iterator:
    yield first
    del first
    yield from rest


def _native_batches(root: Path, split: str, size: int) -> Iterator[SourceBatch]:
    s = native.open_split(root, split)  # headers checked against meta.json: rows are read as they were written
    bounds = official.batch_bounds(len(s.labels)) if split == "train" else [(0, len(s.labels))]
    for i, (a, b) in enumerate(bounds):
        rows = np.empty((b - a, 3 * size * size), np.uint8)
        for c in range(a, b, _CHUNK_ROWS):
            d = min(c + _CHUNK_ROWS, b)
            chunk = native.read_rows(root / split / "images.npy", s.images_offset, (size, size, 3), np.arange(c, d))
            rows[c - a: d - a] = official.nhwc_to_planar(chunk)
        yield SourceBatch(i + 1 if split == "train" else 0, rows, s.labels[a:b])
        del rows


def _hub_batches(src: hub.HubSource, split: str) -> Iterator[SourceBatch]:
    """The shards' rows cut as the official files are (ten train batches, one val_data), channel-planar, so
    that every writer takes them as it takes official batches."""
    n, size = src.counts[split], src.image_size
    bounds = official.batch_bounds(n) if split == "train" else [(0, n)]
    it = src.batches(split)
    left_i, left_l = np.empty((0, size, size, 3), np.uint8), np.empty(0, np.int64)
    for k, (a, b) in enumerate(bounds):
        rows, labels, at = np.empty((b - a, 3 * size * size), np.uint8), np.empty(b - a, np.int64), 0
        while at < b - a:
            if not len(left_l):
                nxt = next(it, None)
                if nxt is None:
                    raise FormatError(f"{src.path}: {split}: {a + at:,} rows, fewer than the {n:,} its shards' "
                                      "metadata say")
                left_i, left_l = nxt
                continue
            t = min(len(left_l), b - a - at)
            rows[at:at + t], labels[at:at + t] = official.nhwc_to_planar(left_i[:t]), left_l[:t]
            left_i, left_l, at = left_i[t:], left_l[t:], at + t
        yield SourceBatch(k + 1 if split == "train" else 0, rows, labels)
        del rows
    if len(left_l) or next(it, None) is not None:
        raise FormatError(f"{src.path}: {split}: more rows than the {n:,} its shards' metadata say")


def _hub_source(path: Path, fmt: str, labels_in: str | None) -> Source:
    """Parquet or WebDataset shards as a Source; their mean training image (not stored) is summed exactly in
    a first pass over the train split."""
    src = hub.open_hub(path, fmt, labels_in)
    splits = src.splits
    mean = None
    if "train" in splits and src.counts["train"]:
        sums = np.zeros((src.image_size, src.image_size, 3), np.int64)
        for images, _ in src.batches("train"):
            sums += images.sum(axis=0, dtype=np.int64)
        mean = sums / src.counts["train"]
    return Source(path, fmt, src.image_size, src.labels.table, src.labels.source, splits, mean, hub=src)


def open_source(path: str | Path, format: str | None = None, labels_in: str | None = None) -> Source:
    path = Path(path)
    check_format(format)
    fmt = format or detect_format(path)
    if fmt in hub.FORMATS:
        return _hub_source(path, fmt, labels_in)
    if labels_in is not None:
        raise ConfigError(f"--labels-in {labels_in}: only Hub-layout shards (parquet, webdataset) need it; {fmt} "
                          "files say their own label order")
    if fmt == "native":
        meta = native.read_meta(path)
        table, origin = class_table(path, fmt)
        return Source(path, fmt, meta["image_size"], table, origin, sorted(meta["splits"]),
                      native.read_mean(path, meta))
    members = official.find_members(path)
    splits = sorted({m.split for m in members if m.kind == fmt})  # "train" sorts before "val"
    if not splits:
        raise official.FormatError(f"{path}: no {fmt} batch files (train_data_batch_1..10, val_data"
                                   f"{'.npz' if fmt == 'npz' else ''}) here")
    table, origin = class_table(path, fmt, members)
    batches = official.read_split(official.split_members(members, splits[0], fmt, str(path)), len(table))
    member, first = next(batches)
    mean = None  # every train batch carries the mean of all training images (official.read_split checks it)
    if splits[0] == "train":
        mean = official.planar_to_nhwc(first.mean[None], first.image_size)[0].copy()
    return Source(path, fmt, first.image_size, table, origin, splits, mean,
                  (splits[0], _prepend((member, first), batches)))


def _append_rows(sw: native.SplitWriter, rows: np.ndarray, labels: np.ndarray, size: int) -> None:
    """Planar rows into a native split, a chunk at a time (a function, so that no view of the batch
    outlives it and keeps the whole batch alive while the next one is read)."""
    for c in range(0, len(rows), _CHUNK_ROWS):
        sw.append(official.planar_to_nhwc(rows[c: c + _CHUNK_ROWS], size), labels[c: c + _CHUNK_ROWS])


def _append_hub(writers: list, rows: np.ndarray, labels: np.ndarray, size: int) -> None:
    """Planar rows into parquet/WebDataset writers, a chunk at a time."""
    for c in range(0, len(rows), _CHUNK_ROWS):
        images = official.planar_to_nhwc(rows[c: c + _CHUNK_ROWS], size)
        for w in writers:
            w.append(images, labels[c: c + _CHUNK_ROWS])


def _write(source: Source, src: Path, out: Path, formats: list[str], quiet: bool = False) -> dict:
    """Every file of the conversion into the empty folder ``out``; returns counts per split. Progress in images
    (of the total, when the source's metadata says it: a native source) through dsimagenet.progress."""
    from dsimagenet.progress import bar

    total = sum(v["count"] for v in native.read_meta(source.path)["splits"].values()) \
        if source.format == "native" else None  # official files and shards say their count only when read
    progress = bar(total, "convert", unit="img", quiet=quiet)
    size = source.image_size
    mean_rows = official.nhwc_to_planar(source.mean[None])[0] if source.mean is not None else None
    writer = None
    if "native" in formats:
        writer = native.NativeWriter(out, size, list(source.table.wnids), list(source.table.names),
                                     source=str(src), extra={"converted_from": source.format})
        writer.mean = source.mean
    counts, tar_lengths = {}, {}
    for split in source.splits:
        sw = writer.split(split) if writer else None
        shards = ([parquet.StreamWriter(out, split, size, source.table)] if parquet.FORMAT in formats else []) + \
            ([webdataset.StreamWriter(out, split, size, source.table)] if webdataset.FORMAT in formats else [])
        n = 0
        for b in source.batches(split):
            if sw is not None:
                _append_rows(sw, b.rows, b.labels, size)
            if shards:
                _append_hub(shards, b.rows, b.labels, size)
            for kind in ("pickle", "npz"):
                if kind in formats:
                    official.write_batch(out / official.batch_name(split, b.index, kind), b.rows, b.labels,
                                         mean_rows if split == "train" else None, kind)
            n += len(b.rows)
            progress.update(len(b.rows))
            del b
        counts[split] = n
        for w in shards:
            done = w.close()
            if isinstance(w, webdataset.StreamWriter):
                tar_lengths[split] = done[1]
    progress.close()
    if tar_lengths:
        webdataset.write_info(out, tar_lengths, source.table, size)
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


# A conversion into ``dst`` lives beside it under hidden names that carry its process id:
#   .<dst>.convert-<pid>   being written (incomplete)
#   .<dst>.new-<pid>       complete, about to be renamed into place
#   .<dst>.old-<pid>       the folder it replaces, between the two renames and until removed
# Each step is one rename, so a kill between any two leaves either the old or the new complete folder, and the
# next conversion into ``dst`` (``recover``) finishes or undoes what a dead process left.
_NEW, _OLD = ".new-", ".old-"


def _hidden(dst: Path, kind: str, pid: int | None = None) -> Path:
    return dst.parent / f".{dst.name}{kind}{os.getpid() if pid is None else pid}"


def _dead(dst: Path, kind: str) -> dict[int, Path]:
    prefix = f".{dst.name}{kind}"
    found = {}
    for p in dst.parent.glob(glob.escape(prefix) + "*"):
        pid = p.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            found[int(pid)] = p
    return found


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (the parent of ``dst``) while renames there are decided and made: two
    conversions into one ``dst`` commit one after the other, never interleaved."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _swap(new: Path, dst: Path, old: Path) -> None:
    """The complete folder ``new`` becomes ``dst``: the existing ``dst`` is renamed away to ``old``, ``new``
    renamed in, ``old`` removed."""
    moved = dst.exists() or dst.is_symlink()
    if moved:
        os.rename(dst, old)
        fsync_dir(dst.parent)
    try:
        os.rename(new, dst)
    except BaseException:
        if moved:
            os.rename(old, dst)
        raise
    fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover(dst: str | Path) -> None:
    """Finish what conversions into ``dst`` that were killed left: an incomplete folder is removed; a complete
    one is put in place (the latest, when several); a replaced folder is removed."""
    dst = Path(dst)
    if not dst.parent.is_dir():
        return
    for p in _dead(dst, _STAGE).values():
        shutil.rmtree(p, ignore_errors=True)
    news, olds = _dead(dst, _NEW), _dead(dst, _OLD)
    if news:
        latest = max(news, key=lambda pid: news[pid].stat().st_mtime_ns)
        for pid, p in news.items():
            if pid != latest:
                shutil.rmtree(p, ignore_errors=True)
        if dst.exists() and latest in olds:  # not possible by our renames: dst was made by someone since
            shutil.rmtree(news[latest], ignore_errors=True)
        else:
            _swap(news[latest], dst, _hidden(dst, _OLD, latest))
    for p in olds.values():
        shutil.rmtree(p, ignore_errors=True)


_NATIVE_ENTRIES = {native.META, "mean.npy", *native.SPLITS}


def _entry_format(name: str) -> str | None:
    """Which output format a top-level entry of a dataset folder belongs to (None: the manifest, or not ours)."""
    if name in _NATIVE_ENTRIES:
        return "native"
    m = _BATCH_NAME.match(name)
    if m:
        return "npz" if m.group(3) else "pickle"
    m = _SHARD_NAME.match(name)
    if m:
        return parquet.FORMAT if m.group(2).endswith(".parquet") else webdataset.FORMAT
    if name == webdataset.INFO:
        return webdataset.FORMAT
    return None


_BATCH_NAME = re.compile(r"^(train_data_batch_([1-9]|10)|val_data)(\.npz)?$")
_SHARD_NAME = re.compile(r"^(train|validation)-\d{5}(-of-\d{5}\.parquet|\.tar)$")


def _foreign(dst: Path) -> list[str]:
    """The entries of ``dst`` that no dsimagenet writer makes (its temp files aside)."""
    bad = []
    for p in sorted(dst.iterdir()):
        if p.name.startswith(".") and ".tmp-" in p.name:
            continue
        fmt = _entry_format(p.name)
        if p.name == MANIFEST or (fmt is not None and fmt != "native"):
            ok = p.is_file() and not p.is_symlink()
        elif p.name in native.SPLITS:
            ok = p.is_dir() and not p.is_symlink() and all(
                q.name in native.ARRAYS or (q.name.startswith(".") and ".tmp-" in q.name) for q in p.iterdir())
        else:
            ok = fmt == "native" and p.is_file() and not p.is_symlink()
        if not ok:
            bad.append(p.name)
    return bad


def _check_out(dst: Path, in_place: bool) -> None:
    """``--out`` may be new, empty, or a dataset folder dsimagenet wrote (meta.json or manifest.json, and
    nothing but our files): it is replaced whole. Anything else would be lost with it, and is refused."""
    if not dst.exists():
        return
    if not dst.is_dir():
        raise ConfigError(f"{dst}: --out must be a folder, and this is a file")
    if not any(dst.iterdir()):
        return
    foreign = _foreign(dst)
    if foreign:
        raise ConfigError(f"{dst}: --out holds files dsimagenet does not write ({', '.join(foreign[:5])}"
                          f"{', ...' if len(foreign) > 5 else ''}); convert replaces --out whole, so choose a new "
                          "or empty folder")
    if not in_place and not ((dst / native.META).is_file() or (dst / MANIFEST).is_file()):
        raise ConfigError(f"{dst}: --out holds dataset files that dsimagenet did not write (no meta.json or "
                          "manifest.json); convert replaces --out whole, so choose a new or empty folder")


def _carry(dst: Path, stage: Path, formats: list[str]) -> None:
    """A conversion of a folder into itself adds formats: the files of the formats not written now are carried
    into the new folder as hard links (copies where the file system has none), the manifest unless a new one
    was written; the written formats' old files (a stale val_data) are not."""
    for p in dst.iterdir():
        fmt = _entry_format(p.name)
        if fmt in formats or (p.name.startswith(".") and ".tmp-" in p.name):
            continue
        if p.name == MANIFEST and (stage / MANIFEST).exists():
            continue
        for f in ([p] if p.is_file() else sorted(q for q in p.iterdir() if q.name in native.ARRAYS)):
            target = stage / f.relative_to(dst)
            target.parent.mkdir(exist_ok=True)
            try:
                os.link(f, target)
            except OSError:
                shutil.copyfile(f, target)


def convert(src: str | Path, dst: str | Path, formats: list[str], src_format: str | None = None,
            quiet: bool = False, labels_in: str | None = None) -> dict:
    """Write ``src`` (any format) to ``dst`` in each of ``formats``; returns counts per split.

    ``dst`` is new, empty, or a dataset folder dsimagenet wrote, and is replaced whole: every file is written
    into a hidden folder beside it, which is renamed into place when complete (the old folder renamed away
    first, then removed). A failed conversion leaves ``dst`` as it was; a killed one leaves the old or the new
    complete folder, and the next conversion into ``dst`` removes or finishes what it left. Converting a
    folder into itself adds the formats written and keeps the others. ``labels_in``: the stored label order of
    Hub parquet/WebDataset shards that do not name their classes ("devkit" or "sorted"). Progress goes to stderr
    unless ``quiet``."""
    bad = [f for f in formats if f not in OUT_FORMATS]
    if bad or not formats or len(set(formats)) != len(formats):
        raise ConfigError(f"--formats must be among {OUT_FORMATS}, one or more, each once, got {formats}")
    dst = Path(dst)
    if dst.is_symlink():  # the folder the link points to is replaced, and the link kept
        dst = Path(os.path.realpath(dst))
    src_path = Path(src).resolve()
    in_place = src_path == dst.resolve()
    if Path(src).is_dir() and not in_place and src_path in dst.resolve().parents:
        raise ConfigError(f"{dst}: --out inside the source folder {src}: its files would be read as part of the "
                          "source by the next reader; choose a folder outside it")
    if dst.resolve() in src_path.parents:
        raise ConfigError(f"{dst}: --out holds the source {src}: replacing --out would delete it; choose "
                          "another folder")
    if dst.parent.is_dir():
        with _locked(dst.parent):
            recover(dst)
    _check_out(dst, in_place)
    source = open_source(src, src_format, labels_in)
    if in_place and source.format in formats:
        raise ConfigError(f"{dst}: converting a dataset onto itself in its own format would overwrite it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = _hidden(dst, _STAGE)
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        counts = _write(source, Path(src), stage, formats, quiet)
        if in_place:
            _carry(dst, stage, formats)
        fsync_dir(stage)
        with _locked(dst.parent):
            _check_out(dst, in_place)  # what another process may have put there meanwhile
            new = _hidden(dst, _NEW)
            os.rename(stage, new)
            _swap(new, dst, _hidden(dst, _OLD))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return counts


def _describe_hub(path: Path, fmt: str, labels_in: str | None) -> dict:
    """describe() of parquet or WebDataset shards: every row read (and checked); without a known label order
    (the files name no classes and no ``labels_in``) the counts and pixels are still described."""
    src = hub.open_hub(path, fmt, labels_in, need_labels=False)
    splits, classes, mean = {}, set(), None
    for split in src.splits:
        n, sums = 0, np.zeros((src.image_size,) * 2 + (3,), np.int64)
        for images, stored, where in src.raw_batches(split):
            n += len(images)
            if split == "train":
                sums += images.sum(axis=0, dtype=np.int64)
            if src.labels is not None:
                classes.update(np.unique(src.labels.map(stored, where)).tolist())
        splits[split] = n
        if split == "train" and n:
            mean = sums / n
    known = src.labels is not None
    return {"path": str(path), "format": fmt, "image_size": src.image_size,
            "label_order": (src.labels.order or "the classes' own (as named in the files)") if known else
            "unknown: give --labels-in devkit or sorted", "num_classes": len(classes) if known else None,
            "classes_from": src.labels.source if known else None,
            "classes_in_table": len(src.labels.table) if known else None, "splits": splits,
            "mean_per_channel": [float(v) for v in mean.mean(axis=(0, 1))] if mean is not None else None,
            "checksums": "not stored in the shards (each one was read and checked)",
            "provenance": provenance.describe(path, fmt, hub_source=src)}


def describe(path: str | Path, check: bool = False, labels_in: str | None = None) -> dict:
    """What a dataset is: format, image size, splits and counts, label order, classes and where their table
    came from (num_classes: those that occur in its splits; classes_in_table: its class table's), mean,
    checksums, and its provenance (``formats.provenance``: the official release recognised
    by MD5, a dsimagenet build or conversion, a Hub copy). Every file's structure is checked; ``check`` also
    recomputes the checksums. ``labels_in``: the stored order of Hub shards that do not name their classes."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt in hub.FORMATS:
        return _describe_hub(path, fmt, labels_in)
    if labels_in is not None:
        raise ConfigError(f"--labels-in {labels_in}: only Hub-layout shards (parquet, webdataset) need it")
    info: dict = {"path": str(path), "format": fmt}
    if fmt == "native":
        meta = native.read_meta(path)
        present: set[int] = set()  # the classes that occur: a build from 10 ImageNet folders has ImageNet's table
        for split in meta["splits"]:
            s = native.open_split(path, split, meta)  # headers and labels, as a reader would find them
            present.update(np.unique(s.labels).tolist())
        native.read_mean(path, meta)
        info.update(image_size=meta["image_size"], method=meta.get("method"), source=meta.get("source"),
                    format_version=meta["version"], label_order=meta["label_order"],
                    num_classes=len(present), classes_in_table=meta["num_classes"], classes_from="native meta",
                    splits={k: v["count"] for k, v in meta["splits"].items()},
                    mean_per_channel=meta.get("mean", {}).get("per_channel"))
        if check:
            problems = native.verify(path)
            info["checksums"] = "ok" if not problems else problems
        info["provenance"] = provenance.describe(path, fmt)
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
                else None, checksums="not stored in the official files (each file was read and checked)",
                provenance=provenance.describe(path, fmt))
    return info
