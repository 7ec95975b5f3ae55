"""Hub parquet copies of downsampled ImageNet, written here with pyarrow alone in the exact schemas of
../shared/reference/hub.md (the ``huggingface`` schema metadata included), read with the right labels and
pixels; our parquet output read back byte for byte, and by ``datasets`` itself when it is installed."""

import hashlib
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_mutated
from PIL import Image

from dsimagenet import convert, describe, open_dataset
from dsimagenet.cli import main
from dsimagenet.errors import ConfigError, FormatError
from dsimagenet.formats import parquet as parquet_format
from dsimagenet.formats import provenance
from dsimagenet.labels import IMAGENET

S = 8
ARRAY3D = "datasets.features.features.Array3DExtensionType"


def hf_meta(image_feature, label_feature):
    return {b"huggingface": json.dumps({"info": {"features": {"image": image_feature,
                                                              "label": label_feature}}}).encode()}


def write_array3d(path, images, labels, label_feature=None, group=7):
    """datasets.Array3D((S, S, 3), "uint8") + an integer label, as hub.md says the file holds them."""
    size = images.shape[1]
    image_type = pa.list_(pa.list_(pa.list_(pa.uint8())))
    ext = {b"ARROW:extension:name": ARRAY3D.encode(),
           b"ARROW:extension:metadata": json.dumps([[size, size, 3], "uint8"]).encode()}
    schema = pa.schema([pa.field("image", image_type, metadata=ext), pa.field("label", pa.int64())],
                       metadata=hf_meta({"shape": [size, size, 3], "dtype": "uint8", "_type": "Array3D"},
                                        label_feature or {"dtype": "int64", "_type": "Value"}))
    table = pa.table({"image": pa.array(images.tolist(), image_type), "label": pa.array(labels, pa.int64())},
                     schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=group)


def write_images(path, encoded, labels, names):
    """datasets.Image() (struct {bytes, path}) + ClassLabel(names), as ILSVRC/imagenet-1k-derived copies."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([pa.field("image", image_type), pa.field("label", pa.int64())],
                       metadata=hf_meta({"_type": "Image"}, {"names": names, "_type": "ClassLabel"}))
    rows = [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(encoded)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": pa.array(rows, image_type), "label": pa.array(labels, pa.int64())},
                            schema=schema), path, row_group_size=5)


def encode(img, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def hub_names_sorted():
    """Class names as ILSVRC/imagenet-1k's ClassLabel has them: sorted-WNID order, synonyms after a comma, the
    second "crane" renamed "crane2" (ClassLabel names are unique)."""
    names, seen = [], set()
    for w in IMAGENET.sorted_wnids:
        n = IMAGENET.name(w)
        n = n + "2" if n in seen else n
        seen.add(n)
        names.append(f"{n}, a synonym")
    return names


@pytest.fixture
def data():
    rng = np.random.default_rng(7)
    return {split: (rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8), rng.integers(0, 1000, n))
            for split, n in (("train", 30), ("val", 11))}


@pytest.fixture
def tfds_copy(tmp_path, data):
    """An Array3D copy with integer labels in devkit order (official labels minus one), two train shards."""
    root = tmp_path / "imagenet8-hub"
    x, y = data["train"]
    write_array3d(root / "data" / "train-00000-of-00002.parquet", x[:17], y[:17])
    write_array3d(root / "data" / "train-00001-of-00002.parquet", x[17:], y[17:])
    write_array3d(root / "data" / "validation-00000-of-00001.parquet", *data["val"])
    return root


def test_an_array3d_copy_opens_with_the_order_given(tfds_copy, data):
    for split in ("train", "val"):
        x, y = data[split]
        ds = open_dataset(tfds_copy, split, labels_in="devkit")
        assert ds.format == "parquet" and ds.image_size == S
        np.testing.assert_array_equal(ds.data, x)
        np.testing.assert_array_equal(ds.targets, y)  # devkit order: the stored integers themselves
        assert ds.wnids[int(y[0])] == IMAGENET.wnids[int(y[0])]
        srt = open_dataset(tfds_copy, split, order="sorted", labels_in="devkit")
        np.testing.assert_array_equal(srt.targets, [IMAGENET.sorted_index(IMAGENET.wnids[k]) for k in y])
    # the same integers read as sorted-WNID order are other classes: devkit ID of sorted class k
    ds = open_dataset(tfds_copy, "val", labels_in="sorted")
    np.testing.assert_array_equal(ds.targets, [IMAGENET.devkit_id(IMAGENET.sorted_wnids[k]) - 1
                                               for k in data["val"][1]])
    x, y = data["train"]  # the mean training image, summed exactly
    np.testing.assert_allclose(open_dataset(tfds_copy, labels_in="devkit").mean, x.astype(np.float64).mean(0))


def test_an_order_that_the_files_do_not_say_is_never_guessed(tfds_copy, tmp_path):
    with pytest.raises(ConfigError, match="--labels-in"):
        open_dataset(tfds_copy)
    with pytest.raises(ConfigError, match="--labels-in"):
        convert(tfds_copy, tmp_path / "o", ["native"])
    with pytest.raises(ConfigError, match="--labels-in must be one of"):
        open_dataset(tfds_copy, labels_in="torchvision")
    info = describe(tfds_copy)  # described all the same, the order said to be unknown
    assert info["splits"] == {"train": 30, "val": 11} and "unknown" in info["label_order"]
    assert main(["convert", str(tfds_copy), "--out", str(tmp_path / "o")]) == 1


def test_a_png_copy_with_classlabel_names_in_sorted_order(tmp_path, data):
    root = tmp_path / "hub"
    x, y = data["val"]
    write_images(root / "validation-00000-of-00001.parquet", [encode(i) for i in x], y, hub_names_sorted())
    ds = open_dataset(root, "val")  # no labels_in: the names say sorted order
    np.testing.assert_array_equal(ds.data, x)  # PNG: exact
    np.testing.assert_array_equal(ds.targets, [IMAGENET.devkit_id(IMAGENET.sorted_wnids[k]) - 1 for k in y])
    assert "sorted order" in ds.class_source
    open_dataset(root, "val", labels_in="sorted")  # agreeing is fine; contradicting is not
    with pytest.raises(ConfigError, match="leave --labels-in out"):
        open_dataset(root, "val", labels_in="devkit")


def test_jpeg_bytes_are_decoded_once_as_pillow_decodes_them(tmp_path, data):
    x, y = data["val"]
    jpegs = [encode(i, "JPEG") for i in x]
    wnids = [IMAGENET.wnids[k] for k in range(1000)][::-1]  # WNID names in an order of their own
    write_images(tmp_path / "h" / "val-00000.parquet", jpegs, y, wnids)
    ds = open_dataset(tmp_path / "h", "val")
    ref = np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs])
    np.testing.assert_array_equal(ds.data, ref)
    np.testing.assert_array_equal(ds.targets, [IMAGENET.devkit_id(wnids[k]) - 1 for k in y])


def test_our_parquet_reads_back_byte_for_byte_and_as_hub_md_says(tfds_copy, tmp_path, data):
    out = tmp_path / "ours"
    counts = convert(tfds_copy, out, ["parquet"], labels_in="devkit")
    assert counts == {"train": 30, "val": 11}
    files = sorted(p.name for p in out.glob("*.parquet"))
    assert files == ["train-00000-of-00001.parquet", "validation-00000-of-00001.parquet"]
    f = out / files[0]
    schema = pq.read_schema(f)
    assert schema.field("image").metadata[b"ARROW:extension:name"] == ARRAY3D.encode()
    assert json.loads(schema.field("image").metadata[b"ARROW:extension:metadata"]) == [[S, S, 3], "uint8"]
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"shape": [S, S, 3], "dtype": "uint8", "_type": "Array3D"}
    assert features["label"]["_type"] == "ClassLabel" and features["label"]["names"] == list(IMAGENET.wnids)
    t = pq.read_table(f)  # independently of our reader: nested lists -> array; label k is devkit class k + 1
    x, y = data["train"]
    np.testing.assert_array_equal(np.array(t.column("image").to_pylist(), np.uint8), x)
    np.testing.assert_array_equal(t.column("label").to_numpy(), y)
    groups = pq.ParquetFile(f).metadata
    assert all(groups.row_group(g).num_rows <= parquet_format.rows_per_group(S) for g in range(groups.num_row_groups))
    for split in ("train", "val"):
        ds = open_dataset(out, split)  # our metadata says the classes: no labels_in needed
        np.testing.assert_array_equal(ds.data, data[split][0])
        np.testing.assert_array_equal(ds.targets, data[split][1])
    info = describe(out)
    assert info["provenance"]["kind"].startswith("dsimagenet convert") and info["label_order"] == "devkit"


def test_our_parquet_loads_with_datasets(tfds_copy, tmp_path, data):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "ours"
    convert(tfds_copy, out, ["parquet"], labels_in="devkit")
    ds = datasets.load_dataset("parquet", data_files={"train": str(out / "train-*.parquet")},
                               cache_dir=str(tmp_path / "cache"))["train"]
    assert isinstance(ds.features["label"], datasets.ClassLabel)
    assert isinstance(ds.features["image"], datasets.Array3D)
    x, y = data["train"]
    rows = ds.with_format("numpy")[:]
    np.testing.assert_array_equal(rows["image"], x)
    assert ds.features["label"].int2str(int(y[0])) == IMAGENET.wnids[int(y[0])]
    # the fixtures too: what they hold is what datasets itself reads from the same schemas
    fix = datasets.load_dataset("parquet", data_files=str(tfds_copy / "data" / "validation-*.parquet"),
                                cache_dir=str(tmp_path / "cache"))["train"]
    assert isinstance(fix.features["image"], datasets.Array3D)
    np.testing.assert_array_equal(fix.with_format("numpy")[:]["image"], data["val"][0])
    write_images(tmp_path / "png" / "validation-0.parquet", [encode(i) for i in data["val"][0]], data["val"][1],
                 hub_names_sorted())
    png = datasets.load_dataset("parquet", data_files=str(tmp_path / "png" / "*.parquet"),
                                cache_dir=str(tmp_path / "cache"))["train"]
    assert isinstance(png.features["image"], datasets.Image) and png.features["label"].num_classes == 1000
    np.testing.assert_array_equal(np.asarray(png[3]["image"]), data["val"][0][3])


def _bad(tmp_path, kind):
    root = tmp_path / kind
    x = np.zeros((4, S, S, 3), np.uint8)
    f = root / "train-00000-of-00001.parquet"
    if kind == "not parquet":
        root.mkdir()
        f.write_bytes(b"PAR1 but not really" * 10)
    elif kind == "truncated":
        write_array3d(f, x, [1, 2, 3, 4])
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif kind == "no label":
        root.mkdir()
        pq.write_table(pa.table({"image": pa.array(x.tolist(), pa.list_(pa.list_(pa.list_(pa.uint8()))))}), f)
    elif kind == "float images":
        root.mkdir()
        pq.write_table(pa.table({"image": pa.array(x.astype(float).tolist()), "label": [1, 2, 3, 4]}), f)
    elif kind == "wrong shape":  # 8 x 7 images under an 8 x 8 x 3 Array3D
        write_array3d(f, x, [1, 2, 3, 4])
        t = pq.read_table(f)
        bad = pa.array(np.zeros((4, S, 7, 3), np.uint8).tolist(), t.schema.field("image").type)
        pq.write_table(t.set_column(0, t.schema.field("image"), bad), f)
    elif kind == "label out of range":
        write_array3d(f, x, [0, 1, 1000, 2])
    elif kind == "test split":
        write_array3d(f, x, [-1, -1, -1, -1])
    elif kind == "missing shard":
        write_array3d(root / "train-00000-of-00002.parquet", x, [1, 2, 3, 4])
    elif kind == "no split in its name":
        write_array3d(root / "shard0.parquet", x, [1, 2, 3, 4])
    return root


BAD = {"not parquet": "not a readable parquet file", "truncated": "parquet", "no label": "PixelRNN",
       "float images": "expected an Array3D of uint8", "wrong shape": "dimension of 7, expected 8",
       "label out of range": "label 1000 out of range 0..999", "test split": "a test split has no labels",
       "missing shard": "train-00001-of-00002 missing", "no split in its name": "which split"}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_files_are_clear_errors_naming_the_file(tmp_path, kind, capsys):
    root = _bad(tmp_path, kind)
    with pytest.raises(FormatError, match=BAD[kind]) as e:
        open_dataset(root, labels_in="devkit")
    assert str(root) in str(e.value)
    assert main(["info", str(root), "--labels-in", "devkit"]) == 1  # one line, no traceback
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and BAD[kind] in err


def test_the_pixelrnn_variant_is_refused(tmp_path):
    (tmp_path / "valid_32x32").mkdir()
    with pytest.raises(FormatError, match="PixelRNN"):
        open_dataset(tmp_path / "valid_32x32")
    with pytest.raises(FormatError, match="PixelRNN"):
        describe(tmp_path)
    (tmp_path / "valid_64x64.tar").write_bytes(b"\0" * 1024)
    with pytest.raises(FormatError, match="PixelRNN"):
        open_dataset(tmp_path / "valid_64x64.tar")


def test_official_files_are_recognised_by_md5_or_said_unknown(tiny, monkeypatch):
    src = tiny.official()
    md5 = hashlib.md5((src / "val_data").read_bytes()).hexdigest()
    info = describe(src)
    assert info["provenance"]["files"]["val_data"] == f"unknown ({md5})"
    assert "not published" in info["provenance"]["recognised"]
    monkeypatch.setitem(provenance._BY_MD5, md5, ("ImageNet16x16", "val_data"))
    info = describe(src)
    assert info["provenance"]["files"]["val_data"] == f"ImageNet16x16 official ({md5})"
    assert "1 of 11" in info["provenance"]["recognised"]
    # the published table itself: ImageNet16's eleven files, as nasbench201/README.md lists them
    known = provenance.KNOWN_MD5["ImageNet16x16"]
    assert len(known) == 11 and known["val_data"] == "3410e3017fdaefba8d5073aaa65e4bd6"


def test_a_failed_parquet_write_leaves_no_shard_under_a_final_name(tfds_copy, tmp_path, monkeypatch):
    calls = []

    def fail_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    real = parquet_format._table
    monkeypatch.setattr(parquet_format, "_table", fail_second)
    monkeypatch.setattr(parquet_format, "GROUP_BYTES", S * S * 3 * 64)  # several row groups
    with pytest.raises(OSError):
        convert(tfds_copy, tmp_path / "o", ["parquet"], labels_in="devkit")
    assert not (tmp_path / "o").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".o")]


def _mutations(tmp_path, tries, seed):
    """Our parquet shard with bytes flipped, cut or overwritten by a random 64-bit value: each opens with the
    same data or is a clear error (no traceback: pyarrow's own errors are ours; a flipped pixel fails the page
    CRC rather than reading as other pixels)."""
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 256, (300, S, S, 3), dtype=np.uint8), rng.integers(1, 1001, 300)
    w = parquet_format.StreamWriter(tmp_path, "train", S, IMAGENET)
    w.append(x, y)
    (name,) = w.close()
    data = (tmp_path / name).read_bytes()
    return read_mutated(tmp_path, name, data, x, y - 1, tries, rng)


def test_mutated_parquet_is_the_same_data_or_a_clear_error(tmp_path):
    outcomes = _mutations(tmp_path, 30, seed=2026)
    assert outcomes["clear"] > 0


@pytest.mark.reliability
def test_1000_mutated_parquet_files(tmp_path):
    outcomes = _mutations(tmp_path, 1000, seed=2027)
    assert outcomes["clear"] > 500


def test_a_declared_or_encoded_size_beyond_any_downsampled_one_is_refused_before_memory_is_asked(tmp_path, data):
    # a schema's shape, or a 6000 px PNG of a few KB, would otherwise size arrays of gigabytes
    x, y = data["val"]
    huge = tmp_path / "huge" / "validation-00000-of-00001.parquet"
    write_array3d(huge, x, y)
    t = pq.read_table(huge)
    meta = dict(t.schema.metadata)
    hf = json.loads(meta[b"huggingface"])
    hf["info"]["features"]["image"]["shape"] = [100000, 100000, 3]
    meta[b"huggingface"] = json.dumps(hf).encode()
    pq.write_table(t.replace_schema_metadata(meta), huge)
    with pytest.raises(FormatError, match=r"validation-00000-of-00001.parquet: image shape \[100000, 100000, 3\]: "
                                          "larger than 4096"):
        open_dataset(huge.parent, "val", labels_in="devkit")
    buf = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buf, format="PNG")
    bomb = tmp_path / "bomb" / "validation-00000-of-00001.parquet"
    write_images(bomb, [buf.getvalue(), encode(x[0])], [0, 1], list(IMAGENET.wnids))
    with pytest.raises(FormatError, match="row 0: a 6000x6000 image, larger than 4096 px"):
        open_dataset(bomb.parent, "val")
