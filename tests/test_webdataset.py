"""WebDataset tar shards: ours hold KEY.png, KEY.cls, KEY.json per sample, as the ``webdataset`` library and
timm read them (checked member by member with tarfile, and with ``webdataset`` itself when it is installed);
they read back byte for byte; a build writes them, and parquet, from the same rows as the native arrays."""

import io
import json
import tarfile

import numpy as np
import pytest
from conftest import read_mutated
from PIL import Image
from release import make_release

from dsimagenet import convert, describe, open_dataset
from dsimagenet.build import BuildConfig, build
from dsimagenet.checksum import digest
from dsimagenet.errors import ConfigError, FormatError
from dsimagenet.formats import webdataset as webdataset_format
from dsimagenet.formats.native import NativeWriter
from dsimagenet.labels import IMAGENET

S = 8


@pytest.fixture
def native(tmp_path):
    rng = np.random.default_rng(3)
    data = {split: (rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8), rng.integers(1, 1001, n))
            for split, n in (("train", 25), ("val", 9))}
    with NativeWriter(tmp_path / "nat", S, list(IMAGENET.wnids)) as w:
        for split, (x, y) in data.items():
            w.split(split).append(x, y)
    return tmp_path / "nat", data


def test_our_tars_hold_png_cls_json_samples(native, tmp_path):
    src, data = native
    convert(src, tmp_path / "w", ["webdataset"])
    x, y = data["val"]
    with tarfile.open(tmp_path / "w" / "validation-00000.tar") as t:
        members = t.getmembers()
        assert [m.name for m in members[:3]] == ["validation_00000000.png", "validation_00000000.cls",
                                                 "validation_00000000.json"]
        assert len(members) == 3 * len(x) and all(m.mtime == 0 for m in members)
        for i in range(len(x)):
            key = f"validation_{i:08d}"
            img = np.asarray(Image.open(io.BytesIO(t.extractfile(f"{key}.png").read())))
            np.testing.assert_array_equal(img, x[i])
            assert int(t.extractfile(f"{key}.cls").read()) == y[i] - 1  # 0-based, devkit order
            meta = json.loads(t.extractfile(f"{key}.json").read())
            assert meta["wnid"] == IMAGENET.wnids[y[i] - 1] and meta["label"] == y[i] - 1
    info = json.loads((tmp_path / "w" / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == 25
    assert info["splits"]["validation"]["filenames"] == ["validation-00000.tar"]
    for split in ("train", "val"):  # back through our reader, byte for byte, no labels_in needed
        ds = open_dataset(tmp_path / "w", split)
        np.testing.assert_array_equal(ds.data, data[split][0])
        np.testing.assert_array_equal(ds.targets, data[split][1] - 1)
    convert(src, tmp_path / "w2", ["webdataset"])  # no dates, no owners: the same rows give the same bytes
    assert digest(tmp_path / "w" / "train-00000.tar") == digest(tmp_path / "w2" / "train-00000.tar")
    assert describe(tmp_path / "w")["splits"] == {"train": 25, "val": 9}


def test_our_tars_load_with_webdataset(native, tmp_path):
    wds = pytest.importorskip("webdataset")
    src, data = native
    convert(src, tmp_path / "w", ["webdataset"])
    rows = list(wds.WebDataset(str(tmp_path / "w" / "train-00000.tar"), shardshuffle=False)
                .decode("rgb8").to_tuple("png", "cls"))
    x, y = data["train"]
    np.testing.assert_array_equal(np.stack([r[0] for r in rows]), x)
    assert [r[1] for r in rows] == list(y - 1)


def _tar(path, samples):
    with tarfile.open(path, "w") as t:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_raw_npy_tars_of_another_tool_need_labels_in(tmp_path):
    rng = np.random.default_rng(5)
    x, y = rng.integers(0, 256, (6, S, S, 3), dtype=np.uint8), rng.integers(0, 1000, 6)
    root = tmp_path / "other"
    root.mkdir()
    _tar(root / "imagenet8-validation-0000.tar",
         [(f"s{i}.{ext}", data) for i in range(6) for ext, data in (("npy", _npy(x[i])), ("cls", b"%d" % y[i]))])
    with pytest.raises(ConfigError, match="--labels-in"):
        open_dataset(root, "val")
    ds = open_dataset(root, "val", labels_in="sorted")
    np.testing.assert_array_equal(ds.data, x)
    np.testing.assert_array_equal(ds.targets, [IMAGENET.devkit_id(IMAGENET.sorted_wnids[k]) - 1 for k in y])


@pytest.mark.parametrize("kind, message", [
    ("truncated", "damaged or truncated tar"), ("no image", "has no image"), ("bad cls", ".cls is not an integer"),
    ("wrong size", "a 4x4 image, expected 8x8"), ("bad npy", "a float32 array of shape"),
    ("cut between members", "cut short"), ("damaged header", "a damaged member header"),
    ("cls and json disagree", ".cls says 3, .json says 4"),
])
def test_bad_tars_are_clear_errors(tmp_path, kind, message):
    root = tmp_path / kind
    root.mkdir()
    png = io.BytesIO()
    Image.fromarray(np.zeros((S, S, 3), np.uint8)).save(png, format="PNG")
    good = [("a.png", png.getvalue()), ("a.cls", b"3")]
    samples = {"no image": good + [("b.cls", b"1")], "bad cls": good + [("b.png", png.getvalue()), ("b.cls", b"x")],
               "wrong size": good, "bad npy": good + [("b.npy", _npy(np.zeros((S, S), np.float32))),
                                                       ("b.cls", b"1")],
               "truncated": good, "cut between members": good + [("b.png", png.getvalue()), ("b.cls", b"1")],
               "damaged header": good + [("b.png", png.getvalue()), ("b.cls", b"1")],
               "cls and json disagree": good + [("a.json", b'{"label": 4}')]}[kind]
    if kind == "wrong size":
        small = io.BytesIO()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(small, format="PNG")
        samples = good + [("b.png", small.getvalue()), ("b.cls", b"1")]
    f = root / "train-00000.tar"
    _tar(f, samples)
    if kind == "truncated":
        f.write_bytes(f.read_bytes()[:700])
    if kind == "cut between members":  # tarfile alone reads this as a shorter archive, without a word
        with tarfile.open(f) as t:
            at = t.getmembers()[2].offset
        f.write_bytes(f.read_bytes()[:at])
    if kind == "damaged header":  # tarfile alone ends the archive at it, without a word
        with tarfile.open(f) as t:
            at = t.getmembers()[2].offset
        data = bytearray(f.read_bytes())
        data[at + 100] ^= 0xFF
        f.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=message) as e:
        open_dataset(root, labels_in="devkit")
    assert str(f) in str(e.value)


def test_a_build_writes_parquet_and_webdataset_from_the_same_rows(tmp_path):
    rel = make_release(tmp_path / "rel")
    build(BuildConfig(out=str(tmp_path / "o"), train=str(rel.train_tar), val=str(rel.val_tar), sizes=(8,),
                      formats=("native", "parquet", "webdataset"), quiet=True, workers=2, allow_partial=True))
    d = tmp_path / "o" / "8_box"
    for split in ("train", "val"):
        ref = open_dataset(d, split, format="native")
        for fmt in ("parquet", "webdataset"):
            got = open_dataset(d, split, format=fmt)
            np.testing.assert_array_equal(got.data, ref.data, err_msg=fmt)
            np.testing.assert_array_equal(got.targets, ref.targets, err_msg=fmt)
    manifest = json.loads((d / "manifest.json").read_text())
    for name in ("train-00000-of-00001.parquet", "validation-00000.tar", "_info.json"):
        assert manifest["files"][name] == digest(d / name)  # hashed as written, checked here by reading
    assert not [p for p in d.iterdir() if ".tmp-" in p.name]


def test_converting_a_folder_into_itself_adds_the_hub_formats(native):
    src, data = native
    convert(src, src, ["parquet", "webdataset"])
    assert (src / "meta.json").exists() and (src / "_info.json").exists()
    assert open_dataset(src, "val").format == "native"  # detected first; the others by name
    for fmt in ("parquet", "webdataset"):
        np.testing.assert_array_equal(open_dataset(src, "train", format=fmt).data, data["train"][0])
    convert(src, src, ["webdataset"], src_format="parquet")  # rewritten from the parquet copy: the same bytes
    np.testing.assert_array_equal(open_dataset(src, "val", format="webdataset").targets, data["val"][1] - 1)


def test_a_build_of_class_folders_keeps_its_own_table_in_every_format(tmp_path):
    rng = np.random.default_rng(9)
    tree = tmp_path / "tree"
    for wnid in ("wolf", "cat"):  # classes of its own: the build's table is these two, sorted
        (tree / wnid).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tree / wnid / f"{i}.png")
    build(BuildConfig(out=str(tmp_path / "o"), folder=str(tree), sizes=(8,), quiet=True, workers=1,
                      formats=("native", "parquet", "webdataset")))
    d = tmp_path / "o" / "8_box"
    ref = open_dataset(d, format="native")
    assert ref.wnids == ["cat", "wolf"]
    for fmt in ("parquet", "webdataset"):
        got = open_dataset(d, format=fmt)
        assert got.wnids == ref.wnids and got.class_source.startswith("dsimagenet metadata")
        np.testing.assert_array_equal(got.targets, ref.targets)
        np.testing.assert_array_equal(got.data, ref.data)


def _mutations(tmp_path, tries, seed):
    """Our tar shard with bytes flipped, cut or overwritten: each reads as the same samples or is a clear
    error; never fewer samples (tarfile ends an archive silently at a damaged header or a cut between members)
    nor another label."""
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 256, (60, S, S, 3), dtype=np.uint8), rng.integers(1, 1001, 60)
    w = webdataset_format.StreamWriter(tmp_path, "train", S, IMAGENET)
    w.append(x, y)
    (name,) = w.close()[0]
    data = (tmp_path / name).read_bytes()
    return read_mutated(tmp_path, name, data, x, y - 1, tries, rng, labels_in="devkit")


def test_mutated_tars_are_the_same_samples_or_a_clear_error(tmp_path):
    assert _mutations(tmp_path, 40, seed=2026)["clear"] > 0


@pytest.mark.reliability
def test_1000_mutated_tars(tmp_path):
    assert _mutations(tmp_path, 1000, seed=2027)["clear"] > 500


def _png(value=0):
    buf = io.BytesIO()
    Image.fromarray(np.full((S, S, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "device"])
def test_links_and_devices_in_a_shard_are_errors_not_skipped(tmp_path, kind):
    # skipped, a hardlinked b.cls left b's label to its .json (5), and a linked image made a baffling message
    f = tmp_path / "train-00000.tar"
    with tarfile.open(f, "w") as t:
        for name, data in [("a.png", _png()), ("a.cls", b"1"), ("b.png", _png()), ("b.json", b'{"label": 5}')]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("b.cls")
        info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "device": tarfile.CHRTYPE}[kind]
        info.linkname = "a.cls" if kind != "device" else ""
        t.addfile(info)
    with pytest.raises(FormatError, match=f"{f}: member 'b.cls' is " + ("not a regular" if kind == "device" else
                                                                         "a link to 'a.cls'")):
        open_dataset(tmp_path, labels_in="devkit")


@pytest.mark.parametrize("cls", [b"9" * 30])
def test_a_cls_beyond_any_class_number_is_an_error(tmp_path, cls):
    _tar(tmp_path / "train-00000.tar", [("a.png", _png()), ("a.cls", cls)])
    with pytest.raises(FormatError, match=r"sample 'a': .cls is not an integer class number"):
        open_dataset(tmp_path, labels_in="devkit")


def test_a_key_that_comes_back_later_counts_as_it_reads(tmp_path):
    # webdataset groups consecutive members: a, b, a are three samples; counted as two keys, convert failed
    (tmp_path / "src").mkdir()
    _tar(tmp_path / "src" / "train-00000.tar", [("a.png", _png(1)), ("a.cls", b"1"), ("b.png", _png(2)),
                                                ("b.cls", b"2"), ("a.png", _png(3)), ("a.cls", b"3")])
    assert convert(tmp_path / "src", tmp_path / "out", ["native"], labels_in="devkit", quiet=True)["train"] == 3
    ds = open_dataset(tmp_path / "out", "train")
    assert ds.data[:, 0, 0, 0].tolist() == [1, 2, 3] and ds.targets.tolist() == [1, 2, 3]


def test_an_image_size_in_info_json_beyond_any_downsampled_one_is_refused(tmp_path):
    _tar(tmp_path / "train-00000.tar", [("a.png", _png()), ("a.cls", b"0")])
    (tmp_path / "_info.json").write_text(json.dumps({"dsimagenet": {"image_size": 10 ** 6, "wnids": ["n01440764"],
                                                                    "names": ["tench"]}}))
    with pytest.raises(FormatError, match=r"image size 1000000: expected 1..4096"):
        open_dataset(tmp_path)
