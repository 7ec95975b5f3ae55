"""The sources on their own: class-folder trees (links followed, loops, unreadable and empty folders, names that
are not UTF-8), the ILSVRC archives (damaged, compressed, duplicated members) and the devkit / Kaggle labels."""

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from release import CLASSES, make_release, tar_bytes

from dsimagenet.cli import main
from dsimagenet.labels import IMAGENET, val_ground_truth
from dsimagenet.sources.folder import list_class_tree, list_folder
from dsimagenet.sources.imagenet import list_train, list_val, parse_devkit, parse_kaggle_csv
from dsimagenet.sources.records import SourceError


@pytest.fixture(scope="module")
def rel(tmp_path_factory):
    return make_release(tmp_path_factory.mktemp("release"))


def cli_error(capsys, *argv) -> str:
    """Run the command line in this process; it must fail with exit 1 and one line, no traceback."""
    assert main(list(argv)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def keys(listing):
    return [(r.key, r.label, r.size) for r in listing.records]


# --- class-folder trees ----------------------------------------------------------------------------------

def test_a_subset_made_of_links_lists_as_the_real_tree(rel, tmp_path):
    """ImageNet-100 and the like: a tree of links to class folders and to single files, as torchvision's
    ImageFolder follows them."""
    sub = tmp_path / "subset"
    sub.mkdir()
    (sub / CLASSES[0]).symlink_to(rel.train_dir / CLASSES[0], target_is_directory=True)  # a whole class
    (sub / CLASSES[1]).mkdir()
    for f in sorted((rel.train_dir / CLASSES[1]).iterdir()):
        (sub / CLASSES[1] / f.name).symlink_to(f)  # one link per image
    want = [k for k in keys(list_class_tree(rel.train_dir, list(IMAGENET.wnids))) if k[0].split("/")[0] in CLASSES[:2]]
    got = list_class_tree(sub, list(IMAGENET.wnids))
    assert keys(got) == want and not got.problems
    assert all(Path(r.path).read_bytes() == rel.train[r.key] for r in got.records)


def test_a_link_to_a_folder_above_is_a_loop_named_in_the_error(tmp_path):
    cls = tmp_path / "data" / "cat"
    cls.mkdir(parents=True)
    (cls / "a.png").write_bytes(b"x")
    (cls / "again").symlink_to(tmp_path / "data", target_is_directory=True)
    with pytest.raises(SourceError, match=r"cat/again: a link back to .*data, a folder above it: a loop"):
        list_folder(tmp_path / "data")
    (cls / "again").unlink()
    (cls / "self").symlink_to(cls, target_is_directory=True)
    with pytest.raises(SourceError, match="cat/self: a link back to"):
        list_folder(tmp_path / "data")


def test_a_folder_linked_twice_is_not_a_loop(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "a.png").write_bytes(b"x")
    for c in ("cat", "dog"):
        (tmp_path / "data" / c).mkdir(parents=True)
        (tmp_path / "data" / c / "s").symlink_to(shared, target_is_directory=True)
    assert [r.key for r in list_folder(tmp_path / "data")["train"].records] == ["cat/s/a.png", "dog/s/a.png"]


def test_a_dangling_link_is_a_bad_entry_naming_it(tmp_path):
    cls = tmp_path / "data" / "cat"
    cls.mkdir(parents=True)
    (cls / "a.png").write_bytes(b"x")
    (cls / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (cls / "me.png").symlink_to(cls / "me.png")  # a link to itself
    listing = list_folder(tmp_path / "data")["train"]
    problems = dict(listing.problems)
    assert "nowhere.png" in problems["cat/gone.png"] and "cannot be followed" in problems["cat/gone.png"]
    assert "cannot be followed" in problems["cat/me.png"]
    assert [r.key for r in listing.records] == ["cat/a.png"]


def test_an_unreadable_class_folder_is_an_error_not_a_smaller_class(tmp_path, monkeypatch):
    # tests run as root, whom chmod 000 does not stop: the folder refuses to be listed as it would for a user
    for c in ("cat", "dog"):
        (tmp_path / "data" / c).mkdir(parents=True)
        (tmp_path / "data" / c / "a.png").write_bytes(b"x")
    locked = str(tmp_path / "data" / "dog")
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(SourceError, match=r"data/dog: cannot list this folder: Permission denied"):
        list_folder(tmp_path / "data")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 folder anyway")
def test_an_unreadable_class_folder_is_an_error_for_a_user(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / "data" / c).mkdir(parents=True)
        (tmp_path / "data" / c / "a.png").write_bytes(b"x")
    (tmp_path / "data" / "dog").chmod(0)
    try:
        with pytest.raises(SourceError, match="dog: cannot list this folder"):
            list_folder(tmp_path / "data")
    finally:
        (tmp_path / "data" / "dog").chmod(0o755)


def test_an_empty_class_folder_is_refused_naming_it(tmp_path, capsys):
    for c, n in (("cat", 2), ("dog", 0), ("emu", 0)):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "data" / c / f"{i}.png").write_bytes(b"x")
    (tmp_path / "data" / "emu" / "notes.txt").write_text("no images here")
    with pytest.raises(SourceError, match=r"2 class folder\(s\) with no image in them: dog, emu .*remove them"):
        list_folder(tmp_path / "data")
    err = cli_error(capsys, "build", "--folder", str(tmp_path / "data"), "--out", str(tmp_path / "o"))
    assert "dog, emu" in err
    assert not (tmp_path / "o").exists()


def test_names_that_are_not_utf8(tmp_path, capsys):
    root = os.fsencode(tmp_path / "data")
    os.makedirs(root + b"/cat")
    for name in (b"/cat/a.png", b"/cat/b\xff.png"):
        with open(root + name, "wb") as f:
            f.write(b"x")
    listing = list_folder(tmp_path / "data")["train"]
    assert [r.key for r in listing.records] == ["cat/a.png"]
    assert listing.problems == [("cat/b\\xff.png", "its name is not valid UTF-8 (rename it)")]
    err = cli_error(capsys, "build", "--folder", str(tmp_path / "data"), "--out", str(tmp_path / "o"))
    assert "cat/b\\xff.png: its name is not valid UTF-8" in err
    os.makedirs(root + b"/d\xe9j\xe0")  # a class name in Latin-1: it would go into the class table
    with open(root + b"/d\xe9j\xe0/a.png", "wb") as f:
        f.write(b"x")
    with pytest.raises(SourceError, match=r"d\\xe9j\\xe0: a class folder whose name is not valid UTF-8"):
        list_folder(tmp_path / "data")


def test_a_fifo_named_like_an_image_is_not_read(tmp_path):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "cat" / "a.png").write_bytes(b"x")
    os.mkfifo(tmp_path / "data" / "cat" / "pipe.jpg")  # opening it would wait for a writer forever
    assert list_folder(tmp_path / "data")["train"].problems == [("cat/pipe.jpg", "not a regular file")]


def test_imagenet_folders_follow_links(rel, tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    for c in CLASSES:
        (train / c).symlink_to(rel.train_dir / c, target_is_directory=True)
    assert keys(list_train(train)) == keys(list_train(rel.train_dir))
    val = tmp_path / "val"
    val.mkdir()
    for f in sorted(rel.val_dir.iterdir()):
        (val / f.name).symlink_to(f)
    assert keys(list_val(val)[0]) == keys(list_val(rel.val_dir)[0])


# --- archives ------------------------------------------------------------------------------------------------

def _tar_with(names_and_data, fmt=tarfile.GNU_FORMAT, encoding="utf-8"):
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w", format=fmt, encoding=encoding) as t:
        for name, data in names_and_data:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return b.getvalue()


def test_a_tar_member_name_that_is_not_utf8(rel, tmp_path, capsys):
    good = rel.train[f"{CLASSES[0]}/{CLASSES[0]}_1.JPEG"]
    inner = _tar_with([("a.JPEG", good), ("b\xff.JPEG", good)], encoding="latin-1")  # byte 0xff in the name
    outer = tmp_path / "train.tar"
    outer.write_bytes(tar_bytes({f"{CLASSES[0]}.tar": inner}))
    listing = list_train(outer)
    assert [r.key for r in listing.records] == [f"{CLASSES[0]}/a.JPEG"]
    assert listing.problems == [(f"{outer}:{CLASSES[0]}.tar:b\\xff.JPEG", "its name is not valid UTF-8 (rename it)")]
    err = cli_error(capsys, "build", "--train", str(outer), "--out", str(tmp_path / "o"), "--allow-partial")
    assert "b\\xff.JPEG: its name is not valid UTF-8" in err


def test_duplicate_names_in_the_val_tar(rel, tmp_path):
    names = sorted(rel.val)
    tar = tmp_path / "ILSVRC2012_img_val.tar"
    tar.write_bytes(_tar_with([(n, rel.val[n]) for n in names] + [(names[0], rel.val[names[1]])]))
    listing, _ = list_val(tar)
    assert [r.key for r in listing.records] == names[1:]
    assert [why for _, why in listing.problems] == ["2 members with this name in the archive"] * 2


def test_a_class_tar_twice_in_the_train_tar(rel, tmp_path):
    files = {n.split("/")[1]: d for n, d in rel.train.items() if n.startswith(CLASSES[0])}
    outer = tmp_path / "train.tar"
    outer.write_bytes(_tar_with([(f"{CLASSES[0]}.tar", tar_bytes(files))] * 2))
    listing = list_train(outer)
    assert not listing.records and len(listing.problems) == 2 * len(files)


def test_empty_compressed_and_cut_tars(rel, tmp_path):
    import gzip

    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(SourceError, match=r"empty.tar: an empty file \(0 bytes\), not a tar"):
        list_train(empty)
    gz = tmp_path / "ILSVRC2012_img_train.tar.gz"
    gz.write_bytes(gzip.compress(rel.train_tar.read_bytes()))
    with pytest.raises(SourceError, match=r"tar.gz: a gzip-compressed file; .*decompress it first \(gunzip\)"):
        list_train(gz)
    files = {n.split("/")[1]: d for n, d in rel.train.items() if n.startswith(CLASSES[0])}
    inner = tar_bytes(files)
    cut = tmp_path / "cut.tar"  # the class tar inside is cut in the middle of a member
    cut.write_bytes(tar_bytes({f"{CLASSES[0]}.tar": inner[: len(inner) // 2]}))
    with pytest.raises(SourceError, match=rf"cut.tar:{CLASSES[0]}.tar: cut short: member"):
        list_train(cut)


# --- labels --------------------------------------------------------------------------------------------------

def test_a_damaged_devkit_is_an_error_naming_it(rel, tmp_path, capsys):
    data = rel.devkit.read_bytes()
    bad = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
    for cut in (0, 5, 30, len(data) // 3, len(data) // 2, len(data) - 2000):  # gzip, zlib, tar and EOF errors
        bad.write_bytes(data[:cut])
        with pytest.raises(SourceError, match=f"--devkit {bad}: "):
            parse_devkit(bad)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(flipped))
    with pytest.raises(SourceError, match=f"--devkit {bad}: "):
        parse_devkit(bad)
    err = cli_error(capsys, "build", "--val", str(rel.val_tar), "--devkit", str(bad), "--out", str(tmp_path / "o"))
    assert f"--devkit {bad}" in err


def _devkit(path, files):
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    path.write_bytes(b.getvalue())
    return path


def test_a_devkit_without_or_with_a_corrupt_meta_mat(rel, tmp_path):
    with tarfile.open(rel.devkit) as t:
        real = {m.name.split("/", 1)[1]: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}
    gt = real["data/ILSVRC2012_validation_ground_truth.txt"]
    no_meta = _devkit(tmp_path / "a.tar.gz", {"data/ILSVRC2012_validation_ground_truth.txt": gt})
    with pytest.raises(SourceError, match="data/meta.mat not found"):
        parse_devkit(no_meta)
    meta = real["data/meta.mat"]
    gt_name = "data/ILSVRC2012_validation_ground_truth.txt"
    for junk in (b"MATLAB 5.0" + b"\x00" * 200, meta[:200], meta[:128] + b"\xff" * 400, b"x" * 10):
        corrupt = _devkit(tmp_path / "b.tar.gz", {"data/meta.mat": junk, gt_name: gt})
        with pytest.raises(SourceError, match="data/meta.mat is damaged"):
            parse_devkit(corrupt)
    latin = _devkit(tmp_path / "c.tar.gz", {"data/meta.mat": meta, gt_name: gt[:-4] + b"\xe9\n"})
    with pytest.raises(SourceError, match="ground truth is not text"):
        parse_devkit(latin)
    words = _devkit(tmp_path / "d.tar.gz", {"data/meta.mat": meta, gt_name: b"x\n" + gt.split(b"\n", 1)[1]})
    with pytest.raises(SourceError, match="line 1 of the validation ground truth, 'x', is not a class ID"):
        parse_devkit(words)
    huge = _devkit(tmp_path / "e.tar.gz", {f"data/junk{i}": b"" for i in range(10_001)})
    with pytest.raises(SourceError, match="more than 10,000 members: not the devkit"):
        parse_devkit(huge)


def test_a_malformed_kaggle_csv_is_an_error_naming_it(rel, tmp_path):
    good = (rel.kaggle / "LOC_val_solution.csv").read_text()
    header, first, rest = good.split("\n", 2)
    cases = {
        "latin1": (good + "ILSVRC2012_val_00000099,n01440764 caf\xe9\n").encode("latin-1"),
        "nul": (good + "ILSVRC2012_val_00000099,n01\x00440764\n").encode(),
        "header": ("Id,Label\n" + first + "\n").encode(),
        "empty": b"",
        "short row": (good + "ILSVRC2012_val_00000099\n").encode(),
        "zero": (good + "ILSVRC2012_val_00000000,n01440764 1 2 3 4\n").encode(),  # would label image 50,000
        "not a wnid": (good + "ILSVRC2012_val_00000099,cat 1 2 3 4\n").encode(),
        "twice": (good + first.split(",")[0] + ",n01443537 1 2 3 4\n").encode(),
    }
    for name, data in cases.items():
        p = tmp_path / f"{name.replace(' ', '_')}.csv"
        p.write_bytes(data)
        with pytest.raises(SourceError, match=f"^{p}: "):
            parse_kaggle_csv(p)
    truth = val_ground_truth()
    p = tmp_path / "ok.csv"
    p.write_text(good)
    labels = parse_kaggle_csv(p)
    assert np.array_equal(labels[:13], truth[:13]) and not labels[13:].any()


def test_a_hidden_class_folder_is_listed_as_ignored_not_dropped_silently(tmp_path):
    """A hidden folder (.git, .ipynb_checkpoints) is never a class, but its images were dropped without a word:
    not among the records, the problems or the ignored entries that the manifest lists. Hidden files inside a
    class folder are images like any other (torchvision's ImageFolder reads them too)."""
    for c in ("cat", ".hidden_class"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "data" / c / f"{i}.png").write_bytes(b"x")
    (tmp_path / "data" / "cat" / ".h.png").write_bytes(b"x")
    (tmp_path / "data" / ".DS_Store").write_bytes(b"x")
    listing = list_folder(tmp_path / "data")["train"]
    assert [r.key for r in listing.records] == ["cat/.h.png", "cat/0.png", "cat/1.png"] and listing.wnids == ["cat"]
    assert sorted(name for name, _ in listing.ignored) == [".DS_Store", ".hidden_class"]
    assert all("hidden" in why for _, why in listing.ignored)


def test_open_files_hold_at_most_their_limit_and_read_right(tmp_path):
    from dsimagenet.sources.records import OpenFiles, Record, read_record

    paths = []
    for i in range(10):
        p = tmp_path / f"{i}.bin"
        p.write_bytes(bytes([i]) * 100)
        paths.append(str(p))
    files = OpenFiles(limit=3)
    for _ in range(2):
        for i, p in enumerate(paths):
            assert read_record(Record(f"k{i}", 1, p, 10 + i, 5), files) == bytes([i]) * 5
            assert len(files.fds) <= 3
    assert list(files.fds) == paths[-3:]  # the three most recently used
    held = list(files.fds.values())
    files.close()
    assert not files.fds
    for fd in held:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_folder_of_more_images_than_open_files_allowed_builds(tmp_path):
    """An extracted folder has more files than a process may hold open (`ulimit -n`): a build reading it
    must not keep every image file open (before: "[Errno 24] Too many open files" after ~1,000 images)."""
    import resource
    import subprocess
    import sys

    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(150):
            Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(tmp_path / "src" / c / f"{i}.png")

    def few_files():
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))

    r = subprocess.run([sys.executable, "-m", "dsimagenet", "build", "--folder", str(tmp_path / "src"), "--out",
                        str(tmp_path / "out"), "--sizes", "4", "--workers", "1", "--formats", "native", "--quiet"],
                       capture_output=True, text=True, preexec_fn=few_files)
    assert r.returncode == 0, r.stderr
    from dsimagenet import open_dataset

    assert len(open_dataset(tmp_path / "out" / "4_box")) == 300


# --- numbered class folders (ImageNetV2) -----------------------------------------------------------------

def _sorted_wnids_by_hand() -> list[str]:
    """ImageNet's WNIDs (sorted, and in devkit order), read from the bundled devkit map without ClassTable."""
    from importlib import resources

    text = resources.files("dsimagenet.resources").joinpath("map_clsloc.txt").read_text()
    rows = [line.split(" ") for line in text.splitlines() if line and not line.startswith("#")]
    return sorted(r[0] for r in rows), [r[0] for r in sorted(rows, key=lambda r: int(r[1]))]


def _numbered_tree(root: Path, numbers) -> dict[tuple, str]:
    """root/<k>/ with two solid-colour PNGs each, one colour per folder: colour -> folder name."""
    from PIL import Image

    colours = {}
    for i, k in enumerate(numbers):
        (root / str(k)).mkdir(parents=True)
        colour = (10 + 20 * i, 200 - 15 * i, 7 * i)
        colours[colour] = str(k)
        for j in range(2):
            Image.new("RGB", (12 + j, 9), colour).save(root / str(k) / f"im{j}.png")
    return colours


@pytest.mark.parametrize("class_names", ["sorted-index", "devkit-index"])
def test_numbered_class_folders_get_imagenets_wnids(tmp_path, class_names):
    """ImageNetV2's folders 0..999 are classes in sorted-WNID order: every built image carries the WNID that a
    hand-built mapping (sorted WNIDs, or devkit order) gives its folder's number; no --allow-partial needed."""
    from dsimagenet.build import BuildConfig, build
    from dsimagenet.dataset import open_dataset

    by_sorted, by_devkit = _sorted_wnids_by_hand()
    expected = by_sorted if class_names == "sorted-index" else by_devkit
    colours = _numbered_tree(tmp_path / "v2", [0, 1, 17, 500, 999])
    build(BuildConfig(out=str(tmp_path / "o"), folder=str(tmp_path / "v2"), sizes=(4,), formats=("native",),
                      class_names=class_names, quiet=True, workers=1))
    ds = open_dataset(tmp_path / "o" / "4_box", "train")
    assert len(ds) == 10 and len(ds.wnids) == 1000
    for img, label in zip(ds.data, ds.targets, strict=True):
        folder = colours[tuple(int(v) for v in img[0, 0])]
        assert ds.wnids[label] == expected[int(folder)]
    listing = list_folder(tmp_path / "v2", class_names)["train"]
    assert listing.imagenet and {r.key.split("/")[0] for r in listing.records} == set(colours.values())


def test_numbered_class_folders_refuse_other_names(tmp_path, capsys):
    _numbered_tree(tmp_path / "v2", [0, 3])
    for name in ("07", "1000", "cat", "-1"):
        (tmp_path / "v2" / name).mkdir()
    with pytest.raises(SourceError, match=r"needs class folders named 0\.\.999, found 4 other name\(s\): '-1', "
                                          r"'07', '1000', 'cat'"):
        list_class_tree(tmp_path / "v2", class_names="sorted-index")
    err = cli_error(capsys, "build", "--folder", str(tmp_path / "v2"), "--out", str(tmp_path / "o"),
                    "--class-names", "sorted-index", "--sizes", "4")
    assert "'07'" in err and "'cat'" in err
    err = cli_error(capsys, "build", "--train", str(tmp_path / "v2"), "--out", str(tmp_path / "o"),
                    "--class-names", "devkit-index")
    assert "--class-names devkit-index reads the class folders of --folder" in err
