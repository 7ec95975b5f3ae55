"""The raw ILSVRC-2012 release as a source, in any of its common layouts, indexed without extracting anything.

Train (``--train``): ``ILSVRC2012_img_train.tar`` (a tar of 1000 class tars), a folder of ``<wnid>/`` folders or of
``<wnid>.tar`` files, or the Kaggle root (``ILSVRC/Data/CLS-LOC/train``).
Val (``--val``): ``ILSVRC2012_img_val.tar``, a flat folder of ``ILSVRC2012_val_%08d.JPEG``, a folder sorted into
``<wnid>/``, or the Kaggle root. Its labels come from ``--devkit`` (the devkit tar.gz: ``data/meta.mat`` and
``data/ILSVRC2012_validation_ground_truth.txt``), Kaggle's ``LOC_val_solution.csv``, or the ground truth bundled
with the package.
"""

from __future__ import annotations

import csv
import io
import os
import re
import stat
import tarfile
from pathlib import Path

import numpy as np

from dsimagenet.checksum import digest
from dsimagenet.labels import IMAGENET, NUM_VAL_IMAGES, val_ground_truth
from dsimagenet.sources import hub
from dsimagenet.sources.folder import follow, list_class_tree, scan
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

NUM_TRAIN_IMAGES = 1_281_167
KAGGLE_TRAIN = Path("ILSVRC/Data/CLS-LOC/train")
KAGGLE_VAL = Path("ILSVRC/Data/CLS-LOC/val")
MD5 = {"ILSVRC2012_img_train.tar": "1d675b47d978889d74fa0da5fadfb00e",
       "ILSVRC2012_img_val.tar": "29b22e2961454d5413ddabcf34fc5622",
       "ILSVRC2012_devkit_t12.tar.gz": "fa75699e90414af021442c21a62c3abf"}
_VAL_RE = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$")
# files of the release as downloaded (MD5's) and of Kaggle's copy, by which a raw release is recognised
RELEASE_FILES = (*MD5, "ILSVRC2012_img_train_t3.tar", "LOC_synset_mapping.txt", "LOC_val_solution.csv")


def release_kind(path: Path) -> str | None:
    """What raw ImageNet ``path`` is, when it is one (the release's tars, or the Kaggle layout), else None: a
    reader of downsampled data names it instead of taking its tars for WebDataset shards."""
    if path.name in RELEASE_FILES:
        return "a file of the raw ILSVRC-2012 release"
    if path.is_dir():
        if any((path / n).is_file() for n in RELEASE_FILES):
            return "the raw ILSVRC-2012 release (its original tars or the Kaggle layout)"
        if (path / KAGGLE_TRAIN.parent).is_dir():
            return "the raw ILSVRC-2012 release in the Kaggle layout"
    return None


def _class_tar(listing: Listing, f, where: str, wnid: str, base: int, limit: int) -> None:
    label = IMAGENET.devkit_id(wnid)
    for m, offset in tar_members(f, where, base, limit):
        key = f"{wnid}/{m.name}"
        if (problem := member_problem(m)) is not None:
            if not m.isdir():
                listing.problems.append((f"{where}:{printable(m.name)}", problem))
        elif not is_image_name(m.name):
            listing.ignored.append((f"{where}:{printable(m.name)}", "not an image file name"))
        else:
            listing.records.append(Record(key, label, str(f.name), offset, m.size))


def _wnid_of(name: str) -> str | None:
    stem = name[:-4] if name.endswith(".tar") else None
    return stem if stem in IMAGENET else None


def list_train(path: str | Path) -> Listing:
    path = Path(path)
    if not path.exists():
        raise SourceError(f"--train {path}: no such file or folder (expected ILSVRC2012_img_train.tar, a folder "
                          "of <wnid>/ folders or <wnid>.tar files, or the Kaggle root)")
    if hub.detect(path):  # ILSVRC/imagenet-1k parquet or timm/imagenet-1k-wds shards
        return hub.list_hub(path, "train")
    listing = Listing([], list(IMAGENET.wnids), True)
    if path.is_file():
        with open(path, "rb") as f:
            for m, offset in tar_members(f, str(path)):
                wnid = _wnid_of(Path(m.name).name)
                if m.isdir():
                    continue
                if wnid is None or not m.isfile():
                    listing.problems.append((f"{path}:{printable(m.name)}", "not a class tar <wnid>.tar"))
                    continue
                _class_tar(listing, f, f"{path}:{m.name}", wnid, offset, offset + m.size)
        listing.records.sort()
        drop_duplicate_keys(listing)  # e.g. a class tar twice in the train tar
        return listing
    if (path / KAGGLE_TRAIN).is_dir():
        path = path / KAGGLE_TRAIN
    entries = [(e, *follow(e)) for e in scan(path)]  # links followed, as in every tree the user points at
    tars = [Path(e.path) for e, st, _ in entries if st is not None and not stat.S_ISDIR(st.st_mode)
            and _wnid_of(e.name)]
    dirs = [e for e, st, _ in entries if st is not None and stat.S_ISDIR(st.st_mode)]
    if tars and not dirs:
        for t in tars:
            with open(t, "rb") as f:
                _class_tar(listing, f, str(t), t.name[:-4], 0, os.fstat(f.fileno()).st_size)
        listing.problems += [(printable(e.path), why) for e, st, why in entries if st is None]
        listing.records.sort()
        drop_duplicate_keys(listing)
        return listing
    if not dirs:
        raise SourceError(f"--train {path}: expected <wnid>/ class folders or <wnid>.tar files here, found neither")
    not_wnids = [printable(d.name) for d in dirs if d.name not in IMAGENET and not d.name.startswith(".")]
    if not_wnids:
        raise SourceError(f"--train {path}: {not_wnids[:3]} are not ILSVRC-2012 WNIDs (for another dataset use "
                          "--folder)")
    return list_class_tree(path, list(IMAGENET.wnids))


# The devkit's two files are 0.3 MB each and it holds a few dozen members: anything far larger is not a devkit,
# and is refused before it is read into memory.
_DEVKIT_MEMBER_BYTES = 16 << 20
_DEVKIT_MEMBERS = 10_000


def _devkit_members(path: Path) -> tuple[bytes, bytes]:
    """meta.mat and the ground truth's bytes. A truncated or corrupt .tar.gz fails in gzip, zlib or tarfile,
    each with its own exception: all of them are this file's fault."""
    import zlib

    want = {"data/meta.mat": None, "data/ILSVRC2012_validation_ground_truth.txt": None}
    try:
        with tarfile.open(path, "r:*") as tf:
            for n, m in enumerate(tf):
                if n >= _DEVKIT_MEMBERS:
                    raise SourceError(f"--devkit {path}: more than {_DEVKIT_MEMBERS:,} members: not the devkit")
                tail = "/".join(m.name.rsplit("/", 2)[-2:])
                if m.isfile() and tail in want and want[tail] is None:
                    if m.size > _DEVKIT_MEMBER_BYTES:
                        raise SourceError(f"--devkit {path}: {printable(m.name)} holds {m.size:,} bytes, the "
                                          f"devkit's holds about 0.3 MB: not the devkit")
                    want[tail] = tf.extractfile(m).read()
                    if all(v is not None for v in want.values()):
                        break
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:  # gzip.BadGzipFile is an OSError
        raise SourceError(f"--devkit {path}: not a readable tar.gz (truncated or damaged?): {e}") from None
    missing = [k for k, v in want.items() if v is None]
    if missing:
        raise SourceError(f"--devkit {path}: expected data/meta.mat and "
                          f"data/ILSVRC2012_validation_ground_truth.txt inside; {' and '.join(missing)} not found")
    return want["data/meta.mat"], want["data/ILSVRC2012_validation_ground_truth.txt"]


def parse_devkit(path: str | Path) -> np.ndarray:
    """Devkit IDs (in this package's table) of val images 1..50000, from ILSVRC2012_devkit_t12.tar.gz.

    The ground truth file holds the devkit's ILSVRC2012_IDs; they are mapped to WNIDs through meta.mat's own
    ID -> WNID pairs, so a meta.mat in another order still labels every image right."""
    import scipy.io

    path = Path(path)
    meta_bytes, gt_bytes = _devkit_members(path)
    try:
        synsets = scipy.io.loadmat(io.BytesIO(meta_bytes), squeeze_me=True)["synsets"]
        ids = np.asarray(synsets["ILSVRC2012_ID"], dtype=np.int64)
        wnids = [str(w) for w in synsets["WNID"]]
        leaves = np.asarray(synsets["num_children"]) == 0
        wnid_of_id = {int(i): w for i, w, leaf in zip(ids, wnids, leaves, strict=True) if leaf}
    except Exception as e:  # noqa: BLE001 - scipy's MAT parser raises many types on a damaged file
        raise SourceError(f"--devkit {path}: data/meta.mat is damaged or has no usable 'synsets' table "
                          f"({type(e).__name__}: {e})") from None
    if len(wnid_of_id) != 1000:
        raise SourceError(f"--devkit {path}: meta.mat lists {len(wnid_of_id)} leaf classes, expected 1000")
    try:
        lines = gt_bytes.decode("ascii").split()
    except UnicodeDecodeError as e:
        raise SourceError(f"--devkit {path}: the validation ground truth is not text (byte {e.start})") from None
    if len(lines) != NUM_VAL_IMAGES:
        raise SourceError(f"--devkit {path}: the validation ground truth has {len(lines):,} lines, expected "
                          f"{NUM_VAL_IMAGES:,}")
    out = np.zeros(NUM_VAL_IMAGES, np.int16)
    for k, x in enumerate(lines):
        wnid = wnid_of_id.get(int(x)) if x.isdigit() else None
        if wnid is None or wnid not in IMAGENET:
            raise SourceError(f"--devkit {path}: line {k + 1} of the validation ground truth, {x[:20]!r}, is not "
                              "a class ID of meta.mat")
        out[k] = IMAGENET.devkit_id(wnid)
    return out


def parse_kaggle_csv(path: str | Path) -> np.ndarray:
    """Devkit IDs of val images from Kaggle's LOC_val_solution.csv (the first WNID of each PredictionString);
    0 where an image is not listed."""
    out = np.zeros(NUM_VAL_IMAGES, np.int16)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
                raise SourceError(f"{path}: expected Kaggle's header 'ImageId,PredictionString', found "
                                  f"{','.join(reader.fieldnames or [])[:80]!r}")
            for row in reader:
                line = reader.line_num
                image, prediction = row["ImageId"] or "", row["PredictionString"] or ""
                m = re.fullmatch(r"ILSVRC2012_val_(\d{8})", image)
                number = int(m.group(1)) if m else 0
                wnid = prediction.split()[0] if prediction.split() else ""
                if not 1 <= number <= NUM_VAL_IMAGES or wnid not in IMAGENET:
                    raise SourceError(f"{path}: line {line}: expected ILSVRC2012_val_00000001..00050000 and a WNID "
                                      f"first in PredictionString, found {image[:40]!r}, {prediction[:40]!r}")
                label = IMAGENET.devkit_id(wnid)
                if out[number - 1] not in (0, label):
                    raise SourceError(f"{path}: line {line}: {image} is listed twice with different classes")
                out[number - 1] = label
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not UTF-8 text (byte {e.start} of a block): not Kaggle's "
                          "LOC_val_solution.csv") from None
    except csv.Error as e:
        raise SourceError(f"{path}: not a readable CSV file: {e}") from None
    return out


def val_labels(devkit: str | Path | None = None) -> tuple[np.ndarray, str]:
    """Ground truth for the val images and where it came from."""
    if devkit is None:
        return val_ground_truth(), "bundled"
    devkit = Path(devkit)
    if not devkit.exists():
        raise SourceError(f"--devkit {devkit}: no such file (expected ILSVRC2012_devkit_t12.tar.gz or Kaggle's "
                          "LOC_val_solution.csv)")
    if devkit.suffix == ".csv":
        return parse_kaggle_csv(devkit), str(devkit)
    return parse_devkit(devkit), str(devkit)


def list_val(path: str | Path, devkit: str | Path | None = None) -> tuple[Listing, str]:
    path = Path(path)
    if not path.exists():
        raise SourceError(f"--val {path}: no such file or folder (expected ILSVRC2012_img_val.tar, a folder of "
                          "ILSVRC2012_val_*.JPEG, a folder of <wnid>/ folders, or the Kaggle root)")
    if hub.detect(path):  # the Hub's own labels, each checked against the ground truth where the name is known
        truth, origin = val_labels(devkit)
        return hub.list_hub(path, "val", truth), f"the Hub copy's labels (checked against {origin})"
    if path.is_dir() and (path / KAGGLE_VAL).is_dir():
        if devkit is None and (path / "LOC_val_solution.csv").exists():
            devkit = path / "LOC_val_solution.csv"
        path = path / KAGGLE_VAL
    entries = [(e, *follow(e)) for e in scan(path)] if path.is_dir() else []  # links followed
    if any(st is not None and stat.S_ISDIR(st.st_mode) for _, st, _ in entries):
        return list_class_tree(path, list(IMAGENET.wnids)), "folder names"
    truth, origin = val_labels(devkit)
    listing = Listing([], list(IMAGENET.wnids), True)

    def add(name: str, where: str, file: str, offset: int, size: int) -> None:
        m = _VAL_RE.match(name)
        if not m or not 1 <= int(m.group(1)) <= NUM_VAL_IMAGES:
            (listing.ignored if not is_image_name(name) else listing.problems).append(
                (where, "not a validation image name ILSVRC2012_val_00000001..00050000.JPEG"))
            return
        label = int(truth[int(m.group(1)) - 1])
        if label == 0:
            listing.problems.append((where, f"no label for it in {origin}"))
            return
        listing.records.append(Record(name, label, file, offset, size))

    if path.is_file():
        with open(path, "rb") as f:
            for m, offset in tar_members(f, str(path)):
                if m.isdir():
                    continue
                if (problem := member_problem(m)) is not None:
                    listing.problems.append((f"{path}:{printable(m.name)}", problem))
                else:
                    add(Path(m.name).name, f"{path}:{m.name}", str(path), offset, m.size)
    else:
        for e, st, why in entries:
            if st is None:
                listing.problems.append((printable(e.path), why))
            elif not stat.S_ISREG(st.st_mode):
                listing.problems.append((printable(e.path), "not a regular file"))
            else:
                add(printable(e.name), printable(e.path), e.path, 0, st.st_size)
    listing.records.sort()
    drop_duplicate_keys(listing)  # the same name twice in the val tar (or under two folders in it)
    return listing, origin


def verify_md5(path: str | Path) -> None:
    """Check an official archive against its published MD5 (reads the whole file)."""
    path = Path(path)
    want = MD5.get(path.name)
    if want is None:
        raise SourceError(f"--verify: {path.name} is not one of the official archives whose MD5 is known "
                          f"({', '.join(MD5)})")
    md5 = digest(path, "md5")
    if md5 != want:
        raise SourceError(f"--verify: {path}: MD5 {md5}, the official archive has {want}: the download "
                          "is damaged or not the official file")
