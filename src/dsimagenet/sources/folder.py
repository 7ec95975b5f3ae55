"""Any class-folder tree as a source: ``root/train/<class>/<image>`` with an optional ``root/val/<class>/...``,
or just ``root/<class>/<image>`` (train only). Classes are sorted and labelled 1..C; a tree whose class names
are ILSVRC-2012 WNIDs is ImageNet, labelled with devkit IDs. A tree whose folders are numbered ``0..999``
(ImageNetV2 arrives so, numbered in sorted-WNID order) is ImageNet too when ``class_names`` says how to read the
numbers: "sorted-index" (k is the k-th WNID in sorted order, torchvision's label k) or "devkit-index" (k is devkit
ID k + 1, the official files' label k).

Symbolic links are followed, to files and to folders, as torchvision's ImageFolder does: subsets such as
ImageNet-100 are usually trees of links into one copy of ImageNet. A link back to a folder above it (a loop) is
an error naming it; a dangling link is a bad entry naming it. A folder that cannot be read is an error, never a
class with fewer images, and so is a class folder with no image in it (torchvision refuses it too).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from dsimagenet.labels import IMAGENET
from dsimagenet.sources.records import Listing, Record, SourceError, is_image_name, name_problem, printable


def scan(path: Path) -> list[os.DirEntry]:
    """The entries of one folder, sorted by name; a folder that cannot be listed is an error naming it (never
    an empty folder: that would silently drop its images)."""
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise SourceError(f"{printable(str(path))}: cannot list this folder: {e.strerror or e}") from None


def follow(entry: os.DirEntry) -> tuple[os.stat_result | None, str | None]:
    """The stat of what ``entry`` is, links followed; or None and why (a dangling link, a link loop)."""
    try:
        return entry.stat(follow_symlinks=True), None
    except OSError as e:
        if entry.is_symlink():
            try:
                target = os.readlink(entry.path)
            except OSError:
                target = "?"
            return None, f"a symbolic link to {printable(target)!r}, which cannot be followed: {e.strerror or e}"
        return None, f"cannot be read: {e.strerror or e}"


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def walk_images(top: Path, prefix: str, listing: Listing, label: int, above: tuple[tuple[int, int], ...]) -> int:
    """Add every image under the folder ``top`` to ``listing`` as ``prefix/<relative path>``, links followed;
    ``above`` holds the identities of the folders above ``top`` (a link to one of them is a loop). Returns the
    number of entries added (records and problems)."""
    added = 0
    stack = [(top, prefix, (*above, _identity(top.stat())))]
    while stack:  # no recursion: a deep tree must not hit Python's recursion limit
        folder, rel_folder, chain = stack.pop()
        for entry in scan(folder):
            rel = f"{rel_folder}/{printable(entry.name)}"
            where = printable(entry.path)
            st, why = follow(entry)
            if st is None:
                listing.problems.append((rel, why))
                added += 1
            elif stat.S_ISDIR(st.st_mode):
                if _identity(st) in chain:
                    target = printable(os.path.realpath(entry.path))
                    raise SourceError(f"{where}: a link back to {target}, a folder above it: a loop; remove the link")
                if (why := name_problem(entry.name)) is not None:
                    listing.problems.append((rel + "/", why.replace("its name", "this folder's name")
                                             + "; nothing in it is read"))
                    added += 1
                    continue
                stack.append((Path(entry.path), rel, (*chain, _identity(st))))
            elif not is_image_name(entry.name):
                listing.ignored.append((rel, "not an image file name"))
            elif (why := name_problem(entry.name)) is not None:
                listing.problems.append((rel, why))
                added += 1
            elif not stat.S_ISREG(st.st_mode):  # a FIFO named .jpg would block the read forever
                listing.problems.append((rel, "not a regular file"))
                added += 1
            else:
                listing.records.append(Record(rel, label, entry.path, 0, st.st_size))
                added += 1
    return added


def class_dirs(root: Path, listing: Listing | None = None) -> list[Path]:
    """The class folders of ``root`` (links followed, hidden ones left out), sorted; other entries go to
    ``listing`` as ignored (files, hidden entries) or problems (dangling links)."""
    dirs = []
    for entry in scan(root):
        if entry.name.startswith("."):  # .git, .ipynb_checkpoints, .DS_Store: never a class, but never unsaid
            if listing is not None:
                listing.ignored.append((printable(entry.name), "hidden (its name starts with '.'): not a class; "
                                                               "rename it to make it one"))
            continue
        st, why = follow(entry)
        if st is not None and stat.S_ISDIR(st.st_mode):
            if name_problem(entry.name) is not None:
                raise SourceError(f"{printable(entry.path)}: a class folder whose name is not valid UTF-8: the "
                                  "class name goes into the dataset's class table; rename it")
            dirs.append(Path(entry.path))
        elif listing is not None:
            if st is None:
                listing.problems.append((printable(entry.name), why))
            else:
                listing.ignored.append((printable(entry.name), "not in a class folder"))
    return dirs


CLASS_NAMES = ("folder", "sorted-index", "devkit-index")


def index_wnids(root: Path, names: list[str], class_names: str) -> dict[str, str]:
    """Folder name -> ILSVRC-2012 WNID for a tree whose folders are numbered 0..999: "sorted-index" reads k as
    the k-th WNID in sorted order, "devkit-index" as devkit ID k + 1. A name that is not one of those integers
    written plainly ("7", not "07" or "seven") is an error naming it: guessing would mislabel the class."""
    if class_names not in CLASS_NAMES[1:]:
        raise ValueError(f"class_names must be one of {CLASS_NAMES[1:]}, not {class_names!r}")
    bad = [n for n in names if not (n.isascii() and n.isdigit() and n == str(int(n)) and int(n) < len(IMAGENET))]
    if bad:
        raise SourceError(f"{printable(str(root))}: --class-names {class_names} needs class folders named 0..999, "
                          f"found {len(bad)} other name(s): {', '.join(map(repr, bad[:5]))}"
                          f"{' ...' if len(bad) > 5 else ''}")
    order = IMAGENET.sorted_wnids if class_names == "sorted-index" else IMAGENET.wnids
    return {n: order[int(n)] for n in names}


def list_class_tree(root: Path, wnids: list[str] | None = None, class_names: str = "folder") -> Listing:
    """Every image under ``root/<class>/`` (recursively, links followed), sorted. ``wnids`` fixes the class list
    (val uses train's); otherwise it is the sorted folder names, or ImageNet's when they are all ILSVRC-2012
    WNIDs, or when ``class_names`` reads numbered folders as ImageNet's classes (``index_wnids``)."""
    placeholder = Listing([], [], False)
    dirs = class_dirs(root, placeholder)
    if not dirs:
        raise SourceError(f"{root}: expected one folder per class (root/<class>/<image>), found none")
    names = [d.name for d in dirs]
    wnid_of = index_wnids(root, names, class_names) if class_names != "folder" else {n: n for n in names}
    imagenet = all(w in IMAGENET for w in wnid_of.values())
    if wnids is None:
        wnids = list(IMAGENET.wnids) if imagenet else names
    position = {w: i + 1 for i, w in enumerate(wnids)}
    label_of = {n: position[wnid_of[n]] for n in names if wnid_of[n] in position}  # folder name -> label
    unknown = [n for n in names if n not in label_of]
    if unknown:
        raise SourceError(f"{root}: classes {unknown[:5]} are not among the training classes")
    listing = Listing([], list(wnids), imagenet, placeholder.problems, placeholder.ignored)
    root_id = _identity(root.stat())
    empty = [d.name for d in dirs if walk_images(d, d.name, listing, label_of[d.name], (root_id,)) == 0]
    if empty:
        raise SourceError(f"{root}: {len(empty)} class folder(s) with no image in them: {', '.join(empty[:10])}"
                          f"{' ...' if len(empty) > 10 else ''} (a class needs at least one image; torchvision's "
                          "ImageFolder refuses them too): remove them, or add their images")
    listing.records.sort()
    return listing


def list_folder(root: str | Path, class_names: str = "folder") -> dict[str, Listing]:
    """``{"train": ..., "val": ...}`` (val only when ``root/val`` exists); ``class_names`` as for
    ``list_class_tree``."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: expected a folder of class folders (root/<class>/<image>, or "
                          "root/train/<class>/<image> with an optional root/val/<class>/<image>)")
    if (root / "train").is_dir():
        train = list_class_tree(root / "train", class_names=class_names)
        out = {"train": train}
        if (root / "val").is_dir():
            out["val"] = list_class_tree(root / "val", train.wnids, class_names)
        return out
    return {"train": list_class_tree(root, class_names=class_names)}
