"""A downsampled dataset laid out as the Hub lays datasets out, parquet or WebDataset shards, as one source:
its splits, image size, counts, class table, and its rows streamed with 1-based labels (as the official files
store them), whatever the files' own label order.

    src = open_hub("imagenet32-hub", "parquet", labels_in="devkit")
    for images, labels in src.batches("val"): ...     # (n, S, S, 3) uint8, 1-based devkit IDs
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dsimagenet.errors import ConfigError, FormatError
from dsimagenet.formats import hublabels, parquet, webdataset
from dsimagenet.formats.hublabels import Labels

FORMATS = (parquet.FORMAT, webdataset.FORMAT)


def detect(path: str | Path) -> str | None:
    """"parquet" or "webdataset" when ``path`` holds such shards (and nothing says otherwise), else None."""
    path = Path(path)
    if path.is_file():
        return parquet.FORMAT if path.suffix == ".parquet" else None
    if not path.is_dir():
        return None
    if parquet.find_shards(path):
        return parquet.FORMAT
    if webdataset.find_shards(path):
        return webdataset.FORMAT
    return None


@dataclass
class HubSource:
    path: Path
    format: str
    shards: dict[str, list]  # split -> parquet.Shard or tar paths
    labels: Labels | None  # None: the order is unknown (describe without --labels-in)
    image_size: int
    meta: dict  # what the files say about themselves: names, ours, image column kind (for provenance)
    known_counts: dict[str, int] = field(default_factory=dict)  # from parquet footers or our _info.json
    shard_lengths: dict[Path, int] = field(default_factory=dict)  # tar -> samples, as our _info.json lists them

    @functools.cached_property
    def counts(self) -> dict[str, int]:
        """Rows per split: parquet footers, our _info.json, else a pass over the tars' member headers (their
        data skipped), made only when asked (a reader that streams every row does not need it)."""
        return {split: self.known_counts[split] if split in self.known_counts else
                sum(webdataset.count(p) for p in group) for split, group in self.shards.items()}

    @property
    def splits(self) -> list[str]:
        return sorted(s for s in self.shards if s in ("train", "val"))

    def raw_batches(self, split: str) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
        """(images, stored labels, where) of a split, shard by shard."""
        if split not in self.shards:
            raise FileNotFoundError(f"{self.path}: no {split} shards (names with "
                                    f"{parquet.HUB_SPLIT.get(split, split)!r}) here")
        for shard in self.shards[split]:
            where = str(shard.path if self.format == parquet.FORMAT else shard)
            rows = parquet.iter_rows(shard, self.image_size) if self.format == parquet.FORMAT else \
                webdataset.iter_rows(shard, self.image_size, expect=self.shard_lengths.get(shard))
            for images, stored in rows:
                yield images, stored, where

    def batches(self, split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(images (n, S, S, 3) uint8, 1-based labels into ``labels.table``), streamed."""
        if self.labels is None:
            raise ConfigError(f"{self.path}: give --labels-in (devkit or sorted) to read its labels")
        for images, stored, where in self.raw_batches(split):
            yield images, self.labels.map(stored, where)


def _hub_meta(fmt: str, shards: dict, path: Path) -> tuple[list[str] | None, dict | None, dict]:
    """The ClassLabel names and our metadata, which every shard must agree on."""
    if fmt == webdataset.FORMAT:
        info = webdataset.read_info(path if path.is_dir() else path.parent) or {}
        ours = info.get(hublabels.META_KEY)
        return None, ours if isinstance(ours, dict) else None, {"info_json": bool(info)}
    all_shards = [s for group in shards.values() for s in group]
    first = all_shards[0]
    for s in all_shards[1:]:
        if (s.names, s.ours, s.encoded) != (first.names, first.ours, first.encoded) or \
                (s.size and first.size and s.size != first.size):
            raise FormatError(f"{s.path}: its schema (classes, image kind or size) differs from {first.path}'s: "
                              "shards of one dataset must agree")
    return first.names, first.ours, {"image_column": "encoded images (PNG/JPEG)" if first.encoded else
                                     "Array3D uint8"}


def open_hub(path: str | Path, fmt: str, labels_in: str | None = None, need_labels: bool = True) -> HubSource:
    """The Hub-layout dataset at ``path``: every shard's layout checked (parquet footers, or tar headers), the
    label order resolved (``hublabels.resolve``; with ``need_labels`` False an unknown order is left None)."""
    path = Path(path)
    hublabels.check_labels_in(labels_in)
    if fmt == parquet.FORMAT:
        found = parquet.find_shards(path)
        shards = {split: [parquet.inspect(p) for p in paths] for split, paths in found.items()}
    else:
        shards = webdataset.find_shards(path)
    shards = {k: v for k, v in shards.items() if k in ("train", "val")}
    if not shards:
        raise FileNotFoundError(f"{path}: no {fmt} train or validation shards here")
    names, ours, meta = _hub_meta(fmt, shards, path)
    meta.update(class_names=names is not None, written_by_dsimagenet=ours is not None)
    try:
        labels = hublabels.resolve(str(path), names, ours, labels_in)
    except ConfigError:
        if need_labels or labels_in is not None:  # a --labels-in that contradicts the files is never dropped
            raise
        labels = None
    lengths: dict[Path, int] = {}
    if fmt == parquet.FORMAT:
        counts = {split: sum(s.rows for s in group) for split, group in shards.items()}
        size = next((s.size for group in shards.values() for s in group if s.size), None)
        if size is None:
            size = next((parquet.first_size(s) for group in shards.values() for s in group if s.rows), None)
    else:
        info = webdataset.read_info(path) or {}
        ours_size = (info.get(hublabels.META_KEY) or {}).get("image_size") if isinstance(
            info.get(hublabels.META_KEY), dict) else None
        lengths = webdataset.info_lengths(info, shards)
        counts = {split: sum(lengths[p] for p in group) for split, group in shards.items()
                  if all(p in lengths for p in group)}
        size = ours_size if isinstance(ours_size, int) else None
        if size is None:
            size = next((imgs.shape[1] for group in shards.values() for p in group
                         for imgs, _ in webdataset.iter_rows(p, None, limit=1)), None)
    if size is None:
        raise FormatError(f"{path}: no images in its {fmt} shards")
    if not (isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= parquet.MAX_SIZE):
        # _info.json's image_size is only a few bytes: it must not size a reader's arrays unchecked
        raise FormatError(f"{path}: image size {size!r}: expected 1..{parquet.MAX_SIZE} px")
    return HubSource(path, fmt, shards, labels, size, meta, counts, lengths if fmt == webdataset.FORMAT else {})
