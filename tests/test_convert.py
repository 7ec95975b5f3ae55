"""Round trips between all formats, the native format's versioning and checksums, `info`."""

import json
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import zip_folder

from dsimagenet import convert, describe, open_dataset
from dsimagenet.cli import main
from dsimagenet.convert import recover
from dsimagenet.errors import ConfigError
from dsimagenet.formats import native
from dsimagenet.formats.official import FormatError


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


def test_a_failed_convert_leaves_nothing_under_final_names(tiny, tmp_path):
    src = tiny.official()
    (src / "val_data").write_bytes((src / "val_data").read_bytes()[:50])  # read last: train is written first
    with pytest.raises(FormatError, match="val_data"):
        convert(src, tmp_path / "out", ["pickle", "npz", "native"])
    assert not (tmp_path / "out").exists() and list(tmp_path.glob(".out*")) == []
    # into a dataset folder it wrote before: that stays exactly as it was, nothing is added
    convert(tiny.official("npz"), tmp_path / "out", ["npz"])
    before = snapshot(tmp_path / "out")
    with pytest.raises(FormatError, match="val_data"):
        convert(src, tmp_path / "out", ["pickle"])
    assert snapshot(tmp_path / "out") == before and list(tmp_path.glob(".out*")) == []


def snapshot(folder):
    """Every file under ``folder``: relative path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_only(tiny, name="train_only"):
    """The tiny dataset's pickles without val_data."""
    src = tiny.official("pickle", name)
    (src / "val_data").unlink()
    return src


def test_convert_into_an_existing_dataset_replaces_it_whole(tiny, tmp_path):
    out = tmp_path / "out"
    convert(tiny.official(), out, ["pickle", "native"])
    convert(train_only(tiny), out, ["pickle"])  # no val split: the old val_data must not survive
    assert sorted(snapshot(out)) == sorted([f"train_data_batch_{i}" for i in range(1, 11)] + ["manifest.json"])
    assert json.loads((out / "manifest.json").read_text())["counts"] == {"train": 203}
    with pytest.raises(FileNotFoundError):
        open_dataset(out, "val")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("kind", ["a file of the user's", "official files without a manifest", "a class tree",
                                  "a link in place of an array", "a sub folder in train"])
def test_out_holding_what_dsimagenet_did_not_write_is_refused(tiny, tmp_path, kind):
    out = tmp_path / "out"
    if kind == "a file of the user's":
        convert(tiny.official(), out, ["native"])
        (out / "notes.txt").write_text("mine")
    elif kind == "official files without a manifest":
        out = tiny.official("pickle", "out")  # a download, say: the user's own copy
    elif kind == "a class tree":
        (out / "train" / "n01440764").mkdir(parents=True)
        (out / "manifest.json").write_text("{}")
    elif kind == "a link in place of an array":
        convert(tiny.official(), out, ["pickle"])
        (out / "val_data").unlink()
        (out / "val_data").symlink_to(tmp_path / "pickle" / "val_data")
    else:
        convert(tiny.official(), out, ["native"])
        (out / "train" / "mine").mkdir()
    before = snapshot(out)
    with pytest.raises(ConfigError, match="choose a new or empty folder"):
        convert(tmp_path / "pickle", out, ["npz"])
    assert snapshot(out) == before
    assert main(["convert", str(tmp_path / "pickle"), "--out", str(out), "--formats", "npz"]) == 1


def test_convert_into_a_folder_that_holds_the_source_is_refused(tiny, tmp_path):
    out = tmp_path / "out"
    convert(tiny.official(), out, ["pickle"])
    zip_folder(tiny.official(), out / "Imagenet8_train.zip", "Imagenet8_train")
    with pytest.raises(ConfigError, match="--out holds the source"):
        convert(out / "Imagenet8_train.zip", out, ["native"])
    assert (out / "Imagenet8_train.zip").is_file()


def test_an_empty_or_linked_out_folder(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    convert(tiny.official(), tmp_path / "empty", ["native"])
    assert describe(tmp_path / "empty", check=True)["checksums"] == "ok"
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    convert(tiny.official(), tmp_path / "link", ["pickle"])  # the folder linked to is replaced, the link kept
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "val_data").is_file()


def test_converting_a_folder_into_itself_adds_formats_and_keeps_the_rest(tiny, tmp_path):
    nat = tmp_path / "nat"
    convert(tiny.official(), nat, ["native"])
    native_files = snapshot(nat)
    convert(nat, nat, ["pickle"])  # what build does for --formats native,pickle
    convert(nat, nat, ["npz"])
    files = snapshot(nat)
    assert {k: files[k] for k in native_files} == native_files
    assert "val_data" in files and "val_data.npz" in files and "manifest.json" in files
    same(tiny.official(), nat)
    assert open_dataset(nat, format="npz").data.shape == (203, 8, 8, 3)


def test_formats_empty_or_repeated_are_refused(tiny, tmp_path, capsys):
    for formats in ("", "native,native", "native,"):
        capsys.readouterr()
        assert main(["convert", str(tiny.official()), "--out", str(tmp_path / "o"), "--formats", formats]) == 1
        assert "--formats must be among" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# the commit: a kill before each of its steps leaves the old or the new complete folder, never a mix; the next
# conversion into the folder finishes or removes what the dead one left
_KILL_CHILD = """
import os, shutil, sys, time
step, flag = int(sys.argv[1]), sys.argv[2]
rename, rmtree, n = os.rename, shutil.rmtree, [0]
def stop():
    open(flag, "w").close()
    time.sleep(600)  # killed here
def counting_rename(a, b):
    n[0] += 1
    if n[0] == step:
        stop()
    rename(a, b)
def counting_rmtree(p, *a, **k):
    if ".old-" in str(p) and step == 4:
        stop()
    rmtree(p, *a, **k)
os.rename, shutil.rmtree = counting_rename, counting_rmtree
from dsimagenet.convert import convert
convert(sys.argv[3], sys.argv[4], ["native"])
"""


@pytest.mark.parametrize("step", [1, 2, 3, 4])  # before: staged -> new, dst -> old, new -> dst, removing old
def test_a_kill_at_each_step_of_the_commit_leaves_old_or_new(tiny, tmp_path, step):
    out = tmp_path / "out"
    convert(tiny.official(), out, ["pickle"])
    old = snapshot(out)
    src = train_only(tiny)
    convert(src, tmp_path / "want", ["native"])
    new = snapshot(tmp_path / "want")
    flag = tmp_path / "stopped"
    p = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(step), str(flag), str(src), str(out)])
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():  # the event: the child reached the step
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        p.kill()
        p.wait()
    if step == 3:  # between the two renames: no folder; the complete new one waits beside it
        assert not out.exists() and snapshot(tmp_path / f".out.new-{p.pid}") == new
        with pytest.raises(FileNotFoundError, match="a conversion into it was killed between its two renames"):
            open_dataset(out)
    else:
        assert snapshot(out) == (old if step < 3 else new)
    recover(out)  # what the next conversion into out does first
    assert snapshot(out) == (old if step == 1 else new)
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith(".")] == []
    convert(tiny.official(), out, ["npz"])
    assert sorted(snapshot(out)) == sorted([f"train_data_batch_{i}.npz" for i in range(1, 11)] +
                                           ["val_data.npz", "manifest.json"])


def test_a_killed_convert_leaves_nothing_under_final_names(tiny, tmp_path):
    src = tiny.official()
    flag = tmp_path / "three batches written"
    child = f"""
import os, sys, time
from dsimagenet.formats import official
write, n = official.write_batch, []
def slow(*a, **k):
    write(*a, **k)
    n.append(1)
    if len(n) == 3:
        open({str(flag)!r}, "w").close()
        time.sleep(600)  # killed here
official.write_batch = slow
from dsimagenet.convert import convert
convert({str(src)!r}, {str(tmp_path / "out")!r}, ["pickle"])
"""
    p = subprocess.Popen([sys.executable, "-c", child])
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():  # the event: three batch files written
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        p.kill()
        p.wait()
    assert not (tmp_path / "out").exists()
    stale = list(tmp_path.glob(".out.convert-*"))
    assert len(stale) == 1 and len(list(stale[0].iterdir())) >= 3  # its staging folder, hidden, beside
    convert(src, tmp_path / "out", ["pickle"])  # the next conversion removes it and finishes
    assert list(tmp_path.glob(".out.convert-*")) == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [f"train_data_batch_{i}" for i in range(1, 11)] + ["val_data", "manifest.json"])


@pytest.mark.parametrize("damage", ["meta null", "meta no splits", "fortran images", "float labels",
                                    "labels header cut", "nan mean"])
def test_info_and_verify_on_a_damaged_native_dataset_is_one_line(tiny, tmp_path, capsys, damage):
    nat = tmp_path / "nat"
    convert(tiny.official(), nat, ["native"])
    meta = json.loads((nat / "meta.json").read_text())
    if damage == "meta null":
        (nat / "meta.json").write_text("null")
    elif damage == "meta no splits":
        del meta["splits"]
        (nat / "meta.json").write_text(json.dumps(meta))
    elif damage == "fortran images":
        np.save(nat / "train" / "images.npy", np.asfortranarray(tiny.images))
    elif damage == "float labels":
        np.save(nat / "val" / "labels.npy", tiny.val_labels.astype(np.float64))
    elif damage == "labels header cut":
        (nat / "val" / "labels.npy").write_bytes((nat / "val" / "labels.npy").read_bytes()[:40])
    else:
        mean = np.load(nat / "mean.npy")
        mean[0, 0, 0] = np.nan
        np.save(nat / "mean.npy", mean)
    for argv in (["info", str(nat)], ["info", str(nat), "--verify"], ["info", str(nat), "--json"]):
        capsys.readouterr()
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("dsimagenet info: error: ") and err.count("\n") == 1 and str(nat) in err


def test_convert_arguments_and_a_missing_format_are_one_line_errors(tiny, tmp_path):
    src = tiny.official("pickle")
    with pytest.raises(FormatError, match="no npz batch files"):
        convert(src, tmp_path / "o", ["native"], src_format="npz")
    with pytest.raises(ConfigError, match="--formats must be among"):
        convert(src, tmp_path / "o", ["hdf5"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--out must be a folder"):
        convert(src, tmp_path / "file", ["native"])
    convert(src, tmp_path / "nat", ["native"])
    with pytest.raises(ConfigError, match="onto itself"):
        convert(tmp_path / "nat", tmp_path / "nat", ["native"])


def test_native_label_out_of_range_is_refused_by_convert(tiny, tmp_path):
    convert(tiny.official(), tmp_path / "nat", ["native"])
    np.save(tmp_path / "nat" / "val" / "labels.npy", np.full(37, 1001, np.int16))
    with pytest.raises(native.NativeFormatError, match=r"val/labels.npy: labels must be 1..1000"):
        convert(tmp_path / "nat", tmp_path / "pk", ["pickle"])
    assert not (tmp_path / "pk").exists()


def test_convert_into_its_own_source_folder_is_refused(tiny):
    src = tiny.official()
    with pytest.raises(ConfigError, match="--out inside the source folder"):
        convert(src, src / "nat", ["pickle"])
    assert not (src / "nat").exists()
    assert open_dataset(src).data.shape == (203, 8, 8, 3)


def test_round_trips_through_our_writers_are_byte_identical(tiny, tmp_path):
    """Official zip -> native -> pickle -> native -> pickle: each generation of our files is the same bytes as
    the last (the manifest aside, which names its source); the first pickles hold exactly the zip's data."""
    zipped = zip_folder(tiny.official(), tmp_path / "Imagenet8_train.zip", "Imagenet8_train")
    convert(zipped, tmp_path / "n1", ["native"])
    convert(tmp_path / "n1", tmp_path / "p1", ["pickle"])
    convert(tmp_path / "p1", tmp_path / "n2", ["native"])
    convert(tmp_path / "n2", tmp_path / "p2", ["pickle", "npz"])
    n1, n2, p1, p2 = (snapshot(tmp_path / d) for d in ("n1", "n2", "p1", "p2"))
    assert {k: v for k, v in n1.items() if k != "meta.json"} == {k: v for k, v in n2.items() if k != "meta.json"}
    assert {k: v for k, v in p1.items() if k != "manifest.json"} == {
        k: v for k, v in p2.items() if k != "manifest.json" and not k.endswith(".npz")}
    same(tiny.official(), tmp_path / "p2")


def test_train_batches_with_different_means_are_refused_by_every_reader(tiny, tmp_path, capsys):
    """The mean is one image for the whole training set: batches that disagree come from different builds."""
    src = tiny.official("pickle")
    with open(src / "train_data_batch_2", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    batch["mean"] = batch["mean"] + 1.0
    with open(src / "train_data_batch_2", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(FormatError, match=r"train_data_batch_2: its 'mean' differs from .*train_data_batch_1"):
        open_dataset(src, "train")
    with pytest.raises(FormatError, match=r"train_data_batch_2: its 'mean' differs"):
        convert(src, tmp_path / "nat", ["native"])
    assert not (tmp_path / "nat").exists()
    assert main(["info", str(src), "--verify"]) == 1
    assert "train_data_batch_2: its 'mean' differs" in capsys.readouterr().err
