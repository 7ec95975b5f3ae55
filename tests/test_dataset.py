"""open_dataset / ImageNetDS on every supported layout, both label orders, subsets and caps."""

import os
import time

import numpy as np
import pytest
from conftest import write_official, zip_folder

from dsimagenet import IMAGENET, ImageNetDS, convert, open_dataset
from dsimagenet.errors import ConfigError
from dsimagenet.formats.official import FormatError


@pytest.mark.parametrize("kind", ["pickle", "npz"])
def test_official_folder(tiny, kind):
    folder = tiny.official(kind)
    ds = open_dataset(folder)
    assert ds.format == kind and ds.image_size == 8 and len(ds) == 203
    np.testing.assert_array_equal(ds.data, tiny.images)
    np.testing.assert_array_equal(ds.targets, tiny.labels - 1)  # devkit order: the files' labels minus one
    np.testing.assert_allclose(ds.mean, tiny.images.astype(np.float64).mean(0))
    val = open_dataset(folder, "val")
    np.testing.assert_array_equal(val.data, tiny.val_images)
    assert val.mean is None


def test_from_zips_with_top_folder_and_64px_parts(tiny, tmp_path):
    folder = tiny.official("pickle")
    zdir = tmp_path / "zips"
    zdir.mkdir()
    zip_folder(folder, zdir / "Imagenet8_val.zip", "Imagenet8_val", ["val_data"])
    zip_folder(folder, zdir / "Imagenet8_train_part1.zip", "Imagenet8_train",
               [f"train_data_batch_{i}" for i in range(1, 6)])
    zip_folder(folder, zdir / "Imagenet8_train_part2.zip", "Imagenet8_train",
               [f"train_data_batch_{i}" for i in range(6, 11)])
    ds = open_dataset(zdir / "Imagenet8_train_part1.zip")  # finds part2 beside it
    np.testing.assert_array_equal(ds.data, tiny.images)
    ds = open_dataset(zdir, "val")  # a folder of zips
    np.testing.assert_array_equal(ds.data, tiny.val_images)
    (zdir / "Imagenet8_train_part2.zip").unlink()
    with pytest.raises(FormatError, match=r"Imagenet8_train_part2.zip: missing"):
        open_dataset(zdir / "Imagenet8_train_part1.zip")


def test_sorted_order(tiny):
    ds = open_dataset(tiny.official(), order="sorted")
    expected = IMAGENET.devkit_to_sorted[tiny.labels - 1]
    np.testing.assert_array_equal(ds.targets, expected)
    assert ds.class_to_idx["n01440764"] == 0 and ds.classes[0] == "tench"
    assert ds.wnids == list(IMAGENET.sorted_wnids)


def test_subset_and_cap_hand_counted(tiny):
    folder = tiny.official()
    ds = open_dataset(folder, classes=5)
    keep = tiny.labels <= 5
    assert len(ds) == keep.sum()
    np.testing.assert_array_equal(ds.data, tiny.images[keep])
    np.testing.assert_array_equal(ds.targets, tiny.labels[keep] - 1)
    assert ds.wnids == list(IMAGENET.wnids[:5])
    ds = open_dataset(folder, classes=["n01440764", "n02119789"], max_per_class=3)
    # by hand: the first three images of devkit 1 and of devkit 449 in file order
    want = np.r_[np.flatnonzero(tiny.labels == 1)[:3], np.flatnonzero(tiny.labels == 449)[:3]]
    want.sort()
    np.testing.assert_array_equal(ds.data, tiny.images[want])
    assert ds.targets.tolist() == [0 if tiny.labels[i] == 1 else 1 for i in want]
    assert np.bincount(ds.targets).tolist() == [3, 3]


def test_cap_across_batches_matches_native(tiny, tmp_path):
    folder = tiny.official()
    convert(folder, tmp_path / "nat", ["native"])
    a = open_dataset(folder, max_per_class=7, classes=12)
    b = open_dataset(tmp_path / "nat", max_per_class=7, classes=12)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.targets, b.targets)
    assert b.format == "native" and np.bincount(b.targets).max() == 7


def test_getitem_and_transforms(tiny):
    ds = ImageNetDS(tiny.official(), transform=lambda im: np.asarray(im), target_transform=lambda t: t + 100)
    img, t = ds[4]
    np.testing.assert_array_equal(img, tiny.images[4])
    assert t == tiny.labels[4] - 1 + 100
    img, t = ImageNetDS(tiny.official())[0]
    assert img.size == (8, 8) and img.mode == "RGB"


def test_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no dataset here"):
        open_dataset(tmp_path / "empty")
    folder = tiny.official()
    (folder / "train_data_batch_4").unlink()
    with pytest.raises(FormatError, match=r"missing \[4\]"):
        open_dataset(folder)
    with pytest.raises(ValueError, match="split"):
        open_dataset(folder, "test")


def test_mixed_sizes_refused(tiny, tmp_path):
    folder = tiny.official()
    other = tmp_path / "other"
    write_official(other, np.zeros((20, 4, 4, 3), np.uint8), np.ones(20, int), np.zeros((2, 4, 4, 3), np.uint8),
                   [1, 1])
    (other / "train_data_batch_2").replace(folder / "train_data_batch_2")
    with pytest.raises(FormatError, match="4 px images, but .* has 8 px"):
        open_dataset(folder)


def test_native_opens_fast_as_memmap(tiny, tmp_path):
    convert(tiny.official(), tmp_path / "nat", ["native"])
    t = time.perf_counter()
    ds = open_dataset(tmp_path / "nat")
    assert time.perf_counter() - t < 0.5
    assert isinstance(ds.data, np.memmap)
    np.testing.assert_array_equal(ds.data, tiny.images)


def test_a_zip_set_is_one_format_found_by_exact_name(tiny, tmp_path):
    pk, nz = tiny.official("pickle"), tiny.official("npz")
    zdir = tmp_path / "zips"
    zdir.mkdir()
    first, second = [f"train_data_batch_{i}" for i in range(1, 6)], [f"train_data_batch_{i}" for i in range(6, 11)]
    zip_folder(pk, zdir / "Imagenet8_train_part1.zip", "Imagenet8_train", first)
    zip_folder(nz, zdir / "Imagenet8_train_part1_npz.zip", "x", [n + ".npz" for n in first])
    zip_folder(nz, zdir / "Imagenet8_train_part2_npz.zip", "x", [n + ".npz" for n in second])
    # the pickle set's part2 is missing: an error naming it, not the npz set read without a word
    with pytest.raises(FormatError, match=r"zips/Imagenet8_train_part2.zip: missing"):
        open_dataset(zdir / "Imagenet8_train_part1.zip")
    ds = open_dataset(zdir / "Imagenet8_train_part2_npz.zip")  # the npz set, complete
    assert ds.format == "npz"
    np.testing.assert_array_equal(ds.data, tiny.images)
    zip_folder(pk, zdir / "Imagenet8_train_part2.zip", "Imagenet8_train", second)
    assert open_dataset(zdir / "Imagenet8_train_part1.zip").format == "pickle"
    (zdir / "Imagenet8_train_part1_npz.zip").unlink()
    with pytest.raises(FormatError, match=r"Imagenet8_train_part1_npz.zip: missing"):
        open_dataset(zdir / "Imagenet8_train_part2_npz.zip")


def test_a_zip_without_batch_files_says_what_it_expected(tmp_path, capsys):
    import zipfile

    with zipfile.ZipFile(tmp_path / "Imagenet8_val.zip", "w") as z:
        z.writestr("README.txt", "nothing here")
    with pytest.raises(FormatError, match="no official batch files in this zip: expected train_data_batch_1..10") as e:
        open_dataset(tmp_path / "Imagenet8_val.zip")
    assert "meta.json" not in str(e.value)
    from dsimagenet.cli import main

    assert main(["info", str(tmp_path / "Imagenet8_val.zip")]) == 1
    err = capsys.readouterr().err
    assert "no official batch files in this zip" in err and "meta.json" not in err


def _three_classes(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("zebra", "apple", "mango"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture
def my3classes(tmp_path):
    from dsimagenet import BuildConfig, build

    build(BuildConfig(out=str(tmp_path / "o"), folder=str(_three_classes(tmp_path / "my3classes")), sizes=(4,),
                      formats=("pickle", "npz"), quiet=True, workers=1))
    return tmp_path / "o" / "4_box"


def test_custom_classes_in_official_files_come_from_the_manifest(my3classes, tmp_path):
    import json

    from dsimagenet import describe

    ds = open_dataset(my3classes, format="pickle")
    assert ds.classes == ds.wnids == ["apple", "mango", "zebra"]  # the build's labels: folders sorted
    assert ds.class_source.startswith("manifest (") and np.bincount(ds.targets).tolist() == [4, 4, 4]
    assert len(ImageNetDS(my3classes, "val").wnids) == 3  # train.py's head: len(wnids)
    assert open_dataset(my3classes, order="sorted", classes=2).classes == ["apple", "mango"]
    two = open_dataset(my3classes, classes=["zebra", "apple"], order="sorted")
    assert two.class_to_idx == {"apple": 0, "zebra": 1} and sorted(set(two.targets.tolist())) == [0, 1]
    with pytest.raises(ValueError, match=r"not classes of this dataset \(3\): \['n01440764'\]"):
        open_dataset(my3classes, classes=["n01440764"])
    with pytest.raises(ValueError, match="must be in 1..3"):
        open_dataset(my3classes, classes=120)
    assert describe(my3classes)["classes_from"].startswith("manifest")
    # converted to native and back to pickles, the class table goes along: meta.json, then a manifest
    convert(my3classes, tmp_path / "nat", ["native"], src_format="npz")
    assert open_dataset(tmp_path / "nat").classes == ["apple", "mango", "zebra"]
    convert(tmp_path / "nat", tmp_path / "pk", ["pickle"])
    back = open_dataset(tmp_path / "pk", "val")
    assert back.classes == ["apple", "mango", "zebra"] and back.class_source.startswith("manifest")
    assert json.loads((tmp_path / "pk" / "manifest.json").read_text())["wnids"] == ["apple", "mango", "zebra"]
    # without a manifest the files are taken for ImageNet's, and that is said
    (my3classes / "manifest.json").unlink()
    ds = open_dataset(my3classes)
    assert ds.class_source == "assumed ILSVRC-2012 devkit order (no manifest.json beside the files)"
    assert len(ds.wnids) == 1000 and describe(my3classes)["classes_from"].startswith("assumed ILSVRC-2012")


def test_build_manifest_without_a_class_table(my3classes):
    import json

    p = my3classes / "manifest.json"
    m = json.loads(p.read_text())
    m.pop("wnids", None), m.pop("names", None)  # a manifest of today's build: per_class counts only
    p.write_text(json.dumps(m))
    assert open_dataset(my3classes).classes == ["apple", "mango", "zebra"]
    del m["per_class"]["train"]["apple"], m["per_class"]["val"]["apple"]  # a class table one short
    p.write_text(json.dumps(m))
    with pytest.raises(FormatError, match="labels must be 1..2"):
        open_dataset(my3classes)


@pytest.mark.parametrize("text, message", [("null", "expected a JSON object"), ("{", "not valid UTF-8 JSON"),
                                           ('{"wnids": [1, 2]}', "'wnids' must be a list of non-empty strings"),
                                           ('{"wnids": ["a", "a"]}', "must be distinct"),
                                           ('{"label_order": "other"}', "no class table"),
                                           ('{"wnids": ["a", "b"], "names": ["x"]}', "as many as 'names'")])
def test_a_damaged_manifest_is_an_error_never_imagenet(my3classes, text, message):
    (my3classes / "manifest.json").write_text(text)
    with pytest.raises(FormatError, match=f"manifest.json: .*{message}"):
        open_dataset(my3classes)


@pytest.mark.parametrize("value", [np.nan, np.inf, -3.0])
def test_an_official_mean_outside_0_255_is_refused(tiny, value):
    import pickle

    folder = tiny.official()
    for i in range(1, 11):
        with open(folder / f"train_data_batch_{i}", "rb") as f:
            d = pickle.load(f, encoding="latin1")
        d["mean"][5] = value
        with open(folder / f"train_data_batch_{i}", "wb") as f:
            pickle.dump(d, f, protocol=3)
    with pytest.raises(FormatError, match=r"train_data_batch_1: .*'mean'.*0\.\.255"):
        open_dataset(folder)
    with pytest.raises(FormatError, match=r"train_data_batch_1: .*0\.\.255"):
        convert(folder, folder.parent / "nat", ["native"])


def test_arguments_are_config_errors(tiny):
    from dsimagenet.errors import ConfigError

    folder = tiny.official()
    for kwargs in ({"split": "test"}, {"format": "hdf5"}, {"order": "alphabetical"}, {"max_per_class": 0}):
        with pytest.raises(ConfigError):
            open_dataset(folder, **kwargs)


@pytest.mark.parametrize("value", [True, 2.5, "3", 0, -1])
def test_max_per_class_must_be_a_positive_integer(tiny, value):
    with pytest.raises(ConfigError, match=r"max_per_class \(--max-per-class\) must be an integer of at least 1"):
        open_dataset(tiny.official(), max_per_class=value)
    assert len(open_dataset(tiny.official(), max_per_class=np.int64(10**9))) == 203  # more than any class: all


@pytest.mark.parametrize("kind", ["a folder", "a FIFO", "a link to nothing"])
def test_a_manifest_that_is_not_a_file_is_an_error_never_imagenet(my3classes, kind):
    import os

    p = my3classes / "manifest.json"
    p.unlink()
    if kind == "a folder":
        p.mkdir()
    elif kind == "a FIFO":
        os.mkfifo(p)
    else:
        p.symlink_to(my3classes / "nothing")
    with pytest.raises(FormatError, match="manifest.json: (not a regular file|a link to nothing)"):
        open_dataset(my3classes)


def test_a_class_subset_of_a_native_dataset_reads_only_its_rows(tiny, tmp_path, monkeypatch):
    """Indexing the memory map with scattered rows makes the kernel read ahead around each: 1% of the classes
    of a 64 px ImageNet read the whole 15 GB file. Only the rows kept are read."""
    import os

    convert(tiny.official(), tmp_path / "nat", ["native"])
    full = open_dataset(tmp_path / "nat")
    read, preadv = [], os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: read.append(sum(map(len, bufs))) or preadv(fd, bufs, off))
    ds = open_dataset(tmp_path / "nat", classes=["n01440764", "n02119789"], max_per_class=5)
    keep = np.flatnonzero(np.isin(full.devkit_labels, [1, 449]))
    keep = np.concatenate([keep[full.devkit_labels[keep] == k][:5] for k in (1, 449)])
    keep.sort()
    np.testing.assert_array_equal(ds.data, np.asarray(full.data)[keep])
    assert not isinstance(ds.data, np.memmap) and sum(read) == len(keep) * 8 * 8 * 3


def test_validation_is_val_and_torchvision_train_flag(tiny):
    folder = tiny.official()
    val = open_dataset(folder, "validation")  # TFDS's and Hugging Face's name
    assert val.split == "val" and len(val) == 37
    np.testing.assert_array_equal(val.data, tiny.val_images)
    np.testing.assert_array_equal(val.targets, tiny.val_labels - 1)
    np.testing.assert_array_equal(ImageNetDS(folder, train=False).data, tiny.val_images)
    train = ImageNetDS(folder, train=True)
    assert train.split == "train" and len(train) == 203
    assert ImageNetDS(folder, "validation", train=False).split == "val"  # agreeing: fine
    with pytest.raises(ConfigError, match="split='val' and train=True contradict each other"):
        ImageNetDS(folder, "val", train=True)
    with pytest.raises(ConfigError, match="contradict"):
        open_dataset(folder, "train", train=False)
    with pytest.raises(ConfigError, match="pass train=False"):
        ImageNetDS(folder, False)
    with pytest.raises(ConfigError, match="split must be one of train, val, validation, x-valid"):
        open_dataset(folder, "test")


def test_a_raw_release_is_named_and_pointed_to_build(tmp_path):
    """The release's tars are not WebDataset shards, nor its folder a dataset: one line saying what it is."""
    import subprocess
    import sys

    from release import make_release

    rel = make_release(tmp_path / "rel")
    for path in (rel.root, rel.train_tar):
        with pytest.raises(FormatError, match=r"raw ILSVRC-2012 release.*not a downsampled dataset: `dsimagenet "
                                              r"build --train"):
            open_dataset(path)
    r = subprocess.run([sys.executable, "-m", "dsimagenet", "info", str(rel.root)], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "raw ILSVRC-2012 release" in r.stderr, r.stderr


def test_fingerprint_hashes_a_dataset_once_a_process_until_a_file_changes(tiny, monkeypatch):
    """A sweep decides, tune's trials and the objective check the data's fingerprint again and again: the arrays
    are re-hashed only when a file of the dataset changed since (an image rewritten in place is still caught)."""
    from dsimagenet import dataset
    from dsimagenet.formats import native

    root = tiny.root / "native"
    convert(tiny.official(), root, ["native"])
    calls = []
    verify = native.verify
    monkeypatch.setattr(native, "verify", lambda p: calls.append(p) or verify(p))
    first = dataset.fingerprint(root)
    assert dataset.fingerprint(root) == first and len(calls) == 2  # written just now: not remembered yet
    monkeypatch.setattr(dataset, "_SETTLED_NS", -10**18)  # as if written long ago
    assert dataset.fingerprint(root) == first and len(calls) == 3
    assert dataset.fingerprint(root) == first and len(calls) == 3  # from memory
    images = root / "train" / "images.npy"
    st = images.stat()
    data = bytearray(images.read_bytes())
    data[-1] ^= 0xFF  # one pixel changed in place, size kept
    images.write_bytes(bytes(data))
    os.utime(images, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later file time, whatever its resolution
    with pytest.raises(FormatError, match="differs from its meta.json"):
        dataset.fingerprint(root)
    assert len(calls) == 4
