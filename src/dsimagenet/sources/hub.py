"""Raw ILSVRC-2012 as the Hugging Face Hub serves it, as a source: ``ILSVRC/imagenet-1k`` parquet shards and
``timm/imagenet-1k-wds`` WebDataset tar shards (../shared/reference/hub.md), indexed without extracting anything.

    dsimagenet build --train imagenet-1k --val imagenet-1k --out out    # the parquet copy: data/*.parquet
    dsimagenet build --train imagenet-1k-wds --val imagenet-1k-wds --out out   # imagenet1k-{train,validation}-*.tar

Parquet: ``ROOT/data/{train,validation}-NNNNN-of-NNNNN.parquet`` (or the shards in ROOT itself, or one .parquet
file), columns ``image`` (``{bytes, path}``: the original JPEG bytes) and ``label`` (0..999 in sorted-WNID order,
-1 in test). Listing reads each shard's footer and its ``label`` and ``image.path`` columns, row group by row group;
the build gives each worker whole row groups in file order (``Listing.in_file_order``, build._bounds), which it
streams a few rows at a time (``read_parquet_image``): memory stays flat whatever the row groups' size.
WebDataset: ``imagenet1k-{train,validation}-NNNN.tar``; a sample is the members sharing a key: ``KEY.jpg``,
``KEY.cls`` (the label as ASCII digits, sorted-WNID order), ``KEY.json`` (the original file name). Images are byte
ranges of the shards, read with one pread like the official tars'.

Labels are stored as devkit IDs, like every build. Each image is keyed by its original file name where the source
gives it (``n01440764/n01440764_10026.JPEG``, ``ILSVRC2012_val_00000001.JPEG``; the Hub's ``..._n01440764.JPEG``
suffix removed), so that a build from either layout orders and labels the images as a build of the official tars
does; a name that contradicts the label (its WNID, or the validation ground truth) is a bad entry.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np

from dsimagenet.labels import IMAGENET
from dsimagenet.sources.records import (
    Listing,
    Record,
    SourceError,
    drop_duplicate_keys,
    is_image_name,
    member_problem,
    printable,
    tar_members,
)

PARQUET = "Hugging Face parquet (ILSVRC/imagenet-1k)"
WEBDATASET = "WebDataset tar shards (timm/imagenet-1k-wds)"
SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val")}
_WDS_RE = re.compile(r"^(?:.*-)?(train|validation|val|test)-\d+\.tar$")
_PARQUET_RE = re.compile(r"^(train|validation|val|test)[-_.].*\.parquet$")
_WNID_RE = re.compile(r"^n\d{8}$")
_VAL_RE = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$")
_TEST = ("label -1: this is the test split (ImageNet's test labels were never published); build from the "
         "train and validation shards")
_SMALL_MEMBER = 1 << 16  # a .cls or .json member is a few bytes; more is not one


def _shard_files(path: Path) -> dict[str, list[Path]]:
    """{split name: shard files} under the folder ``path``: named by their split (``train-*.parquet``,
    ``*-train-NNNN.tar``) in ``path`` or ``path/data``, or any parquet (or WebDataset-named tar) in a folder named
    after its split there (``train/0000.parquet``: the Hub's converted-parquet layout)."""
    found: dict[str, list[Path]] = {}
    try:
        for folder in (path, path / "data"):
            if not folder.is_dir():
                continue
            for n in sorted(os.listdir(folder)):
                if m := _PARQUET_RE.match(n) or _WDS_RE.match(n):
                    found.setdefault(m.group(1), []).append(folder / n)
            for split in ("train", "validation", "val", "test"):
                if (folder / split).is_dir():
                    found.setdefault(split, []).extend(folder / split / n for n in sorted(os.listdir(folder / split))
                                                       if n.endswith(".parquet") or _WDS_RE.match(n))
    except OSError as e:  # never "not a Hub copy" for a folder that could not be looked at
        raise SourceError(f"{printable(str(path))}: cannot list this folder: {e.strerror or e}") from None
    return {k: v for k, v in found.items() if v}


def detect(path: str | Path) -> str | None:
    """PARQUET or WEBDATASET when ``path`` is a Hub copy (a folder of its shards, or one shard), else None."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".parquet":
            return PARQUET
        return WEBDATASET if _WDS_RE.match(path.name) else None
    if not path.is_dir():
        return None
    kinds = {PARQUET if f.suffix == ".parquet" else WEBDATASET for fs in _shard_files(path).values() for f in fs}
    if len(kinds) > 1:
        raise SourceError(f"{path}: holds both parquet and WebDataset shards; give the folder of one of them")
    return kinds.pop() if kinds else None


def shards(path: Path, split: str, layout: str) -> list[Path]:
    """The shards of ``split`` ("train" or "val") under ``path``, sorted; a test split alone is refused."""
    flag = "--train" if split == "train" else "--val"
    if path.is_file():
        found = [path]
    else:
        named = _shard_files(path)
        found = sorted(f for s in SPLIT_NAMES[split] for f in named.get(s, []))
        if not found:
            has = sorted(named)
            why = (" (only the test split, whose labels were never published)" if has == ["test"] else
                   f" (it holds {', '.join(has)})")
            raise SourceError(f"{flag} {path}: a {layout} copy with no {SPLIT_NAMES[split][0]} shards{why}")
    test = [p for p in found if p.name.startswith("test") or "-test-" in p.name or p.parent.name == "test"]
    if test:
        raise SourceError(f"{flag} {test[0]}: {_TEST}")
    return found


def list_hub(path: str | Path, split: str, truth: np.ndarray | None = None) -> Listing:
    """The images of ``split`` in the Hub copy at ``path``; ``truth`` (devkit IDs of val images 1..50000), when
    given, checks the labels of validation images whose original names the source gives."""
    path = Path(path)
    layout = detect(path)
    if layout is None:
        raise SourceError(f"{path}: neither Hugging Face parquet shards nor WebDataset tar shards")
    files = shards(path, split, layout)
    names = [printable(str(f.relative_to(path))) if path.is_dir() else f.name for f in files]  # for messages
    span = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
    count = f"{len(files)} shard{'' if len(files) == 1 else 's'}"
    listing = Listing([], list(IMAGENET.wnids), True, layout=f"{layout}: {count} ({span})")
    for f, name in zip(files, names, strict=True):
        (_list_parquet if layout == PARQUET else _list_wds)(listing, f, name, split, truth)
    listing.records.sort()
    drop_duplicate_keys(listing)  # the same image twice (e.g. a shard copied under two names)
    listing.in_file_order = layout == PARQUET
    return listing


def _key(name: str | None, label: int, split: str, where: str, listing: Listing,
         truth: np.ndarray | None) -> str | None:
    """The record key of an image of class ``label`` (a devkit ID) from its original file name, as the tar
    build names it; None (and a bad entry) when the name contradicts the label. ``where`` names it otherwise."""
    wnid = IMAGENET.wnid(label)
    if not name:
        return f"{wnid}/{where}" if split == "train" else where
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, ext = base.rpartition(".")
    head, _, tail = stem.rpartition("_")
    if head and tail in IMAGENET:  # the Hub's "n01440764_10026_n01440764.JPEG": the class appended
        if tail != wnid:
            listing.problems.append((where, f"labelled {wnid} but its file name {printable(name)!r} says {tail}"))
            return None
        base = f"{head}{dot}{ext}"
    first = base.split("_", 1)[0]
    if split == "train" and _WNID_RE.match(first) and first in IMAGENET and first != wnid:
        listing.problems.append((where, f"labelled {wnid} but its file name {printable(name)!r} says {first}"))
        return None
    m = _VAL_RE.match(base)
    if split == "val" and m and truth is not None and 1 <= int(m.group(1)) <= len(truth):
        want = int(truth[int(m.group(1)) - 1])
        if want and want != label:
            listing.problems.append((where, f"labelled {wnid}, the validation ground truth says "
                                            f"{IMAGENET.wnid(want)}"))
            return None
    return f"{wnid}/{printable(base)}" if split == "train" else printable(base)


def _devkit_of_sorted(names: list | None, where: str) -> np.ndarray:
    """Devkit ID of each stored label: the ClassLabel names when they are WNIDs (each once), else ImageNet's
    class names in the order they are in (ILSVRC/imagenet-1k's are human-readable, in sorted-WNID order:
    hub.md); no names: sorted-WNID order. Names that say neither are refused, never read as sorted order: a
    copy relabelled in another order would build with every image under another class."""
    from dsimagenet.formats.hublabels import order_of_names

    if names is None:
        return IMAGENET.sorted_to_devkit
    if len(names) != len(IMAGENET):
        raise SourceError(f"{where}: its ClassLabel has {len(names)} names; ImageNet-1k has {len(IMAGENET)}: "
                          "not ILSVRC-2012")
    if not all(isinstance(n, str) for n in names):
        raise SourceError(f"{where}: its ClassLabel names are not all strings")
    if all(n in IMAGENET for n in names):
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise SourceError(f"{where}: its ClassLabel names class {twice} twice: two labels would be one class")
        return np.array([IMAGENET.devkit_id(n) for n in names], np.int64)
    order = order_of_names(names)
    if order == "sorted":
        return IMAGENET.sorted_to_devkit
    if order == "devkit":
        return np.arange(1, len(IMAGENET) + 1, dtype=np.int64)
    raise SourceError(f"{where}: its ClassLabel names are neither ImageNet's WNIDs nor its class names in "
                      "sorted-WNID or devkit order: which class each label is cannot be known")


# --- parquet -----------------------------------------------------------------------------------------------

def _open_parquet(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:  # no footer (cut short), not parquet at all, unreadable
        raise SourceError(f"{path}: not a readable parquet file (truncated or not parquet?): {e}") from None


def _image_column(pf, path: Path) -> tuple[str, bool]:
    """The column holding the image bytes and whether ``image`` has a ``path`` child; the schema checked."""
    import pyarrow as pa

    schema = pf.schema_arrow
    names = schema.names
    if "image" not in names or "label" not in names:
        raise SourceError(f"{path}: expected columns 'image' and 'label' (ILSVRC/imagenet-1k), found {names}")
    image, label = schema.field("image").type, schema.field("label").type
    if not pa.types.is_integer(label):
        raise SourceError(f"{path}: column 'label' is {label}, expected integers (a ClassLabel)")
    if pa.types.is_struct(image):
        children = {image.field(i).name: image.field(i).type for i in range(image.num_fields)}
        kind, name = children.get("bytes"), children.get("path")
        if name is not None and not (pa.types.is_string(name) or pa.types.is_large_string(name)):
            # the original file name keys and checks each image: any other type is not the Image feature's
            raise SourceError(f"{path}: column 'image' has a 'path' of type {name}, expected the Image feature's "
                              "string (the original file name)")
        if kind is not None and (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
            return "image.bytes", name is not None
    elif pa.types.is_binary(image) or pa.types.is_large_binary(image):
        return "image", False
    raise SourceError(f"{path}: column 'image' is {image}, expected the Image feature's struct<bytes: binary, "
                      "path: string> of encoded images (a downsampled copy with Array3D pixels is opened with "
                      "open_dataset, not built)")


def _class_names(pf, path: Path) -> list | None:
    """The ClassLabel names from the ``huggingface`` schema metadata, or None where there are none."""
    raw = (pf.schema_arrow.metadata or {}).get(b"huggingface")
    if raw is None:
        return None
    try:
        info = json.loads(raw)
        features = info.get("info", info)["features"]
        names = features["label"].get("names")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SourceError(f"{path}: its 'huggingface' schema metadata is not the datasets library's JSON "
                          f"({type(e).__name__}: {e})") from None
    if names is not None and not isinstance(names, list):
        raise SourceError(f"{path}: the label's ClassLabel names are not a list")
    return names


def _list_parquet(listing: Listing, path: Path, shard: str, split: str, truth: np.ndarray | None) -> None:
    import pyarrow as pa

    pf = _open_parquet(path)
    _, has_path = _image_column(pf, path)
    devkit = _devkit_of_sorted(_class_names(pf, path), str(path))
    columns = ["label", "image.path"] if has_path else ["label"]
    row = 0
    for g in range(pf.metadata.num_row_groups):  # one row group's labels and names at a time
        try:
            t = pf.read_row_group(g, columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise SourceError(f"{path}: row group {g} cannot be read (truncated or damaged?): {e}") from None
        labels = t.column("label").to_pylist()
        names = t.column("image").combine_chunks().field("path").to_pylist() if has_path else [None] * len(labels)
        for i, (label, name) in enumerate(zip(labels, names, strict=True)):
            where = f"{shard} row {row + i}"
            if label == -1:
                raise SourceError(f"{path}: row {row + i}: {_TEST}")
            if label is None or not 0 <= label < len(devkit):
                listing.problems.append((where, f"label {label} is not a class 0..{len(devkit) - 1}"))
                continue
            d = int(devkit[label])
            if (key := _key(name, d, split, where, listing, truth)) is not None:
                listing.records.append(Record(key, d, str(path), i, 0, g, "" if where in key else where))
        row += len(labels)


class _RowGroups:
    """A worker's parquet state: a few open files, and a stream over the row group it reads now, ``_BATCH`` rows
    at a time (buffered reads: a row group of any size is never held whole). Records arrive in file order, so
    the stream only moves forward, and each row group is read once by one worker (build._bounds)."""

    def __init__(self, limit: int = 8):
        self.files: OrderedDict[str, tuple] = OrderedDict()
        self.limit = limit
        self.at, self.stream, self.start, self.batch = None, None, 0, None

    def _open(self, path: str) -> tuple:
        if path not in self.files:
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:  # buffer_size: column pages are read a buffer at a time, not a whole column chunk at once
                pf = pq.ParquetFile(path, buffer_size=_READ_BUFFER, pre_buffer=False)
            except (pa.ArrowException, OSError) as e:  # changed since it was listed
                raise OSError(f"not a readable parquet file: {e}") from None
            self.files[path] = (pf, _image_column(pf, Path(path))[0])
            while len(self.files) > self.limit:
                self.files.popitem(last=False)
        self.files.move_to_end(path)
        return self.files[path]

    def image(self, r: Record) -> bytes | None:
        import pyarrow as pa
        import pyarrow.compute as pc

        if self.at != (r.path, r.group) or r.offset < self.start:  # another row group, or behind: (re)start
            pf, column = self._open(r.path)
            self.batch = None  # the old batch freed before the next is read
            self.stream = pf.iter_batches(batch_size=_BATCH, row_groups=[r.group], columns=[column],
                                          use_threads=False)
            self.at, self.start, self.column = (r.path, r.group), 0, column
        try:
            while self.batch is None or r.offset >= self.start + len(self.batch):
                if self.batch is not None:
                    self.start += len(self.batch)
                col = next(self.stream).column(0)
                images = col.field("bytes") if self.column == "image.bytes" else col
                if col.null_count:  # a null image struct: its bytes child may hold anything
                    images = pc.if_else(col.is_valid(), images, pa.nulls(len(col), images.type))
                self.batch = images
        except StopIteration:
            self.at = None
            rows = self.start + (len(self.batch) if self.batch is not None else 0)
            raise OSError(f"row group {r.group} has {rows} rows, not "
                          f"{r.offset + 1}: the file changed since it was listed") from None
        except (pa.ArrowException, OSError) as e:
            self.at = None
            raise OSError(f"row group {r.group} cannot be read (truncated or damaged?): {e}") from None
        return self.batch[r.offset - self.start].as_py()


_BATCH = 32  # rows decoded at a time from a row group (about 3.5 MB of ImageNet JPEGs)
_READ_BUFFER = 1 << 20
_groups = _RowGroups()


def read_parquet_image(r: Record) -> bytes:
    """The encoded image of a parquet record (in a build worker); a row without image bytes is that image's
    error (ImageError: bad, or skipped with --skip-bad), a shard that cannot be read an OSError."""
    from dsimagenet.resize import ImageError

    data = _groups.image(r)
    if data is None:
        raise ImageError("no image bytes (null) in this row")
    return data


# --- WebDataset --------------------------------------------------------------------------------------------

def _sample_key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: the key is everything before the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _list_wds(listing: Listing, path: Path, shard: str, split: str, truth: np.ndarray | None) -> None:
    with open(path, "rb") as f:
        sample: dict = {}
        for m, offset in tar_members(f, str(path)):  # consecutive members with one key are a sample
            if m.isdir():
                continue
            where = f"{shard}:{printable(m.name)}"
            if (problem := member_problem(m)) is not None:
                listing.problems.append((where, problem))
                continue
            key, ext = _sample_key(m.name)
            if sample and sample["key"] != key:
                _wds_sample(listing, f, path, shard, sample, split, truth)
                sample = {}
            sample.setdefault("key", key)
            if ext in ("cls", "json"):
                if ext in sample:
                    listing.problems.append((where, f"a second .{ext} in sample {printable(key)}"))
                sample[ext] = (m, offset)
            elif is_image_name(m.name):
                sample.setdefault("images", []).append((m, offset))
            else:
                listing.ignored.append((where, "not an image, .cls or .json member"))
        if sample:
            _wds_sample(listing, f, path, shard, sample, split, truth)


def _small(f, path: Path, m, offset: int, what: str) -> bytes:
    if m.size > _SMALL_MEMBER:
        raise ValueError(f"{m.size:,} bytes: not a {what}")
    data = os.pread(f.fileno(), m.size, offset)
    if len(data) != m.size:
        raise SourceError(f"{path}: cut short inside {printable(m.name)}")
    return data


def _wds_sample(listing: Listing, f, path: Path, shard: str, sample: dict, split: str,
                truth: np.ndarray | None) -> None:
    key, images = printable(sample["key"]), sample.get("images", [])
    where = f"{shard}:{key}"
    if len(images) != 1:
        listing.problems.append((where, "a sample with no image (.jpg)" if not images else
                                 f"a sample with {len(images)} images"))
        return
    if "cls" not in sample:
        listing.problems.append((where, "a sample with no label (.cls)"))
        return
    m, offset = sample["cls"]
    try:
        text = _small(f, path, m, offset, "label").decode("ascii").strip()
        label = int(text)
    except (ValueError, UnicodeDecodeError):
        listing.problems.append((f"{where}.cls", "not an integer label (ASCII digits)"))
        return
    if label == -1:
        raise SourceError(f"{path}: {key}.cls: {_TEST}")
    if not 0 <= label < len(IMAGENET):
        listing.problems.append((f"{where}.cls", f"label {label} is not a class 0..{len(IMAGENET) - 1}"))
        return
    name = None
    if "json" in sample:
        jm, joffset = sample["json"]
        try:
            meta = json.loads(_small(f, path, jm, joffset, "metadata JSON"))
        except (ValueError, UnicodeDecodeError) as e:
            listing.problems.append((f"{where}.json", f"not readable JSON: {e}"))
            return
        name = meta.get("filename") if isinstance(meta, dict) else None
        name = name if isinstance(name, str) and name else None
    image, image_offset = images[0]
    where = f"{shard}:{printable(image.name)}"
    devkit = int(IMAGENET.sorted_to_devkit[label])
    if (k := _key(name or image.name, devkit, split, where, listing, truth)) is not None:
        listing.records.append(Record(k, devkit, str(path), image_offset, image.size, -1, where))
