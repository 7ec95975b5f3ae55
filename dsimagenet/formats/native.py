"""dsimagenet's native format: memory-mappable .npy arrays and a versioned meta.json.

    root/meta.json              format name and version, image size, method, source, label order, classes,
                                counts, per-channel mean, sha256 of every array's data
    root/mean.npy               float64 (S, S, 3): the mean of all training images, as the official files
    root/<split>/images.npy     uint8 (N, S, S, 3), one image a row, HWC
    root/<split>/labels.npy     int16 (N,) 1-based labels: devkit IDs for ImageNet (wnids[label - 1])

``open_split(root, "train")`` returns an ``np.memmap`` in milliseconds whatever the size; meta.json is written
last, so a folder without it is an incomplete write, never a dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsimagenet.errors import DSImageNetError
from dsimagenet.formats.atomic import atomic_write, commit, fsync_dir, temp_path

FORMAT_NAME = "dsimagenet-native"
FORMAT_VERSION = 1
META = "meta.json"
_HEADER_BYTES = 128  # a fixed-size .npy header, so it can be rewritten once the row count is known
_HASH_CHUNK = 64 << 20


class NativeFormatError(DSImageNetError, ValueError):
    pass


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    d = f"{{'descr': '{np.dtype(dtype).str}', 'fortran_order': False, 'shape': {tuple(shape)}, }}"
    body_len = _HEADER_BYTES - 10
    if len(d) >= body_len:
        raise ValueError(f"shape {shape} too large for the header")
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + (d.ljust(body_len - 1) + "\n").encode()


class NpyWriter:
    """Writes one .npy array of rows to a temp file: appended in order, or placed at row offsets when the
    count is known. ``close()`` fixes the header, fsyncs and renames; returns the sha256 of the data bytes."""

    def __init__(self, path: str | Path, row_shape: tuple[int, ...], dtype, count: int | None = None):
        self.path, self.row_shape, self.dtype, self.count = Path(path), tuple(row_shape), np.dtype(dtype), count
        self.row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.tmp = temp_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.tmp, "wb+")
        self.f.write(_npy_header((count or 0, *row_shape), self.dtype))
        if count is not None:
            self.f.truncate(_HEADER_BYTES + count * self.row_bytes)
        self.rows = 0
        self.hasher: hashlib._Hash | None = hashlib.sha256()  # valid while rows arrive in order

    def _check(self, rows: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path}: rows of shape {rows.shape[1:]}, expected {self.row_shape}")
        return rows

    def append(self, rows: np.ndarray) -> None:
        rows = self._check(rows)
        if self.count is not None and self.rows + len(rows) > self.count:
            raise ValueError(f"{self.path}: more than the {self.count} rows announced")
        self.f.seek(_HEADER_BYTES + self.rows * self.row_bytes)
        self.f.write(rows.data)
        if self.hasher is not None:
            self.hasher.update(rows.data)
        self.rows += len(rows)

    def write_at(self, start: int, rows: np.ndarray) -> None:
        rows = self._check(rows)
        if self.count is None or start < 0 or start + len(rows) > self.count:
            raise ValueError(f"{self.path}: rows {start}..{start + len(rows)} outside 0..{self.count}")
        os.pwrite(self.f.fileno(), rows.data, _HEADER_BYTES + start * self.row_bytes)
        self.hasher = None

    def close(self) -> str:
        count = self.count if self.count is not None else self.rows
        if self.count is not None and self.hasher is not None and self.rows != self.count:
            raise ValueError(f"{self.path}: {self.rows} rows written of {self.count}")
        self.f.seek(0)
        self.f.write(_npy_header((count, *self.row_shape), self.dtype))
        self.f.flush()
        digest = self.hasher.hexdigest() if self.hasher is not None else _hash_data(self.f, count * self.row_bytes)
        self.f.close()
        commit(self.tmp, self.path)
        return digest

    def abort(self) -> None:
        self.f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def _hash_data(f, nbytes: int, offset: int = _HEADER_BYTES) -> str:
    """sha256 of ``nbytes`` of ``f`` from ``offset``, read in chunks."""
    h = hashlib.sha256()
    f.seek(offset)
    while nbytes > 0:
        chunk = f.read(min(_HASH_CHUNK, nbytes))
        if not chunk:
            raise NativeFormatError(f"{getattr(f, 'name', 'array')}: shorter than its header says")
        h.update(chunk)
        nbytes -= len(chunk)
    return h.hexdigest()


def array_sha256(path: str | Path) -> str:
    """sha256 of an .npy file's data bytes (what meta.json records)."""
    arr = np.load(path, mmap_mode="r")
    with open(path, "rb") as f:
        return _hash_data(f, arr.nbytes, arr.offset)


class SplitWriter:
    """Images and labels of one split; the train split also sums images for the mean."""

    def __init__(self, root: Path, split: str, size: int, label_dtype, count: int | None):
        self.split = split
        self.images = NpyWriter(root / split / "images.npy", (size, size, 3), np.uint8, count)
        self.labels = NpyWriter(root / split / "labels.npy", (), label_dtype, count)
        self.pixel_sum = np.zeros((size, size, 3), np.float64)

    def append(self, images: np.ndarray, labels: np.ndarray) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images.append(images)
        self.labels.append(labels)
        self.pixel_sum += images.sum(axis=0, dtype=np.float64)

    def write_at(self, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        self.images.write_at(start, images)
        self.labels.write_at(start, labels)
        self.pixel_sum += images.sum(axis=0, dtype=np.float64)

    def close(self) -> dict:
        count = self.images.count if self.images.count is not None else self.images.rows
        return {"count": count, "sha256": {"images.npy": self.images.close(), "labels.npy": self.labels.close()}}

    def abort(self) -> None:
        self.images.abort()
        self.labels.abort()


def place(src: Path, dst: Path) -> None:
    """Give the finished file ``src`` a second name ``dst`` (a hard link: no copy, and ``src`` stays for a
    build that is interrupted and resumed); a copy where the file system has no hard links."""
    tmp = temp_path(dst)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    fsync_dir(dst.parent)


class AdoptedSplit:
    """A split whose images.npy was written elsewhere (the builder's work array): linked into place on close,
    with its checksum and pixel sums read back in chunks."""

    def __init__(self, root: Path, split: str, images_path: str | Path, labels: np.ndarray, label_dtype):
        self.root, self.split, self.src, self.labels, self.label_dtype = root, split, Path(images_path), labels, \
            label_dtype
        self.pixel_sum = None

    def close(self) -> dict:
        dst = self.root / self.split / "images.npy"
        dst.parent.mkdir(parents=True, exist_ok=True)
        arr = np.load(self.src, mmap_mode="r")
        if arr.dtype != np.uint8 or arr.ndim != 4 or len(arr) != len(self.labels):
            raise ValueError(f"{self.src}: {arr.dtype} {arr.shape} for {len(self.labels)} labels")
        h, self.pixel_sum = hashlib.sha256(), np.zeros(arr.shape[1:], np.float64)
        row = int(np.prod(arr.shape[1:]))
        with open(self.src, "rb") as f:
            f.seek(arr.offset)
            for a in range(0, len(arr), 8192):
                n = min(8192, len(arr) - a)
                chunk = np.fromfile(f, np.uint8, n * row)
                h.update(chunk.data)
                self.pixel_sum += chunk.reshape(n, *arr.shape[1:]).sum(axis=0, dtype=np.float64)
        del arr
        place(self.src, dst)
        labels = NpyWriter(self.root / self.split / "labels.npy", (), self.label_dtype, len(self.labels))
        labels.append(self.labels)
        return {"count": len(self.labels), "sha256": {"images.npy": h.hexdigest(), "labels.npy": labels.close()}}

    def abort(self) -> None:
        pass


class NativeWriter:
    """Writes a native dataset: ``with NativeWriter(root, 32, wnids) as w: w.split("train").append(x, y)``.

    meta.json is written only by a clean exit of the ``with`` block; an exception removes the temp files."""

    def __init__(self, root: str | Path, image_size: int, wnids: list[str], names: list[str] | None = None,
                 method: str | None = None, source: str | None = None, extra: dict | None = None):
        self.root, self.size = Path(root), int(image_size)
        self.wnids, self.names = list(wnids), list(names) if names is not None else None
        self.info = {"method": method, "source": source, **(extra or {})}
        self.label_dtype = np.int16 if len(wnids) < 2**15 else np.int32
        self.splits: dict[str, SplitWriter | AdoptedSplit] = {}
        self.mean: np.ndarray | None = None
        self.root.mkdir(parents=True, exist_ok=True)

    def split(self, name: str, count: int | None = None) -> SplitWriter:
        if name in self.splits:
            raise ValueError(f"split {name!r} already being written")
        self.splits[name] = SplitWriter(self.root, name, self.size, self.label_dtype, count)
        return self.splits[name]

    def adopt(self, name: str, images_path: str | Path, labels: np.ndarray) -> None:
        """Take an images.npy written elsewhere as split ``name`` (moved into place by ``close``)."""
        self.splits[name] = AdoptedSplit(self.root, name, images_path, labels, self.label_dtype)

    def __enter__(self) -> NativeWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            for s in self.splits.values():
                s.abort()
            return
        self.close()

    def close(self) -> dict:
        splits = {name: s.close() for name, s in self.splits.items()}
        for name, info in splits.items():
            labels = np.load(self.root / name / "labels.npy", mmap_mode="r")
            if info["count"] and (labels.min() < 1 or labels.max() > len(self.wnids)):
                raise ValueError(f"{self.root / name / 'labels.npy'}: labels outside 1..{len(self.wnids)}")
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "image_size": self.size, **self.info,
                "label_order": "devkit", "label_base": 1,  # label k is wnids[k - 1]
                "num_classes": len(self.wnids), "wnids": self.wnids, "names": self.names, "splits": splits}
        mean = self.mean
        if mean is None and "train" in self.splits and splits["train"]["count"]:
            mean = self.splits["train"].pixel_sum / splits["train"]["count"]
        if mean is not None:
            with atomic_write(self.root / "mean.npy") as f:
                np.save(f, np.asarray(mean, dtype=np.float64))
            meta["mean"] = {"file": "mean.npy", "per_channel": [float(v) for v in mean.mean(axis=(0, 1))],
                            "sha256": array_sha256(self.root / "mean.npy")}
        with atomic_write(self.root / META, "w") as f:
            json.dump(meta, f, indent=1)
        return meta


def is_native(root: str | Path) -> bool:
    return (Path(root) / META).is_file()


def read_meta(root: str | Path) -> dict:
    path = Path(root) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise NativeFormatError(f"{path}: missing: not a native dataset, or its writing did not finish") from None
    except json.JSONDecodeError as e:
        raise NativeFormatError(f"{path}: not valid JSON: {e}") from None
    if meta.get("format") != FORMAT_NAME:
        raise NativeFormatError(f"{path}: not a {FORMAT_NAME} meta.json")
    if meta.get("version") != FORMAT_VERSION:
        raise NativeFormatError(f"{path}: format version {meta.get('version')}; this dsimagenet reads "
                                f"version {FORMAT_VERSION} (upgrade dsimagenet, or rebuild the dataset)")
    return meta


@dataclass
class NativeSplit:
    images: np.ndarray  # np.memmap uint8 (N, S, S, 3)
    labels: np.ndarray  # int64 (N,), 1-based


def open_split(root: str | Path, split: str, meta: dict | None = None) -> NativeSplit:
    root = Path(root)
    meta = meta or read_meta(root)
    if split not in meta["splits"]:
        raise NativeFormatError(f"{root}: no {split!r} split (it has {sorted(meta['splits'])})")
    count, size = meta["splits"][split]["count"], meta["image_size"]
    try:
        images = np.load(root / split / "images.npy", mmap_mode="r", allow_pickle=False)
        labels = np.load(root / split / "labels.npy", allow_pickle=False)
    except FileNotFoundError as e:
        raise NativeFormatError(f"{e.filename}: missing") from None
    except ValueError as e:  # np.load raises ValueError when the file is shorter than its header says
        raise NativeFormatError(f"{root / split}: damaged array: {e}") from None
    if images.shape != (count, size, size, 3) or images.dtype != np.uint8:
        raise NativeFormatError(f"{root / split / 'images.npy'}: {images.dtype} {images.shape}, meta.json says "
                                f"uint8 ({count}, {size}, {size}, 3)")
    if labels.shape != (count,):
        raise NativeFormatError(f"{root / split / 'labels.npy'}: shape {labels.shape}, expected ({count},)")
    return NativeSplit(images, labels.astype(np.int64))


def read_mean(root: str | Path, meta: dict) -> np.ndarray | None:
    if "mean" not in meta:
        return None
    mean = np.load(Path(root) / meta["mean"]["file"], allow_pickle=False)
    size = meta["image_size"]
    if mean.shape != (size, size, 3):
        raise NativeFormatError(f"{root}/mean.npy: shape {mean.shape}, expected ({size}, {size}, 3)")
    return mean


def verify(root: str | Path) -> list[str]:
    """Recompute every array's sha256; returns the problems found (empty when all hold)."""
    root = Path(root)
    meta = read_meta(root)
    problems = []
    files = [(f"{split}/{name}", digest) for split, info in meta["splits"].items()
             for name, digest in info["sha256"].items()]
    if "mean" in meta:
        files.append((meta["mean"]["file"], meta["mean"]["sha256"]))
    for rel, digest in files:
        try:
            actual = array_sha256(root / rel)
        except (OSError, ValueError) as e:
            problems.append(f"{root / rel}: unreadable: {e}")
            continue
        if actual != digest:
            problems.append(f"{root / rel}: sha256 {actual[:12]}..., meta.json says {digest[:12]}...")
    return problems
