"""WebDataset tar shards, as ``webdataset`` and timm stream them: write ours, read them (and others') back.

A sample is the tar members sharing a key: ``KEY.png`` (or raw ``KEY.npy``, or ``KEY.jpg``), ``KEY.cls`` (the
0-based label as ASCII digits) and ``KEY.json`` (label, WNID, class name). Shards are
``<split>-NNNNN.tar`` (split "train" / "validation"); ``_info.json`` beside them says each split's shards and
counts, as timm's WebDataset reader expects, and holds our class table under ``dsimagenet`` (label k is
wnids[k]: devkit class k + 1 for ImageNet).

    wds.WebDataset("out/32_box/train-{00000..00003}.tar").decode("pil").to_tuple("png", "cls")
    timm: --dataset wds/ --data-dir out/32_box --train-split train
    open_dataset("out/32_box", split="val", format="webdataset")

Tars are read as streams (member by member, nothing extracted); no ``webdataset`` needed at run time.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsimagenet.checksum import HashingWriter
from dsimagenet.errors import FormatError
from dsimagenet.formats import hublabels, parquet
from dsimagenet.formats.atomic import atomic_write, commit, temp_path
from dsimagenet.formats.parquet import HUB_SPLIT, decode
from dsimagenet.labels import ClassTable

FORMAT = "webdataset"
VERSION = 1
INFO = "_info.json"
SHARD_BYTES = 256 << 20
IMAGE_EXTS = ("png", "npy", "jpg", "jpeg", "webp")
_BATCH = 4096  # samples a reader yields at once
_MAX_LABEL = 1 << 31  # far above any class count; larger numbers in a .cls/.json are damage, not labels


def find_shards(root: str | Path) -> dict[str, list[Path]]:
    """{"train"/"val"/"test": tar shards}: the .tar files in ``root``, up to two folders down (hidden temp
    files aside)."""
    root = Path(root)
    if not root.is_dir():
        return {}
    files = [p for pattern in ("*.tar", "*/*.tar", "*/*/*.tar") for p in root.glob(pattern)
             if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return hublabels.group_shards(root, files, "WebDataset tar")


def read_info(root: Path) -> dict | None:
    """``_info.json`` beside the shards, when there is one."""
    path = root / INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_bytes()[: 64 << 20].decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise FormatError(f"{path}: not a JSON object")
    return info


def info_lengths(info: dict, shards: dict[str, list[Path]]) -> dict[Path, int]:
    """Samples per shard as ``_info.json`` lists them, for the splits whose shards it lists exactly as found
    (a shard added or removed since makes the split counted from the tars instead). A shard that then holds
    another number of samples is an error when it is read."""
    out = {}
    splits = info.get("splits") if isinstance(info.get("splits"), dict) else {}
    for split, paths in shards.items():
        entry = splits.get(HUB_SPLIT.get(split, split))
        if not isinstance(entry, dict):
            continue
        names, lengths = entry.get("filenames"), entry.get("shard_lengths")
        if isinstance(names, list) and isinstance(lengths, list) and len(names) == len(lengths) and \
                sorted(names) == sorted(p.name for p in paths) and \
                all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lengths):
            by_name = dict(zip(names, lengths, strict=True))
            out.update({p: by_name[p.name] for p in paths})
    return out


def _split_key(name: str) -> tuple[str, str]:
    """``dir/KEY.ext.ext`` -> (``dir/KEY``, ``ext.ext``), as webdataset splits member names."""
    folder, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext.lower()


def _open(path: Path, mode: str):
    try:
        return tarfile.open(path, mode)
    except tarfile.TarError as e:
        raise FormatError(f"{path}: not a readable tar file ({e})") from None


def _check_end(f, offset: int, path: Path) -> None:
    """tarfile ends an archive silently at an unreadable member header, or where a file cut at a member
    boundary ends: what follows the last member must be the end-of-archive blocks (at least two zero blocks of
    512 bytes), and nothing else."""
    f.seek(offset)
    rest = 0
    while chunk := f.read(1 << 20):
        if chunk.count(0) != len(chunk):
            at = offset + rest + len(chunk) - len(chunk.lstrip(bytes(1)))
            raise FormatError(f"{path}: a damaged member header at byte {at:,}: the members after it cannot be "
                              "read")
        rest += len(chunk)
    if rest < 1024:
        raise FormatError(f"{path}: cut short: it ends after {offset:,} bytes without the end-of-archive blocks")


def count(path: Path) -> int:
    """Samples in a shard, from its member headers (the data is skipped, not read)."""
    n, key = 0, None
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as t:
            for m in t:
                if not _sample_member(m, path):
                    continue
                k, _ = _split_key(m.name)
                n, key = n + (k != key), k  # a sample is a run of members with one key, as samples() reads them
            _check_end(f, t.offset, path)
    except (tarfile.TarError, EOFError) as e:
        raise FormatError(f"{path}: a damaged or truncated tar ({e})") from None
    return n


def _sample_member(m: tarfile.TarInfo, path: Path) -> bool:
    """Whether ``m`` is part of a sample (a regular file); a folder entry is not; a link, device or fifo is an
    error, never skipped: a skipped ``.cls`` link would leave the sample's label to its ``.json``."""
    if m.isdir():
        return False
    if not m.isfile():
        kind = f"a link to {m.linkname!r}" if m.issym() or m.islnk() else "not a regular file"
        raise FormatError(f"{path}: member {m.name!r} is {kind}: the samples of a shard are regular files")
    return True


def _image(ext: str, data: bytes, size: int | None, where: str) -> np.ndarray:
    if ext != "npy":
        return decode(data, size, where)
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise FormatError(f"{where}: not a .npy array ({e})") from None
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or a.shape[0] != a.shape[1] or \
            (size is not None and a.shape[0] != size):
        raise FormatError(f"{where}: a {a.dtype} array of shape {a.shape}, expected uint8 (S, S, 3)"
                          f"{f' with S = {size}' if size else ''}")
    return a


def samples(path: Path) -> Iterator[tuple[str, str, bytes, bytes | None, bytes | None]]:
    """(key, image extension, image bytes, cls bytes, json bytes) of each sample, in tar order, streamed."""
    current: dict[str, bytes] = {}
    key = None

    def flush():
        images = [e for e in IMAGE_EXTS if e in current]
        if not images:
            raise FormatError(f"{path}: sample {key!r} has no image ({', '.join(sorted(current))})")
        if len(images) > 1:
            raise FormatError(f"{path}: sample {key!r} has {len(images)} images ({', '.join(images)})")
        return key, images[0], current[images[0]], current.get("cls"), current.get("json")

    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as t:
            for m in t:
                if not _sample_member(m, path):
                    continue
                k, ext = _split_key(m.name)
                if k != key and current:
                    yield flush()
                    current = {}
                if k != key:
                    key = k
                if ext in current:
                    raise FormatError(f"{path}: sample {k!r} has two {ext} members")
                f = t.extractfile(m)
                current[ext] = f.read()
                if len(current[ext]) != m.size:
                    raise FormatError(f"{path}: {m.name} is cut short")
            _check_end(raw, t.offset, path)
            if current:
                yield flush()
    except (tarfile.TarError, EOFError) as e:
        raise FormatError(f"{path}: a damaged or truncated tar ({e})") from None


def _label(cls: bytes | None, js: bytes | None, where: str) -> int:
    """The label from .cls, else from the .json's "label"; when both are there they must agree (a damaged
    digit is then an error, not another class)."""
    value = None
    if js is not None:
        try:
            value = json.loads(js).get("label")
        except (ValueError, AttributeError, RecursionError):
            value = None
        value = value if isinstance(value, int) and not isinstance(value, bool) else None
    if value is not None and not -1 <= value < _MAX_LABEL:
        raise FormatError(f"{where}: .json's label {value} is not a class number")
    if cls is not None:
        text = cls.strip()
        if not text.lstrip(b"-").isdigit() or not -1 <= int(text) < _MAX_LABEL:  # int64 holds what is left
            raise FormatError(f"{where}: .cls is not an integer class number ({cls[:20]!r})")
        if value is not None and int(text) != value:
            raise FormatError(f"{where}: .cls says {int(text)}, .json says {value}")
        return int(text)
    if value is not None:
        return value
    raise FormatError(f"{where}: no label (.cls, or 'label' in .json)")


def iter_rows(path: Path, size: int | None, limit: int | None = None, expect: int | None = None
              ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images (n, S, S, 3) uint8, stored labels int64) of a shard, a few thousand samples at a time;
    ``expect``: the number of samples _info.json lists for it, checked."""
    images, labels, n = [], [], 0
    for key, ext, data, cls, js in samples(path):
        n += 1
        where = f"{path}: sample {key!r}"
        img = _image(ext, data, size, where)
        size = img.shape[0]
        images.append(img)
        labels.append(_label(cls, js, where))
        if limit is not None and len(images) >= limit:
            break
        if len(images) == _BATCH:
            yield np.stack(images), np.array(labels, np.int64)
            images, labels = [], []
    if expect is not None and limit is None and n != expect:
        raise FormatError(f"{path}: {n:,} samples, {INFO} says {expect:,}")
    if images:
        yield np.stack(images), np.array(labels, np.int64)


# --- writing -----------------------------------------------------------------------------------------------

def shard_name(split: str, index: int) -> str:
    return f"{HUB_SPLIT[split]}-{index:05d}.tar"


def rows_per_shard(size: int) -> int:
    return int(max(1000, SHARD_BYTES // (3 * size * size + 3 * 1024)))  # a member's header and padding: ~1 KB


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # no dates or owners: the same rows, the same bytes
    tar.addfile(info, io.BytesIO(data))


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class _ShardFile:
    """One tar shard under a temp name, hashed as it is written."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, temp_path(path)
        self.f = open(self.tmp, "wb")
        self.hw = HashingWriter(self.f)
        self.tar = tarfile.open(fileobj=self.hw, mode="w|", format=tarfile.USTAR_FORMAT)
        self.n = 0

    def add(self, key: str, image: np.ndarray, label0: int, table: ClassTable, image_ext: str) -> None:
        if image_ext == "npy":
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(image), allow_pickle=False)
            data = buf.getvalue()
        else:
            data = png(image)
        _member(self.tar, f"{key}.{image_ext}", data)
        _member(self.tar, f"{key}.cls", str(label0).encode())
        wnid = table.wnids[label0]
        _member(self.tar, f"{key}.json", json.dumps({"key": key, "label": label0, "wnid": wnid,
                                                     "class_name": table.name(wnid)}).encode())
        self.n += 1

    def close(self, final: Path | None = None) -> str:
        self.tar.close()
        self.f.close()
        commit(self.tmp, final or self.path)
        return self.hw.hexdigest()

    def abort(self) -> None:
        self.tar.close()
        self.f.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def write_shard(path: Path, read: Callable[[int, int], np.ndarray], labels0: np.ndarray, first_key: int,
                split: str, table: ClassTable, image_ext: str = "png") -> str:
    """Rows 0..len(labels0) of ``read`` as the samples ``<split>_<first_key + i>``; returns the sha256."""
    shard = _ShardFile(path)
    try:
        for a in range(0, len(labels0), _BATCH):
            rows = read(a, min(a + _BATCH, len(labels0)))
            for i, img in enumerate(rows):
                shard.add(f"{HUB_SPLIT[split]}_{first_key + a + i:08d}", img, int(labels0[a + i]), table, image_ext)
        return shard.close()
    except BaseException:
        shard.abort()
        raise


@dataclass(frozen=True)
class ShardJob(parquet.ShardJob):
    """One tar shard, to write in any process: ``run()`` -> {name: sha256}; its samples are keyed by split."""

    split: str = "train"

    def run(self) -> dict[str, str]:
        return {self.path.name: write_shard(self.path, lambda a, b: self.read(self.start + a, self.start + b),
                                            self.labels0, self.start, self.split, self.table)}


def write_info(root: Path, shards: dict[str, dict[str, int]], table: ClassTable, size: int) -> None:
    """``_info.json``: each split's shards and counts (timm's WebDataset reader), and our class table."""
    splits = {}
    for split, names in shards.items():
        hub = HUB_SPLIT[split]
        files = sorted(names)
        splits[hub] = {"name": hub, "num_samples": sum(names.values()), "filenames": files,
                       "shard_lengths": [names[f] for f in files]}
    info = {"name": root.name, "splits": splits,
            hublabels.META_KEY: {"dsimagenet_webdataset": VERSION, "image_size": size, "label_base": 0,
                                 "wnids": list(table.wnids), "names": list(table.names)}}
    with atomic_write(root / INFO, "w") as f:
        json.dump(info, f, indent=1)


class SplitWriter:
    """One split as tar shards from its ``count`` images: ``jobs(read, labels)`` (1-based labels into ``table``)
    gives a ``ShardJob`` per shard; ``add`` takes their checksums; ``close()`` returns {file name: sha256}."""

    def __init__(self, root: str | Path, split: str, count: int, size: int, table: ClassTable):
        self.root, self.split, self.count, self.size, self.table = Path(root), split, count, size, table
        per = rows_per_shard(size)
        self.bounds = [(a, min(a + per, count)) for a in range(0, count, per)] or [(0, 0)]
        self.checksums: dict[str, str] = {}

    def lengths(self) -> dict[str, int]:
        return {shard_name(self.split, i): b - a for i, (a, b) in enumerate(self.bounds)}

    def jobs(self, read: Callable[[int, int], np.ndarray], labels: np.ndarray) -> list[ShardJob]:
        labels0 = np.asarray(labels, np.int64) - 1
        return [ShardJob(self.root / shard_name(self.split, i), read, a, labels0[a:b], self.size, self.table,
                         self.split) for i, (a, b) in enumerate(self.bounds)]

    def add(self, checksums: dict[str, str]) -> None:
        self.checksums.update(checksums)

    def close(self) -> dict[str, str]:
        missing = [n for n in self.lengths() if n not in self.checksums]
        if missing:
            raise ValueError(f"{self.root}: {', '.join(missing)} not written")
        return dict(self.checksums)


class StreamWriter:
    """A split written as rows arrive (a conversion): shards of ``rows_per_shard`` samples, each under a temp
    name until it is full (or ``close()``)."""

    def __init__(self, root: str | Path, split: str, size: int, table: ClassTable):
        self.root, self.split, self.size, self.table = Path(root), split, size, table
        self.per = rows_per_shard(size)
        self.sums: dict[str, str] = {}
        self.lengths: dict[str, int] = {}
        self.shard: _ShardFile | None = None
        self.n = 0

    def append(self, images: np.ndarray, labels: np.ndarray) -> None:
        """NHWC images and their 1-based labels."""
        for img, lab in zip(images, np.asarray(labels, np.int64) - 1, strict=True):
            if self.shard is None:
                self.shard = _ShardFile(self.root / shard_name(self.split, len(self.sums)))
            self.shard.add(f"{HUB_SPLIT[self.split]}_{self.n:08d}", img, int(lab), self.table, "png")
            self.n += 1
            if self.shard.n == self.per:
                self._finish()

    def _finish(self) -> None:
        shard, self.shard = self.shard, None
        self.lengths[shard.path.name] = shard.n
        self.sums[shard.path.name] = shard.close()

    def close(self) -> tuple[dict[str, str], dict[str, int]]:
        """({file name: sha256}, {file name: samples}) of the shards, all under their final names."""
        if self.shard is not None or not self.sums:  # an empty split still gets its (empty) shard
            self.shard = self.shard or _ShardFile(self.root / shard_name(self.split, 0))
            self._finish()
        return dict(self.sums), dict(self.lengths)

    def abort(self) -> None:
        if self.shard is not None:
            self.shard.abort()
