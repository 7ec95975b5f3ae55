"""Split names beyond train and val: NAS-Bench-201's halves of ImageNet16-120 (x-valid, x-test, search-train,
search-valid), --val-fraction's stratified holdout, and C-way heads over the classes train has."""

import hashlib
import json

import numpy as np
import pytest
from conftest import learnable_native

from dsimagenet import IMAGENET, open_dataset
from dsimagenet.errors import ConfigError
from dsimagenet.formats.native import NativeWriter
from dsimagenet.splits import holdout

# From NAS-Bench-201's own files (D-X-Y/AutoDL-Projects configs/nas-benchmark), read with plain json.loads: the
# sha256 of each index list written ascending, comma-separated, and its first indices; NOT from dsimagenet's copy.
NB201 = {
    "x-valid": (3000, [1, 2, 3, 6, 7, 8, 9, 12], "7859ce235eea793f3e17ad52becef181179998a1977f88e1870ee83b6a8769e6"),
    "x-test": (3000, [0, 4, 5, 10, 11, 13, 14, 15], "effac827470ee17228cbd31a3d5008976446f6d8d5a19f571fddd60d8972c5a4"),
    "search-train": (75850, [1, 3, 5, 7, 8], "084e373dc8085a4b3d17e9b4b29d38752276f4543f30bfb85396bb8f337e5f0e"),
    "search-valid": (75850, [0, 2, 4, 6, 9], "6637099e7a8f7507a3b97ed86354fd95330181360222d1dce470673dd483ed48"),
}
TRAIN_120, VAL_120, OTHER = 151_700, 6_000, 250  # ImageNet16-120's counts, and rows of other classes among them


def _digest(rows):
    return hashlib.sha256(",".join(map(str, rows)).encode()).hexdigest()


def _stamp(images, numbers):
    """Write each image's number into its first pixel (24 bits), so a selected image says which it was."""
    images[:, 0, 0, 0], images[:, 0, 0, 1], images[:, 0, 0, 2] = numbers >> 16, (numbers >> 8) & 255, numbers & 255


def _number(images):
    p = np.asarray(images[:, 0, 0], np.int64)
    return (p[:, 0] << 16) | (p[:, 1] << 8) | p[:, 2]


def _split(rng, n120, other):
    """Labels: n120 rows of devkit IDs 1..120 and ``other`` rows of 121..1000, interleaved at random; images
    stamped with their place among the 1..120 rows (the order NAS-Bench-201's indices count in)."""
    labels = np.r_[rng.integers(1, 121, n120), rng.integers(121, 1001, other)]
    rng.shuffle(labels)
    images = np.zeros((len(labels), 16, 16, 3), np.uint8)
    place = np.full(len(labels), 2**24 - 1)
    place[labels <= 120] = np.arange(n120)
    _stamp(images, place)
    return images, labels


@pytest.fixture(scope="module")
def imagenet16(tmp_path_factory):
    """A native ImageNet16 with exactly ImageNet16-120's counts in classes 1..120, plus rows of other classes."""
    root = tmp_path_factory.mktemp("i16") / "Imagenet16"
    rng = np.random.default_rng(0)
    with NativeWriter(root, 16, list(IMAGENET.wnids), list(IMAGENET.names), method="box") as w:
        for name, n in (("train", TRAIN_120), ("val", VAL_120)):
            w.split(name).append(*_split(rng, n, OTHER))
    return root


@pytest.mark.parametrize("split", ["x-valid", "x-test"])
def test_x_valid_and_x_test_are_the_split_files_rows(imagenet16, split):
    count, first, digest = NB201[split]
    ds = open_dataset(imagenet16, split, classes=120)
    got = _number(ds.data)
    assert len(ds) == count and got[: len(first)].tolist() == first and _digest(got.tolist()) == digest
    val = open_dataset(imagenet16, "val", classes=120)
    np.testing.assert_array_equal(ds.targets, val.targets[got])  # the same images with the same labels
    np.testing.assert_array_equal(ds.devkit_labels, ds.targets + 1)
    assert ds.split == split and ds.wnids == val.wnids and len(ds.wnids) == 120
    srt = open_dataset(imagenet16, split, order="sorted", classes=120, train=False)  # the order relabels, no more
    np.testing.assert_array_equal(_number(srt.data), got)


def test_x_valid_and_x_test_partition_val(imagenet16):
    a = _number(open_dataset(imagenet16, "x-valid", classes=list(IMAGENET.wnids[:120])).data)
    b = _number(open_dataset(imagenet16, "x-test", classes=120).data)
    assert sorted(np.r_[a, b].tolist()) == list(range(VAL_120))


@pytest.mark.parametrize("split", ["search-train", "search-valid"])
def test_search_halves_of_train(imagenet16, split):
    count, first, digest = NB201[split]
    got = _number(open_dataset(imagenet16, split, classes=120).data)
    assert len(got) == count and got[: len(first)].tolist() == first and _digest(got.tolist()) == digest


def test_nasbench201_splits_refusals(imagenet16, tmp_path):
    with pytest.raises(ConfigError, match=r"ImageNet16-120 only .*none for ImageNet16-150"):
        open_dataset(imagenet16, "x-valid", classes=150)
    with pytest.raises(ConfigError, match=r"none for ImageNet16-200"):
        open_dataset(imagenet16, "x-test", classes=200)
    with pytest.raises(ConfigError, match=r"open it with classes=120 \(--classes 120\); this was opened with 1000"):
        open_dataset(imagenet16, "x-valid")
    with pytest.raises(ConfigError, match=r"indexes ImageNet16-120's 6,000 val images, and its val split has 1,200"):
        open_dataset(imagenet16, "x-valid", classes=120, max_per_class=10)
    with pytest.raises(ConfigError, match="contradict"):
        open_dataset(imagenet16, "x-valid", classes=120, train=True)
    small = learnable_native(tmp_path / "small", classes=120, per_class=1, val_per_class=2, size=16)
    with pytest.raises(ConfigError, match=r"6,000 val images, and its val split has 240 "):
        open_dataset(small, "x-test", classes=120)


def test_holdout_is_stratified_seeded_and_refuses_empty_classes():
    labels = np.repeat([0, 1, 2, 3], [10, 7, 3, 20])
    np.random.default_rng(1).shuffle(labels)
    mask = holdout(labels, 0.25, seed=0)
    # by hand, 0.25 * n rounded half up: 2.5 -> 3, 1.75 -> 2, 0.75 -> 1, 5 -> 5
    assert np.bincount(labels[mask]).tolist() == [3, 2, 1, 5]
    np.testing.assert_array_equal(mask, holdout(labels, 0.25, seed=0))
    assert any((holdout(labels, 0.25, seed=s) != mask).any() for s in (1, 2))
    with pytest.raises(ConfigError, match=r"--val-fraction 0.1 leaves 1 class\(es\) of train with no held-out image, "
                                          rf"e.g. {IMAGENET.wnids[2]} \(3 images, 0 held out\)"):
        holdout(labels, 0.1, 0, classes=list(IMAGENET.wnids[:4]))
    with pytest.raises(ConfigError, match=r"with no training image, e.g. label 2 \(3 images, 3 held out\): choose "
                                          r"a fraction in \[0.1667, 0.8333\)"):
        holdout(labels, 0.9, 0)


def _folder_without_val(root, counts):
    """A native dataset of class folders (its table: the folder names) with a train split only."""
    rng = np.random.default_rng(3)
    names = [f"class{k}" for k in range(len(counts))]
    labels = np.repeat(np.arange(1, len(counts) + 1), counts)
    rng.shuffle(labels)
    images = (labels[:, None, None, None] * 40 + rng.integers(0, 30, (len(labels), 8, 8, 3))).astype(np.uint8)
    with NativeWriter(root, 8, names, method="box") as w:
        w.split("train").append(images, labels)
    return root, labels


def test_train_val_fraction_on_data_without_val(tmp_path):
    import subprocess
    import sys

    from dsimagenet.train import TrainConfig, check_environment, train

    data, labels = _folder_without_val(tmp_path / "tree", [12, 9, 6])
    r = subprocess.run([sys.executable, "-m", "dsimagenet", "train", "--data", str(data), "--out", str(tmp_path / "a"),
                        "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 1 and "has no val split to evaluate on: pass --val-fraction" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "a").exists()
    fast = dict(data=str(data), epochs=1, depth=6, batch_size=8, device="cpu", quiet=True)
    with pytest.raises(ConfigError, match=r"--val-fraction 0.05 leaves 2 class\(es\) .* with no held-out image"):
        check_environment(TrainConfig(out=str(tmp_path / "b"), val_fraction=0.05, **fast))
    with pytest.raises(ConfigError, match="--val-fraction holds out a part of train .* --val-split x-valid"):
        TrainConfig(out=str(tmp_path / "b"), val_fraction=0.5, val_split="x-valid", **fast)
    train(TrainConfig(out=str(tmp_path / "run"), val_fraction=0.3, seed=4, **fast))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["config"]["val_fraction"] == 0.3 and config["class_wnids"] == ["class0", "class1", "class2"]
    val = config["splits"]["val"]
    # by hand: 0.3 * (12, 9, 6) rounded half up = (4, 3, 2)
    assert val["per_class"] == [4, 3, 2] and val["images"] == 9 and val["seed"] == 4 and val["name"] == "holdout"
    assert config["splits"]["train"] == {"name": "train", "images": 27 - 9}
    mask = holdout(labels - 1, 0.3, 4)  # the record names the rows: recomputed here
    assert val["rows_sha256"] == _digest(np.flatnonzero(mask).tolist())
    per_class = (tmp_path / "run" / "per_class.csv").read_text().splitlines()
    assert [row.split(",")[3] for row in per_class[1:]] == ["4", "3", "2"]  # evaluated on the held-out images


def test_a_10_class_dataset_trains_a_10_way_head(tmp_path):
    from dsimagenet.convert import describe
    from dsimagenet.runs import load_run
    from dsimagenet.train import TrainConfig, check_environment, train

    data = learnable_native(tmp_path / "data", classes=10, per_class=4, val_per_class=2)  # ImageNet's table
    info = describe(data)
    assert info["num_classes"] == 10 and info["classes_in_table"] == 1000
    fast = dict(data=str(data), epochs=1, depth=6, batch_size=16, device="cpu", quiet=True)
    _, train_ds, val_ds = check_environment(TrainConfig(out=str(tmp_path / "x"), **fast))
    assert train_ds.wnids == val_ds.wnids == list(IMAGENET.wnids[:10]) and len(val_ds) == 20
    want = sorted(IMAGENET.wnids[:10])  # torchvision's order: by WNID
    train(TrainConfig(out=str(tmp_path / "run"), order="sorted", **fast))
    run = load_run(tmp_path / "run")
    assert run.num_classes == 10 and run.class_wnids == want and run.model().num_classes == 10
    assert [row.split(",")[1] for row in (tmp_path / "run" / "per_class.csv").read_text().splitlines()[1:]] == want
    ds = open_dataset(data, "val", classes="present")
    assert ds.wnids == list(IMAGENET.wnids[:10]) and len(ds) == 20
    assert open_dataset(data, classes=3).wnids == list(IMAGENET.wnids[:3])  # --classes N: the table's first N


def test_val_images_of_a_class_train_lacks_are_refused(tmp_path):
    from dsimagenet.train import TrainConfig, check_environment

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    with NativeWriter(root, 8, list(IMAGENET.wnids)) as w:
        w.split("train").append(rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8), np.array([1, 2, 3, 1, 2, 3]))
        w.split("val").append(rng.integers(0, 255, (3, 8, 8, 3), dtype=np.uint8), np.array([1, 2, 449]))
    with pytest.raises(ConfigError, match=r"val: 1 images of 1 class\(es\) that train does not have \(n01440764\)"):
        check_environment(TrainConfig(data=str(root), out=str(tmp_path / "run"), device="cpu"))
    with pytest.raises(ConfigError, match="that train does not have"):
        open_dataset(root, "validation", classes="present")


def test_a_run_evaluates_on_x_valid_or_search_valid(imagenet16, tmp_path):
    import torch

    from dsimagenet.data import Loader
    from dsimagenet.train import TrainConfig, check_environment

    fast = dict(data=str(imagenet16), classes=120, depth=8, device="cpu")
    _, train_ds, val_ds = check_environment(TrainConfig(out=str(tmp_path / "a"), val_split="x-valid", **fast))
    assert (train_ds.split, len(train_ds), val_ds.split) == ("train", TRAIN_120, "x-valid")
    assert _digest(_number(val_ds.data).tolist()) == NB201["x-valid"][2]
    loader = Loader(val_ds, 1000, "cpu", "none", shuffle=False, stats=Loader(train_ds, 128, "cpu").stats)
    assert torch.equal(torch.cat([y for _, y in loader.epoch(0)]), torch.from_numpy(val_ds.targets))
    _, train_ds, val_ds = check_environment(TrainConfig(out=str(tmp_path / "b"), val_split="search-valid", **fast))
    assert _digest(_number(train_ds.data).tolist()) == NB201["search-train"][2]  # trains on the other half
    assert _digest(_number(val_ds.data).tolist()) == NB201["search-valid"][2]
    with pytest.raises(ConfigError, match=r"--val-split x-test is NAS-Bench-201's split of ImageNet16-120: it needs "
                                          r"--classes 120, which was not given"):
        TrainConfig(out=str(tmp_path / "c"), val_split="x-test", data=str(imagenet16))
    with pytest.raises(ConfigError, match=r"not 150 \(NAS-Bench-201 publishes no split files for it\)"):
        TrainConfig(out=str(tmp_path / "c"), val_split="search-valid", classes=150, data=str(imagenet16))
