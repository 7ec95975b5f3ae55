"""open_dataset / ImageNetDS on every supported layout, both label orders, subsets and caps."""

import time

import numpy as np
import pytest
from conftest import write_official, zip_folder

from dsimagenet import IMAGENET, ImageNetDS, convert, open_dataset
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
    with pytest.raises(FormatError, match=r"missing \[6, 7, 8, 9, 10\]"):
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
