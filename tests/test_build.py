"""The builder on a miniature release: Pillow-exact pixels, every layout, determinism, resume, bad input."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from release import CLASSES, encode, make_release, reference, tar_bytes

from dsimagenet import open_dataset
from dsimagenet.build import BuildConfig, BuildError, build
from dsimagenet.labels import IMAGENET, val_ground_truth

QUIET = dict(quiet=True, workers=1, allow_partial=True)


@pytest.fixture(scope="module")
def rel(tmp_path_factory):
    return make_release(tmp_path_factory.mktemp("release"))


def expected_train_order(keys, seed=0):
    """The documented order: keys sorted, then numpy's default_rng(seed).permutation."""
    keys = sorted(keys)
    return [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]


def files_of(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()
            and p.name != "manifest.json"}


METHODS = ["box", "nearest", "bilinear", "bicubic", "hamming", "lanczos"]


def test_pixels_match_pillow_for_every_method_and_size(rel, tmp_path):
    build(BuildConfig(out=str(tmp_path), train=str(rel.train_tar), val=str(rel.val_tar), sizes=(8, 13, 32),
                      methods=tuple(METHODS), formats=("native",), **QUIET))
    order = expected_train_order(rel.train)
    for size in (8, 13, 32):
        for method in METHODS:
            ds = open_dataset(tmp_path / f"{size}_{method}")
            assert len(ds) == len(rel.train)
            for i, key in enumerate(order):
                np.testing.assert_array_equal(ds.data[i], reference(rel.train[key], size, method), err_msg=key)
                assert ds.targets[i] == IMAGENET.devkit_id(key.split("/")[0]) - 1
    val = open_dataset(tmp_path / "13_lanczos", "val")
    for i, name in enumerate(sorted(rel.val)):  # val in sorted file-name order, labels from the ground truth
        np.testing.assert_array_equal(val.data[i], reference(rel.val[name], 13, "lanczos"))
        assert val.targets[i] == val_ground_truth()[int(name[15:23]) - 1] - 1


def test_official_files_read_back_as_format_md_says(rel, tmp_path):
    build(BuildConfig(out=str(tmp_path), train=str(rel.train_tar), val=str(rel.val_tar), sizes=(8,),
                      formats=("pickle", "npz"), **QUIET))
    d = tmp_path / "8_box"
    order = expected_train_order(rel.train)
    n = len(order)
    rows, labels = [], []
    for k in range(1, 11):
        with open(d / f"train_data_batch_{k}", "rb") as f:
            b = pickle.load(f, encoding="latin1")
        assert len(b["data"]) == (n // 10 if k < 10 else n - 9 * (n // 10))
        assert isinstance(b["labels"], list) and b["mean"].dtype == np.float64
        rows.append(b["data"])
        labels += b["labels"]
        z = np.load(d / f"train_data_batch_{k}.npz", allow_pickle=False)
        np.testing.assert_array_equal(z["data"], b["data"])
    x = np.concatenate(rows).reshape(-1, 3, 8, 8).transpose(0, 2, 3, 1)  # format.md's recipe
    for i, key in enumerate(order):
        np.testing.assert_array_equal(x[i], reference(rel.train[key], 8, "box"))
        assert labels[i] == IMAGENET.devkit_id(key.split("/")[0])
    np.testing.assert_allclose(b["mean"], np.concatenate(rows).mean(0))
    with open(d / "val_data", "rb") as f:
        v = pickle.load(f, encoding="latin1")
    assert "mean" not in v and len(v["data"]) == len(rel.val)
    assert not (d / "meta.json").exists()  # native was not asked for
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["counts"] == {"train": n, "val": len(rel.val)}
    assert set(manifest["files"]) == {p.name for p in d.iterdir() if p.name != "manifest.json"}
    converted = dict(map(tuple, manifest["converted"]))
    assert "CMYK" in converted[f"{CLASSES[0]}/{CLASSES[0]}_4.JPEG"]
    assert "PNG" in converted[f"{CLASSES[0]}/{CLASSES[0]}_5.JPEG"]
    assert manifest["versions"]["pillow"] and manifest["versions"]["libjpeg"]


def test_layouts_give_identical_bytes(rel, tmp_path):
    common = dict(sizes=(8,), formats=("native", "pickle"), **QUIET)
    build(BuildConfig(out=str(tmp_path / "tar"), train=str(rel.train_tar), val=str(rel.val_tar),
                      devkit=str(rel.devkit), **common))
    build(BuildConfig(out=str(tmp_path / "dir"), train=str(rel.train_dir), val=str(rel.val_dir), **common))
    build(BuildConfig(out=str(tmp_path / "kaggle"), train=str(rel.kaggle), val=str(rel.kaggle), **common))
    ref = files_of(tmp_path / "tar" / "8_box")
    # native meta.json records the source path: compare everything else byte for byte
    for other in ("dir", "kaggle"):
        got = files_of(tmp_path / other / "8_box")
        assert got.keys() == ref.keys()
        assert {k for k in ref if got[k] != ref[k]} == {"meta.json"}


def test_workers_and_listing_order_do_not_change_bytes(rel, tmp_path, monkeypatch):
    common = dict(train=str(rel.train_dir), sizes=(8,), formats=("native",), quiet=True, allow_partial=True,
                  chunk_rows=4)
    build(BuildConfig(out=str(tmp_path / "one"), workers=1, **common))
    real_iterdir = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: reversed(list(real_iterdir(self))))
    build(BuildConfig(out=str(tmp_path / "two"), workers=2, **common))
    assert files_of(tmp_path / "one" / "8_box") == files_of(tmp_path / "two" / "8_box")
    build(BuildConfig(out=str(tmp_path / "seed1"), workers=1, seed=1, **{**common}))
    assert files_of(tmp_path / "seed1" / "8_box") != files_of(tmp_path / "one" / "8_box")


def test_devkit_in_another_order_and_kaggle_csv_label_val(rel, tmp_path):
    from release import devkit_targz

    from dsimagenet.sources.imagenet import list_val

    shuffled = devkit_targz(tmp_path / "ILSVRC2012_devkit_t12.tar.gz", shuffle_ids=True)
    truth = val_ground_truth()
    for devkit in (shuffled, rel.kaggle / "LOC_val_solution.csv", None):
        listing, _ = list_val(rel.val_tar, devkit)
        assert [r.label for r in listing.records] == [int(truth[int(k[15:23]) - 1]) for k in sorted(rel.val)]
    short = devkit_targz(tmp_path / "short.tar.gz", gt_lines=49_999)
    with pytest.raises(ValueError, match="49,999 lines"):
        list_val(rel.val_tar, short)


def test_center_crop_and_exif(tmp_path):
    from PIL import Image

    root = tmp_path / "f" / "cls"
    root.mkdir(parents=True)
    a = np.random.default_rng(0).integers(0, 256, (20, 50, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    b = tmp_path / "x.jpg"
    img.save(b, "JPEG", exif=exif)
    (root / "a.jpg").write_bytes(b.read_bytes())
    build(BuildConfig(out=str(tmp_path / "o"), folder=str(tmp_path / "f"), sizes=(8,), formats=("native",),
                      aspect="center-crop", quiet=True, workers=1))
    got = open_dataset(tmp_path / "o" / "8_box").data[0]
    src = Image.open(b).convert("RGB")
    np.testing.assert_array_equal(got, np.asarray(src.crop((15, 0, 35, 20)).resize((8, 8), Image.BOX)))
    build(BuildConfig(out=str(tmp_path / "e"), folder=str(tmp_path / "f"), sizes=(8,), formats=("native",),
                      exif_transpose=True, quiet=True, workers=1))
    from PIL import ImageOps

    want = np.asarray(ImageOps.exif_transpose(Image.open(b)).convert("RGB").resize((8, 8), Image.BOX))
    np.testing.assert_array_equal(open_dataset(tmp_path / "e" / "8_box").data[0], want)


def test_folder_of_other_classes(tmp_path):
    rng = np.random.default_rng(0)
    from PIL import Image

    for split, n in (("train", 5), ("val", 2)):
        for cls in ("zebra", "apple"):
            d = tmp_path / "data" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)).save(d / f"{i}.png")
    (tmp_path / "data" / "train" / "apple" / "notes.txt").write_text("not an image")
    build(BuildConfig(out=str(tmp_path / "o"), folder=str(tmp_path / "data"), sizes=(4,), quiet=True, workers=1))
    ds = open_dataset(tmp_path / "o" / "4_box", "val")
    assert ds.wnids == ["apple", "zebra"] and sorted(ds.targets.tolist()) == [0, 0, 1, 1]
    manifest = json.loads((tmp_path / "o" / "4_box" / "manifest.json").read_text())
    assert manifest["ignored"] == [["apple/notes.txt", "not an image file name"]]


def test_full_imagenet_counts_are_checked(rel, tmp_path):
    with pytest.raises(BuildError, match=r"full ILSVRC-2012 has 1,281,167.*997 classes have no images"):
        build(BuildConfig(out=str(tmp_path), train=str(rel.train_tar), quiet=True, workers=1))
    with pytest.raises(BuildError, match=r"val: 13 images.*missing e.g. ILSVRC2012_val_00000014"):
        build(BuildConfig(out=str(tmp_path), val=str(rel.val_tar), quiet=True, workers=1))


def _bad_release(tmp_path, name, data):
    root = tmp_path / "bad" / "n02119789"
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    from PIL import Image

    for i in range(3):
        (root / f"ok{i}.JPEG").write_bytes(encode(Image.fromarray(rng.integers(0, 256, (9, 9, 3), np.uint8))))
    (root / name).write_bytes(data)
    return tmp_path / "bad"


@pytest.mark.parametrize("name, data, why", [
    ("empty.JPEG", b"", "empty file"),
    ("text.JPEG", b"hello, I am not a JPEG\n" * 10, "not an image"),
    ("cut.JPEG", None, "damaged image"),
])
def test_bad_images_stop_the_build_or_are_skipped(tmp_path, name, data, why):
    from PIL import Image

    if data is None:
        full = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)))
        data = full[: len(full) // 2]
    src = _bad_release(tmp_path, name, data)
    out = tmp_path / "out"
    with pytest.raises(BuildError, match=f"n02119789/{name}: {why}"):
        build(BuildConfig(out=str(out), train=str(src), sizes=(8,), **QUIET))
    assert not (out / "8_box").exists()  # nothing under a final name
    build(BuildConfig(out=str(out), train=str(src), sizes=(8,), skip_bad=True, **QUIET))
    manifest = json.loads((out / "8_box" / "manifest.json").read_text())
    assert manifest["counts"]["train"] == 3
    assert manifest["skipped"][0][0] == f"n02119789/{name}" and why in manifest["skipped"][0][1]
    assert len(open_dataset(out / "8_box")) == 3


def test_decompression_bomb_is_a_per_file_error(tmp_path):
    from PIL import Image

    src = _bad_release(tmp_path, "big.JPEG", encode(Image.new("RGB", (300, 300))))
    with pytest.raises(BuildError, match="big.JPEG: decompression bomb"):
        build(BuildConfig(out=str(tmp_path / "o"), train=str(src), sizes=(8,), max_image_pixels=10_000, **QUIET))


def test_tar_links_and_dotdot_members_write_nothing(tmp_path, rel):
    b = tar_bytes({"n02119789_1.JPEG": rel.train[f"{CLASSES[0]}/{CLASSES[0]}_1.JPEG"]})
    raw = tarfile.open(fileobj=__import__("io").BytesIO(b))
    import io

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as t:
        for m in raw.getmembers():
            t.addfile(m, raw.extractfile(m))
        for name, kind in (("../evil.JPEG", tarfile.REGTYPE), ("/abs.JPEG", tarfile.REGTYPE),
                           ("link.JPEG", tarfile.SYMTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
            data = rel.train[f"{CLASSES[0]}/{CLASSES[0]}_2.JPEG"] if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    outer = tmp_path / "train.tar"
    outer.write_bytes(tar_bytes({"n02119789.tar": out.getvalue()}))
    with pytest.raises(BuildError, match=r"'\.\.' path|link"):
        build(BuildConfig(out=str(tmp_path / "o"), train=str(outer), sizes=(8,), **QUIET))
    build(BuildConfig(out=str(tmp_path / "o"), train=str(outer), sizes=(8,), skip_bad=True, **QUIET))
    manifest = json.loads((tmp_path / "o" / "8_box" / "manifest.json").read_text())
    assert manifest["counts"]["train"] == 1 and len(manifest["skipped"]) == 3
    assert not (tmp_path / "evil.JPEG").exists() and not Path("/abs.JPEG").exists()


def test_tar_cut_mid_member(rel, tmp_path):
    cut = tmp_path / "ILSVRC2012_img_train.tar"
    data = rel.train_tar.read_bytes()
    cut.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ValueError, match="cut short"):
        build(BuildConfig(out=str(tmp_path / "o"), train=str(cut), sizes=(8,), **QUIET))


def test_verify_md5(rel, tmp_path):
    with pytest.raises(ValueError, match="MD5"):
        build(BuildConfig(out=str(tmp_path / "o"), train=str(rel.train_tar), verify=True, **QUIET))


def test_missing_paths_say_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match="expected ILSVRC2012_img_train.tar"):
        build(BuildConfig(out=str(tmp_path / "o"), train=str(tmp_path / "nope"), **QUIET))
    with pytest.raises(ValueError, match="nothing to build"):
        BuildConfig(out="o")


def test_second_build_into_the_same_folder_is_refused(rel, tmp_path):
    import fcntl

    out = tmp_path / "o"
    out.mkdir()
    fd = os.open(out / ".build.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(BuildError, match="another build"):
            build(BuildConfig(out=str(out), train=str(rel.train_tar), **QUIET))
    finally:
        os.close(fd)


def _cli(rel, out, *extra):
    return [sys.executable, "-m", "dsimagenet", "build", "--train", str(rel.train_tar), "--val", str(rel.val_tar),
            "--out", str(out), "--sizes", "8", "16", "--methods", "box", "bicubic", "--workers", "1",
            "--chunk-rows", "2", "--allow-partial", "--quiet", *extra]


def test_sigkill_and_resume_is_byte_identical(rel, tmp_path):
    subprocess.run(_cli(rel, tmp_path / "whole"), check=True)
    killed = tmp_path / "killed"
    p = subprocess.Popen(_cli(rel, killed))
    journal = killed / ".build" / "done.jsonl"
    deadline = time.time() + 60
    while p.poll() is None and time.time() < deadline and not (journal.exists() and journal.stat().st_size > 0):
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (killed / ".build").exists(), "the build finished before it could be killed"
    assert not (killed / "8_box" / "manifest.json").exists()
    # resumed with other worker and chunk settings: the chunks keep the bounds the journal was written with
    resume = [a for a in _cli(rel, killed) if a not in ("--chunk-rows", "2")]
    subprocess.run(resume[:resume.index("--workers")] + ["--workers", "2"] + resume[resume.index("--workers") + 2:],
                   check=True)
    for combo in ("8_box", "8_bicubic", "16_box", "16_bicubic"):
        a, b = files_of(tmp_path / "whole" / combo), files_of(killed / combo)
        assert a.keys() == b.keys() and all(a[k] == b[k] for k in a if k != "meta.json")
    assert not (killed / ".build").exists()


def test_disk_full_fails_cleanly(rel, tmp_path, monkeypatch):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        # the check before the build refuses it, writing nothing
        with pytest.raises(BuildError, match=r"needs about 0.66 MB \(27 images x sizes 64 .*has 0.10 MB free"):
            build(BuildConfig(out=str(mnt / "o"), train=str(rel.train_tar), sizes=(64,), **QUIET))
        assert not (mnt / "o").exists()
        # space that goes while the build runs (another program filling the disk): the disk fills mid-build
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40))
        with pytest.raises(BuildError, match="disk is full"):
            build(BuildConfig(out=str(mnt / "o"), train=str(rel.train_tar), sizes=(64,), **QUIET))
        assert not (mnt / "o" / ".build").exists()
        assert not list((mnt / "o").glob("*/manifest.json"))
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)])


def test_a_build_larger_than_the_free_disk_is_refused_before_writing(rel, tmp_path, monkeypatch, capsys):
    from dsimagenet.cli import main

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10**6))  # 1 MB free
    n = len(rel.train) + len(rel.val)
    need = (n * (128 * 128 * 3 + 256 * 256 * 3) + 4 * 128) * 2  # 4 arrays (2 splits x 2 sizes), native + pickle
    with pytest.raises(BuildError, match=rf"needs about {need / 1e6:.2f} MB \({n} images x sizes 128, 256 "
                                         r"x 1 method x 2 formats\), the disk has 1.00 MB free"):
        build(BuildConfig(out=str(tmp_path / "o"), train=str(rel.train_tar), val=str(rel.val_tar),
                          sizes=(128, 256), **QUIET))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=need - 1000))
    argv = ["build", "--train", str(rel.train_tar), "--val", str(rel.val_tar), "--out", str(tmp_path / "o"),
            "--sizes", "128", "256", "--allow-partial", "--workers", "1", "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the disk has {(need - 1000) / 1e6:.2f} MB free" in err
    assert not (tmp_path / "o").exists()  # nothing was created: no sparse work arrays, no lock file
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=need + 1000))
    build(BuildConfig(out=str(tmp_path / "o"), train=str(rel.train_tar), val=str(rel.val_tar),
                      sizes=(128, 256), **QUIET))


@pytest.mark.parametrize("field, value, message", [
    ("sizes", (100000,), "--sizes: 100000 is larger than 1024"),
    ("sizes", (0, 8), "--sizes must be positive whole numbers"),
    ("sizes", (8, 8), "--sizes lists a value twice"),
    ("sizes", tuple(range(1, 12)), r"--sizes x --methods: 11 x 6 = 66 outputs, at most 64"),
    ("methods", (), "--methods: give at least one"),
    ("methods", ("cubic",), "--methods: unknown methods"),
    ("formats", ("pickle", "pickle"), "--formats lists a value twice"),
    ("formats", ("jpeg",), "--formats must be among"),
    ("aspect", "pad", "--aspect must be one of"),
    ("workers", 0, r"--workers must be 1..1,024 \(or left out\), not 0"),
    ("workers", 100_000, "--workers must be 1..1,024"),
    ("max_image_pixels", 0, "--max-image-pixels must be a whole number >= 1"),
    ("chunk_rows", 0, "--chunk-rows must be 1..1,048,576"),
    ("chunk_rows", 1 << 20, "--chunk-rows 1048576: .* at most 1024 MB"),
    ("seed", -1, "--seed must be a whole number >= 0, not -1"),
    ("devkit", "ILSVRC2012_devkit_t12.tar.gz", "--devkit labels the validation images: give --val too"),
])
def test_every_setting_is_checked_before_anything_is_written(rel, tmp_path, field, value, message):
    from dsimagenet.errors import ConfigError

    kwargs = dict(out=str(tmp_path / "o"), train=str(rel.train_tar), quiet=True, allow_partial=True)
    if field == "sizes" and len(value) > 2:
        kwargs["methods"] = tuple(METHODS)
    kwargs[field] = value
    with pytest.raises(ConfigError, match=message):
        build(BuildConfig(**kwargs))
    assert not (tmp_path / "o").exists()


def test_sizes_100000_on_the_command_line_is_one_line(rel, tmp_path):
    r = subprocess.run([sys.executable, "-m", "dsimagenet", "build", "--train", str(rel.train_tar), "--out",
                        str(tmp_path / "o"), "--sizes", "100000", "--allow-partial"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--sizes: 100000 is larger than 1024" in r.stderr
    assert not (tmp_path / "o").exists()


def _folder_source(root: Path) -> Path:
    from PIL import Image

    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        Image.new("RGB", (9, 7), (10, 20, 30)).save(root / c / "a.png")
    return root


@pytest.mark.parametrize("where", ["inside", "same", "through a link", "source inside out", "tar in .build"])
def test_out_never_overlaps_a_source(rel, tmp_path, where):
    data = _folder_source(tmp_path / "data")
    kwargs = dict(folder=str(data), out=str(data / "ds"), sizes=(8,), quiet=True, workers=1)
    if where == "same":
        kwargs["out"] = str(data)
    elif where == "through a link":
        (tmp_path / "alias").symlink_to(data, target_is_directory=True)
        kwargs["out"] = str(tmp_path / "alias" / "ds")
    elif where == "source inside out":
        kwargs["out"] = str(tmp_path)
    elif where == "tar in .build":
        (tmp_path / "o" / ".build").mkdir(parents=True)
        shutil.copy(rel.train_tar, tmp_path / "o" / ".build" / "train.tar")
        kwargs = dict(train=str(tmp_path / "o" / ".build" / "train.tar"), out=str(tmp_path / "o"), sizes=(8,),
                      quiet=True, workers=1, allow_partial=True)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(BuildError, match="--out .* is inside --folder|--out .* is --folder|--folder .* is inside "
                                         "--out|--train .* is inside .*build folders"):
        build(BuildConfig(**kwargs))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_an_archive_beside_the_output_is_fine(rel, tmp_path):
    shutil.copy(rel.train_tar, tmp_path / "ILSVRC2012_img_train.tar")  # ~/imagenet/*.tar, --out ~/imagenet
    build(BuildConfig(out=str(tmp_path), train=str(tmp_path / "ILSVRC2012_img_train.tar"), sizes=(8,), **QUIET))
    assert (tmp_path / "8_box" / "manifest.json").exists()


def test_fuzzed_images_fail_the_build_naming_them_or_are_skipped(tmp_path):
    from test_resize import dds_with_unknown_pixel_format, tiff_with_float_strip_offsets

    data = _folder_source(tmp_path / "data")
    (data / "cat" / "photo.jpg").write_bytes(dds_with_unknown_pixel_format())  # a DDS named .jpg
    (data / "dog" / "scan.tif").write_bytes(tiff_with_float_strip_offsets())
    with pytest.raises(BuildError, match=r"cat/photo.jpg: not an image Pillow can read|dog/scan.tif: damaged"):
        build(BuildConfig(out=str(tmp_path / "o"), folder=str(data), sizes=(8,), quiet=True, workers=1))
    build(BuildConfig(out=str(tmp_path / "o"), folder=str(data), sizes=(8,), quiet=True, workers=1, skip_bad=True))
    manifest = json.loads((tmp_path / "o" / "8_box" / "manifest.json").read_text())
    assert manifest["counts"]["train"] == 2
    assert [k for k, _ in manifest["skipped"]] == ["cat/photo.jpg", "dog/scan.tif"]
    assert "TypeError" in manifest["skipped"][1][1]


def test_a_subset_tree_of_links_builds_as_the_real_one(rel, tmp_path):
    sub = tmp_path / "sub"
    for c in CLASSES[:2]:
        (sub / c).mkdir(parents=True)
        for f in sorted((rel.train_dir / c).iterdir()):
            (sub / c / f.name).symlink_to(f)
    build(BuildConfig(out=str(tmp_path / "o"), folder=str(sub), sizes=(8,), formats=("native",), **QUIET))
    ds = open_dataset(tmp_path / "o" / "8_box")
    order = expected_train_order([k for k in rel.train if k.split("/")[0] in CLASSES[:2]])
    assert len(ds) == len(order)
    for i, key in enumerate(order):
        np.testing.assert_array_equal(ds.data[i], reference(rel.train[key], 8, "box"), err_msg=key)


def test_interrupted_while_finishing_resumes_identically(rel, tmp_path, monkeypatch):
    common = dict(train=str(rel.train_tar), sizes=(8, 16), formats=("native", "pickle"), **QUIET)
    build(BuildConfig(out=str(tmp_path / "whole"), **common))
    writer = sys.modules["dsimagenet.formats.official"].SplitWriter  # the official files of one split
    real, calls = writer.close, []

    def dies_second_time(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill would, after the first combination was finished
        return real(*a, **k)

    monkeypatch.setattr(writer, "close", dies_second_time)
    with pytest.raises(KeyboardInterrupt):
        build(BuildConfig(out=str(tmp_path / "cut"), **common))
    monkeypatch.setattr(writer, "close", real)
    build(BuildConfig(out=str(tmp_path / "cut"), **common))
    for combo in ("8_box", "16_box"):
        a, b = files_of(tmp_path / "whole" / combo), files_of(tmp_path / "cut" / combo)
        assert a.keys() == b.keys() and all(a[k] == b[k] for k in a if k != "meta.json"), combo


def test_a_dying_worker_fails_the_build_quickly(rel, tmp_path):
    p = subprocess.Popen(_cli(rel, tmp_path / "o", "--workers", "2"), stderr=subprocess.PIPE, text=True)
    deadline, victim = time.time() + 30, None
    while victim is None and time.time() < deadline and p.poll() is None:
        for child in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split():
            if "spawn_main" in Path(f"/proc/{child}/cmdline").read_text():
                victim = int(child)
                break
        time.sleep(0.01)
    if victim is None:
        p.kill()
        pytest.skip("the build finished before a worker could be killed")
    os.kill(victim, signal.SIGKILL)
    t = time.time()
    _, err = p.communicate(timeout=30)
    assert p.returncode != 0 and "worker process died" in err and time.time() - t < 15


def _tagged(tag: str) -> list[int]:
    """Live processes (not zombies) whose environment holds ``tag``: the build and every process it started."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if tag.encode() in (d / "environ").read_bytes().split(b"\0"):
                if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(int(d.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _kill_early_and_count_leftovers(rel, out: Path, moment: int, extra_polls: int) -> list[int]:
    """Start a build, SIGKILL it at an early moment (0: its first child exists; 1: two workers exist; 2: the
    journal exists), ``extra_polls`` polls later; return the pids of its processes still alive 60 s on."""
    tag = f"DSIMAGENET_TEST_BUILD={out}"
    env = {**os.environ, tag.split("=", 1)[0]: tag.split("=", 1)[1]}
    p = subprocess.Popen(_cli(rel, out, "--workers", "2"), env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 60

    def reached() -> bool:
        if moment == 0:
            return bool(_children(p.pid))
        if moment == 1:
            return sum("spawn_main" in Path(f"/proc/{c}/cmdline").read_text(errors="replace")
                       for c in _children(p.pid) if Path(f"/proc/{c}").exists()) >= 2
        return (out / ".build" / "done.jsonl").exists()

    while p.poll() is None and time.time() < deadline and not reached():
        time.sleep(0.001)
    for _ in range(extra_polls):
        _children(p.pid)  # a moment a little later, measured in work rather than time
    p.kill()
    p.wait()
    deadline = time.time() + 60
    while (left := _tagged(tag)) and time.time() < deadline:
        time.sleep(0.05)
    for pid in left:  # do not leave them behind for the rest of the suite
        os.kill(pid, signal.SIGKILL)
    return left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_build_killed_while_its_workers_start_leaves_none_behind(rel, tmp_path):
    left = {(m, k): _kill_early_and_count_leftovers(rel, tmp_path / f"o{m}{k}", m, k)
            for m, k in ((0, 0), (1, 0), (1, 30), (1, 300), (2, 0))}
    assert not any(left.values()), left


@pytest.mark.reliability
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_40_early_kills_leave_no_worker_behind(rel, tmp_path):
    import random

    rng = random.Random(5)
    left = {}
    for i in range(40):
        m, k = rng.choice((0, 0, 1, 2)), rng.choice((0, 0, 10, 100, 1000))
        left[(i, m, k)] = _kill_early_and_count_leftovers(rel, tmp_path / f"o{i}", m, k)
    assert not any(left.values()), {k: v for k, v in left.items() if v}


def test_a_damaged_plan_of_an_unfinished_build_is_named(rel, tmp_path):
    out = tmp_path / "o"
    (out / ".build").mkdir(parents=True)
    for junk in (b"{\"digest\": ", b"null", b"{\"digest\": \"x\"}", b"\xff\xfe"):
        (out / ".build" / "plan.json").write_bytes(junk)
        with pytest.raises(BuildError, match=r"plan.json: the unfinished build's plan is damaged .*remove .*\.build"):
            build(BuildConfig(out=str(out), train=str(rel.train_tar), sizes=(8,), **QUIET))


_INTERRUPTIBLE = """
import sys
from dsimagenet.build import BuildConfig, build
try:
    build(BuildConfig(out=sys.argv[1], train=sys.argv[2], val=sys.argv[3], sizes=(8, 16), methods=("box", "bicubic"),
                      workers=2, chunk_rows=2, allow_partial=True, quiet=True))
except KeyboardInterrupt:  # what the CLI does with it is the CLI's; here: did anything else print?
    print("interrupted", file=sys.stderr)
    sys.exit(130)
"""


_SLOW_WORKER_START = """
import os, sys, time
if "--multiprocessing-fork" in sys.orig_argv:  # a build's worker, in its interpreter's start-up (site)
    open(os.path.join(os.environ["DSIMAGENET_TEST_MARKS"], str(os.getpid())), "w").close()
    for _ in range(50):
        time.sleep(0.01)  # a start-up long enough that the Ctrl-C sent on seeing the mark lands in it
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups, signal masks")
@pytest.mark.parametrize("moment", ["a worker starting", "the journal written"])
def test_ctrl_c_is_one_interrupt_and_the_build_resumes(rel, tmp_path, moment):
    """Ctrl-C goes to the terminal's whole process group. A worker still starting died of it with a traceback
    of its own ("Fatal Python error: init_import_site"); now workers are spawned with SIGINT blocked, the build
    alone gets it and ends them. The same command then resumes to the bytes of an uninterrupted build."""
    whole, out, marks, site = tmp_path / "whole", tmp_path / "out", tmp_path / "marks", tmp_path / "site"
    subprocess.run(_cli(rel, whole), check=True)
    marks.mkdir()
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SLOW_WORKER_START)
    env = {**os.environ, "DSIMAGENET_TEST_MARKS": str(marks),
           "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    p = subprocess.Popen([sys.executable, "-c", _INTERRUPTIBLE, str(out), str(rel.train_tar), str(rel.val_tar)],
                         stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)

    def reached() -> bool:
        if moment == "a worker starting":
            return any(marks.iterdir())
        return (out / ".build" / "done.jsonl").exists()

    deadline = time.time() + 60
    while p.poll() is None and time.time() < deadline and not reached():
        time.sleep(0.001)
    if p.poll() is not None:
        pytest.skip("the build finished before it could be interrupted")
    os.killpg(p.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the build and every worker
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.strip() == "interrupted", err[-3000:]
    assert not (out / "8_box" / "manifest.json").exists()
    subprocess.run(_cli(rel, out), check=True)
    for combo in ("8_box", "8_bicubic", "16_box", "16_bicubic"):
        a, b = files_of(whole / combo), files_of(out / combo)
        assert a.keys() == b.keys() and all(a[k] == b[k] for k in a if k != "meta.json")


def test_checksums_means_and_batches_agree_with_the_files(rel, tmp_path):
    """The manifest's and meta.json's checksums are taken without reading the files back, the mean from the
    workers' per-chunk sums, and the official batches are streamed from the rows: each checked here against the
    files themselves (hashlib over their bytes, the mean of the images, batches written from whole arrays)."""
    import hashlib

    from dsimagenet.formats import official

    build(BuildConfig(out=str(tmp_path / "o"), train=str(rel.train_tar), val=str(rel.val_tar), sizes=(8, 16),
                      formats=("native", "pickle", "npz"), chunk_rows=2, workers=2, quiet=True, allow_partial=True))
    for size in (8, 16):
        d = tmp_path / "o" / f"{size}_box"
        manifest, meta = json.loads((d / "manifest.json").read_text()), json.loads((d / "meta.json").read_text())
        on_disk = {k: hashlib.sha256(v).hexdigest() for k, v in files_of(d).items()}
        assert manifest["files"] == on_disk
        for split in ("train", "val"):
            for name in ("images.npy", "labels.npy"):
                data = np.load(d / split / name)
                assert meta["splits"][split]["sha256"][name] == hashlib.sha256(data.tobytes()).hexdigest()
        images, labels = np.load(d / "train" / "images.npy"), np.load(d / "train" / "labels.npy")
        mean = images.sum(axis=0, dtype=np.float64) / len(images)
        np.testing.assert_array_equal(np.load(d / "mean.npy"), mean)
        val_images, val_labels = np.load(d / "val" / "images.npy"), np.load(d / "val" / "labels.npy")
        batches = [(f"train_data_batch_{k + 1}", images[a:b], labels[a:b], mean)
                   for k, (a, b) in enumerate(official.batch_bounds(len(images)))]
        for name, rows, lab, m in [*batches, ("val_data", val_images, val_labels, None)]:
            for kind, suffix in (("pickle", ""), ("npz", ".npz")):
                whole = tmp_path / f"{size}_{name}{suffix}"  # from whole arrays, as numpy and pickle write them
                official.write_batch(whole, official.nhwc_to_planar(rows), lab,
                                     None if m is None else official.nhwc_to_planar(m[None])[0], kind)
                assert whole.read_bytes() == (d / f"{name}{suffix}").read_bytes(), (size, name, kind)


def test_a_skipped_image_is_left_out_of_the_mean(tmp_path):
    src = _bad_release(tmp_path, "text.JPEG", b"not a JPEG\n" * 10)
    build(BuildConfig(out=str(tmp_path / "o"), train=str(src), sizes=(8,), formats=("native", "pickle"),
                      skip_bad=True, chunk_rows=2, **QUIET))
    d = tmp_path / "o" / "8_box"
    images = np.load(d / "train" / "images.npy")
    assert len(images) == 3
    mean = images.sum(axis=0, dtype=np.float64) / 3
    np.testing.assert_array_equal(np.load(d / "mean.npy"), mean)
    with open(d / "train_data_batch_10", "rb") as f:
        np.testing.assert_array_equal(pickle.load(f)["mean"], mean.transpose(2, 0, 1).reshape(-1))


def test_a_lost_pixel_sums_file_redoes_the_train_split(rel, tmp_path, monkeypatch):
    from dsimagenet.formats import official

    common = dict(train=str(rel.train_tar), sizes=(8, 16), formats=("native", "pickle"), chunk_rows=4, **QUIET)
    build(BuildConfig(out=str(tmp_path / "whole"), **common))

    def interrupted(*a, **k):  # after every chunk is done and journalled
        raise KeyboardInterrupt

    monkeypatch.setattr(official.SplitWriter, "close", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(BuildConfig(out=str(tmp_path / "cut"), **common))
    monkeypatch.undo()
    (tmp_path / "cut" / ".build" / "train_sums.npy").unlink()
    build(BuildConfig(out=str(tmp_path / "cut"), **common))
    for combo in ("8_box", "16_box"):
        a, b = files_of(tmp_path / "whole" / combo), files_of(tmp_path / "cut" / combo)
        assert a.keys() == b.keys() and all(a[k] == b[k] for k in a if k != "meta.json"), combo
        files = [json.loads((tmp_path / o / combo / "manifest.json").read_text())["files"] for o in ("whole", "cut")]
        assert {k: v for k, v in files[0].items() if k != "meta.json"} == \
            {k: v for k, v in files[1].items() if k != "meta.json"}
