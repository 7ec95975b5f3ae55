"""What the stored integers of a Hub-style dataset (parquet or WebDataset shards) mean, and which split a shard
is: shared by ``formats.parquet`` and ``formats.webdataset``.

A Hub copy of downsampled ImageNet stores labels as 0-based integers in one of two orders, and the integers
alone cannot say which: TFDS-derived copies count in devkit order (the official files' labels minus one),
copies made from ``ILSVRC/imagenet-1k`` in sorted-WNID order. The order is read off the ClassLabel names when
they identify the classes (WNIDs, or ImageNet's class names in one of the two orders); otherwise the user says
it (``labels_in``, ``--labels-in``), and it is never guessed.

    >>> resolve("x.parquet", names=None, ours=None, labels_in="sorted").to_devkit[0]   # tench: devkit ID 449
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsimagenet.errors import ConfigError, FormatError
from dsimagenet.labels import IMAGENET, ORDERS, ClassTable

LABELS_IN = ORDERS  # "devkit", "sorted"
# the split words the Hub's data-file patterns recognise, and ours
SPLIT_WORDS = {"train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val",
               "dev": "val", "test": "test", "testing": "test"}
_WORD = re.compile(r"(?:^|[-_.])(" + "|".join(sorted(SPLIT_WORDS, key=len, reverse=True)) + r")(?=[-_.]|$)")
_OF = re.compile(r"-(\d+)-of-(\d+)$")
META_KEY = "dsimagenet"  # our own class table, in parquet schema metadata and in a WebDataset's _info.json
# names that identify ImageNet's classes in an order must match ImageNet's at all but this many positions
# (ILSVRC/imagenet-1k renames the second of its two "crane" classes "crane2"; the other order matches ~0.1%)
_NAME_SLACK = 10


def split_of(path: Path, root: Path) -> str | None:
    """"train", "val" or "test" from a shard's name (``train-00000-of-00004.parquet``,
    ``imagenet1k-validation-0003.tar``) or from a folder between ``root`` and it (``default/train/0000.parquet``);
    None when neither says."""
    m = _WORD.search(path.name.split(".", 1)[0].lower())
    if m:
        return SPLIT_WORDS[m.group(1)]
    try:
        folders = path.parent.relative_to(root).parts
    except ValueError:
        folders = ()
    for part in reversed(folders):
        if part.lower() in SPLIT_WORDS:
            return SPLIT_WORDS[part.lower()]
    return None


def group_shards(root: Path, files: list[Path], kind: str) -> dict[str, list[Path]]:
    """{split: its shards in name order}; a shard whose split no name says, or a set ``-NNNNN-of-MMMMM`` with a
    shard missing, is an error (never skipped: a missing shard would drop its images silently)."""
    out: dict[str, list[Path]] = {}
    for f in sorted(files):
        split = split_of(f, root)
        if split is None:
            raise FormatError(f"{f}: which split this {kind} file holds is not in its name or folder: name it "
                              f"train-*, validation-* (or val-*), or put it in a train/ or validation/ folder")
        out.setdefault(split, []).append(f)
    for split, shards in out.items():
        sets: dict[tuple[Path, str, int], set[int]] = {}
        for f in shards:
            stem = f.name.split(".", 1)[0]
            m = _OF.search(stem)
            if m:
                sets.setdefault((f.parent, stem[:m.start()], int(m.group(2))), set()).add(int(m.group(1)))
        for (folder, prefix, total), have in sets.items():
            missing = [i for i in range(total) if i not in have]
            if missing:
                width = len(str(total - 1).zfill(5))
                raise FormatError(f"{folder}: {prefix}-{missing[0]:0{width}d}-of-{total:0{width}d} missing "
                                  f"({len(missing)} of the {total} {split} shards): the split would be incomplete")
    return out


@dataclass(frozen=True)
class Labels:
    """``to_devkit[k]`` is the 1-based label (into ``table``) of stored integer ``k``; ``source`` says how the
    order was known."""

    table: ClassTable
    to_devkit: np.ndarray
    source: str
    order: str | None  # "devkit" or "sorted" for ImageNet's classes in one of its orders, else None

    def map(self, stored: np.ndarray, where: str) -> np.ndarray:
        """Stored integers -> 1-based labels; negative (a test split) or out-of-range integers are errors."""
        stored = np.asarray(stored, np.int64)
        if stored.size and stored.min() < 0:
            raise FormatError(f"{where}: label {int(stored.min())}: a test split has no labels (-1); only the "
                              "train and validation splits can be read")
        if stored.size and stored.max() >= len(self.to_devkit):
            raise FormatError(f"{where}: label {int(stored.max())} out of range 0..{len(self.to_devkit) - 1} "
                              f"({self.source})")
        return self.to_devkit[stored]


def check_labels_in(labels_in: str | None) -> None:
    if labels_in is not None and labels_in not in LABELS_IN:
        raise ConfigError(f"--labels-in must be one of {LABELS_IN} (or left out when the files name their "
                          f"classes), not {labels_in!r}")


def _norm(name: str) -> str:
    return name.split(",", 1)[0].strip().replace("_", " ").casefold()


def order_of_names(names: list[str]) -> str | None:
    """"devkit" or "sorted" when ``names`` are ImageNet's 1000 class names (their first synonym, case and "_"
    aside) in that order, at all but a few positions; else None."""
    if len(names) != len(IMAGENET):
        return None
    got = [_norm(n) for n in names]
    refs = {"devkit": [_norm(n) for n in IMAGENET.names],
            "sorted": [_norm(IMAGENET.name(w)) for w in IMAGENET.sorted_wnids]}
    hits = {order: sum(a == b for a, b in zip(got, ref, strict=True)) for order, ref in refs.items()}
    best = max(hits, key=hits.get)
    return best if hits[best] >= len(names) - _NAME_SLACK else None


def _given(labels_in: str, source: str) -> Labels:
    if labels_in == "devkit":
        return Labels(IMAGENET, np.arange(1, len(IMAGENET) + 1, dtype=np.int64), source, "devkit")
    return Labels(IMAGENET, IMAGENET.sorted_to_devkit.copy(), source, "sorted")


def _by_wnid(wnids: list[str], source: str) -> Labels:
    """Stored integer k is class ``wnids[k]``: ImageNet's table when they are ImageNet WNIDs, else their own."""
    if len(set(wnids)) != len(wnids):
        raise FormatError(f"{source}: a class named twice")
    if all(w in IMAGENET for w in wnids):
        order = "devkit" if tuple(wnids) == IMAGENET.wnids else "sorted" if tuple(wnids) == IMAGENET.sorted_wnids \
            else None
        return Labels(IMAGENET, np.array([IMAGENET.devkit_id(w) for w in wnids], np.int64), source, order)
    return Labels(ClassTable(tuple(wnids), tuple(wnids)), np.arange(1, len(wnids) + 1, dtype=np.int64), source, None)


def resolve(where: str, names: list[str] | None, ours: dict | None, labels_in: str | None) -> Labels:
    """The meaning of the stored integers of the dataset at ``where``: from dsimagenet's own metadata
    (``ours``: {"wnids", "names"}, integer k is wnids[k]), from ClassLabel ``names`` that identify the classes,
    or from ``labels_in``. A ``labels_in`` that contradicts the names is an error; one that is needed and
    missing is a ConfigError naming --labels-in."""
    check_labels_in(labels_in)
    found: Labels | None = None
    if ours is not None:
        wnids, table_names = ours.get("wnids"), ours.get("names")
        if not (isinstance(wnids, list) and wnids and all(isinstance(w, str) and w for w in wnids)):
            raise FormatError(f"{where}: its dsimagenet metadata has no class list ('wnids')")
        if len(set(wnids)) != len(wnids):
            raise FormatError(f"{where}: its dsimagenet metadata names a class twice")
        # the table exactly as written (a build of some ImageNet classes' folders keeps its own table, as the
        # native files of the same build do): integer k is class k + 1 of it
        names_ok = isinstance(table_names, list) and len(table_names) == len(wnids)
        table = IMAGENET if tuple(wnids) == IMAGENET.wnids else \
            ClassTable(tuple(wnids), tuple(map(str, table_names)) if names_ok else tuple(wnids))
        found = Labels(table, np.arange(1, len(wnids) + 1, dtype=np.int64), f"dsimagenet metadata in {where}",
                       "devkit" if table is IMAGENET else None)
    elif names is not None and names and all(isinstance(n, str) for n in names):
        if all(n in IMAGENET for n in names):
            found = _by_wnid(names, f"ClassLabel names (WNIDs) in {where}")
        elif (order := order_of_names(names)) is not None:
            found = _given(order, f"ClassLabel names in {where} (ImageNet's, in {order} order)")
        elif len(names) != len(IMAGENET):
            if labels_in is not None:
                raise ConfigError(f"--labels-in {labels_in}: {where} names {len(names)} classes of its own "
                                  f"({', '.join(names[:3])}, ...), not ImageNet's 1000: their order is the names'")
            found = _by_wnid(names, f"ClassLabel names in {where} (classes of its own)")
    if found is None:
        if labels_in is None:
            why = "its ClassLabel names are not WNIDs or ImageNet's class names" if names else \
                "it has no ClassLabel names"
            raise ConfigError(f"{where}: the order of its integer labels cannot be read off the files ({why}); "
                              "give --labels-in devkit (the official files' labels minus one, as TFDS "
                              "imagenet_resized) or --labels-in sorted (sorted WNIDs, as torchvision and "
                              "ILSVRC/imagenet-1k)")
        return _given(labels_in, f"--labels-in {labels_in} (for {where})")
    if labels_in is not None and found.order != labels_in:
        raise ConfigError(f"--labels-in {labels_in}: the {found.source} say the labels are "
                          f"{found.order + ' order' if found.order else 'in an order of their own'}; leave "
                          "--labels-in out")
    return found
