"""Round trips between all formats, the native format's versioning and checksums, `info`."""

import json
import pickle

import numpy as np
import pytest

from dsimagenet import convert, describe, open_dataset
from dsimagenet.cli import main
from dsimagenet.formats import native


def same(a, b):
    for split in ("train", "val"):
        x, y = open_dataset(a, split), open_dataset(b, split)
        np.testing.assert_array_equal(x.data, y.data)
        np.testing.assert_array_equal(x.targets, y.targets)
    np.testing.assert_array_equal(open_dataset(a).mean, open_dataset(b).mean)


def test_round_trips_between_all_formats(tiny, tmp_path):
    src = tiny.official("pickle")
    convert(src, tmp_path / "nat", ["native"])
    convert(tmp_path / "nat", tmp_path / "pk", ["pickle"])
    convert(tmp_path / "pk", tmp_path / "nz", ["npz"])
    convert(tmp_path / "nz", tmp_path / "nat2", ["native", "pickle"])
    for d in ("nat", "pk", "nz", "nat2"):
        same(src, tmp_path / d)
    # native -> pickle re-batches as the official files: n // 10 per batch, the rest in the last
    with open(tmp_path / "pk" / "train_data_batch_1", "rb") as f:
        b1 = pickle.load(f, encoding="latin1")
    with open(src / "train_data_batch_1", "rb") as f:
        ref = pickle.load(f, encoding="latin1")
    np.testing.assert_array_equal(b1["data"], ref["data"])
    assert b1["labels"] == ref["labels"]
    np.testing.assert_array_equal(b1["mean"], ref["mean"])  # the official mean, carried over exactly


def test_native_meta_and_checksums(tiny, tmp_path):
    convert(tiny.official(), tmp_path / "nat", ["native"])
    meta = json.loads((tmp_path / "nat" / "meta.json").read_text())
    assert meta["format"] == "dsimagenet-native" and meta["version"] == native.FORMAT_VERSION
    assert meta["image_size"] == 8 and meta["splits"]["train"]["count"] == 203
    assert meta["splits"]["val"]["count"] == 37 and meta["label_order"] == "devkit"
    assert native.verify(tmp_path / "nat") == []
    imgs = np.load(tmp_path / "nat" / "train" / "images.npy", mmap_mode="r+")
    imgs[5, 0, 0, 0] ^= 1  # one flipped bit
    imgs.flush()
    del imgs
    problems = native.verify(tmp_path / "nat")
    assert len(problems) == 1 and "train/images.npy" in problems[0]
    assert main(["info", str(tmp_path / "nat"), "--verify"]) == 1


def test_version_checked(tiny, tmp_path):
    convert(tiny.official(), tmp_path / "nat", ["native"])
    meta_path = tmp_path / "nat" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(native.NativeFormatError, match="format version 99"):
        open_dataset(tmp_path / "nat")


def test_incomplete_native_is_not_a_dataset(tiny, tmp_path):
    convert(tiny.official(), tmp_path / "nat", ["native"])
    (tmp_path / "nat" / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="no dataset here"):
        open_dataset(tmp_path / "nat")


def test_truncated_native_array(tiny, tmp_path):
    convert(tiny.official(), tmp_path / "nat", ["native"])
    p = tmp_path / "nat" / "train" / "images.npy"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(native.NativeFormatError, match="damaged"):
        open_dataset(tmp_path / "nat")


def test_failed_convert_leaves_no_dataset(tiny, tmp_path):
    src = tiny.official()
    (src / "val_data").write_bytes((src / "val_data").read_bytes()[:50])
    with pytest.raises(ValueError, match="val_data"):
        convert(src, tmp_path / "nat", ["native"])
    assert not (tmp_path / "nat" / "meta.json").exists()
    assert not [p for p in (tmp_path / "nat").rglob("*tmp*")]


def test_info_and_cli(tiny, tmp_path, capsys):
    src = tiny.official()
    assert main(["convert", str(src), "--out", str(tmp_path / "nat"), "--formats", "native,npz"]) == 0
    info = describe(tmp_path / "nat", check=True)
    assert info["format"] == "native" and info["splits"] == {"train": 203, "val": 37}
    assert info["checksums"] == "ok"
    info = describe(src)
    assert info["format"] == "pickle" and info["splits"] == {"train": 203, "val": 37} and info["num_classes"] == 13
    capsys.readouterr()
    assert main(["info", str(tmp_path / "nat"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["image_size"] == 8
    assert main(["info", str(tmp_path / "missing")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_train_batches_without_a_mean_are_refused(tiny, tmp_path):
    src = tiny.official()
    with open(src / "train_data_batch_1", "rb") as f:
        d = pickle.load(f, encoding="latin1")
    del d["mean"]
    with open(src / "train_data_batch_1", "wb") as f:
        pickle.dump(d, f, protocol=3)
    with pytest.raises(ValueError, match="train_data_batch_1: no 'mean' in a train batch"):
        convert(src, tmp_path / "nat", ["native"])
