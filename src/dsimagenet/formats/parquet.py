"""Parquet shards as the Hugging Face Hub holds datasets: read downsampled ImageNet copies, write ours.

Read: an ``image`` column that is ``datasets.Array3D((S, S, 3), "uint8")`` (``list<list<list<uint8>>>``) or
``datasets.Image()`` (a struct ``{bytes, path}`` of PNG/JPEG bytes, decoded once with Pillow, exactly), and an
integer or ``ClassLabel`` label; streamed row group by row group. What the integers mean: ``hublabels``.

Write: ``<split>-NNNNN-of-MMMMM.parquet`` shards (split "train" / "validation", as ``ILSVRC/imagenet-1k``) with
an Array3D image column, an int64 ``label`` whose ClassLabel names are the classes' WNIDs (label k is devkit
class k + 1 for ImageNet), the ``huggingface`` schema metadata that ``datasets`` reads its features from, and
our class table under ``dsimagenet``; row groups of about 8 MB, so a streaming reader holds little.

    datasets.load_dataset("parquet", data_files={"train": "out/32_box/train-*.parquet"})
    open_dataset("out/32_box", split="val", format="parquet")

pyarrow only: ``datasets`` is not needed at run time.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsimagenet.errors import FormatError
from dsimagenet.formats import hublabels
from dsimagenet.formats.atomic import commit, temp_path
from dsimagenet.labels import ClassTable

FORMAT = "parquet"
VERSION = 1
ARRAY3D = "datasets.features.features.Array3DExtensionType"
HF_KEY, OUR_KEY = b"huggingface", hublabels.META_KEY.encode()
GROUP_BYTES = 8 << 20  # a row group: what a streaming reader holds at once
SHARD_BYTES = 512 << 20  # a shard file: the Hub's advice is a few hundred MB
HUB_SPLIT = {"train": "train", "val": "validation"}
ENCODINGS = ("PNG", "JPEG", "WEBP")  # what Pillow may parse an encoded image as: no other decoder is reached
# the largest S read, as the native reader's (a few KB of PNG or a schema's shape may declare any size: memory for
# a 100000 px image, or a per-pixel mean of one, is never asked for)
MAX_SIZE = 4096


def find_shards(root: str | Path) -> dict[str, list[Path]]:
    """{"train"/"val"/"test": shard paths}: ``root`` itself when it is a .parquet file, else the .parquet files
    in it, up to two folders down (``data/``, ``default/train/``); temp files (hidden) are not shards."""
    root = Path(root)
    if root.is_file():
        return hublabels.group_shards(root.parent, [root], "parquet") if root.suffix == ".parquet" else {}
    files = [p for pattern in ("*.parquet", "*/*.parquet", "*/*/*.parquet") for p in root.glob(pattern)
             if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return hublabels.group_shards(root, files, "parquet")


def _arrow():
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa, pq


@dataclass(frozen=True)
class Shard:
    """One parquet file's layout, from its footer."""

    path: Path
    rows: int
    image: str  # column names
    label: str
    encoded: bool  # PNG/JPEG bytes (datasets.Image) rather than Array3D
    size: int | None  # S, when the schema says it
    names: list[str] | None  # ClassLabel names
    ours: dict | None  # our metadata (class table), when we wrote the file


def _json_meta(meta: dict, key: bytes, path: Path) -> dict | None:
    if key not in meta:
        return None
    try:
        value = json.loads(meta[key].decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{path}: its {key.decode()!r} schema metadata is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise FormatError(f"{path}: its {key.decode()!r} schema metadata is not a JSON object")
    return value


def _nested_uint8(t, depth: int) -> bool:
    pa = _arrow()[0]
    for _ in range(depth):
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
            return False
        t = t.value_type
    return pa.types.is_uint8(t)


def _open(path: Path):
    """A parquet file, its pages' CRCs checked where the writer stored them (we do)."""
    return _arrow()[1].ParquetFile(path, page_checksum_verification=True)


def _damaged(where, e: Exception) -> Exception:
    """pyarrow's error about a file as a FormatError naming it; an error of the system (a missing file, no
    permission, a failing disk: an OSError with an errno) stays what it is."""
    if isinstance(e, OSError) and e.errno is not None:
        return e
    return FormatError(f"{where}: not a readable parquet file ({str(e).strip()})")


def _is_bytes(t) -> bool:
    pa = _arrow()[0]
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def inspect(path: str | Path) -> Shard:
    """The layout of one shard (its footer only); a file that is not parquet, or has no image or label
    column of a kind we read, is a FormatError naming it."""
    pa, pq = _arrow()
    path = Path(path)
    try:
        pf = _open(path)
        schema, rows = pf.schema_arrow, pf.metadata.num_rows
    except (pa.ArrowException, OSError) as e:
        raise _damaged(path, e) from None
    meta = schema.metadata or {}
    hf = _json_meta(meta, HF_KEY, path) or {}
    features = (hf.get("info") or {}).get("features") or hf.get("features") or {}
    features = features if isinstance(features, dict) else {}
    typed = {k: v.get("_type") for k, v in features.items() if isinstance(v, dict)}
    image = next((k for k, t in typed.items() if t in ("Array3D", "Image")), None) or \
        next((k for k in ("image", "img") if k in schema.names), None)
    label = next((k for k, t in typed.items() if t == "ClassLabel"), None) or \
        next((k for k in ("label", "labels") if k in schema.names), None)
    columns = ", ".join(schema.names)
    if image is None or image not in schema.names:
        raise FormatError(f"{path}: no image column (columns: {columns}): expected 'image', an Array3D or Image")
    if label is None or label not in schema.names:
        raise FormatError(f"{path}: no label column (columns: {columns}): unlabelled images, such as the PixelRNN "
                          "downsampled ImageNet (van den Oord et al. 2016), are not the Chrabaszcz et al. data")
    t = schema.field(image).type
    if isinstance(t, pa.ExtensionType):  # Array3D, when datasets is imported in this process and registered it
        t = t.storage_type
    if _nested_uint8(t, 3):
        encoded = False
    elif _is_bytes(t) or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and
                          _is_bytes(t.field("bytes").type)):
        encoded = True
    else:
        raise FormatError(f"{path}: image column {image!r} is {t}: expected an Array3D of uint8 "
                          "(list<list<list<uint8>>>) or encoded images (struct<bytes, path> or binary)")
    if not pa.types.is_integer(schema.field(label).type):
        raise FormatError(f"{path}: label column {label!r} is {schema.field(label).type}, not integers")
    size = None
    shape = (features.get(image) or {}).get("shape") if typed.get(image) == "Array3D" else None
    if shape is None and not encoded:
        ext = (schema.field(image).metadata or {}).get(b"ARROW:extension:metadata")
        try:
            shape = json.loads(ext)[0] if ext else None
        except (ValueError, IndexError, TypeError):
            shape = None
    if shape is not None:
        if not (isinstance(shape, list) and len(shape) == 3 and shape[0] == shape[1] and shape[2] == 3 and
                all(isinstance(s, int) and s > 0 for s in shape)):
            raise FormatError(f"{path}: image shape {shape}: expected [S, S, 3]")
        if shape[0] > MAX_SIZE:
            raise FormatError(f"{path}: image shape {shape}: larger than {MAX_SIZE} px, not a downsampled dataset")
        size = shape[0]
    names = (features.get(label) or {}).get("names") if typed.get(label) == "ClassLabel" else None
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise FormatError(f"{path}: ClassLabel names of {label!r} are not a list of strings")
    return Shard(path, rows, image, label, encoded, size, names, _json_meta(meta, OUR_KEY, path))


def _flat_uint8(column, n: int, size: int, where: str) -> np.ndarray:
    """An Array3D column (any list kind, possibly sliced) as (n, S, S, 3) uint8; every row must be S x S x 3."""
    import pyarrow.compute as pc

    pa, _ = _arrow()
    a = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if isinstance(a, pa.ExtensionArray):  # datasets imported in this process registers Array3D
        a = a.storage
    for want in (size, size, 3):
        if a.null_count:
            raise FormatError(f"{where}: an image (or a row of one) is null")
        if pa.types.is_fixed_size_list(a.type):
            if a.type.list_size != want:
                raise FormatError(f"{where}: an image dimension of {a.type.list_size}, expected {want}")
        else:
            lengths = np.asarray(pc.list_value_length(a).to_numpy(zero_copy_only=False))
            bad = np.flatnonzero(lengths != want)
            if len(bad):
                raise FormatError(f"{where}: an image with a dimension of {int(lengths[bad[0]])}, expected {want} "
                                  f"(images must be {size}x{size}x3)")
        a = a.flatten()
    if a.null_count:
        raise FormatError(f"{where}: null pixel values")
    return np.asarray(a.to_numpy(zero_copy_only=False), np.uint8).reshape(n, size, size, 3)


def decode(data: bytes, size: int | None, where: str) -> np.ndarray:
    """Encoded image bytes -> (S, S, 3) uint8 with Pillow (exact for PNG; JPEG as Pillow decodes it); its size
    is checked before its pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=ENCODINGS) as im:
            if size is None and max(im.size) > MAX_SIZE:  # the header says it: checked before any pixel is decoded
                raise FormatError(f"{where}: a {im.size[0]}x{im.size[1]} image, larger than {MAX_SIZE} px: not a "
                                  "downsampled dataset (full-size photos: a raw copy of ImageNet is built with "
                                  "`dsimagenet build --train ...`)")
            if im.size[0] != im.size[1] or (size is not None and im.size != (size, size)):
                want = f"{size}x{size}" if size else "square"
                raw = "" if im.size[0] == im.size[1] else \
                    " (full-size photos: a raw copy of ImageNet is built with `dsimagenet build --train ...`)"
                raise FormatError(f"{where}: a {im.size[0]}x{im.size[1]} image, expected {want}{raw}")
            if im.mode not in ("RGB", "L", "P"):
                raise FormatError(f"{where}: a {im.mode} image, expected RGB (or grayscale)")
            im = im.convert("RGB") if im.mode != "RGB" else im
            return np.asarray(im, np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"{where}: an image that cannot be decoded ({e})") from None


def _decoded(column, size: int | None, where: str) -> np.ndarray:
    pa, _ = _arrow()
    a = column.combine_chunks()
    if pa.types.is_struct(a.type):
        if a.null_count:
            raise FormatError(f"{where}: a null image")
        a = a.field("bytes")
    values = a.to_pylist()
    out = None
    for i, v in enumerate(values):
        if v is None:
            raise FormatError(f"{where}: row {i}: an image without bytes (a path to a file elsewhere, or null): "
                              "the parquet file must hold its images")
        img = decode(v, size, f"{where}: row {i}")
        if out is None:
            size = img.shape[0]
            out = np.empty((len(values), size, size, 3), np.uint8)
        out[i] = img
    return out if out is not None else np.empty((0, size or 0, size or 0, 3), np.uint8)


def first_size(shard: Shard) -> int | None:
    """S of a shard: from its schema, else from its first image."""
    if shard.size is not None:
        return shard.size
    for images, _ in iter_rows(shard, None, limit=1):
        return images.shape[1]
    return None


def iter_rows(shard: Shard, size: int | None, limit: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images (n, S, S, 3) uint8, stored labels int64), one row group at a time."""
    pa, pq = _arrow()
    try:
        pf = _open(shard.path)
    except (pa.ArrowException, OSError) as e:
        raise _damaged(shard.path, e) from None
    for g in range(pf.num_row_groups):
        where = f"{shard.path}: row group {g}"
        try:
            if limit is not None:
                t = next(pf.iter_batches(batch_size=limit, row_groups=[g], columns=[shard.image, shard.label]))
                t = pa.Table.from_batches([t])
            else:
                t = pf.read_row_group(g, columns=[shard.image, shard.label])
        except StopIteration:
            continue
        except (pa.ArrowException, OSError) as e:  # a truncated or damaged file shows here
            raise _damaged(where, e) from None
        lab = t.column(shard.label).combine_chunks()
        if lab.null_count:
            raise FormatError(f"{where}: a null label")
        labels = np.asarray(lab.to_numpy(zero_copy_only=False), np.int64)
        if shard.encoded:
            images = _decoded(t.column(shard.image), size, where)
        else:
            if size is None:
                size = _first_len(t.column(shard.image), where)
            images = _flat_uint8(t.column(shard.image), t.num_rows, size, where)
        del t
        yield images, labels
        if limit is not None:
            return


def _first_len(column, where: str) -> int:
    a = column.combine_chunks()
    if isinstance(a, _arrow()[0].ExtensionArray):
        a = a.storage
    if len(a) == 0 or a[0] is None or not a[0].is_valid:
        raise FormatError(f"{where}: no image to learn the image size from")
    return len(a[0])


# --- writing -----------------------------------------------------------------------------------------------

def rows_per_group(size: int) -> int:
    return int(max(64, min(1 << 16, GROUP_BYTES // (3 * size * size))))


def rows_per_shard(size: int) -> int:
    group = rows_per_group(size)
    return group * max(1, SHARD_BYTES // (group * 3 * size * size))


def shard_name(split: str, index: int, total: int) -> str:
    return f"{HUB_SPLIT[split]}-{index:05d}-of-{total:05d}.parquet"


def schema(size: int, table: ClassTable):
    """The schema of our shards: what ``datasets`` writes for Array3D + ClassLabel features, and our table."""
    pa, _ = _arrow()
    image_type = pa.list_(pa.list_(pa.list_(pa.uint8())))
    ext = {b"ARROW:extension:name": ARRAY3D.encode(),
           b"ARROW:extension:metadata": json.dumps([[size, size, 3], "uint8"]).encode()}
    features = {"image": {"shape": [size, size, 3], "dtype": "uint8", "_type": "Array3D"},
                "label": {"names": list(table.wnids), "_type": "ClassLabel"}}
    ours = {"dsimagenet_parquet": VERSION, "image_size": size, "label_base": 0,  # label k is wnids[k]
            "wnids": list(table.wnids), "names": list(table.names)}
    # nullable, as datasets writes them: a non-nullable label made datasets drop its ClassLabel feature
    return pa.schema([pa.field("image", image_type, metadata=ext), pa.field("label", pa.int64())],
                     metadata={HF_KEY: json.dumps({"info": {"features": features}}).encode(),
                               OUR_KEY: json.dumps(ours).encode()})


def _table(images: np.ndarray, labels0: np.ndarray, sch):
    pa, _ = _arrow()
    n, s = len(images), images.shape[1]
    flat = pa.array(np.ascontiguousarray(images).reshape(-1), pa.uint8())
    pixels = pa.ListArray.from_arrays(pa.array(np.arange(0, n * s * s * 3 + 1, 3, dtype=np.int32)), flat)
    rows = pa.ListArray.from_arrays(pa.array(np.arange(0, n * s * s + 1, s, dtype=np.int32)), pixels)
    image = pa.ListArray.from_arrays(pa.array(np.arange(0, n * s + 1, s, dtype=np.int32)), rows)
    return pa.Table.from_arrays([image, pa.array(np.asarray(labels0, np.int64))], schema=sch)


def _writer(path: Path, sch):
    """zstd (every reader of parquet the Hub's tools use has it), and a CRC of every page, which our reader
    checks: a flipped byte in the pixels is an error, not other pixels."""
    return _arrow()[1].ParquetWriter(path, sch, compression="zstd", write_page_checksum=True)


def write_shard(path: Path, read: Callable[[int, int], np.ndarray], labels0: np.ndarray, size: int,
                table: ClassTable) -> str:
    """Rows 0..len(labels0) of ``read`` into the shard ``path``, a row group at a time, under a temp name until
    complete; returns its sha256."""
    from dsimagenet.checksum import digest

    sch, tmp, group = schema(size, table), temp_path(path), rows_per_group(size)
    try:
        with _writer(tmp, sch) as w:
            for a in range(0, len(labels0), group):
                b = min(a + group, len(labels0))
                w.write_table(_table(read(a, b), labels0[a:b], sch), row_group_size=b - a)
        commit(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return digest(path)


@dataclass(frozen=True)
class ShardJob:
    """One shard, to write in any process (the job pickles when ``read`` does): ``run()`` -> {name: sha256}."""

    path: Path
    read: Callable[[int, int], np.ndarray]
    start: int
    labels0: np.ndarray
    size: int
    table: ClassTable

    @property
    def nbytes(self) -> int:
        return len(self.labels0) * 3 * self.size ** 2

    def run(self) -> dict[str, str]:
        return {self.path.name: write_shard(self.path, lambda a, b: self.read(self.start + a, self.start + b),
                                            self.labels0, self.size, self.table)}


class SplitWriter:
    """One split as shards, from its ``count`` images (NHWC, as a build computes them): ``jobs(read, labels)``
    (1-based labels into ``table``) gives a ``ShardJob`` per shard; ``add`` takes their checksums; ``close()``
    checks every shard is in and returns {file name: sha256}."""

    def __init__(self, root: str | Path, split: str, count: int, size: int, table: ClassTable):
        self.root, self.split, self.count, self.size, self.table = Path(root), split, count, size, table
        per = rows_per_shard(size)
        self.bounds = [(a, min(a + per, count)) for a in range(0, count, per)] or [(0, 0)]
        self.checksums: dict[str, str] = {}

    def jobs(self, read: Callable[[int, int], np.ndarray], labels: np.ndarray) -> list[ShardJob]:
        labels0 = np.asarray(labels, np.int64) - 1  # parquet labels count from 0, as ClassLabel does
        return [ShardJob(self.root / shard_name(self.split, i, len(self.bounds)), read, a, labels0[a:b],
                         self.size, self.table) for i, (a, b) in enumerate(self.bounds)]

    def add(self, checksums: dict[str, str]) -> None:
        self.checksums.update(checksums)

    def close(self) -> dict[str, str]:
        missing = [n for i in range(len(self.bounds)) if (n := shard_name(self.split, i, len(self.bounds)))
                   not in self.checksums]
        if missing:
            raise ValueError(f"{self.root}: {', '.join(missing)} not written")
        return dict(self.checksums)


class StreamWriter:
    """A split written as rows arrive (a conversion, whose count is known only at the end): each shard is
    written under a temp name and takes its ``-NNNNN-of-MMMMM`` name at ``close()``, when the count is known."""

    def __init__(self, root: str | Path, split: str, size: int, table: ClassTable):
        self.root, self.split, self.size, self.table = Path(root), split, size, table
        self.per, self.group = rows_per_shard(size), rows_per_group(size)
        self.sch = schema(size, table)
        self.done: list[Path] = []  # finished shards, under temp names
        self.writer, self.rows, self.pending = None, 0, []

    def _path(self, i: int) -> Path:
        return temp_path(self.root / f"{HUB_SPLIT[self.split]}-{i:05d}.parquet")

    def append(self, images: np.ndarray, labels: np.ndarray) -> None:
        """NHWC images and their 1-based labels."""
        labels0 = np.asarray(labels, np.int64) - 1
        a = 0
        while a < len(images):
            if self.writer is None:
                self.writer = _writer(self._path(len(self.done)), self.sch)
                self.rows = 0
            b = min(len(images), a + self.per - self.rows)
            for c in range(a, b, self.group):
                d = min(b, c + self.group)
                self.writer.write_table(_table(images[c:d], labels0[c:d], self.sch), row_group_size=d - c)
            self.rows += b - a
            a = b
            if self.rows == self.per:
                self._finish_shard()

    def _finish_shard(self) -> None:
        self.writer.close()
        self.done.append(self._path(len(self.done)))
        self.writer = None

    def close(self) -> dict[str, str]:
        """The shards under their final names; {file name: sha256}."""
        from dsimagenet.checksum import digest

        if self.writer is not None or not self.done:
            if self.writer is None:  # an empty split: one empty shard, so that the split exists
                self.writer = _writer(self._path(0), self.sch)
            self._finish_shard()
        out = {}
        for i, tmp in enumerate(self.done):
            final = self.root / shard_name(self.split, i, len(self.done))
            commit(tmp, final)
            out[final.name] = digest(final)
        return out

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.done.append(self._path(len(self.done)))
        for p in self.done:
            if p.exists():
                p.unlink()
