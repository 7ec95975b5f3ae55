"""What a dataset is, as ``dsimagenet info`` says it: the official files (recognised by their MD5 where it is
published), a dsimagenet build or conversion (its manifest), a Hub copy (parquet or WebDataset shards), or the
unlabelled PixelRNN downsampled ImageNet, which is refused: it is not the Chrabaszcz et al. data.

    provenance.describe(path, fmt, members=...)   # -> {"kind": ..., ...}, the "provenance" entry of describe()
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from dsimagenet.formats import official
from dsimagenet.formats.native import META

# MD5s of the official files as published (ImageNet16x16: NAS-Bench-201's loader, xautodl DownsampledImageNet.py).
# The other sizes' MD5s are not published; their files are reported "unknown", with the MD5 computed here.
KNOWN_MD5 = {
    "ImageNet16x16": {
        "train_data_batch_1": "27846dcaa50de8e21a7d1a35f30f0e91",
        "train_data_batch_2": "c7254a054e0e795c69120a5727050e3f",
        "train_data_batch_3": "4333d3df2e5ffb114b05d2ffc19b1e87",
        "train_data_batch_4": "1620cdf193304f4a92677b695d70d10f",
        "train_data_batch_5": "348b3c2fdbb3940c4e9e834affd3b18d",
        "train_data_batch_6": "6e765307c242a1b3d7d5ef9139b48945",
        "train_data_batch_7": "564926d8cbf8fc4818ba23d2faac7564",
        "train_data_batch_8": "f4755871f718ccb653440b9dd0ebac66",
        "train_data_batch_9": "bb6dd660c38c58552125b1a92f86b5d4",
        "train_data_batch_10": "8f03f34ac4b42271a294f91bf480f29b",
        "val_data": "3410e3017fdaefba8d5073aaa65e4bd6",
    },
}
_BY_MD5 = {md5: (release, name) for release, files in KNOWN_MD5.items() for name, md5 in files.items()}

PIXELRNN = ("the unlabelled PixelRNN downsampled ImageNet (van den Oord et al. 2016; TFDS downsampled_imagenet: "
            "32 and 64 px, no labels, 49,999 validation images, another resizing), not the Chrabaszcz et al. data "
            "dsimagenet reads: use the official Imagenet32/64 files, or `dsimagenet build` from ILSVRC-2012")
PIXELRNN_VAL = 49_999
_PIXELRNN_NAME = re.compile(r"^(train|valid)_(32x32|64x64)(\.tar|\.zip)?$")


def pixelrnn(path: str | Path, look_inside: bool = True) -> str | None:
    """The reason to refuse ``path`` when it is (a folder holding) the PixelRNN release, ``train_32x32`` /
    ``valid_64x64`` folders or tars of PNGs; else None. ``look_inside`` False: its name only (no listing)."""
    path = Path(path)
    names = [path.name] + ([p.name for p in path.iterdir()] if look_inside and path.is_dir() else [])
    if any(_PIXELRNN_NAME.match(n) for n in names):
        return f"this is {PIXELRNN}"
    if look_inside and path.is_dir():
        pngs = sum(1 for p in path.iterdir() if p.suffix.lower() == ".png")
        if pngs == PIXELRNN_VAL:
            return f"{pngs:,} PNG files and no labels: this looks like {PIXELRNN}"
    return None


def _md5(member: official.Member) -> str:
    h = hashlib.md5()
    with member.open() as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _manifest(folders: set[Path]) -> tuple[Path, dict] | None:
    for folder in sorted(folders):
        p = folder / "manifest.json"
        if p.is_file():
            try:
                m = json.loads(p.read_bytes()[: 64 << 20].decode("utf-8"))
            except (ValueError, RecursionError):
                return p, {}
            return p, m if isinstance(m, dict) else {}
    return None


def _ours(path: Path, m: dict) -> dict | None:
    if "dsimagenet_build" in m:
        return {"kind": "dsimagenet build", "manifest": str(path), "source": m.get("source"),
                "size": m.get("size"), "method": m.get("method"),
                "dsimagenet": (m.get("versions") or {}).get("dsimagenet")}
    if "dsimagenet_convert" in m:
        return {"kind": "dsimagenet convert", "manifest": str(path), "converted_from": m.get("converted_from"),
                "source": m.get("source")}
    return None


def official_files(path: Path, members: list[official.Member]) -> dict:
    """Official pickle/npz files: a dsimagenet build or conversion when its manifest is beside them, else each
    file's MD5 against the published ones."""
    folders = {path} if path.is_dir() else set()
    folders |= {Path(m.where).parent for m in members if ".zip:" not in m.where}
    found = _manifest(folders)
    if found and (ours := _ours(*found)) is not None:
        return ours
    files, releases = {}, set()
    for m in members:
        md5 = _md5(m)
        name = official.batch_name(m.split, m.index, "pickle")
        hit = _BY_MD5.get(md5)
        if hit and hit[1] == name and m.kind == "pickle":
            files[name] = f"{hit[0]} official ({md5})"
            releases.add(hit[0])
        else:
            files[official.batch_name(m.split, m.index, m.kind)] = f"unknown ({md5})"
    known = [n for n, v in files.items() if not v.startswith("unknown")]
    if known and len(known) == len(files):
        what = f"the official {', '.join(sorted(releases))} files (every file's MD5 matches the published one)"
    elif known:
        what = (f"official-format files, {len(known)} of {len(files)} matching the published "
                f"{', '.join(sorted(releases))} MD5s: the others differ from the release")
    else:
        what = ("official-format files whose MD5s are not published (only ImageNet16x16's are): the release, "
                "or a copy written by another tool")
    return {"kind": "official files", "recognised": what, "files": files}


def describe(path: str | Path, fmt: str, members: list[official.Member] | None = None,
             hub_source=None) -> dict:
    """The "provenance" entry of ``convert.describe``."""
    path = Path(path)
    if fmt == "native":
        meta = json.loads((path / META).read_text())
        found = _manifest({path})
        if found and (ours := _ours(*found)) is not None:
            return ours
        if meta.get("converted_from"):
            return {"kind": "dsimagenet convert", "converted_from": meta.get("converted_from"),
                    "source": meta.get("source")}
        return {"kind": "dsimagenet native files", "source": meta.get("source")}
    if fmt in ("pickle", "npz"):
        return official_files(path, members if members is not None else official.find_members(path))
    src = hub_source
    ours = src.meta.get("written_by_dsimagenet")
    found = _manifest({path if path.is_dir() else path.parent})
    if found and (built := _ours(*found)) is not None:
        return {**built, "kind": f"{built['kind']} ({fmt} shards)"}
    return {"kind": f"{'dsimagenet' if ours else 'Hub'} {fmt} copy",
            "image_column": src.meta.get("image_column", "PNG/npy tar members"),
            "labels": src.labels.source if src.labels is not None else
            "order unknown: the files do not name their classes; give --labels-in devkit or sorted"}
