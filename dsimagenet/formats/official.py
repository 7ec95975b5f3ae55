"""The official downsampled-ImageNet batch files: read them safely (also straight from the zips), write them.

Format (``../shared/reference/format.md``): ``train_data_batch_1`` .. ``train_data_batch_10`` and ``val_data``,
as pickles (no extension) or ``.npz``; keys ``data`` uint8 (n, 3*S*S) channel-planar rows, ``labels`` 1..1000
in devkit order, ``mean`` float64 (3*S*S,) in train batches only.

Pickles are never handed to ``pickle.load``: ``SafeUnpickler`` builds only numpy arrays and dtypes from an
allow-list, so a file that asks for ``os.system`` is refused before anything runs. npz files are read with
``allow_pickle=False``.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from dsimagenet.errors import DSImageNetError
from dsimagenet.formats.atomic import atomic_write

NUM_BATCHES = 10
_BATCH_RE = re.compile(r"^(train_data_batch_(\d+)|val_data)(\.npz)?$")
_ZIP_MAGIC = b"PK\x03\x04"

# (module, name) pairs a numpy-array pickle needs, under the NumPy 1 and NumPy 2 module names.
_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # protocol 2 stores bytes as latin-1 text
}


class FormatError(DSImageNetError, ValueError):
    """A dataset file that is not what it should be; the message names the file."""


class RefusedPickle(pickle.UnpicklingError):
    pass


class SafeUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes, lists, dicts, numbers and strings, and refuses everything else."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise RefusedPickle(f"refused to load {module}.{name}: not a numpy array or plain value")


def safe_load(fileobj: IO[bytes], where: str):
    try:
        return SafeUnpickler(fileobj, encoding="latin1").load()
    except RefusedPickle as e:
        raise FormatError(f"{where}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError) as e:
        raise FormatError(f"{where}: not a readable pickle (truncated or damaged): {e}") from None


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


def _check_batch(obj, where: str, num_classes: int) -> Batch:
    if not isinstance(obj, dict) or "data" not in obj or "labels" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise FormatError(f"{where}: expected a dict with 'data' and 'labels', found {keys}")
    data, labels, mean = obj["data"], obj["labels"], obj.get("mean")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise FormatError(f"{where}: 'data' must be a uint8 array (n, 3*S*S), found {desc}")
    size = int(round((data.shape[1] / 3) ** 0.5))
    if 3 * size * size != data.shape[1] or size == 0:
        raise FormatError(f"{where}: rows of {data.shape[1]} values are not 3*S*S for any image size S")
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu" or labels.shape != (len(data),):
        raise FormatError(f"{where}: {labels.shape} labels of type {labels.dtype} for {len(data)} images")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > num_classes):
        raise FormatError(f"{where}: labels must be 1..{num_classes} (devkit IDs), "
                          f"found {labels.min()}..{labels.max()}")
    if mean is not None:
        mean = np.asarray(mean)
        if mean.shape != (data.shape[1],) or mean.dtype.kind != "f":
            raise FormatError(f"{where}: 'mean' must be float ({data.shape[1]},), found {mean.dtype} {mean.shape}")
        mean = mean.astype(np.float64)
    return Batch(data, labels, mean, size)


def read_batch(fileobj: IO[bytes], where: str, expect: str, num_classes: int = 1000) -> Batch:
    """Read one batch file; ``expect`` is "pickle" or "npz" (from its name). ``where`` names it in errors."""
    head = fileobj.read(4)
    fileobj.seek(0)
    if not head:
        raise FormatError(f"{where}: the file is empty")
    is_zip = head == _ZIP_MAGIC
    if expect == "npz" and not is_zip:
        hint = " (it is a pickle: drop the .npz from its name)" if head[:1] == b"\x80" else ""
        raise FormatError(f"{where}: expected an npz file but it is not one{hint}")
    if expect == "pickle" and is_zip:
        raise FormatError(f"{where}: expected a pickle but this is an npz (zip) file: name it {Path(where).name}.npz")
    if expect == "pickle":
        return _check_batch(safe_load(fileobj, where), where, num_classes)
    try:
        with np.load(fileobj, allow_pickle=False) as z:
            obj = {k: z[k] for k in z.files}
    except ValueError as e:  # object arrays need pickle: refused
        raise FormatError(f"{where}: {e}") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise FormatError(f"{where}: not a readable npz (truncated or damaged): {e}") from None
    return _check_batch(obj, where, num_classes)


@dataclass(frozen=True)
class Member:
    """A batch file found on disk or inside a zip."""

    split: str  # "train" or "val"
    index: int  # 1..10 for train, 0 for val
    kind: str  # "pickle" or "npz"
    where: str  # a path for messages: /x/Imagenet32_train.zip:Imagenet32_train/train_data_batch_1
    open: Callable[[], IO[bytes]]

    def read(self, num_classes: int = 1000) -> Batch:
        with self.open() as f:
            if self.kind == "npz" and not f.seekable():
                f = io.BytesIO(f.read())
            return read_batch(f, self.where, self.kind, num_classes)


def _classify(name: str) -> tuple[str, int, str] | None:
    m = _BATCH_RE.match(name)
    if not m:
        return None
    kind = "npz" if m.group(3) else "pickle"
    return ("val", 0, kind) if m.group(1) == "val_data" else ("train", int(m.group(2)), kind)


def _zip_members(path: Path) -> Iterator[Member]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise FormatError(f"{path}: not a readable zip file: {e}") from None
    for info in zf.infolist():
        if info.is_dir():
            continue
        c = _classify(info.filename.rsplit("/", 1)[-1])
        if c:
            yield Member(*c, f"{path}:{info.filename}", lambda info=info: zf.open(info))


def _sibling_parts(path: Path) -> list[Path]:
    """Imagenet64_train_part1.zip holds batches 1-5 and part2 holds 6-10: take both when given one."""
    m = re.match(r"^(.*_part)\d+(.*\.zip)$", path.name)
    if not m:
        return [path]
    return sorted(path.parent.glob(f"{m.group(1)}*{m.group(2)}"))


def find_members(path: str | Path) -> list[Member]:
    """Every official batch file at ``path``: a folder (files, or zips, possibly one folder down) or a zip."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    members: list[Member] = []
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise FormatError(f"{path}: expected a folder of batch files or a zip of them")
        for part in _sibling_parts(path):
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


def batch_bounds(n: int, num_batches: int = NUM_BATCHES) -> list[tuple[int, int]]:
    """The official split of n training images: batches of n // 10, the rest in the last one."""
    step = n // num_batches
    return [(i * step, (i + 1) * step if i < num_batches - 1 else n) for i in range(num_batches)]


def batch_name(split: str, index: int, kind: str) -> str:
    name = "val_data" if split == "val" else f"train_data_batch_{index}"
    return name + (".npz" if kind == "npz" else "")


class _Raw:
    """Array bytes to be written as one BINBYTES opcode straight from the array's memory."""

    def __init__(self, array: np.ndarray):
        self.view = memoryview(np.ascontiguousarray(array).reshape(-1))  # 1-D uint8, empty batches too


class _BatchPickler(pickle._Pickler):
    """Pickles like ``pickle.dump`` (protocol 3), except that the image array's bytes go to the file
    without the full copy ``ndarray.__reduce__`` makes (1.6 GB per 64 px batch)."""

    def reducer_override(self, obj):
        if type(obj) is np.ndarray and obj.dtype == np.uint8 and obj.flags.c_contiguous:
            state = (1, obj.shape, obj.dtype, False, _Raw(obj))
            return np.ndarray.__reduce__(np.empty(0, np.uint8))[0], (np.ndarray, (0,), b"b"), state
        return NotImplemented

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Raw):
            self.write(pickle.BINBYTES + len(obj.view).to_bytes(4, "little"))
            self.write(obj.view)
            return
        super().save(obj, save_persistent_id)


def write_batch(path: str | Path, rows: np.ndarray, labels: np.ndarray, mean: np.ndarray | None,
                kind: str) -> None:
    """Write one official batch file atomically: ``rows`` uint8 (n, 3*S*S) channel-planar, ``labels`` 1-based
    devkit IDs, ``mean`` float64 (3*S*S,) for train batches, None for val."""
    if rows.dtype != np.uint8 or rows.ndim != 2:
        raise ValueError(f"rows must be uint8 (n, 3*S*S), not {rows.dtype} {rows.shape}")
    if kind == "npz":
        labels_out = np.asarray(labels, dtype=np.int64)
    else:
        labels_out = [int(x) for x in labels]  # a Python list of int, as in the official pickles
    obj = {"data": rows, "labels": labels_out}
    if mean is not None:
        obj["mean"] = np.asarray(mean, dtype=np.float64).reshape(-1)
    with atomic_write(path) as f:
        if kind == "npz":
            np.savez(f, **obj)
        elif rows.nbytes >= 2**32:  # BINBYTES holds at most 4 GiB; protocol 4 has BINBYTES8
            pickle.dump(obj, f, protocol=4)
        else:
            _BatchPickler(f, protocol=3).dump(obj)  # protocol 3, as the originals
