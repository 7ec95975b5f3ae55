"""Building from the Hub's raw ImageNet (sources/hub.py): ILSVRC/imagenet-1k parquet and timm/imagenet-1k-wds tar
shards, written by tests/hub_release.py in hub.md's exact layouts from the JPEGs of the miniature release, give
the bytes of the official tars' build, with devkit labels; damaged shards are errors naming file and row/member."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_release import hf_metadata, hub_items, parquet_table, tar_of, wds_sample, write_hub, write_parquet, write_wds
from release import make_release

from dsimagenet import open_dataset
from dsimagenet.build import BuildConfig, BuildError, build
from dsimagenet.labels import IMAGENET, val_ground_truth
from dsimagenet.sources.imagenet import list_train, list_val
from dsimagenet.sources.records import SourceError

QUIET = dict(quiet=True, workers=1, allow_partial=True, sizes=(8,))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    rel = make_release(root / "release")
    items = hub_items(rel.train, rel.val, val_ground_truth())
    pq_root, wds_root = write_hub(root, items)
    return rel, items, pq_root, wds_root


def files_of(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_both_hub_layouts_give_the_tar_builds_bytes_with_devkit_labels(hub, tmp_path):
    rel, _, pq_root, wds_root = hub
    common = dict(sizes=(8, 5), methods=("box", "bicubic"), formats=("native", "pickle"), allow_partial=True,
                  quiet=True, workers=2, chunk_rows=5)  # several chunks, each over several row groups and shards
    build(BuildConfig(out=str(tmp_path / "tar"), train=str(rel.train_tar), val=str(rel.val_tar), **common))
    for name, root in (("parquet", pq_root), ("wds", wds_root)):
        manifests = build(BuildConfig(out=str(tmp_path / name), train=str(root), val=str(root), **common))
        for combo in ("8_box", "8_bicubic", "5_box", "5_bicubic"):
            ref, got = files_of(tmp_path / "tar" / combo), files_of(tmp_path / name / combo)
            assert got.keys() == ref.keys()
            # meta.json and the manifest name the source; every array, label and batch file is the same
            assert {k for k in ref if got[k] != ref[k]} == {"meta.json", "manifest.json"}
            m = manifests[combo]
            assert m["counts"] == {"train": len(rel.train), "val": len(rel.val)}
            assert m["source"]["train_layout"].startswith(("Hugging Face parquet", "WebDataset"))
            assert m["label_order"] == "devkit"
    # labels, independently: the documented order (keys sorted, then the seeded permutation), devkit IDs
    keys = sorted(rel.train)
    order = [keys[i] for i in np.random.default_rng(0).permutation(len(keys))]
    ds = open_dataset(tmp_path / "parquet" / "8_box")
    assert list(ds.targets) == [IMAGENET.devkit_id(k.split("/")[0]) - 1 for k in order]
    val = open_dataset(tmp_path / "wds" / "8_box", "val")
    assert list(val.targets) == [int(val_ground_truth()[int(n[15:23]) - 1]) - 1 for n in sorted(rel.val)]


def test_converted_and_skipped_images_name_the_shard_and_row(hub, tmp_path):
    rel, _, pq_root, wds_root = hub
    m = build(BuildConfig(out=str(tmp_path / "p"), train=str(pq_root), **QUIET))["8_box"]
    cmyk = [where for where, note in m["converted"] if "CMYK" in note]
    assert cmyk and all(" row " in w and ".parquet" in w for w in cmyk)
    m = build(BuildConfig(out=str(tmp_path / "w"), val=str(wds_root), **QUIET))["8_box"]
    assert m["converted"][0][0] == ("ILSVRC2012_val_00000013.JPEG "
                                    "(imagenet1k-validation-0000.tar:ILSVRC2012_val_00000013.jpg)")


def test_shards_without_file_names_still_build_every_image_with_its_label(hub, tmp_path):
    rel, items, _, _ = hub
    root = tmp_path / "nameless"
    write_parquet(root, "train", items["train"], with_path=False)
    listing = list_train(root)
    assert sorted(r.label for r in listing.records) == sorted(IMAGENET.devkit_id(k.split("/")[0]) for k in rel.train)
    build(BuildConfig(out=str(tmp_path / "o"), train=str(root), formats=("native",), **QUIET))
    build(BuildConfig(out=str(tmp_path / "t"), train=str(rel.train_tar), formats=("native",), **QUIET))
    got, ref = open_dataset(tmp_path / "o" / "8_box"), open_dataset(tmp_path / "t" / "8_box")

    def rows(ds):  # the same (image, label) pairs, in another order (the keys differ)
        return sorted(ds.data[i].tobytes() + bytes([ds.targets[i] % 256]) for i in range(len(ds)))

    assert rows(got) == rows(ref)


def test_class_names_that_are_wnids_decide_the_labels(hub, tmp_path):
    _, items, _, _ = hub
    names = list(IMAGENET.wnids)  # devkit order, not sorted: the names, not the integers' order, say the class
    table = parquet_table(items["train"], label_names=names)
    table = table.set_column(1, "label", pa.array([names.index(w) for _, w, _ in items["train"]], pa.int64()))
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "train-00000-of-00001.parquet", row_group_size=3)
    listing = list_train(tmp_path)
    assert sorted(r.key for r in listing.records) == sorted(f"{w}/{n}" for n, w, _ in items["train"])
    assert all(r.label == IMAGENET.devkit_id(r.key.split("/")[0]) for r in listing.records)


def test_the_test_split_is_refused(hub, tmp_path):
    _, items, _, _ = hub
    t = parquet_table(items["val"][:3])
    t = t.set_column(1, "label", pa.array([-1] * 3, pa.int64()))
    (tmp_path / "p" / "data").mkdir(parents=True)
    pq.write_table(t, tmp_path / "p" / "data" / "test-00000-of-00001.parquet")
    with pytest.raises(SourceError, match="only the test split"):
        list_val(tmp_path / "p")
    pq.write_table(t, tmp_path / "p" / "data" / "validation-00000-of-00001.parquet")  # -1 inside a val shard
    with pytest.raises(SourceError, match=r"validation-00000-of-00001.parquet: row 0: label -1: this is the test"):
        list_val(tmp_path / "p")
    name, wnid, data = items["val"][0]
    sample = wds_sample("k", name, wnid, data)
    sample["k.cls"] = b"-1"
    tar_of(tmp_path / "imagenet1k-validation-0000.tar", sample)
    with pytest.raises(SourceError, match="k.cls: label -1: this is the test split"):
        list_val(tmp_path / "imagenet1k-validation-0000.tar")
    r = subprocess.run([sys.executable, "-m", "dsimagenet", "build", "--val", str(tmp_path / "p"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode != 0 and "test split" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _parquet(tmp_path, table, name="train-00000-of-00001.parquet", row_group_size=4):
    """One shard in tmp_path/src/data (the build writes beside its sources, never inside them)."""
    (tmp_path / "src" / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, tmp_path / "src" / "data" / name, row_group_size=row_group_size)
    return tmp_path / "src" / "data" / name


def test_damaged_parquet_shards_are_named(hub, tmp_path):
    _, items, _, _ = hub
    good = _parquet(tmp_path, parquet_table(items["train"]))
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])  # cut short: no footer
    with pytest.raises(SourceError, match=r"train-00000-of-00001.parquet: not a readable parquet file"):
        list_train(tmp_path / "src")
    good.write_bytes(b"this is not parquet at all\n" * 10)
    with pytest.raises(SourceError, match="not a readable parquet file"):
        list_train(tmp_path / "src")
    wrong = pa.table({"img": pa.array([b"x"]), "label": pa.array([1])})
    _parquet(tmp_path, wrong)
    with pytest.raises(SourceError, match=r"expected columns 'image' and 'label'.*\['img', 'label'\]"):
        list_train(tmp_path / "src")
    pixels = pa.table({"image": pa.array([[[[1, 2, 3]]]], pa.list_(pa.list_(pa.list_(pa.uint8())))),
                       "label": pa.array([1])})  # a downsampled copy (Array3D) is not a raw source
    _parquet(tmp_path, pixels)
    with pytest.raises(SourceError, match="column 'image' is list<"):
        list_train(tmp_path / "src")
    t = parquet_table(items["train"][:2]).replace_schema_metadata({"huggingface": hf_metadata(["a", "b"])})
    _parquet(tmp_path, t)
    with pytest.raises(SourceError, match="its ClassLabel has 2 names"):
        list_train(tmp_path / "src")
    t = parquet_table(items["train"][:3]).set_column(1, "label", pa.array(["x", "y", "z"]))
    _parquet(tmp_path, t)
    with pytest.raises(SourceError, match="column 'label' is string, expected integers"):
        list_train(tmp_path / "src")


def test_a_label_out_of_range_or_against_the_file_name_is_a_bad_entry(hub, tmp_path):
    _, items, _, _ = hub
    t = parquet_table(items["train"])
    labels = t.column("label").to_pylist()
    labels[5], labels[7] = 1000, (labels[7] + 1) % 1000  # out of range; another class than the name's
    _parquet(tmp_path, t.set_column(1, "label", pa.array(labels, pa.int64())))
    with pytest.raises(BuildError, match=r"train-00000-of-00001.parquet row (5: label 1000 is not a class 0..999"
                                         r"|7: labelled n\d+ but its file name)"):
        build(BuildConfig(out=str(tmp_path / "o"), train=str(tmp_path / "src"), **QUIET))
    m = build(BuildConfig(out=str(tmp_path / "o"), train=str(tmp_path / "src"), skip_bad=True, **QUIET))["8_box"]
    assert m["counts"]["train"] == len(items["train"]) - 2
    assert {w for w, _ in m["skipped"]} == {"data/train-00000-of-00001.parquet row 5",
                                            "data/train-00000-of-00001.parquet row 7"}


def test_a_val_label_against_the_ground_truth_is_a_bad_entry(hub, tmp_path):
    _, items, _, _ = hub
    val = list(items["val"])
    name, wnid, data = val[2]
    val[2] = (name, IMAGENET.sorted_wnids[(IMAGENET.sorted_index(wnid) + 1) % 1000], data)
    write_wds(tmp_path, "validation", val, shards=1)
    listing, origin = list_val(tmp_path)
    assert "checked against bundled" in origin
    assert listing.problems == [(f"imagenet1k-validation-0000.tar:{name[:-5]}.jpg",
                                 f"labelled {val[2][1]}, the validation ground truth says {wnid}")]


def test_a_row_without_image_bytes_is_a_per_image_error_and_resumes(hub, tmp_path):
    _, items, _, _ = hub
    t = parquet_table(items["train"])
    rows = t.column("image").to_pylist()
    rows[9]["bytes"] = None
    bad = t.set_column(0, "image", pa.array(rows, t.schema.field("image").type))
    _parquet(tmp_path, bad.replace_schema_metadata(t.schema.metadata))
    kw = dict(train=str(tmp_path / "src"), formats=("native",), chunk_rows=3, **QUIET)  # one worker: in order
    with pytest.raises(BuildError, match=r"\(data/train-00000-of-00001.parquet row 9\): no image bytes"):
        build(BuildConfig(out=str(tmp_path / "o"), **kw))
    journal = (tmp_path / "o" / ".build" / "done.jsonl").read_text().splitlines()
    # chunks of whole row groups (4 rows each, chunk_rows 3): chunk 0 (rows 0..3 in file order) and perhaps 1
    # (results that arrive together are taken in any order) were kept ...
    assert sorted(json.loads(line)["chunk"] for line in journal) in ([0], [0, 1])
    build(BuildConfig(out=str(tmp_path / "o"), skip_bad=True, **kw))  # ... and resumed from
    build(BuildConfig(out=str(tmp_path / "fresh"), skip_bad=True, **kw))
    resumed, fresh = files_of(tmp_path / "o" / "8_box"), files_of(tmp_path / "fresh" / "8_box")
    del resumed["manifest.json"], fresh["manifest.json"]  # which names --out
    assert resumed == fresh
    with pytest.raises(BuildError, match="no image bytes"):  # another unfinished build of the same shards ...
        build(BuildConfig(out=str(tmp_path / "again"), **kw))
    _parquet(tmp_path, bad.replace_schema_metadata(t.schema.metadata), row_group_size=5)  # ... re-sharded:
    with pytest.raises(BuildError, match="holds an unfinished build with other settings or inputs"):
        build(BuildConfig(out=str(tmp_path / "again"), skip_bad=True, **kw))  # its chunks meant other rows
    m = json.loads((tmp_path / "o" / "8_box" / "manifest.json").read_text())
    assert [w for w, _ in m["skipped"]] == [f"{items['train'][9][1]}/{items['train'][9][0]} "
                                            "(data/train-00000-of-00001.parquet row 9)"]


def test_damaged_webdataset_shards_are_named(hub, tmp_path):
    _, items, _, wds_root = hub
    shard = wds_root / "imagenet1k-train-0000.tar"
    cut = tmp_path / "cut" / shard.name
    cut.parent.mkdir()
    cut.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])
    with pytest.raises(SourceError, match=r"imagenet1k-train-0000.tar: cut short"):
        list_train(cut.parent)
    members = {}
    for i, (name, wnid, data) in enumerate(items["train"][:4]):
        members.update(wds_sample(f"s{i}", name, wnid, data))
    members["s0.cls"] = b"seven"
    members["s1.cls"] = b"1000"
    del members["s2.jpg"]
    members["s3.txt"] = b"a note"
    tar_of(tmp_path / "imagenet1k-train-0000.tar", members)
    listing = list_train(tmp_path / "imagenet1k-train-0000.tar")
    assert dict(listing.problems) == {"imagenet1k-train-0000.tar:s0.cls": "not an integer label (ASCII digits)",
                                      "imagenet1k-train-0000.tar:s1.cls": "label 1000 is not a class 0..999",
                                      "imagenet1k-train-0000.tar:s2": "a sample with no image (.jpg)"}
    assert listing.ignored == [("imagenet1k-train-0000.tar:s3.txt", "not an image, .cls or .json member")]
    assert [r.key for r in listing.records] == [f"{items['train'][3][1]}/{items['train'][3][0]}"]
    with pytest.raises(BuildError, match=r"imagenet1k-train-0000.tar:s0.cls: not an integer label"):
        build(BuildConfig(out=str(tmp_path / "o"), train=str(tmp_path / "imagenet1k-train-0000.tar"), **QUIET))


def test_a_webdataset_image_that_does_not_decode_is_a_per_image_error(hub, tmp_path):
    _, items, _, _ = hub
    members = {}
    (tmp_path / "src").mkdir()
    for i, (name, wnid, data) in enumerate(items["train"][:3]):
        members.update(wds_sample(f"s{i}", name, wnid, data if i != 1 else b"\xff\xd8 not really a jpeg"))
    tar_of(tmp_path / "src" / "imagenet1k-train-0000.tar", members)
    with pytest.raises(BuildError, match=r"\(imagenet1k-train-0000.tar:s1.jpg\)"):
        build(BuildConfig(out=str(tmp_path / "o"), train=str(tmp_path / "src"), **QUIET))
    m = build(BuildConfig(out=str(tmp_path / "o"), train=str(tmp_path / "src"), skip_bad=True, **QUIET))["8_box"]
    assert m["counts"]["train"] == 2 and len(m["skipped"]) == 1


def test_webdataset_members_are_read_in_place(hub, tmp_path):
    """Every image record is a byte range of its shard holding exactly the sample's bytes (nothing extracted)."""
    _, items, _, wds_root = hub
    listing = list_train(wds_root)
    by_name = {f"{w}/{n}": d for n, w, d in items["train"]}
    for r in listing.records:
        with open(r.path, "rb") as f:
            f.seek(r.offset)
            assert f.read(r.size) == by_name[r.key]
    with tarfile.open(wds_root / "imagenet1k-train-0000.tar") as t:  # the fixture is what hub.md describes
        names = t.getnames()
    assert names[:3] == [f"{names[0][:-4]}.cls", f"{names[0][:-4]}.jpg", f"{names[0][:-4]}.json"]


def test_the_parquet_fixture_loads_with_datasets(hub):
    datasets = pytest.importorskip("datasets")
    _, items, pq_root, _ = hub
    ds = datasets.load_dataset("parquet", data_files=sorted(map(str, (pq_root / "data").glob("train-*"))),
                               split="train")
    assert ds.features["label"].names[0] == IMAGENET.name(IMAGENET.sorted_wnids[0])
    assert ds.features["image"].__class__.__name__ == "Image"
    img = ds[0]["image"]
    assert img.size == __import__("PIL.Image", fromlist=["Image"]).open(io.BytesIO(items["train"][0][2])).size


def test_parquet_chunks_are_whole_row_groups():
    """Each row group is read by one worker: chunks end where a row group does once chunk_rows are reached, hold
    at most 2 * chunk_rows (a larger row group is cut), and are never more than ceil(n / chunk_rows)."""
    from dsimagenet.build import _bounds
    from dsimagenet.sources.records import Listing, Record

    sizes = {"a": [5, 1, 1, 1, 9], "b": [2, 2]}  # rows per row group, per file
    records = [Record(f"{f}{g}-{r}", 1, f, r, 0, g) for f, groups in sizes.items()
               for g, n in enumerate(groups) for r in range(n)]
    listing = Listing(records, [], True, in_file_order=True)
    bounds = _bounds(listing, np.arange(len(records)), 3)
    #         group a0 (5)  a1+a2+a3 (3)  a4 (9 > 2*3: cut at 6)  b0+b1 (4)
    assert bounds == [(0, 5), (5, 8), (8, 14), (14, 17), (17, 21)]
    assert len(bounds) <= -(-len(records) // 3)
    plain = Listing(records, [], True)
    assert _bounds(plain, np.arange(len(records)), 8) == [(0, 8), (8, 16), (16, 21)]


def test_parquet_rows_stream_in_any_order_and_from_row_groups_of_any_size(hub, tmp_path, monkeypatch):
    """A worker streams a row group a few rows at a time: every row's bytes are the original JPEG's whether the
    records come in file order (the build's) or not (the stream restarts), and a build from one row group per
    shard (larger than a chunk: cut between chunks) gives the tar build's arrays."""
    from dsimagenet.sources import hub as hub_source

    rel, items, _, _ = hub
    write_parquet(tmp_path / "src", "train", items["train"], shards=2, row_group_size=1000)
    listing = list_train(tmp_path / "src")
    monkeypatch.setattr(hub_source, "_BATCH", 3)
    monkeypatch.setattr(hub_source, "_groups", hub_source._RowGroups())
    by_key = {f"{w}/{n}": d for n, w, d in items["train"]}
    in_file_order = sorted(listing.records, key=lambda r: (r.path, r.group, r.offset))
    shuffled = [listing.records[i] for i in np.random.default_rng(3).permutation(len(listing.records))]
    for r in in_file_order + shuffled:
        assert hub_source.read_parquet_image(r) == by_key[r.key]
    common = dict(formats=("native",), chunk_rows=4, **{**QUIET, "workers": 2})
    build(BuildConfig(out=str(tmp_path / "p"), train=str(tmp_path / "src"), **common))
    build(BuildConfig(out=str(tmp_path / "t"), train=str(rel.train_tar), **common))
    got, ref = files_of(tmp_path / "p" / "8_box"), files_of(tmp_path / "t" / "8_box")
    assert got["train/images.npy"] == ref["train/images.npy"] and got["train/labels.npy"] == ref["train/labels.npy"]


def test_split_folders_of_shards_are_found_and_two_kinds_in_one_folder_are_refused(hub, tmp_path):
    """The Hub's converted-parquet layout (``train/0000.parquet``, ``validation/0000.parquet``) is found too; a
    folder holding both kinds of shards is ambiguous and said so."""
    _, items, _, _ = hub
    for split, hub_split in (("train", "train"), ("val", "validation")):
        (tmp_path / "conv" / hub_split).mkdir(parents=True)
        pq.write_table(parquet_table(items[split]), tmp_path / "conv" / hub_split / "0000.parquet")
    assert len(list_train(tmp_path / "conv").records) == len(items["train"])
    listing, _ = list_val(tmp_path / "conv")
    assert sorted(r.key for r in listing.records) == sorted(n for n, _, _ in items["val"])
    assert listing.layout.endswith("1 shard (validation/0000.parquet)")
    write_wds(tmp_path / "conv", "train", items["train"], shards=1)
    with pytest.raises(SourceError, match="holds both parquet and WebDataset shards"):
        list_train(tmp_path / "conv")


def _one_shard(tmp_path, table):
    (tmp_path / "data").mkdir(exist_ok=True)
    pq.write_table(table, tmp_path / "data" / "train-00000-of-00001.parquet", row_group_size=3)
    return tmp_path


@pytest.mark.parametrize("kind", ["duplicate-wnid", "wnids-and-garbage", "own-names", "not-strings"])
def test_class_names_that_do_not_identify_the_classes_are_refused_not_read_as_sorted(hub, tmp_path, kind):
    # without file names to contradict them, any of these would build every image under another class
    _, items, _, _ = hub
    names = {"duplicate-wnid": [IMAGENET.sorted_wnids[0]] + list(IMAGENET.sorted_wnids[:-1]),
             "wnids-and-garbage": list(IMAGENET.wnids[:-1]) + ["garbage"],
             "own-names": [f"class {i}" for i in range(1000)],
             "not-strings": list(range(1000))}[kind]
    root = _one_shard(tmp_path, parquet_table(items["train"], with_path=False, label_names=names))
    with pytest.raises(SourceError, match="train-00000-of-00001.parquet: its ClassLabel"):
        list_train(root)


def test_human_class_names_in_devkit_order_label_by_devkit_order(hub, tmp_path):
    _, items, _, _ = hub
    names = [IMAGENET.name(w) for w in IMAGENET.wnids]
    table = parquet_table(items["train"], with_path=False, label_names=names)
    table = table.set_column(1, "label", pa.array([IMAGENET.devkit_id(w) - 1 for _, w, _ in items["train"]],
                                                  pa.int64()))
    listing = list_train(_one_shard(tmp_path, table))
    assert sorted(r.label for r in listing.records) == sorted(IMAGENET.devkit_id(w) for _, w, _ in items["train"])


@pytest.mark.parametrize("path_type", [pa.int64(), pa.binary()])
def test_an_image_path_that_is_not_a_string_is_a_clear_error(hub, tmp_path, path_type):
    _, items, _, _ = hub
    table = parquet_table(items["train"])
    image = table.column("image").combine_chunks()
    paths = pa.array([i if path_type == pa.int64() else b"x.JPEG" for i in range(len(image))], path_type)
    table = table.set_column(0, "image", pa.StructArray.from_arrays([image.field("bytes"), paths], ["bytes", "path"]))
    with pytest.raises(SourceError, match=f"'path' of type {path_type}"):
        list_train(_one_shard(tmp_path, table))
