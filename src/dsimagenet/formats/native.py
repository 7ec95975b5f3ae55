"""dsimagenet's native format: memory-mappable .npy arrays and a versioned meta.json.

    root/meta.json              format name and version, image size, method, source, label order, classes,
                                counts, per-channel mean, sha256 of every array's data
    root/mean.npy               float64 (S, S, 3): the mean of all training images, as the official files
    root/<split>/images.npy     uint8 (N, S, S, 3), one image a row, HWC
    root/<split>/labels.npy     int16 (N,) 1-based labels: devkit IDs for ImageNet (wnids[label - 1])

``open_split(root, "train")`` returns an ``np.memmap`` in milliseconds whatever the size; meta.json is written
last, so a folder without it is an incomplete write, never a dataset. Readers check meta.json whole
(``check_meta``) and each .npy header against it (``read_npy_header``: C order, dtype, shape, file size) before
reading a byte of data; anything else is a NativeFormatError naming the file and what is wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsimagenet.checksum import digest, read_chunks
from dsimagenet.errors import DSImageNetError
from dsimagenet.fields import is_int
from dsimagenet.formats.atomic import atomic_write, commit, fsync_dir, temp_path

FORMAT_NAME = "dsimagenet-native"
FORMAT_VERSION = 1
META = "meta.json"
HEADER_BYTES = 128  # a fixed-size .npy header, so it can be rewritten once the row count is known


class NativeFormatError(DSImageNetError, ValueError):
    pass


def npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The .npy 1.0 header dsimagenet writes: always ``HEADER_BYTES`` long, so rows start at a known offset."""
    d = f"{{'descr': '{np.dtype(dtype).str}', 'fortran_order': False, 'shape': {tuple(shape)}, }}"
    body_len = HEADER_BYTES - 10
    if len(d) >= body_len:
        raise ValueError(f"shape {shape} too large for the header")
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + (d.ljust(body_len - 1) + "\n").encode()


def array_bytes(count: int, row_shape: tuple[int, ...], dtype=np.uint8) -> int:
    """The size of the .npy file of ``count`` rows that dsimagenet writes (header and data)."""
    return HEADER_BYTES + count * int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize


@dataclass(frozen=True)
class RowArray:
    """An .npy file of ``count`` rows of a known shape, written at row offsets by any process: the builder's
    work arrays, created once, filled chunk by chunk by its workers (a picklable value: each write opens the
    file), and kept across an interruption. ``RowArray.create`` writes the header and sizes the file (sparse:
    rows never written read as zeros)."""

    path: str
    count: int
    row_shape: tuple[int, ...]
    dtype: str = "|u1"

    @classmethod
    def create(cls, path: str | Path, count: int, row_shape: tuple[int, ...], dtype=np.uint8) -> RowArray:
        a = cls(str(path), count, tuple(row_shape), np.dtype(dtype).str)
        with open(path, "wb") as f:
            f.write(npy_header((count, *a.row_shape), a.dtype))
            f.truncate(array_bytes(count, a.row_shape, a.dtype))
        return a

    def write_at(self, start: int, rows: np.ndarray) -> None:
        """Rows ``start``.. in place; ``sync()``, from any process, makes them durable (before a journal says
        they are written)."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape or start < 0 or start + len(rows) > self.count:
            raise ValueError(f"{self.path}: rows {start}..{start + len(rows)} of shape {rows.shape[1:]}, the "
                             f"array holds {self.count} of {self.row_shape}")
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, rows.data, array_bytes(start, self.row_shape, self.dtype))
        finally:
            os.close(fd)

    def write_rows(self, positions: np.ndarray, rows: np.ndarray) -> None:
        """Row ``rows[i]`` at row ``positions[i]`` (the build's rows read in a source's file order)."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        positions = np.asarray(positions, np.int64)
        if rows.shape[1:] != self.row_shape or len(positions) != len(rows) or \
                (len(positions) and (positions.min() < 0 or positions.max() >= self.count)):
            raise ValueError(f"{self.path}: {len(rows)} rows of shape {rows.shape[1:]} at positions in "
                             f"0..{self.count - 1}, the array holds {self.count} of {self.row_shape}")
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for p, row in zip(positions.tolist(), rows, strict=True):
                os.pwrite(fd, row.data, array_bytes(p, self.row_shape, self.dtype))
        finally:
            os.close(fd)

    def sync(self) -> None:
        """Make every row written so far durable."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (ascending) of a uint8 array, read with plain reads (``read_rows``)."""
        return read_rows(self.path, HEADER_BYTES, self.row_shape, idx)

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start``..``stop`` (a picklable reader: ``array.read_range`` can be sent to another process)."""
        return self.read(np.arange(start, stop))

    def read_all(self) -> np.ndarray:
        """Every row, of any dtype (small arrays: the build's per-chunk pixel sums)."""
        n = self.count * int(np.prod(self.row_shape, dtype=np.int64))
        with open_regular(self.path) as f:
            out = np.fromfile(f, self.dtype, n, offset=HEADER_BYTES)
        if out.size != n:
            raise _bad(Path(self.path), "cut short while being read")
        return out.reshape(self.count, *self.row_shape)


class NpyWriter:
    """Writes one .npy array of rows to a temp file, appended in order (rows written at offsets by several
    processes are a ``RowArray``). ``close()`` fixes the header, fsyncs and renames; returns the sha256 of the
    data bytes."""

    def __init__(self, path: str | Path, row_shape: tuple[int, ...], dtype, count: int | None = None):
        self.path, self.row_shape, self.dtype, self.count = Path(path), tuple(row_shape), np.dtype(dtype), count
        self.row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.tmp = temp_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.tmp, "wb+")
        self.f.write(npy_header((count or 0, *row_shape), self.dtype))
        if count is not None:
            self.f.truncate(HEADER_BYTES + count * self.row_bytes)
        self.rows = 0
        self.hasher = hashlib.sha256()  # rows arrive in order: hashed as they are written

    def _check(self, rows: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path}: rows of shape {rows.shape[1:]}, expected {self.row_shape}")
        return rows

    def append(self, rows: np.ndarray) -> None:
        rows = self._check(rows)
        if self.count is not None and self.rows + len(rows) > self.count:
            raise ValueError(f"{self.path}: more than the {self.count} rows announced")
        self.f.seek(HEADER_BYTES + self.rows * self.row_bytes)
        self.f.write(rows.data)
        self.hasher.update(rows.data)
        self.rows += len(rows)

    def close(self) -> str:
        count = self.count if self.count is not None else self.rows
        if self.count is not None and self.rows != self.count:
            raise ValueError(f"{self.path}: {self.rows} rows written of {self.count}")
        self.f.seek(0)
        self.f.write(npy_header((count, *self.row_shape), self.dtype))
        self.f.flush()
        sha = self.hasher.hexdigest()
        self.f.close()
        commit(self.tmp, self.path)
        return sha

    def abort(self) -> None:
        self.f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def array_sha256(path: str | Path) -> str:
    """sha256 of an .npy file's data bytes (what meta.json records)."""
    h = read_npy_header(path)
    return digest(path, offset=h.offset, nbytes=int(np.prod(h.shape)) * h.dtype.itemsize, short=NativeFormatError)


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


def scan_rows(path: str | Path, sha256: bool = True) -> tuple[str | None, np.ndarray]:
    """One pass over a checked uint8 (N, S, S, 3) array: the sha256 of its data (None unless ``sha256``) and
    the float64 sum of its rows (exact: sums of uint8 stay integers far below 2**53, whatever the order)."""
    h = read_npy_header(path)
    if h.dtype != np.uint8 or len(h.shape) != 4:
        raise _bad(Path(path), f"{h.dtype} {h.shape}: expected uint8 rows of images (N, S, S, 3)")
    row_shape = h.shape[1:]
    row = int(np.prod(row_shape))
    hasher, pixel_sum = hashlib.sha256() if sha256 else None, np.zeros(row_shape, np.float64)
    with open_regular(path) as f:
        for chunk in read_chunks(f, h.shape[0] * row, h.offset, max(1, (16 << 20) // row) * row, NativeFormatError):
            if hasher is not None:
                hasher.update(chunk)
            rows = np.frombuffer(chunk, np.uint8).reshape(-1, *row_shape)
            pixel_sum += rows.sum(axis=0, dtype=np.float64)
    return (hasher.hexdigest() if hasher is not None else None), pixel_sum


def array_digests(path: str | Path) -> tuple[str, str]:
    """One pass over a checked uint8 (N, S, S, 3) array dsimagenet wrote: the sha256 of its data (what
    meta.json records) and of the whole file, header included (what a build's manifest records)."""
    h = read_npy_header(path)
    if h.dtype != np.uint8 or len(h.shape) != 4:
        raise _bad(Path(path), f"{h.dtype} {h.shape}: expected uint8 rows of images (N, S, S, 3)")
    data, whole = hashlib.sha256(), hashlib.sha256()
    with open_regular(path) as f:
        whole.update(f.read(h.offset))
        for chunk in read_chunks(f, int(np.prod(h.shape)), h.offset, short=NativeFormatError):
            data.update(chunk)
            whole.update(chunk)
    return data.hexdigest(), whole.hexdigest()


class AdoptedSplit:
    """A split whose images.npy was written elsewhere (the builder's work array): linked into place on close,
    with its checksum and pixel sums read back in one pass, unless its ``sha256`` is given (taken elsewhere:
    the build hashes in its worker processes)."""

    def __init__(self, root: Path, split: str, images_path: str | Path, labels: np.ndarray, label_dtype,
                 sha256: str | None = None):
        self.root, self.split, self.src, self.labels, self.label_dtype = root, split, Path(images_path), labels, \
            label_dtype
        self.sha256, self.pixel_sum = sha256, None

    def close(self) -> dict:
        dst = self.root / self.split / "images.npy"
        dst.parent.mkdir(parents=True, exist_ok=True)
        h = read_npy_header(self.src)
        if h.dtype != np.uint8 or len(h.shape) != 4 or h.shape[0] != len(self.labels):
            raise ValueError(f"{self.src}: {h.dtype} {h.shape} for {len(self.labels)} labels")
        sha = self.sha256
        if sha is None:
            sha, self.pixel_sum = scan_rows(self.src)
        place(self.src, dst)
        labels = NpyWriter(self.root / self.split / "labels.npy", (), self.label_dtype, len(self.labels))
        labels.append(self.labels)
        return {"count": len(self.labels), "sha256": {"images.npy": sha, "labels.npy": labels.close()}}

    def abort(self) -> None:
        pass


class NativeWriter:
    """Writes a native dataset: ``with NativeWriter(root, 32, wnids) as w: w.split("train").append(x, y)``.

    meta.json is written only by a clean exit of the ``with`` block; an exception removes the temp files."""

    def __init__(self, root: str | Path, image_size: int, wnids: list[str], names: list[str] | None = None,
                 method: str | None = None, source: str | None = None, extra: dict | None = None,
                 mean: np.ndarray | None = None):
        self.root, self.size = Path(root), int(image_size)
        self.wnids, self.names = list(wnids), list(names) if names is not None else None
        self.info = {"method": method, "source": source, **(extra or {})}
        self.label_dtype = np.int16 if len(wnids) < 2**15 else np.int32
        self.splits: dict[str, SplitWriter | AdoptedSplit] = {}
        self.mean = mean  # the train images' mean, when known already (else summed from the train split)
        self.root.mkdir(parents=True, exist_ok=True)

    def split(self, name: str, count: int | None = None) -> SplitWriter:
        if name in self.splits:
            raise ValueError(f"split {name!r} already being written")
        self.splits[name] = SplitWriter(self.root, name, self.size, self.label_dtype, count)
        return self.splits[name]

    def adopt(self, name: str, images_path: str | Path, labels: np.ndarray, sha256: str | None = None) -> None:
        """Take an images.npy written elsewhere as split ``name`` (linked into place by ``close``); ``sha256``:
        its data's, when already known (``array_digests``)."""
        self.splits[name] = AdoptedSplit(self.root, name, images_path, labels, self.label_dtype, sha256)

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
            pixel_sum = self.splits["train"].pixel_sum
            if pixel_sum is None:  # an adopted split whose checksum came with it
                pixel_sum = scan_rows(self.splits["train"].src, sha256=False)[1]
            mean = pixel_sum / splits["train"]["count"]
        self.mean = mean  # what the official files of the same rows carry
        if mean is not None:
            with atomic_write(self.root / "mean.npy") as f:
                np.save(f, np.asarray(mean, dtype=np.float64))
            meta["mean"] = {"file": "mean.npy", "per_channel": [float(v) for v in mean.mean(axis=(0, 1))],
                            "sha256": array_sha256(self.root / "mean.npy")}
        with atomic_write(self.root / META, "w") as f:
            json.dump(meta, f, indent=1, allow_nan=False)  # NaN is not JSON, and never a count or mean
        return meta


def is_native(root: str | Path) -> bool:
    """A folder with anything named meta.json (a folder or a FIFO so named is then refused by ``read_meta``)."""
    return os.path.lexists(Path(root) / META)


# --- reading: every field of meta.json and every .npy header is checked before anything is read ------------

MAX_META_BYTES = 16 << 20  # a meta.json of 200,000 classes is about 10 MB; more is not one we wrote
MAX_IMAGE_SIZE = 4096  # one 4096 px image is 48 MB; the downsampled datasets go to 256 px
MAX_COUNT = 1 << 40
MAX_CLASSES = 1 << 31  # labels are int32 at most
SPLITS = ("train", "val")  # also the folder names: nothing else ever becomes a path
ARRAYS = ("images.npy", "labels.npy")
_MAX_NPY_HEADER = 4096  # we write 128 bytes; np.save writes a few hundred for any of our arrays
_NPY_KEYS = {"descr", "fortran_order", "shape"}


def open_regular(path: str | Path, error=None):
    """``open(path, "rb")`` for a regular file only: a FIFO would block the reader forever, a device
    (/dev/zero) never ends. ``error`` makes the exception (default NativeFormatError)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise (error or NativeFormatError)(f"{path}: not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _bad(path: Path, msg: str) -> NativeFormatError:
    return NativeFormatError(f"{path}: {msg}")


def _is_hex64(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _check_int(path: Path, key: str, v, lo: int, hi: int) -> int:
    if not is_int(v) or not lo <= v <= hi:
        raise _bad(path, f"{key} must be an integer in {lo}..{hi}, found {v!r:.60}")
    return v


def _check_strings(path: Path, key: str, v, n: int | None = None) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise _bad(path, f"{key} must be a list of non-empty strings, found {type(v).__name__}")
    if n is not None and len(v) != n:
        raise _bad(path, f"{key} has {len(v)} entries for {n} classes")
    return v


def check_meta(meta, path: str | Path) -> dict:
    """Check the whole structure of a parsed meta.json in one place: every key we read, its type and range;
    returns ``meta``. The message names the file and the key (``splits.train.count must be ...``)."""
    path = Path(path)
    if not isinstance(meta, dict):
        raise _bad(path, f"expected a JSON object, found {type(meta).__name__}")
    if meta.get("format") != FORMAT_NAME:
        raise _bad(path, f"not a {FORMAT_NAME} meta.json (its 'format' is {meta.get('format')!r:.60})")
    version = meta.get("version")
    if not is_int(version):
        raise _bad(path, f"'version' must be an integer, found {version!r:.60}")
    if version != FORMAT_VERSION:
        raise _bad(path, f"format version {version}; this dsimagenet reads version {FORMAT_VERSION} (upgrade "
                         "dsimagenet, or rebuild the dataset)")
    missing = [k for k in ("image_size", "label_order", "label_base", "num_classes", "wnids", "names", "splits")
               if k not in meta]
    if missing:
        raise _bad(path, f"missing {', '.join(map(repr, missing))}")
    _check_int(path, "'image_size'", meta["image_size"], 1, MAX_IMAGE_SIZE)
    if meta["label_order"] != "devkit" or meta["label_base"] != 1 or isinstance(meta["label_base"], bool):
        raise _bad(path, f"label_order {meta['label_order']!r:.60} and label_base {meta['label_base']!r:.60}: "
                         "this dsimagenet reads label_order 'devkit' with label_base 1 (label k is wnids[k - 1])")
    n = _check_int(path, "'num_classes'", meta["num_classes"], 1, MAX_CLASSES)
    wnids = _check_strings(path, "'wnids'", meta["wnids"], n)
    if len(set(wnids)) != len(wnids):
        dup = sorted({w for w, c in Counter(wnids).items() if c > 1})
        raise _bad(path, f"'wnids' lists a class twice: {dup[:5]}")
    if meta["names"] is not None:
        _check_strings(path, "'names'", meta["names"], n)
    for key in ("method", "source", "converted_from", "aspect"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise _bad(path, f"{key!r} must be a string or null, found {type(meta[key]).__name__}")
    splits = meta["splits"]
    if not isinstance(splits, dict) or not splits:
        raise _bad(path, f"'splits' must be an object of one or more splits, found {splits!r:.60}")
    for split, info in splits.items():
        if split not in SPLITS:  # a split name is a folder name: "../x" or "a/b" must never become a path
            raise _bad(path, f"split {split!r:.60}: splits are {' and '.join(SPLITS)}")
        if not isinstance(info, dict) or "count" not in info or "sha256" not in info:
            raise _bad(path, f"splits.{split} must be an object with 'count' and 'sha256', found {info!r:.60}")
        _check_int(path, f"splits.{split}.count", info["count"], 0, MAX_COUNT)
        sums = info["sha256"]
        if not isinstance(sums, dict) or set(sums) != set(ARRAYS) or not all(map(_is_hex64, sums.values())):
            raise _bad(path, f"splits.{split}.sha256 must map exactly {' and '.join(ARRAYS)} to sha256 hex "
                             f"digests, found {sums!r:.80}")
    if "mean" in meta:
        mean = meta["mean"]
        if not isinstance(mean, dict) or mean.get("file") != "mean.npy" or not _is_hex64(mean.get("sha256")):
            raise _bad(path, f"'mean' must be an object with file 'mean.npy' and its sha256, found {mean!r:.80}")
        pc = mean.get("per_channel")
        if (not isinstance(pc, list) or len(pc) != 3 or not all(isinstance(v, (int, float)) and not
                                                              isinstance(v, bool) and 0 <= v <= 255 for v in pc)):
            raise _bad(path, f"mean.per_channel must be 3 numbers in 0..255, found {pc!r:.80}")  # NaN fails too
    return meta


def read_meta(root: str | Path) -> dict:
    """meta.json, parsed and checked (``check_meta``): bounded in size, UTF-8, JSON."""
    path = Path(root) / META
    try:
        with open_regular(path) as f:  # read(n) allocates n bytes first: ask for no more than the file holds
            data = f.read(min(os.fstat(f.fileno()).st_size, MAX_META_BYTES) + 1)
    except FileNotFoundError:
        raise NativeFormatError(f"{path}: missing: not a native dataset, or its writing did not finish") from None
    if len(data) > MAX_META_BYTES:
        raise _bad(path, f"larger than {MAX_META_BYTES >> 20} MB: not a meta.json dsimagenet wrote")
    try:
        meta = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _bad(path, f"not UTF-8 text: {e}") from None
    except RecursionError:
        raise _bad(path, "not valid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and Python's limit on the digits of an int
        raise _bad(path, f"not valid JSON: {e}") from None
    return check_meta(meta, path)


@dataclass(frozen=True)
class NpyHeader:
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # where the data starts


def read_npy_header(path: str | Path) -> NpyHeader:
    """The header of an .npy file, parsed without numpy's loader and checked against the file: a simple dtype,
    C order, a shape of non-negative ints, and a file of exactly header + data bytes."""
    path = Path(path)
    with open_regular(path) as f:
        head = f.read(12)
        file_size = os.fstat(f.fileno()).st_size
        if head[:6] != b"\x93NUMPY":
            raise _bad(path, "not an .npy file (no \\x93NUMPY magic at its start)")
        if len(head) < 10:
            raise _bad(path, "cut short inside its .npy header")
        if head[6:8] == b"\x01\x00":
            hlen, start = int.from_bytes(head[8:10], "little"), 10
        elif head[6:8] == b"\x02\x00" and len(head) == 12:
            hlen, start = int.from_bytes(head[8:12], "little"), 12
        else:
            raise _bad(path, f".npy version {head[6]}.{head[7]}: expected 1.0 or 2.0")
        if hlen > _MAX_NPY_HEADER:
            raise _bad(path, f"an .npy header of {hlen} bytes (at most {_MAX_NPY_HEADER})")
        f.seek(start)
        text = f.read(hlen)
    if len(text) < hlen:
        raise _bad(path, "cut short inside its .npy header")
    try:
        import ast

        d = ast.literal_eval(text.decode("ascii"))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise _bad(path, f"an unreadable .npy header: {e}") from None
    if not isinstance(d, dict) or set(d) != _NPY_KEYS:
        raise _bad(path, f"an .npy header without exactly {sorted(_NPY_KEYS)}: {text[:80]!r}")
    descr, fortran, shape = d["descr"], d["fortran_order"], d["shape"]
    if fortran is not False:  # Fortran-ordered rows would be read scrambled
        raise _bad(path, f"fortran_order {fortran!r}: only C (row-major) order, as dsimagenet writes, is read")
    if not isinstance(shape, tuple) or not all(is_int(v) and 0 <= v <= MAX_COUNT * MAX_IMAGE_SIZE for v in shape):
        raise _bad(path, f"an .npy shape that is not a tuple of non-negative integers: {shape!r:.60}")
    try:
        dtype = np.dtype(descr) if isinstance(descr, str) else None
    except (TypeError, ValueError, SyntaxError):
        dtype = None
    if dtype is None or dtype.kind not in "buif" or dtype.itemsize > 8:
        raise _bad(path, f"dtype {descr!r:.40}: expected a plain integer, float or bool dtype")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize  # Python ints: no overflow
    if file_size != start + hlen + nbytes:
        how = "shorter" if file_size < start + hlen + nbytes else "longer"
        raise _bad(path, f"{how} than its header says: {file_size} bytes, the header's {dtype} {shape} needs "
                         f"{start + hlen + nbytes} (truncated or damaged)")
    return NpyHeader(dtype, shape, start + hlen)


def _read_all(path: Path, h: NpyHeader) -> np.ndarray:
    """The whole array (its size was checked against the file by ``read_npy_header``)."""
    with open(path, "rb") as f:
        f.seek(h.offset)
        out = np.fromfile(f, h.dtype, int(np.prod(h.shape)))
    if out.size != int(np.prod(h.shape)):
        raise _bad(path, "cut short while being read")
    return out.reshape(h.shape)


@dataclass
class NativeSplit:
    images: np.ndarray  # np.memmap uint8 (N, S, S, 3) (an empty array when N is 0)
    labels: np.ndarray  # int64 (N,), 1-based
    images_offset: int = HEADER_BYTES  # where the rows start in images.npy


def open_split(root: str | Path, split: str, meta: dict | None = None) -> NativeSplit:
    """One split, checked: both headers exactly as meta.json says, labels integers in 1..num_classes."""
    root = Path(root)
    meta = meta or read_meta(root)
    if split not in meta["splits"]:
        raise NativeFormatError(f"{root}: no {split!r} split (it has {sorted(meta['splits'])})")
    count, size, n = meta["splits"][split]["count"], meta["image_size"], meta["num_classes"]
    ipath, lpath = root / split / "images.npy", root / split / "labels.npy"
    try:
        ih, lh = read_npy_header(ipath), read_npy_header(lpath)
    except FileNotFoundError as e:
        raise NativeFormatError(f"{e.filename}: missing") from None
    if ih.dtype != np.uint8 or ih.shape != (count, size, size, 3):
        raise _bad(ipath, f"{ih.dtype} {ih.shape}, meta.json says uint8 {(count, size, size, 3)}")
    if lh.dtype.kind not in "iu" or lh.shape != (count,):  # float or bool labels would be truncated or read as 1
        raise _bad(lpath, f"{lh.dtype} {lh.shape}, meta.json says integer labels ({count},)")
    labels = _read_all(lpath, lh).astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > n):
        raise _bad(lpath, f"labels must be 1..{n} (meta.json's num_classes), found {labels.min()}..{labels.max()}")
    if count:
        images = np.memmap(ipath, np.uint8, "r", ih.offset, ih.shape)
    else:
        images = np.empty(ih.shape, np.uint8)
    return NativeSplit(images, labels, ih.offset)


def read_rows(path: str | Path, offset: int, row_shape: tuple[int, ...], idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` (ascending) of a checked uint8 .npy file whose rows start at ``offset``, read with one
    ``preadv`` per run of consecutive rows: only those bytes are read (indexing a memory map with scattered
    rows makes the kernel read ahead around each, which for 1% of ImageNet's rows is the whole file)."""
    row_bytes = int(np.prod(row_shape))
    out = np.empty((len(idx), *row_shape), np.uint8)
    if not len(idx):
        return out
    flat = out.reshape(len(idx), row_bytes)
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    with open_regular(path) as f:
        fd = f.fileno()
        for a, b in zip([0, *breaks.tolist()], [*breaks.tolist(), len(idx)], strict=True):
            want, got, start = (b - a) * row_bytes, 0, offset + int(idx[a]) * row_bytes
            view = memoryview(flat[a:b]).cast("B")
            while got < want:
                n = os.preadv(fd, [view[got:]], start + got)
                if n == 0:
                    raise _bad(Path(path), "cut short while being read (changed since it was opened?)")
                got += n
    return out


def read_mean(root: str | Path, meta: dict) -> np.ndarray | None:
    """mean.npy, float64 (S, S, 3), every value finite and in 0..255; None when meta.json has no mean."""
    if "mean" not in meta:
        return None
    path, size = Path(root) / "mean.npy", meta["image_size"]
    try:
        h = read_npy_header(path)
    except FileNotFoundError:
        raise _bad(path, "missing (meta.json lists it)") from None
    if h.dtype != np.float64 or h.shape != (size, size, 3):
        raise _bad(path, f"{h.dtype} {h.shape}, expected float64 ({size}, {size}, 3)")
    mean = _read_all(path, h)
    if not np.all(np.isfinite(mean)) or mean.min() < 0 or mean.max() > 255:
        raise _bad(path, "values outside 0..255 (NaN or infinite included): not a mean image")
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
    for rel, want in files:
        try:
            actual = array_sha256(root / rel)
        except (OSError, NativeFormatError) as e:
            problems.append(f"{root / rel}: unreadable: {e}")
            continue
        if actual != want:
            problems.append(f"{root / rel}: sha256 {actual[:12]}..., meta.json says {want[:12]}...")
    return problems
