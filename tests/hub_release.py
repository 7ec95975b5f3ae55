"""The same JPEGs as the Hugging Face Hub serves raw ImageNet (../shared/reference/hub.md), written with pyarrow and
tarfile only, independently of dsimagenet's readers:
- ``ILSVRC/imagenet-1k``: ``data/{train,validation}-NNNNN-of-NNNNN.parquet``, ``image`` the ``datasets.Image``
  struct ``{bytes, path}`` (path as the Hub's loading script names files: ``<name>_<wnid>.JPEG``), ``label`` int64
  in sorted-WNID order, the ClassLabel names (human-readable) in the ``huggingface`` schema metadata;
- ``timm/imagenet-1k-wds``: ``imagenet1k-{train,validation}-NNNN.tar`` of samples ``KEY.cls``, ``KEY.jpg``,
  ``KEY.json`` (``{"filename", "label", "class_name"}``), members of a sample together, in extension order.
Rows and samples are shuffled across the shards (as both copies are), so file order is not name order."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from dsimagenet.labels import IMAGENET


def hub_items(train: dict[str, bytes], val: dict[str, bytes], truth: np.ndarray, seed: int = 0) -> dict:
    """{split: [(original file name, wnid, bytes)]} in a shuffled order; ``train`` keyed "wnid/name", ``val``
    "ILSVRC2012_val_%08d.JPEG" labelled by ``truth`` (devkit IDs of val images 1..50000)."""
    rng = np.random.default_rng(seed)
    items = {"train": [(k.split("/")[1], k.split("/")[0], d) for k, d in train.items()],
             "val": [(n, IMAGENET.wnid(int(truth[int(n[15:23]) - 1])), d) for n, d in val.items()]}
    return {s: [v[i] for i in rng.permutation(len(v))] for s, v in items.items()}


def _sorted_label(wnid: str) -> int:
    return IMAGENET.sorted_index(wnid)  # the Hub's labels: sorted-WNID order, 0..999


def hf_metadata(label_names=None) -> bytes:
    names = list(label_names) if label_names is not None else [IMAGENET.name(w) for w in IMAGENET.sorted_wnids]
    return json.dumps({"info": {"features": {"image": {"_type": "Image"},
                                             "label": {"names": names, "_type": "ClassLabel"}}}}).encode()


def parquet_table(items, with_path: bool = True, label_names=None):
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = []
    for name, wnid, data in items:
        stem, ext = name.rsplit(".", 1)
        rows.append({"bytes": data, "path": f"{stem}_{wnid}.{ext}" if with_path else None})
    table = pa.table({"image": pa.array(rows, image),
                      "label": pa.array([_sorted_label(w) for _, w, _ in items], pa.int64())})
    return table.replace_schema_metadata({"huggingface": hf_metadata(label_names)})


def write_parquet(root: Path, split: str, items, shards: int = 2, row_group_size: int = 4, **kw) -> list[Path]:
    """``root/data/{split}-NNNNN-of-NNNNN.parquet`` (split "train" or "validation"), snappy as datasets writes."""
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(shards):
        path = root / "data" / f"{split}-{k:05d}-of-{shards:05d}.parquet"
        pq.write_table(parquet_table(items[k::shards], **kw), path, row_group_size=row_group_size)
        out.append(path)
    return out


def wds_sample(key: str, name: str, wnid: str, data: bytes) -> dict[str, bytes]:
    label = _sorted_label(wnid)
    meta = {"filename": name, "label": label, "class_name": IMAGENET.name(wnid)}
    return {f"{key}.cls": str(label).encode(), f"{key}.jpg": data, f"{key}.json": json.dumps(meta).encode()}


def tar_of(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as t:  # tarfile's default format, as webdataset's TarWriter writes
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def write_wds(root: Path, split: str, items, shards: int = 2) -> list[Path]:
    """``root/imagenet1k-{split}-NNNN.tar`` (split "train" or "validation"); keys as timm's: the file's stem."""
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(shards):
        members = {}
        for name, wnid, data in items[k::shards]:
            members.update(wds_sample(name.rsplit(".", 1)[0], name, wnid, data))
        out.append(tar_of(root / f"imagenet1k-{split}-{k:04d}.tar", members))
    return out


def write_hub(root: Path, items: dict) -> tuple[Path, Path]:
    """Both Hub copies of ``items`` (hub_items): (parquet root, WebDataset root)."""
    pq_root, wds_root = root / "imagenet-1k", root / "imagenet-1k-wds"
    for split, hub_split in (("train", "train"), ("val", "validation")):
        write_parquet(pq_root, hub_split, items[split])
        write_wds(wds_root, hub_split, items[split])
    return pq_root, wds_root
