"""The 1000 ILSVRC-2012 classes, their two label orders, and class subsets.

Two orders exist and both are in use:

* devkit order: the devkit's ILSVRC2012_ID, 1..1000 (kit fox = 1, tench = 449). The official downsampled
  files store these IDs as labels; inside Python we use ``devkit_id - 1``.
* sorted order: the WNIDs sorted as strings, 0..999 (tench = 0). torchvision's ``ImageFolder`` and
  ``ImageNet`` produce this order, so a pretrained torchvision head expects it.

    >>> from dsimagenet import labels
    >>> labels.IMAGENET.devkit_id("n01440764"), labels.IMAGENET.sorted_index("n01440764")
    (449, 0)
    >>> labels.subset(120).wnids[:2]          # NAS-Bench-201's ImageNet16-120: devkit IDs 1..120
    ('n02119789', 'n02100735')

CLI: ``dsimagenet classes [--order devkit|sorted] [--csv]``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np

from dsimagenet.errors import ConfigError

ORDERS = ("devkit", "sorted")
NUM_VAL_IMAGES = 50_000


def _resource_lines(name: str) -> list[str]:
    text = resources.files("dsimagenet.resources").joinpath(name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line and not line.startswith("#")]


@dataclass(frozen=True)
class ClassInfo:
    index: int  # the 0-based label in the chosen order
    wnid: str
    devkit_id: int  # 1-based, the label stored in the official files
    name: str


@dataclass(frozen=True)
class ClassTable:
    """An ordered set of classes. ``wnids[i]`` has devkit ID ``i + 1`` (the order of the label files)."""

    wnids: tuple[str, ...]
    names: tuple[str, ...]

    def __post_init__(self):
        if len(self.wnids) != len(self.names):
            raise ValueError(f"{len(self.wnids)} WNIDs but {len(self.names)} names")
        if len(set(self.wnids)) != len(self.wnids):
            dup = sorted({w for w in self.wnids if self.wnids.count(w) > 1})
            raise ValueError(f"duplicate class names in the class table: {dup[:5]}")

    def __len__(self) -> int:
        return len(self.wnids)

    def __repr__(self) -> str:  # one line: the dataclass's would list every WNID and name
        return f"ClassTable({_some(self.wnids, self.name)})"

    def __contains__(self, wnid: object) -> bool:
        return wnid in self._devkit_of

    @functools.cached_property
    def _devkit_of(self) -> dict[str, int]:
        return {w: i + 1 for i, w in enumerate(self.wnids)}

    @functools.cached_property
    def sorted_wnids(self) -> tuple[str, ...]:
        return tuple(sorted(self.wnids))

    @functools.cached_property
    def _sorted_of(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.sorted_wnids)}

    def devkit_id(self, wnid: str) -> int:
        try:
            return self._devkit_of[wnid]
        except KeyError:
            raise KeyError(f"{wnid!r} is not one of the {len(self)} classes") from None

    def sorted_index(self, wnid: str) -> int:
        try:
            return self._sorted_of[wnid]
        except KeyError:
            raise KeyError(f"{wnid!r} is not one of the {len(self)} classes") from None

    def wnid(self, devkit_id: int) -> str:
        if not 1 <= devkit_id <= len(self):
            raise ConfigError(f"devkit ID {devkit_id} is outside 1..{len(self)}")
        return self.wnids[devkit_id - 1]

    def name(self, wnid: str) -> str:
        return self.names[self.devkit_id(wnid) - 1]

    @functools.cached_property
    def devkit_to_sorted(self) -> np.ndarray:
        """``devkit_to_sorted[devkit_id - 1]`` is the sorted index, int64 (len(self),)."""
        return np.array([self._sorted_of[w] for w in self.wnids], dtype=np.int64)

    @functools.cached_property
    def sorted_to_devkit(self) -> np.ndarray:
        """``sorted_to_devkit[sorted_index]`` is the 1-based devkit ID, int64 (len(self),)."""
        return np.array([self._devkit_of[w] for w in self.sorted_wnids], dtype=np.int64)

    def table(self, order: str = "devkit") -> list[ClassInfo]:
        """Every class as a ClassInfo, in ``order`` ("devkit" or "sorted")."""
        return [
            ClassInfo(i, w, self.devkit_id(w), self.name(w)) for i, w in enumerate(self.ordered(order))
        ]

    def ordered(self, order: str) -> tuple[str, ...]:
        check_order(order)
        return self.wnids if order == "devkit" else self.sorted_wnids


def check_order(order: str) -> None:
    if order not in ORDERS:
        raise ConfigError(f"label order (--order) must be one of {ORDERS}, not {order!r}")


@functools.cache
def imagenet_classes() -> ClassTable:
    """The ILSVRC-2012 class table shipped with the package (from the devkit's map_clsloc.txt)."""
    wnids, names = [], []
    for line_no, line in enumerate(_resource_lines("map_clsloc.txt"), 1):
        wnid, devkit_id, name = line.split(" ", 2)
        if int(devkit_id) != line_no:  # the file is in devkit order; a reordered copy would mislabel all
            raise ValueError(f"map_clsloc.txt: line {line_no} has devkit ID {devkit_id}")
        wnids.append(wnid)
        names.append(name.replace("_", " "))
    return ClassTable(tuple(wnids), tuple(names))


IMAGENET = imagenet_classes()


@functools.cache
def _val_ground_truth() -> np.ndarray:
    ids = np.array([int(x) for x in _resource_lines("val_ground_truth.txt")], dtype=np.int16)
    if ids.shape != (NUM_VAL_IMAGES,) or ids.min() < 1 or ids.max() > 1000:
        raise ValueError("the bundled validation ground truth is damaged")
    ids.flags.writeable = False
    return ids


def val_ground_truth() -> np.ndarray:
    """Devkit IDs (1..1000) of ILSVRC2012_val_00000001 .. 00050000, as read-only int16 (50000,)."""
    return _val_ground_truth()


def val_label(filename: str) -> int:
    """The devkit ID of a validation image, from its file name (``ILSVRC2012_val_00000001.JPEG`` -> 490)."""
    stem = filename.rsplit("/", 1)[-1].split(".", 1)[0]
    prefix = "ILSVRC2012_val_"
    number = stem[len(prefix):]
    if not stem.startswith(prefix) or not number.isdigit() or not 1 <= int(number) <= NUM_VAL_IMAGES:
        raise ConfigError(f"{filename!r} is not a validation image name ILSVRC2012_val_00000001..00050000")
    return int(_val_ground_truth()[int(number) - 1])


def _some(wnids: Sequence[str], name, of: int | None = None, shown: int = 3) -> str:
    """``10 of 1,000 classes: n02119789 kit fox, n02100735 English setter, ..., n03000134 chainlink fence``."""
    def one(w: str) -> str:
        return f"{w} {name(w)}" if name(w) != w else w

    some = [one(w) for w in wnids] if len(wnids) <= shown + 1 else \
        [*(one(w) for w in wnids[:shown]), "...", one(wnids[-1])]
    count = f"{len(wnids):,}" + (f" of {of:,}" if of is not None else "")
    return f"{count} {'class' if len(wnids) == 1 and of is None else 'classes'}: " + ", ".join(some)


@dataclass(frozen=True)
class ClassSubset:
    """The classes kept, in their new label order: class ``wnids[i]`` gets label ``i``."""

    wnids: tuple[str, ...]
    table: ClassTable

    def __len__(self) -> int:
        return len(self.wnids)

    def __repr__(self) -> str:  # one line: which classes, of how many
        return f"ClassSubset({_some(self.wnids, self.table.name, len(self.table))})"

    @functools.cached_property
    def devkit_ids(self) -> np.ndarray:
        return np.array([self.table.devkit_id(w) for w in self.wnids], dtype=np.int64)

    @functools.cached_property
    def lookup(self) -> np.ndarray:
        """``lookup[devkit_id]`` is the new 0-based label, or -1 for a class not kept; int64 (C + 1,)."""
        lut = np.full(len(self.table) + 1, -1, dtype=np.int64)
        lut[self.devkit_ids] = np.arange(len(self.wnids))
        return lut

    def relabel(self, devkit_ids: np.ndarray) -> np.ndarray:
        """Map 1-based devkit IDs to new labels (-1 where the class is not kept)."""
        devkit_ids = np.asarray(devkit_ids)
        if devkit_ids.size and (devkit_ids.min() < 1 or devkit_ids.max() > len(self.table)):
            raise ConfigError(f"labels outside 1..{len(self.table)}: "
                             f"min {devkit_ids.min()}, max {devkit_ids.max()}")
        return self.lookup[devkit_ids]


def subset(classes: None | int | Sequence[str] = None, order: str = "devkit",
           table: ClassTable = IMAGENET) -> ClassSubset:
    """Choose classes and their new labels.

    ``classes``: None for all; an int N for the first N classes in devkit order (NAS-Bench-201's
    ImageNet16-120 is ``subset(120)``); or a list of WNIDs. The kept classes are labelled 0..len-1 in
    ``order``: by devkit ID ("devkit") or by WNID ("sorted"). ``table`` is any dataset's classes: for a class-
    folder dataset "devkit" is the build's label order (the folder names sorted) and the WNIDs are folder
    names, so both orders agree with torchvision's ImageFolder.
    """
    check_order(order)
    what = "ILSVRC-2012 classes" if table is IMAGENET else f"classes of this dataset ({len(table)})"
    if classes is None:
        kept = list(table.wnids)
    elif isinstance(classes, (int, np.integer)) and not isinstance(classes, bool):
        if not 1 <= classes <= len(table):
            raise ConfigError(f"classes={classes}: the number of classes (--classes) must be in 1..{len(table)}, "
                              f"the {what}")
        kept = list(table.wnids[:classes])
    elif isinstance(classes, (str, bytes)) or not isinstance(classes, Iterable):
        raise ConfigError(f"classes must be None, an int, a list of class names (WNIDs) or 'present', not "
                          f"{type(classes).__name__} {classes!r:.40}")
    else:
        kept = list(classes)
        if not kept:
            raise ConfigError("classes is an empty list")
        unknown = [w for w in kept if not isinstance(w, str) or w not in table]
        if unknown:
            raise ConfigError(f"not {what}: {unknown[:5]}")
        if len(set(kept)) != len(kept):
            raise ConfigError("classes lists a class twice")
    kept.sort(key=table.devkit_id if order == "devkit" else None)  # "sorted": by name, as torchvision sorts folders
    return ClassSubset(tuple(kept), table)
