"""Any class-folder tree as a source: ``root/train/<class>/<image>`` with an optional ``root/val/<class>/...``,
or just ``root/<class>/<image>`` (train only). Classes are sorted and labelled 1..C; a tree whose class names
are ILSVRC-2012 WNIDs is ImageNet, labelled with devkit IDs.
"""

from __future__ import annotations

from pathlib import Path

from dsimagenet.labels import IMAGENET
from dsimagenet.sources.records import Listing, Record, SourceError, is_image_name


def class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_class_tree(root: Path, wnids: list[str] | None = None) -> Listing:
    """Every image under ``root/<class>/`` (recursively), sorted. ``wnids`` fixes the class list (val uses
    train's); otherwise it is the sorted folder names, or ImageNet's when they are all ILSVRC-2012 WNIDs."""
    dirs = class_dirs(root)
    if not dirs:
        raise SourceError(f"{root}: expected one folder per class (root/<class>/<image>), found none")
    names = [d.name for d in dirs]
    imagenet = all(n in IMAGENET for n in names)
    if wnids is None:
        wnids = list(IMAGENET.wnids) if imagenet else names
    label_of = {w: i + 1 for i, w in enumerate(wnids)}
    unknown = [n for n in names if n not in label_of]
    if unknown:
        raise SourceError(f"{root}: classes {unknown[:5]} are not among the training classes")
    listing = Listing([], list(wnids), imagenet)
    for d in dirs:
        for p in sorted(d.rglob("*")):
            rel = f"{d.name}/{p.relative_to(d).as_posix()}"
            if p.is_symlink():
                listing.problems.append((rel, "a symbolic link (links are not followed)"))
            elif not p.is_file():
                continue
            elif not is_image_name(p.name):
                listing.ignored.append((rel, "not an image file name"))
            else:
                listing.records.append(Record(rel, label_of[d.name], str(p), 0, p.stat().st_size))
    listing.records.sort()
    return listing


def list_folder(root: str | Path) -> dict[str, Listing]:
    """``{"train": ..., "val": ...}`` (val only when ``root/val`` exists)."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: expected a folder of class folders (root/<class>/<image>, or "
                          "root/train/<class>/<image> with an optional root/val/<class>/<image>)")
    if (root / "train").is_dir():
        train = list_class_tree(root / "train")
        out = {"train": train}
        if (root / "val").is_dir():
            out["val"] = list_class_tree(root / "val", train.wnids)
        return out
    return {"train": list_class_tree(root)}
