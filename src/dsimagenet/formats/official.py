"""The official downsampled-ImageNet batch files: read them safely (also straight from the zips), write them.

Format (``../shared/reference/format.md``): ``train_data_batch_1`` .. ``train_data_batch_10`` and ``val_data``,
as pickles (no extension) or ``.npz``; keys ``data`` uint8 (n, 3*S*S) channel-planar rows, ``labels`` 1..1000
in devkit order, ``mean`` float64 (3*S*S,) in train batches only.

Pickles are never handed to ``pickle.load``. ``safepickle`` is a small pickle machine that knows only the
opcodes and the few numpy callables that the official files and the common writers produce (each named where
it is handled), builds numpy arrays itself from the bytes the file holds, and refuses everything else with the
construct's name: a file that asks for ``os.system`` is refused before anything runs, and one that would build
more than the file holds (an array of a claimed size, a chain of ``_codecs.encode``, lists of lists from memo
references) is refused before it is built. npz files are read member by member: each ``.npy`` header's shape
is checked against the member's size in the zip before anything is allocated. Whatever a file claims, reading
it costs memory in proportion to the bytes it really holds.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from dsimagenet.checksum import HashingWriter, digest
from dsimagenet.errors import FormatError
from dsimagenet.formats import safepickle
from dsimagenet.formats.atomic import atomic_write

NUM_BATCHES = 10
_BATCH_RE = re.compile(r"^(train_data_batch_(\d+)|val_data)(\.npz)?$")
_ZIP_MAGIC = b"PK\x03\x04"
_DEFLATE_MAX_RATIO = 1032  # deflate cannot expand more than this: a larger claimed size is a lie
_MAX_NPY_HEADER = 10_000  # numpy's own limit for headers of untrusted files


# --- zips and npz ------------------------------------------------------------------------------------------

def _check_zip_member(info: zipfile.ZipInfo, where: str, archive_size: int) -> None:
    """Refuse, before opening it, a member zipfile cannot read or whose sizes cannot be true."""
    if info.flag_bits & 0x1:
        raise FormatError(f"{where}: the member is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        name = {9: "Deflate64", 12: "bzip2", 14: "LZMA", 93: "Zstandard"}.get(info.compress_type, "unknown")
        raise FormatError(f"{where}: compression method {info.compress_type} ({name}) is not supported; the "
                          "official zips and numpy use stored or deflate")
    if info.compress_size > archive_size:
        raise FormatError(f"{where}: claims {info.compress_size:,} compressed bytes in a {archive_size:,}-byte zip")
    limit = info.compress_size if info.compress_type == zipfile.ZIP_STORED else \
        info.compress_size * _DEFLATE_MAX_RATIO + 1024
    if info.file_size > limit:
        raise FormatError(f"{where}: claims {info.file_size:,} bytes from {info.compress_size:,} compressed: "
                          "more than the compression can produce (a damaged or forged zip)")


def _open_zip(f, where: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(f)
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, struct.error, OSError) as e:
        # OSError: a seek to the negative offset a damaged directory asks for
        raise FormatError(f"{where}: not a readable zip file: {e}") from None


def _open_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, archive_size: int) -> IO[bytes]:
    _check_zip_member(info, where, archive_size)
    try:
        return zf.open(info)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, ValueError, struct.error,
            OSError) as e:
        raise FormatError(f"{where}: damaged zip member: {e}") from None


def _read_npy(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, archive_size: int) -> np.ndarray:
    """One .npy member: its header's shape and dtype checked against the member's size before allocating."""
    with _open_member(zf, info, where, archive_size) as f:
        s = safepickle.Stream(f, where, info.file_size)
        try:
            pre = s.read(10)
            if pre[:6] != b"\x93NUMPY" or pre[6] not in (1, 2, 3):
                raise safepickle.Refused(f"not an .npy array (starts {pre[:8]!r})")
            if pre[6] == 1:
                hlen, lenbytes = int.from_bytes(pre[8:10], "little"), pre[8:10]
            else:
                lenbytes = pre[8:10] + s.read(2)
                hlen = int.from_bytes(lenbytes, "little")
            if hlen > _MAX_NPY_HEADER:
                raise safepickle.Refused(f"an .npy header of {hlen:,} bytes (at most {_MAX_NPY_HEADER:,})")
            header = s.read(hlen)
        except safepickle.Refused as e:
            raise FormatError(f"{where}: {e}") from None
        try:
            reader = np.lib.format.read_array_header_1_0 if pre[6] == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(io.BytesIO(lenbytes + header))
        except (ValueError, SyntaxError, TypeError) as e:
            raise FormatError(f"{where}: unreadable .npy header: {e}") from None
        if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields or dtype.subdtype:
            raise FormatError(f"{where}: dtype {dtype} is refused: only bool, integer and float arrays (object "
                              "arrays would need pickle)")
        problem = safepickle.shape_problem(shape, dtype.itemsize)
        if problem:
            raise FormatError(f"{where}: its header claims {problem}")
        nbytes = math.prod(shape) * dtype.itemsize
        if s.offset() + nbytes != info.file_size:
            raise FormatError(f"{where}: its header claims shape {shape} {dtype} ({nbytes:,} bytes) but the "
                              f"member holds {info.file_size - s.offset():,} bytes of data")
        try:
            arr = s.payload(nbytes)
            if not s.at_end():
                raise safepickle.Refused("bytes after the array")
        except safepickle.Refused as e:
            raise FormatError(f"{where}: {e}") from None
        flat = np.frombuffer(arr, dtype) if isinstance(arr, bytes) else arr.view(dtype)
        return (flat.copy() if isinstance(arr, bytes) else flat).reshape(shape, order="F" if fortran else "C")


def _read_npz(f, where: str, size: int) -> dict:
    zf = _open_zip(f, where)
    with zf:
        by_name: dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            if info.filename in ("data.npy", "labels.npy", "mean.npy"):
                if info.filename in by_name:
                    raise FormatError(f"{where}: two members named {info.filename}")
                by_name[info.filename] = info
        return {name[:-4]: _read_npy(zf, info, f"{where}:{name}", size) for name, info in by_name.items()}


# --- batches -----------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """One batch file: ``data`` uint8 (n, 3*S*S) channel-planar, ``labels`` int64 devkit IDs, ``mean``."""

    data: np.ndarray
    labels: np.ndarray
    mean: np.ndarray | None
    image_size: int


def planar_to_nhwc(rows: np.ndarray, size: int) -> np.ndarray:
    """(n, 3*S*S) channel-planar rows -> (n, S, S, 3), a view."""
    return rows.reshape(-1, 3, size, size).transpose(0, 2, 3, 1)


def nhwc_to_planar(images: np.ndarray) -> np.ndarray:
    """(n, S, S, 3) -> (n, 3*S*S) channel-planar rows (all R, then G, then B), a copy."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)


def _check_labels(labels, n: int, where: str, num_classes: int) -> np.ndarray:
    if isinstance(labels, list):  # the official pickles: a list of int (np.int64 from list(array) too)
        bad = next((v for v in labels if type(v) is not int and not isinstance(v, np.integer)), None)
        if bad is not None:
            raise FormatError(f"{where}: 'labels' must be integers, found a {type(bad).__name__} "
                              f"({safepickle.short(bad)})")
        lo, hi = (min(labels), max(labels)) if labels else (1, 1)
    elif isinstance(labels, np.ndarray):  # the npz files: an integer array
        if labels.dtype.kind not in "iu" or labels.ndim != 1:
            raise FormatError(f"{where}: 'labels' must be integers (n,), found {labels.dtype} {labels.shape}")
        lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (1, 1)
    else:
        raise FormatError(f"{where}: 'labels' must be a list or array of integers, found {type(labels).__name__}")
    if len(labels) != n:
        raise FormatError(f"{where}: {len(labels)} labels for {n} images")
    if lo < 1 or hi > num_classes:
        raise FormatError(f"{where}: labels must be 1..{num_classes} (devkit IDs), found {lo}..{hi}")
    return np.array(labels, dtype=np.int64).reshape(n)  # empty lists too: int64, length 0


def _check_batch(obj, where: str, num_classes: int) -> Batch:
    if not isinstance(obj, dict) or "data" not in obj or "labels" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise FormatError(f"{where}: expected a dict with 'data' and 'labels', found {keys}")
    data, labels, mean = obj["data"], obj["labels"], obj.get("mean")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise FormatError(f"{where}: 'data' must be a uint8 array (n, 3*S*S), found {desc}")
    size = math.isqrt(data.shape[1] // 3)
    if 3 * size * size != data.shape[1] or size == 0:
        raise FormatError(f"{where}: rows of {data.shape[1]} values are not 3*S*S for any image size S")
    labels = _check_labels(labels, len(data), where, num_classes)
    if mean is not None:
        if not isinstance(mean, np.ndarray) or mean.shape != (data.shape[1],) or mean.dtype.kind != "f":
            desc = f"{mean.dtype} {mean.shape}" if isinstance(mean, np.ndarray) else type(mean).__name__
            raise FormatError(f"{where}: 'mean' must be a float array ({data.shape[1]},), found {desc}")
        mean = mean.astype(np.float64)
        if not np.isfinite(mean).all() or mean.min() < 0 or mean.max() > 255:
            bad = "NaN or infinite values" if not np.isfinite(mean).all() else f"{mean.min()}..{mean.max()}"
            raise FormatError(f"{where}: 'mean' is the mean of uint8 pixels, 0..255, but holds {bad}")
    return Batch(np.ascontiguousarray(data), labels, mean, size)


def _stream_size(fileobj) -> tuple[int, int] | None:
    """(start, size) of a seekable file, else None."""
    try:
        if not fileobj.seekable():
            return None
        start = fileobj.tell()
        end = fileobj.seek(0, io.SEEK_END)
        fileobj.seek(start)
        return start, end - start
    except (OSError, AttributeError, ValueError):
        return None


def read_batch(fileobj: IO[bytes], where: str, expect: str, num_classes: int = 1000,
               size: int | None = None) -> Batch:
    """Read one batch file; ``expect`` is "pickle" or "npz" (from its name). ``where`` names it in errors.
    ``size``: the bytes the stream holds, when it cannot be seeked cheaply (a zip member: its central
    directory's size); never more is read, and no claim inside the file beyond it is believed."""
    seekable = _stream_size(fileobj) if size is None else None
    if seekable:
        size = seekable[1]
    s = safepickle.Stream(fileobj, where, size)
    head = s.peek(4)
    if not head:
        raise FormatError(f"{where}: the file is empty")
    is_zip = head == _ZIP_MAGIC
    if expect == "npz" and not is_zip:
        hint = " (it is a pickle: drop the .npz from its name)" if head[:1] == b"\x80" else ""
        raise FormatError(f"{where}: expected an npz file but it is not one{hint}")
    if expect == "pickle" and is_zip:
        raise FormatError(f"{where}: expected a pickle but this is an npz (zip) file: name it {Path(where).name}.npz")
    if expect == "pickle":
        obj = safepickle.load_pickle(s, where)
    else:
        if seekable:
            fileobj.seek(seekable[0])
            f = fileobj
        else:  # inside a zip: into memory, but first make sure it starts as an npz does (a .npy member)
            name_len = int.from_bytes(s.peek(28)[26:28], "little")
            first = s.peek(30 + name_len)[30:]
            if not 0 < name_len <= 1024 or not first.endswith(b".npy"):
                raise FormatError(f"{where}: not an npz: its first member is {first[:40]!r}, not an .npy array")
            f = s.slurp()
            size = len(f.buf)
        obj = _read_npz(f, where, size)
    return _check_batch(obj, where, num_classes)


@dataclass(frozen=True)
class Member:
    """A batch file found on disk or inside a zip."""

    split: str  # "train" or "val"
    index: int  # 1..10 for train, 0 for val
    kind: str  # "pickle" or "npz"
    where: str  # a path for messages: /x/Imagenet32_train.zip:Imagenet32_train/train_data_batch_1
    open: Callable[[], IO[bytes]]
    size: int | None = None  # a zip member's size from the central directory; None for a file on disk

    def read(self, num_classes: int = 1000) -> Batch:
        with self.open() as f:
            b = read_batch(f, self.where, self.kind, num_classes, size=self.size)
        if self.split == "train" and b.mean is None:
            raise FormatError(f"{self.where}: no 'mean' in a train batch")
        return b


def _classify(name: str) -> tuple[str, int, str] | None:
    m = _BATCH_RE.match(name)
    if not m:
        return None
    kind = "npz" if m.group(3) else "pickle"
    return ("val", 0, kind) if m.group(1) == "val_data" else ("train", int(m.group(2)), kind)


def _zip_members(path: Path) -> Iterator[Member]:
    try:
        archive_size = path.stat().st_size
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, struct.error) as e:
        raise FormatError(f"{path}: not a readable zip file: {e}") from None
    for info in zf.infolist():
        if info.is_dir():
            continue
        c = _classify(info.filename.rsplit("/", 1)[-1])
        if c:
            where = f"{path}:{info.filename}"
            yield Member(*c, where, lambda info=info, where=where: _open_member(zf, info, where, archive_size),
                         info.file_size)


_PART_RE = re.compile(r"^(.*_part)(\d+)(.*\.zip)$")


def zip_set(path: Path) -> list[Path]:
    """The zips that hold one set together: Imagenet64_train_part1.zip holds batches 1-5 and part2 6-10. Found by
    exact name, alike but for the part number (Imagenet64_train_part1_npz.zip is another set); every part must
    be there. Any other zip is a set of one."""
    m = _PART_RE.match(path.name)
    if not m:
        return [path]
    head, tail = m.group(1), m.group(3)
    family = re.compile(rf"^{re.escape(head)}(\d+){re.escape(tail)}$")
    found = {int(f.group(1)) for p in path.parent.iterdir() if (f := family.match(p.name)) and p.is_file()}
    parts = range(1, max([*found, 2]) + 1)  # the official sets come in two parts at least
    missing = [path.parent / f"{head}{k}{tail}" for k in parts if k not in found]
    if missing:
        raise FormatError(f"{missing[0]}: missing: {path.name} is one of {len(parts)} zips "
                          f"({head}{parts[0]}{tail} .. {head}{parts[-1]}{tail}) that hold the set together")
    return [path.parent / f"{head}{k}{tail}" for k in parts]


def find_members(path: str | Path) -> list[Member]:
    """Every official batch file at ``path``: a folder (files, or zips, possibly one folder down) or a zip (with
    the other parts of its set, ``zip_set``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    members: list[Member] = []
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise FormatError(f"{path}: expected a folder of batch files or a zip of them")
        for part in zip_set(path):
            members.extend(_zip_members(part))
        return members
    for f in sorted(path.iterdir()) + sorted(p for d in sorted(path.iterdir()) if d.is_dir()
                                             for p in d.iterdir()):
        if f.is_file() and f.suffix == ".zip":
            members.extend(_zip_members(f))
        elif f.is_file() and (c := _classify(f.name)):
            members.append(Member(*c, str(f), lambda f=f: open(f, "rb")))
    return members


def split_members(members: list[Member], split: str, kind: str | None, where: str) -> list[Member]:
    """The files of one split, in batch order; errors for missing or duplicated batches."""
    chosen = [m for m in members if m.split == split]
    kinds = {m.kind for m in chosen}
    if kind is None and len(kinds) > 1:
        kind = "npz"  # both variants present: npz needs no unpickling and is checked on load
    if kind is not None:
        chosen = [m for m in chosen if m.kind == kind]
    if not chosen:
        what = "train_data_batch_1..10" if split == "train" else "val_data"
        raise FileNotFoundError(f"{where}: no {split} files ({what}, pickle or .npz) found")
    by_index: dict[int, Member] = {}
    for m in chosen:
        if m.index in by_index:
            raise FormatError(f"{where}: {m.where} and {by_index[m.index].where} are the same batch")
        by_index[m.index] = m
    if split == "train":
        missing = [i for i in range(1, NUM_BATCHES + 1) if i not in by_index]
        extra = [i for i in by_index if not 1 <= i <= NUM_BATCHES]
        if missing or extra:
            raise FormatError(f"{where}: train batches must be 1..{NUM_BATCHES}; missing {missing}, "
                              f"unexpected {extra} (is a part of the 64 px train zips missing?)")
    return [by_index[i] for i in sorted(by_index)]


def read_split(members: list[Member], num_classes: int = 1000,
               image_size: int | None = None) -> Iterator[tuple[Member, Batch]]:
    """The batches of one split (``split_members``), one at a time, with every check a split needs beyond its
    files' own (``Member.read``: structure, labels 1..num_classes, a mean in each train batch, finite and in
    0..255): every batch of ``image_size`` (default: the first one's), and one mean in all of them (batches
    with different means come from different datasets). The only reader of official splits: datasets,
    conversions and ``info`` all read through it."""
    first_mean, first = None, None
    for m in members:
        b = m.read(num_classes)
        if image_size is None:
            image_size, first = b.image_size, m
        elif b.image_size != image_size:
            raise FormatError(f"{m.where}: {b.image_size} px images, but "
                              f"{first.where + ' has' if first else 'the rest are'} {image_size} px")
        if b.mean is not None:
            if first_mean is None:
                first_mean = (m, b.mean)
            elif not np.array_equal(first_mean[1], b.mean):
                raise FormatError(f"{m.where}: its 'mean' differs from {first_mean[0].where}'s: the batches come "
                                  "from different datasets")
        yield m, b
        del b  # or it stays alive while the next batch is read: two batches in memory


def batch_bounds(n: int, num_batches: int = NUM_BATCHES) -> list[tuple[int, int]]:
    """The official split of n training images: batches of n // 10, the rest in the last one."""
    step = n // num_batches
    return [(i * step, (i + 1) * step if i < num_batches - 1 else n) for i in range(num_batches)]


def batch_name(split: str, index: int, kind: str) -> str:
    name = "val_data" if split == "val" else f"train_data_batch_{index}"
    return name + (".npz" if kind == "npz" else "")


# --- writing -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RowSource:
    """``count`` images of ``size`` px that ``read(a, b)`` gives as NHWC uint8 rows a..b: a batch written from
    it is never whole in memory (its channel-planar rows are written ``step`` images at a time). Picklable when
    ``read`` is (a method of a picklable object), so that any process can write the batch."""

    count: int
    size: int
    read: Callable[[int, int], np.ndarray]
    step: int = 0  # images a piece; 0: about 1 MB of them (writes of 25 MB pieces ran at a third of the speed)

    @property
    def nbytes(self) -> int:
        return self.count * 3 * self.size * self.size

    def planar(self) -> Iterator[np.ndarray]:
        """The rows, channel-planar (n, 3*S*S), in order, ``step`` at a time."""
        step = self.step or max(1, (1 << 20) // (3 * self.size * self.size))
        for a in range(0, self.count, step):
            yield nhwc_to_planar(self.read(a, min(a + step, self.count)))


class _Raw:
    """Array bytes to be written as one BINBYTES opcode straight from memory, piece by piece."""

    def __init__(self, rows: np.ndarray | RowSource):
        self.rows, self.nbytes = rows, rows.nbytes

    def pieces(self) -> Iterator[memoryview]:
        arrays = [self.rows] if isinstance(self.rows, np.ndarray) else self.rows.planar()
        for a in arrays:
            yield memoryview(np.ascontiguousarray(a).reshape(-1))  # 1-D uint8, empty batches too


# numpy's pickle callables under the names NumPy 1.x writes. NumPy < 1.26 cannot import numpy._core (NumPy 2's
# name); NumPy 2 keeps numpy.core.multiarray._reconstruct and .scalar importable without a warning for old
# pickles (numpy/core/multiarray.py), so every NumPy from 1.x to 2.x reads these with plain pickle.load.
_NUMPY1_NAMES = {id(np.empty(0).__reduce__()[0]): ("numpy.core.multiarray", "_reconstruct"),
                 id(np.int64(0).__reduce__()[0]): ("numpy.core.multiarray", "scalar")}


class _BatchPickler(pickle._Pickler):
    """Pickles like ``pickle.dump``, except that the image array's bytes go to the file without the full copy
    ``ndarray.__reduce__`` makes (1.6 GB per 64 px batch), and numpy is named as NumPy 1.x names it."""

    def reducer_override(self, obj):
        if isinstance(obj, RowSource):  # pickled as the uint8 (n, 3*S*S) array it stands for
            state = (1, (obj.count, 3 * obj.size * obj.size), np.dtype(np.uint8), False, _Raw(obj))
        elif type(obj) is np.ndarray and obj.dtype == np.uint8 and obj.flags.c_contiguous:
            state = (1, obj.shape, obj.dtype, False, _Raw(obj))
        else:
            return NotImplemented
        return np.ndarray.__reduce__(np.empty(0, np.uint8))[0], (np.ndarray, (0,), b"b"), state

    def save_global(self, obj, name=None):
        alias = _NUMPY1_NAMES.get(id(obj))
        if alias is None:
            return super().save_global(obj, name)
        module, name = alias
        if self.proto >= 4:
            self.save(module)
            self.save(name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Raw):
            n, pieces = obj.nbytes, obj.pieces()
            if self.proto >= 4:  # large bytes go outside frames, straight to the file (pickle's own way)
                self._write_large_bytes(pickle.BINBYTES8 + n.to_bytes(8, "little"), next(pieces, b""))
                write = self.framer.file_write
            else:
                self.write(pickle.BINBYTES + n.to_bytes(4, "little"))
                write = self.write
            for piece in pieces:
                write(piece)
            return
        super().save(obj, save_persistent_id)


def write_batch(path: str | Path, rows: np.ndarray | RowSource, labels: np.ndarray, mean: np.ndarray | None,
                kind: str) -> str:
    """Write one official batch file atomically: ``rows`` uint8 (n, 3*S*S) channel-planar (or a ``RowSource``
    of NHWC images), ``labels`` 1-based devkit IDs, ``mean`` float64 (3*S*S,) for train batches, None for val.
    An empty batch is legal. Returns the file's sha256 (a pickle's taken as it is written; an npz, which
    zipfile writes with seeks, read back)."""
    if not isinstance(rows, RowSource) and (rows.dtype != np.uint8 or rows.ndim != 2):
        raise ValueError(f"rows must be uint8 (n, 3*S*S), not {rows.dtype} {rows.shape}")
    n = rows.count if isinstance(rows, RowSource) else len(rows)
    if kind == "npz":
        labels_out = np.asarray(labels, dtype=np.int64).reshape(n)
    else:
        labels_out = [int(x) for x in labels]  # a Python list of int, as in the official pickles ([] if empty)
    obj = {"data": rows, "labels": labels_out}
    if mean is not None:
        obj["mean"] = np.asarray(mean, dtype=np.float64).reshape(-1)
    with atomic_write(path, "wb+") as f:
        if kind == "npz":
            _savez(f, obj)
            f.flush()
            return digest(f, offset=0)
        # protocol 3, as the originals; BINBYTES holds at most 4 GiB, protocol 4 has BINBYTES8
        hashed = HashingWriter(f)
        _BatchPickler(hashed, protocol=3 if rows.nbytes < 2**32 else 4).dump(obj)
        return hashed.hexdigest()


def _savez(f: IO[bytes], arrays: dict) -> None:
    """``np.savez(f, **arrays)``, with a ``RowSource`` written a piece at a time (numpy's own calls: a stored
    zip, one forced-zip64 ``.npy`` member an array)."""
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                if not isinstance(value, RowSource):
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
                    continue
                shape = (value.count, 3 * value.size * value.size)
                np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False,
                                                              "shape": shape})
                for piece in value.planar():
                    member.write(piece)


@dataclass(frozen=True)
class BatchJob:
    """One batch of a split, in each kind asked for: ``run()`` writes it, in any process (the job pickles),
    and returns {file name: sha256}."""

    root: Path
    names: dict[str, str]  # kind -> file name
    rows: RowSource
    labels: np.ndarray
    mean: np.ndarray | None  # channel-planar, train batches only

    def run(self) -> dict[str, str]:
        return {name: write_batch(self.root / name, self.rows, self.labels, self.mean, kind)
                for kind, name in self.names.items()}


@dataclass(frozen=True)
class _Slice:
    """Rows ``start``.. of a reader, as a reader (picklable, unlike a lambda)."""

    read: Callable[[int, int], np.ndarray]
    start: int

    def __call__(self, a: int, b: int) -> np.ndarray:
        return self.read(self.start + a, self.start + b)


class SplitWriter:
    """Writes one split as official batch files, in each of ``kinds`` ("pickle", "npz"), from its ``count``
    images (NHWC, as a build computes them), cut as the official files are (``batch_bounds``: ten train
    batches, one val_data). ``mean`` (S, S, 3) goes into every train batch. ``jobs(read, labels)`` gives one
    ``BatchJob`` per batch, to run in any process and order; ``add`` takes each one's checksums, ``close()``
    checks that every file is in and returns {file name: sha256}. Memory: about 1 MB of rows a job."""

    def __init__(self, root: str | Path, split: str, count: int, image_size: int, kinds: list[str],
                 mean: np.ndarray | None = None):
        self.root, self.split, self.kinds, self.size, self.count = Path(root), split, list(kinds), image_size, count
        self.bounds = batch_bounds(count) if split == "train" else [(0, count)]
        self.mean_rows = nhwc_to_planar(np.asarray(mean)[None])[0] if mean is not None and split == "train" \
            else None
        self.checksums: dict[str, str] = {}

    def jobs(self, read: Callable[[int, int], np.ndarray], labels: np.ndarray) -> list[BatchJob]:
        """One job per batch; ``read(a, b)`` gives images a..b of the split (NHWC uint8), ``labels`` all
        ``count`` labels."""
        if len(labels) != self.count:
            raise ValueError(f"{self.root}: {len(labels)} {self.split} labels for {self.count} images")
        out = []
        for i, (a, b) in enumerate(self.bounds):
            index = i + 1 if self.split == "train" else 0
            out.append(BatchJob(self.root, {k: batch_name(self.split, index, k) for k in self.kinds},
                                RowSource(b - a, self.size, _Slice(read, a)), np.asarray(labels[a:b]),
                                self.mean_rows))
        return out

    def add(self, checksums: dict[str, str]) -> None:
        """The checksums a finished job returned."""
        self.checksums.update(checksums)

    def close(self) -> dict[str, str]:
        index = range(1, len(self.bounds) + 1) if self.split == "train" else [0]
        missing = [n for i in index for k in self.kinds if (n := batch_name(self.split, i, k)) not in self.checksums]
        if missing:
            raise ValueError(f"{self.root}: {', '.join(missing)} not written")
        return dict(self.checksums)
