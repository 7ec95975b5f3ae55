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
import hashlib
import io
import re
import tarfile
from pathlib import Path

import numpy as np

from dsimagenet.labels import IMAGENET, NUM_VAL_IMAGES, val_ground_truth
from dsimagenet.sources.folder import list_class_tree
from dsimagenet.sources.records import Listing, Record, SourceError, is_image_name, member_problem, tar_members

NUM_TRAIN_IMAGES = 1_281_167
KAGGLE_TRAIN = Path("ILSVRC/Data/CLS-LOC/train")
KAGGLE_VAL = Path("ILSVRC/Data/CLS-LOC/val")
MD5 = {"ILSVRC2012_img_train.tar": "1d675b47d978889d74fa0da5fadfb00e",
       "ILSVRC2012_img_val.tar": "29b22e2961454d5413ddabcf34fc5622",
       "ILSVRC2012_devkit_t12.tar.gz": "fa75699e90414af021442c21a62c3abf"}
_VAL_RE = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$")


def _class_tar(listing: Listing, f, where: str, wnid: str, base: int, limit: int) -> None:
    label = IMAGENET.devkit_id(wnid)
    for m, offset in tar_members(f, where, base, limit):
        key = f"{wnid}/{m.name}"
        if (problem := member_problem(m)) is not None:
            if not m.isdir():
                listing.problems.append((f"{where}:{m.name}", problem))
        elif not is_image_name(m.name):
            listing.ignored.append((f"{where}:{m.name}", "not an image file name"))
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
    listing = Listing([], list(IMAGENET.wnids), True)
    if path.is_file():
        with open(path, "rb") as f:
            for m, offset in tar_members(f, str(path)):
                wnid = _wnid_of(Path(m.name).name)
                if m.isdir():
                    continue
                if wnid is None or not m.isfile():
                    listing.problems.append((f"{path}:{m.name}", "not a class tar <wnid>.tar"))
                    continue
                _class_tar(listing, f, f"{path}:{m.name}", wnid, offset, offset + m.size)
        listing.records.sort()
        return listing
    if (path / KAGGLE_TRAIN).is_dir():
        path = path / KAGGLE_TRAIN
    tars = sorted(p for p in path.glob("*.tar") if _wnid_of(p.name))
    dirs = [p for p in path.iterdir() if p.is_dir()]
    if tars and not dirs:
        for t in tars:
            with open(t, "rb") as f:
                _class_tar(listing, f, str(t), t.name[:-4], 0, t.stat().st_size)
        listing.records.sort()
        return listing
    if not dirs:
        raise SourceError(f"--train {path}: expected <wnid>/ class folders or <wnid>.tar files here, found neither")
    not_wnids = [d.name for d in dirs if d.name not in IMAGENET and not d.name.startswith(".")]
    if not_wnids:
        raise SourceError(f"--train {path}: {not_wnids[:3]} are not ILSVRC-2012 WNIDs (for another dataset use "
                          "--folder)")
    return list_class_tree(path, list(IMAGENET.wnids))


def parse_devkit(path: str | Path) -> np.ndarray:
    """Devkit IDs (in this package's table) of val images 1..50000, from ILSVRC2012_devkit_t12.tar.gz.

    The ground truth file holds the devkit's ILSVRC2012_IDs; they are mapped to WNIDs through meta.mat's own
    ID -> WNID pairs, so a meta.mat in another order still labels every image right."""
    import scipy.io

    path = Path(path)
    try:
        with tarfile.open(path, "r:*") as tf:
            members = {m.name.rsplit("/", 2)[-2] + "/" + m.name.rsplit("/", 1)[-1]: m for m in tf.getmembers()
                       if m.isfile() and m.name.count("/") >= 1}
            meta_m = members.get("data/meta.mat")
            gt_m = members.get("data/ILSVRC2012_validation_ground_truth.txt")
            if meta_m is None or gt_m is None:
                raise SourceError(f"--devkit {path}: expected data/meta.mat and "
                                  "data/ILSVRC2012_validation_ground_truth.txt inside")
            meta_bytes = tf.extractfile(meta_m).read()
            gt_text = tf.extractfile(gt_m).read().decode()
    except tarfile.TarError as e:
        raise SourceError(f"--devkit {path}: not a readable tar.gz: {e}") from None
    try:
        synsets = scipy.io.loadmat(io.BytesIO(meta_bytes), squeeze_me=True)["synsets"]
        ids = np.asarray(synsets["ILSVRC2012_ID"], dtype=np.int64)
        wnids = [str(w) for w in synsets["WNID"]]
        leaves = np.asarray(synsets["num_children"]) == 0
    except (KeyError, ValueError, TypeError) as e:
        raise SourceError(f"--devkit {path}: data/meta.mat has no usable 'synsets' table: {e}") from None
    wnid_of_id = {int(i): w for i, w, leaf in zip(ids, wnids, leaves, strict=True) if leaf}
    if len(wnid_of_id) != 1000:
        raise SourceError(f"--devkit {path}: meta.mat lists {len(wnid_of_id)} leaf classes, expected 1000")
    lines = [x for x in gt_text.split() if x]
    if len(lines) != NUM_VAL_IMAGES:
        raise SourceError(f"--devkit {path}: the validation ground truth has {len(lines):,} lines, expected "
                          f"{NUM_VAL_IMAGES:,}")
    try:
        return np.array([IMAGENET.devkit_id(wnid_of_id[int(x)]) for x in lines], dtype=np.int16)
    except (KeyError, ValueError) as e:
        raise SourceError(f"--devkit {path}: ground truth ID {e} is not a class of meta.mat") from None


def parse_kaggle_csv(path: str | Path) -> np.ndarray:
    """Devkit IDs of val images from Kaggle's LOC_val_solution.csv (the first WNID of each PredictionString);
    0 where an image is not listed."""
    out = np.zeros(NUM_VAL_IMAGES, np.int16)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                number = int(row["ImageId"].rsplit("_", 1)[1])
                out[number - 1] = IMAGENET.devkit_id(row["PredictionString"].split()[0])
            except (KeyError, IndexError, ValueError) as e:
                raise SourceError(f"{path}: bad row {row}: {e}") from None
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
    if path.is_dir() and (path / KAGGLE_VAL).is_dir():
        if devkit is None and (path / "LOC_val_solution.csv").exists():
            devkit = path / "LOC_val_solution.csv"
        path = path / KAGGLE_VAL
    if path.is_dir() and any(p.is_dir() for p in path.iterdir()):
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
                    listing.problems.append((f"{path}:{m.name}", problem))
                else:
                    add(Path(m.name).name, f"{path}:{m.name}", str(path), offset, m.size)
    else:
        for p in sorted(path.iterdir()):
            if p.is_symlink():
                listing.problems.append((str(p), "a symbolic link (links are not followed)"))
            elif p.is_file():
                add(p.name, str(p), str(p), 0, p.stat().st_size)
    listing.records.sort()
    return listing, origin


def verify_md5(path: str | Path) -> None:
    """Check an official archive against its published MD5 (reads the whole file)."""
    path = Path(path)
    want = MD5.get(path.name)
    if want is None:
        raise SourceError(f"--verify: {path.name} is not one of the official archives whose MD5 is known "
                          f"({', '.join(MD5)})")
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    if h.hexdigest() != want:
        raise SourceError(f"--verify: {path}: MD5 {h.hexdigest()}, the official archive has {want}: the download "
                          "is damaged or not the official file")
