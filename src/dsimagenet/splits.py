"""Split names beyond the two stored splits: NAS-Bench-201's halves of ImageNet16-120, and a held-out part of train.

    >>> open_dataset("Imagenet16", "x-valid", classes=120)     # 3,000 of ImageNet16-120's 6,000 val images
    >>> canonical("validation")                                # TFDS's and Hugging Face's name for val
    'val'
    >>> mask = holdout(train.targets, 0.1, seed=0)             # 10% of each class, True where held out

The names a dataset opens with (``SPLITS``):

  train, val                   the stored splits; "validation" is val (the name TFDS and Hugging Face use)
  x-valid, x-test              NAS-Bench-201's two 3,000-image halves of ImageNet16-120's val (its "xvalid" and
                               "xtest", which its tables report as x-valid and x-test accuracy)
  search-train, search-valid   its two 75,850-image halves of ImageNet16-120's train (its "train" and "valid",
                               used to search: train on one half, validate on the other); named so that they do
                               not read as our train and val

NAS-Bench-201's files index ImageNet16-120 in the order ``open_dataset(path, <stored split>, classes=120)`` yields
(the official files' order, rows of devkit IDs 1..120). They ship in resources/nasbench201_splits.txt as one bit a
row (its header says where they come from and how it was made); each row list is checked against its sha256 when
first read. NAS-Bench-201 publishes such files for ImageNet16-120 only: none for 150 or 200 classes.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Sequence

import numpy as np

from dsimagenet.errors import ConfigError, FormatError

STORED = ("train", "val")
ALIASES = {"validation": "val"}
NASBENCH201 = ("x-valid", "x-test", "search-train", "search-valid")
SPLITS = STORED + tuple(ALIASES) + NASBENCH201
NASBENCH201_CLASSES = 120  # the only class count NAS-Bench-201 ships split files for
RESOURCE = "nasbench201_splits.txt"
HOLDOUT = "holdout"  # the split name of the part of train held out by --val-fraction
_HOLDOUT_STREAM = 0x686F6C64  # "hold": the holdout's random stream is its own, apart from the epochs' [seed, epoch]


def canonical(split) -> str:
    """The split's own name ("validation" -> "val"); ConfigError naming the names for anything else."""
    if isinstance(split, bool):
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, not {split!r}: for torchvision's "
                          f"train=True/False pass train={split}")
    if not isinstance(split, str) or split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, not {split!r:.60}")
    return ALIASES.get(split, split)


def resolve(split: str | None, train: bool | None) -> str:
    """The split asked for by ``split`` and/or torchvision's ``train`` (True: train, False: val); both given,
    they must agree (train=False with a half of val, or train=True with a half of train, agree)."""
    if train is not None and not isinstance(train, bool):
        raise ConfigError(f"train must be True, False or None, not {train!r:.40}")
    if split is None:
        return "train" if train is None or train else "val"
    name = canonical(split)
    if train is not None and (stored_split(name) == "train") != train:
        raise ConfigError(f"split={split!r} and train={train} contradict each other: {name} is drawn from the "
                          f"{stored_split(name)} split; pass one of them")
    return name


def stored_split(split: str) -> str:
    """The stored split a name draws its rows from."""
    name = canonical(split)
    return name if name in STORED else ("val" if name in ("x-valid", "x-test") else "train")


def _digest(rows: np.ndarray) -> str:
    return hashlib.sha256(",".join(map(str, rows.tolist())).encode()).hexdigest()


@functools.cache
def _nasbench201() -> dict[str, tuple[str, int, np.ndarray]]:
    """name -> (stored split, rows of ImageNet16-120 in it, ascending indices of the name's half), checked."""
    from importlib import resources

    text = resources.files("dsimagenet.resources").joinpath(RESOURCE).read_text(encoding="ascii")
    out = {}
    for line in (x for x in text.splitlines() if x and not x.startswith("#")):
        stored, n, one, zero, source, _, sum_one, sum_zero, bits = line.split(" ")
        n = int(n)
        mask = np.unpackbits(np.frombuffer(base64.b64decode(bits), np.uint8), count=n, bitorder="little")
        for name, bit, want in ((one, 1, sum_one), (zero, 0, sum_zero)):
            rows = np.flatnonzero(mask == bit)
            if _digest(rows) != want:  # a damaged installation: never select other rows without a word
                raise FormatError(f"dsimagenet/resources/{RESOURCE}: the rows of {name} (from {source}) do not match "
                                  "their sha256: the installation is damaged; reinstall dsimagenet")
            out[name] = (stored, n, rows)
    if set(out) != set(NASBENCH201):
        raise ValueError(f"dsimagenet/resources/{RESOURCE}: holds {sorted(out)}, expected {list(NASBENCH201)}")
    return out


def nasbench201_rows(split: str, kept: Sequence[str], count: int, imagenet: bool, where: str) -> np.ndarray:
    """The ascending rows of NAS-Bench-201's ``split`` among the ``count`` rows of its stored split opened with
    the classes ``kept`` (WNIDs); ConfigError unless those are ImageNet16-120's: ImageNet's classes (``imagenet``)
    with devkit IDs 1..120, and exactly the rows NAS-Bench-201's file indexes (naming both counts)."""
    from dsimagenet.labels import IMAGENET

    stored, rows, chosen = _nasbench201()[canonical(split)]
    first = {n: set(IMAGENET.wnids[:n]) for n in (120, 150, 200)}
    if imagenet and set(kept) in (first[150], first[200]):
        raise ConfigError(f"split {split!r}: NAS-Bench-201 publishes split files for ImageNet16-120 only "
                          f"(classes=120, --classes 120); there are none for ImageNet16-{len(kept)}")
    if not imagenet or set(kept) != first[NASBENCH201_CLASSES]:
        what = "ImageNet's classes" if imagenet else "classes that are not ImageNet's (a class-folder tree)"
        raise ConfigError(f"{where}: split {split!r} indexes the {stored} rows of ImageNet16-120 (devkit IDs 1..120):"
                          f" open it with classes=120 (--classes 120); this was opened with {len(kept)} {what}")
    if count != rows:
        raise ConfigError(f"{where}: split {split!r} indexes ImageNet16-120's {rows:,} {stored} images, and its "
                          f"{stored} split has {count:,} images of classes 1..120 (the official ImageNet16 files have "
                          f"{rows:,}; is this a subset, or capped by max_per_class?)")
    return chosen


def holdout_counts(per_class: np.ndarray, fraction: float) -> np.ndarray:
    """How many images of each class a holdout of ``fraction`` takes: ``fraction * n`` rounded half up."""
    return np.floor(fraction * np.asarray(per_class, np.float64) + 0.5).astype(np.int64)


def holdout(labels: np.ndarray, fraction: float, seed: int, classes: Sequence[str] | None = None,
            where: str = "train") -> np.ndarray:
    """A seeded, per-class stratified holdout: a bool mask over ``labels`` (0..C-1), True for the
    ``holdout_counts`` images of each class held out, chosen by ``numpy.random.default_rng([seed, "hold"])``
    (one uniform key a row; each class keeps its lowest keys). ConfigError, naming the class (``classes``: the
    WNIDs by label), when the fraction leaves a class with no training or no held-out image."""
    labels = np.asarray(labels, np.int64)
    if not 0 < fraction < 1:
        raise ConfigError(f"--val-fraction must be a number in (0, 1), not {fraction!r}")
    per_class = np.bincount(labels, minlength=len(classes) if classes is not None else 0)
    take = holdout_counts(per_class, fraction)
    present = per_class > 0
    smallest = int(per_class[present].min()) if present.any() else 0
    for bad, what in ((present & (take == 0), "no held-out image"),
                      (present & (take == per_class), "no training image")):
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            name = classes[k] if classes is not None else f"label {k}"
            fix = (f"choose a fraction in [{0.5 / smallest:.4g}, {1 - 0.5 / smallest:.4g}) (its smallest class has "
                   f"{smallest} images)" if smallest > 1 else
                   "a class of one image cannot be both trained on and held out: use a val split")
            raise ConfigError(f"--val-fraction {fraction:g} leaves {int(bad.sum())} class(es) of {where} with {what}, "
                              f"e.g. {name} ({per_class[k]} images, {take[k]} held out): {fix}")
    keys = np.random.default_rng([seed, _HOLDOUT_STREAM]).random(len(labels))
    order = np.lexsort((keys, labels))  # by class, then by key
    starts = np.searchsorted(labels[order], labels[order], side="left")
    rank = np.empty(len(labels), np.int64)
    rank[order] = np.arange(len(labels)) - starts
    return rank < take[labels]


def holdout_record(mask: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> dict:
    """What a run records of its holdout: enough to check, or recompute, the rows it held out."""
    rows = np.flatnonzero(mask)
    return {"name": HOLDOUT, "of": "train", "fraction": fraction, "seed": seed, "images": int(len(rows)),
            "per_class": np.bincount(np.asarray(labels)[rows]).tolist(), "rows_sha256": _digest(rows)}
