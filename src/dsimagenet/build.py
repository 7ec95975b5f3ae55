"""Build downsampled datasets from the raw ILSVRC-2012 release or any class-folder tree.

    dsimagenet build --train ILSVRC2012_img_train.tar --val ILSVRC2012_img_val.tar --out out \\
        --sizes 16 32 64 --methods box        # -> out/16_box/, out/32_box/, out/64_box/
    dsimagenet.build(BuildConfig(out="out", folder="my_dataset", sizes=(32,)))

Source -> index (archives are indexed, never extracted) -> a seeded order -> chunks of rows, each decoded once
and resized to every (size, method) by worker processes that write their rows straight into place (one work
array per split and output, ``native.RowArray``; the train split's per-chunk pixel sums beside them, so that the
mean is known when the last chunk is) -> each requested format written from those rows by its own writer, its
work done by the same worker processes (the native arrays hashed once and adopted in place; the official batches
cut from them, each hashed as it is written) -> a manifest with the sha256 of every file, none read back. A
journal of finished chunks makes the build resumable after
any interruption (SIGKILL included) with byte-identical results; the same seed gives the same bytes whatever the
number of workers and the order in which the file system lists files.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import multiprocessing
import numbers
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from dsimagenet.checksum import digest
from dsimagenet.errors import ConfigError, DSImageNetError
from dsimagenet.fields import check, is_int, option, recipe, text, whole
from dsimagenet.formats import native, official
from dsimagenet.formats import parquet as parquet_format
from dsimagenet.formats import webdataset as webdataset_format
from dsimagenet.formats.atomic import atomic_write
from dsimagenet.labels import IMAGENET, ClassTable
from dsimagenet.resize import ImageError, Resize, resize_all
from dsimagenet.runs import plural
from dsimagenet.sources import folder as folder_source
from dsimagenet.sources import imagenet as imagenet_source
from dsimagenet.sources.records import Listing, OpenFiles, Record, printable, read_record
from dsimagenet.versions import libjpeg_version, versions

FORMATS = ("pickle", "npz", "native", "parquet", "webdataset")
WORK = ".build"
LOCK = ".build.lock"
_CHUNK_BYTES = 32 << 20
# Bounds on what one build may ask for, checked before anything is written: the largest side ImageNet's photos
# commonly have (beyond it a "downsampled" dataset is an upsampled one), and a grid of outputs that one decode
# feeds (every combination's rows of a chunk are held in each worker's memory at once).
MAX_SIZE = 1024
MAX_COMBOS = 64
MAX_WORKERS = 1024
_MAX_CHUNK_BYTES = 1 << 30


class BuildError(DSImageNetError, RuntimeError):
    """The build stopped; the message says which file and why, and how to go on."""


@dataclass(frozen=True)
class BuildConfig:
    """One build. ``recipe`` fields decide the output bytes (a resumed build must match them), ``option`` fields
    how it is run; each declares its help and allowed values once (dsimagenet.fields), for the flags and checks."""

    out: str = option(check=text(), help="the folder to build into (created)")
    train: str | None = recipe(
        None, check=text(optional=True),
        help="ILSVRC2012_img_train.tar, a folder of <wnid>/ folders or <wnid>.tar files, the Kaggle root, or a "
             "Hub copy (ILSVRC/imagenet-1k parquet, timm/imagenet-1k-wds)")
    val: str | None = recipe(
        None, check=text(optional=True),
        help="ILSVRC2012_img_val.tar, a folder of ILSVRC2012_val_*.JPEG or of <wnid>/ folders, the Kaggle root, "
             "or a Hub copy (ILSVRC/imagenet-1k parquet, timm/imagenet-1k-wds)")
    folder: str | None = recipe(
        None, check=text(optional=True),
        help="any class-folder tree: root/train/<class>/<img> (+ root/val/...) or root/<class>/<img>")
    class_names: Literal["folder", "sorted-index", "devkit-index"] = recipe(
        "folder", help="what --folder's class folder names are: the classes themselves (folder), or ImageNet's "
                       "classes numbered 0..999 in sorted-WNID order (sorted-index: ImageNetV2) or devkit order "
                       "(devkit-index)")
    devkit: str | None = recipe(
        None, check=text(optional=True),
        help="ILSVRC2012_devkit_t12.tar.gz or Kaggle's LOC_val_solution.csv (default: bundled val labels)")
    sizes: tuple[int, ...] = recipe(
        (32,), check=(lambda v: all(is_int(s) and 1 <= s <= MAX_SIZE for s in v), f"whole numbers in 1..{MAX_SIZE}"),
        help="output sizes S (S x S)")
    methods: tuple[str, ...] = recipe(  # the names are Resize's to check
        ("box",), check=(lambda v: all(isinstance(m, str) for m in v), "method names"),
        help="box (the paper), lanczos, bilinear, bicubic, hamming, nearest")
    formats: tuple[str, ...] = recipe(
        ("pickle", "native"), check=(lambda v: set(v) <= set(FORMATS), "among " + ", ".join(FORMATS)),
        help="pickle (official), npz, native, parquet (Hugging Face datasets), webdataset (tar shards: "
             "webdataset, timm)")
    aspect: Literal["squash", "center-crop"] = recipe("squash", help="squash (the paper) or center-crop")
    fast: bool = recipe(False, help="reduced-scale JPEG decoding: faster, close to but not the exact pixels")
    exif_transpose: bool = recipe(False, help="apply EXIF orientation (the paper ignores it)")
    seed: int = recipe(0, check=whole(0), help="seed of the order of the images in the files")
    workers: int | None = option(None, check=whole(1, MAX_WORKERS, optional=True),
                                 help="processes (default: all cores)")
    skip_bad: bool = option(False, help="skip unreadable images, list them in the manifest")
    allow_partial: bool = option(False, help="build an incomplete ILSVRC-2012 with a warning instead of an error")
    verify: bool = option(False, help="check the official archives' MD5s first")
    max_image_pixels: int | None = recipe(None, check=whole(1, optional=True),  # None keeps Pillow's
                                          help="decompression-bomb limit in pixels (default: Pillow's)")
    chunk_rows: int | None = option(None, check=whole(1, 1 << 20, optional=True),
                                    help="images per work chunk (default: about 32 MB of rows)")
    quiet: bool = option(False, help="print nothing but errors")

    def __post_init__(self):
        """Every field checked here, in one place, before the build creates anything on disk."""
        for name in ("sizes", "methods", "formats"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str | int) else tuple(value))
        if all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in self.sizes):
            object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))  # numpy ints: JSON and digest
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ConfigError(f"--formats must be among {', '.join(FORMATS)}, not {list(self.formats)}")
        for name in ("sizes", "methods", "formats"):
            value = getattr(self, name)
            if len(set(value)) != len(value):
                raise ConfigError(f"--{name} lists a value twice: {list(value)}")
        if not self.out:
            raise ConfigError("--out: give the folder to build into")
        if self.folder and (self.train or self.val):
            raise ConfigError("--folder is one source; use it without --train/--val")
        if not (self.folder or self.train or self.val):
            raise ConfigError("nothing to build: give --train and/or --val (ILSVRC-2012), or --folder")
        if self.class_names != "folder" and not self.folder:
            raise ConfigError(f"--class-names {self.class_names} reads the class folders of --folder: give --folder")
        if self.devkit and not self.val:
            raise ConfigError("--devkit labels the validation images: give --val too (or leave --devkit out)")
        self.resize  # noqa: B018 - validates methods, sizes (positive whole numbers), aspect
        if max(self.sizes) > MAX_SIZE:
            raise ConfigError(f"--sizes: {max(self.sizes)} is larger than {MAX_SIZE}, the largest size a build "
                              "makes (ImageNet's photos are about 400 px a side)")
        if len(self.sizes) * len(self.methods) > MAX_COMBOS:
            raise ConfigError(f"--sizes x --methods: {len(self.sizes)} x {len(self.methods)} = "
                              f"{len(self.sizes) * len(self.methods)} outputs, at most {MAX_COMBOS} in one build")
        check(self)  # every field's declared values: --workers, --seed, --chunk-rows, the flags, ...
        row_bytes = sum(3 * s * s for s, _ in self.resize.combos)
        if self.chunk_rows and self.chunk_rows * row_bytes > _MAX_CHUNK_BYTES:
            raise ConfigError(f"--chunk-rows {self.chunk_rows}: {self.chunk_rows} rows of {row_bytes:,} bytes "
                              f"would be held in each worker's memory; at most {_MAX_CHUNK_BYTES >> 20} MB")

    @property
    def resize(self) -> Resize:
        return Resize(self.sizes, self.methods, self.aspect, self.fast, self.exif_transpose)


# --- worker side -------------------------------------------------------------------------------------------

_files = OpenFiles()  # the source files a worker holds open (a few, least recently used closed first)


def _die_with_parent(parent: int) -> None:
    """End this worker when the build that started it ends, however early it is killed: a worker left behind
    waits on its queue forever, holding the deleted work arrays (and their disk space) open.

    ``parent`` is the build's pid, taken by the build itself: a worker whose build died before it got here has
    been re-parented (to 1 or a subreaper), and its own os.getppid() would name the wrong process to watch."""
    import threading

    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1  # noqa: N806 - <linux/prctl.h>
        libc = ctypes.CDLL(None, use_errno=True)
        # SIGKILL when the parent *thread* that spawned us exits: the pool spawns its workers from the build's
        # main thread (ProcessPoolExecutor.submit), which lives as long as the build
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # after prctl: a build that died before it was set is seen here
        os._exit(1)

    def exit_with_parent() -> None:  # where there is no prctl, and as a second line where there is
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()


def _init_worker(max_pixels: int | None, parent: int) -> None:
    _die_with_parent(parent)
    from PIL import Image

    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _run_chunk(task: dict) -> dict:
    """Decode and resize one chunk of rows and write them into the work arrays, and for the train split their
    sums into the chunk's row of pixel sums (so that the mean is known when the last chunk is, without a pass
    over the rows); returns notes and bad rows. The build makes the rows durable before it journals the chunk
    (here, a worker waiting on the disk would leave its core idle)."""
    r: Resize = task["resize"]
    records: list[Record] = task["records"]
    rows = {c: np.zeros((len(records), c[0], c[0], 3), np.uint8) for c in r.combos}
    notes, bad = [], []
    positions = task.get("positions")  # rows read in file order go to these rows of the arrays (_file_order)
    for i, rec in enumerate(records):
        try:
            out, note = resize_all(read_record(rec, _files), r)
        except ImageError as e:
            bad.append((task["start"] + i if positions is None else int(positions[i]), _named(rec), str(e)))
            if not task["skip_bad"]:
                break
            continue
        except OSError as e:
            return {"error": f"{rec.path}: reading {rec.key}: {e}"}
        for c in r.combos:
            rows[c][i] = out[c]
        if note:
            notes.append((_named(rec), note))
    if bad and not task["skip_bad"]:
        return {"bad": bad}
    for c, array in task["arrays"].items():
        if positions is None:
            array.write_at(task["start"], rows[c])
        else:
            array.write_rows(positions, rows[c])
    if task["sums"] is not None:  # exact integers; skipped rows are zeros and add nothing
        sums = [rows[c].sum(axis=0, dtype=np.int64).reshape(-1) for c in r.combos]
        task["sums"].write_at(task["chunk"], np.concatenate(sums)[None])
    return {"split": task["split"], "chunk": task["chunk"], "notes": notes, "bad": bad}


def _named(rec: Record) -> str:
    """An image's name in the manifest and in messages: its key, and where a Hub image is (shard, row/member)."""
    return f"{rec.key} ({rec.where})" if rec.where else rec.key


# --- planning ----------------------------------------------------------------------------------------------

def _listings(c: BuildConfig) -> tuple[dict[str, Listing], dict]:
    origin = {}
    if c.folder:
        return folder_source.list_folder(c.folder, c.class_names), {"folder": str(c.folder)}
    out = {}
    if c.train:
        out["train"] = imagenet_source.list_train(c.train)
        origin["train"] = str(c.train)
        if out["train"].layout:
            origin["train_layout"] = out["train"].layout
    if c.val:
        out["val"], labels_from = imagenet_source.list_val(c.val, c.devkit)
        origin["val"] = str(c.val)
        if out["val"].layout:
            origin["val_layout"] = out["val"].layout
        origin["val_labels"] = labels_from
    return out, origin


def _check_counts(c: BuildConfig, splits: dict[str, Listing]) -> list[str]:
    """Full ImageNet has exactly 1,281,167 train and 50,000 val images: anything else is an error (a tar cut at
    a member boundary reads short without any error) unless --allow-partial, then a warning."""
    msgs = []
    expect = {"train": imagenet_source.NUM_TRAIN_IMAGES, "val": imagenet_source.NUM_VAL_IMAGES}
    for split, lst in splits.items():
        if not lst.imagenet or c.class_names != "folder":  # a numbered tree (ImageNetV2) is not the release
            continue
        n = len(lst.records)
        if n == expect[split]:
            continue
        per_class = Counter(r.label for r in lst.records)
        empty = [IMAGENET.wnid(k) for k in range(1, 1001) if per_class[k] == 0]
        where = (f"{plural(len(empty), 'class', 'classes')} {'has' if len(empty) == 1 else 'have'} no images "
                 f"(e.g. {', '.join(empty[:5])})") if empty else ""
        if split == "val":
            present = {int(r.key[15:23]) for r in lst.records if r.key.startswith("ILSVRC2012_val_")}
            missing = [i for i in range(1, 50_001) if i not in present][:5]
            where += (", " if where else "") + f"missing e.g. ILSVRC2012_val_{missing[0]:08d}" if missing else ""
        short = sorted(per_class.items(), key=lambda kv: kv[1])[:3]
        diff = f"{expect[split] - n:,} missing" if n < expect[split] else f"{n - expect[split]:,} too many"
        msgs.append(f"{split}: {n:,} images, full ILSVRC-2012 has {expect[split]:,} ({diff}); "
                    f"{where or 'fewest per class: ' + ', '.join(f'{IMAGENET.wnid(k)} {v}' for k, v in short)}")
    return msgs


def _plan_digest(c: BuildConfig, splits: dict[str, Listing]) -> str:
    """Everything that decides the output bytes: a resumed build must match it."""
    h = hashlib.sha256()
    keep = {k: v for k, v in dataclasses.asdict(c).items()
            if k not in ("workers", "quiet", "verify", "chunk_rows", "out", "skip_bad", "allow_partial")}
    h.update(json.dumps(keep, sort_keys=True).encode())
    for split in sorted(splits):
        for r in splits[split].records:
            h.update(f"{split}\0{r.key}\0{r.label}\0{r.size}\n".encode())
            if r.group >= 0:  # read in file order: the journal's chunks are runs of rows of these row groups
                h.update(f"{r.group}\0{r.where}\n".encode())
    return h.hexdigest()


def _chunk_rows(c: BuildConfig, n_total: int, workers: int) -> int:
    if c.chunk_rows:
        return c.chunk_rows
    row_bytes = sum(3 * s * s for s, _ in c.resize.combos)
    if row_bytes * 16 > _CHUNK_BYTES:  # large outputs: fewer rows a chunk, so a worker's memory stays bounded
        return max(1, _CHUNK_BYTES // row_bytes)
    rows = max(16, min(4096, _CHUNK_BYTES // row_bytes))
    # 16 chunks a worker at least: the last chunks end nearly together (a worker idle while another finishes a
    # large last chunk costs up to a chunk's time); each chunk costs a few file syncs, a journal line
    return max(16, min(rows, -(-n_total // (16 * workers))))


@contextlib.contextmanager
def _lock(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BuildError(f"{out}: another build is writing into this folder (it holds {out / LOCK})") from None
    try:
        yield
    finally:
        os.close(fd)


def _combo_dir(out: Path, size: int, method: str) -> Path:
    return out / f"{size}_{method}"


# --- the build ---------------------------------------------------------------------------------------------

def _check_paths(c: BuildConfig, out: Path) -> None:
    """The build never writes where it reads: --out may not be a source, lie inside a source folder (the output
    would join the source, and a later listing of it), or hold a source folder; a source file (an archive) may
    not lie where the build writes or replaces (out/.build, out/<size>_<method>/). Symbolic links are
    resolved first."""
    real_out = Path(os.path.realpath(out))
    owned = [real_out / WORK, real_out / LOCK] + [real_out / f"{s}_{m}" for s, m in c.resize.combos]
    for flag, src in (("--folder", c.folder), ("--train", c.train), ("--val", c.val), ("--devkit", c.devkit)):
        if not src:
            continue
        real = Path(os.path.realpath(src))
        if real == real_out:
            raise BuildError(f"--out {out} is {flag} {src}: the build would write into its own source; choose "
                             "another --out")
        if real_out.is_relative_to(real):
            raise BuildError(f"--out {out} is inside {flag} {src}: the output would be written into the source "
                             "(and read as part of it next time); choose an --out outside it")
        if real.is_dir() and real.is_relative_to(real_out):
            raise BuildError(f"{flag} {src} is inside --out {out}, where the build writes: move it, or choose "
                             "another --out")
        if any(real.is_relative_to(o) for o in owned):
            raise BuildError(f"{flag} {src} is inside {out}'s build folders, which the build replaces: move it")


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.2f} MB"


def _check_disk(c: BuildConfig, out: Path, splits: dict[str, Listing]) -> None:
    """Refuse, before anything is allocated, a build that cannot fit: the work arrays (which become the native
    files) plus one copy per official format, less what an interrupted build already holds in out/.build."""
    images = sum(len(lst.records) for lst in splits.values())
    work = sum(native.array_bytes(len(lst.records), (s, s, 3)) for lst in splits.values() for s, _ in c.resize.combos)
    need = work * (1 + len([f for f in c.formats if f != "native"]))
    have = 0
    if (out / WORK).is_dir():
        have = sum(p.stat().st_blocks * 512 for p in (out / WORK).iterdir() if p.is_file())
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need - have > free:
        raise BuildError(f"{out}: the build needs about {_gb(need - have)} ({images:,} images x sizes "
                         f"{', '.join(map(str, c.sizes))} x {plural(len(c.methods), 'method')} x "
                         f"{plural(len(c.formats), 'format')}), the disk has {_gb(free)} free: free space, or "
                         "build fewer sizes or formats at a time")


@contextlib.contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - t


def build(c: BuildConfig, timings: dict[str, float] | None = None) -> dict:
    """Build every (size, method) of ``c``; returns {"<size>_<method>": manifest}. ``timings``, when given, is
    filled with the seconds each phase took: index, resize, each format, checksums (bench/build.py's parts)."""
    timings = {} if timings is None else timings
    out = Path(c.out)
    t0 = time.perf_counter()
    with _timed(timings, "index"):
        splits, origin = _checked_listings(c, out)
    with _lock(out):
        try:
            result = _build_locked(c, out, splits, origin, timings)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                shutil.rmtree(out / WORK, ignore_errors=True)  # the space is what the user needs back
                raise BuildError(f"{out}: the disk is full; the unfinished build was removed") from None
            raise
    if not c.quiet:
        m = next(iter(result.values()))
        counts = ", ".join(f"{k} {v:,}" for k, v in m["counts"].items())
        print(f"built {', '.join(result)} in {printable(str(out))}: {counts} images; {len(m['converted']):,} "
              f"converted, {len(m['skipped'])} skipped, {len(m['ignored'])} ignored (see manifest.json); "
              f"{time.perf_counter() - t0:.0f} s")
    return result


def _checked_listings(c: BuildConfig, out: Path) -> tuple[dict[str, Listing], dict]:
    """The sources listed, with everything that can be checked before a byte is written: the paths, the
    sources (bad entries, counts, empty splits), the disk."""
    _check_paths(c, out)
    if c.verify:
        for p in (c.train, c.val, c.devkit):
            if p and Path(p).is_file():
                imagenet_source.verify_md5(p)
    splits, origin = _listings(c)
    problems = [(s, k, why) for s, lst in splits.items() for k, why in lst.problems]
    if problems and not c.skip_bad:
        s, k, why = problems[0]
        raise BuildError(f"{k}: {why} ({len(problems)} such entries; --skip-bad skips them and lists them "
                         "in the manifest)")
    count_msgs = _check_counts(c, splits)
    if count_msgs and not c.allow_partial:
        raise BuildError("incomplete ILSVRC-2012: " + "; ".join(count_msgs) + " (--allow-partial builds it "
                         "anyway)")
    for m in count_msgs if not c.quiet else []:
        print(f"warning: {m}", file=sys.stderr)
    empty = [s for s, lst in splits.items() if not lst.records]
    if empty:
        raise BuildError(f"no images found for {', '.join(empty)}")
    _check_disk(c, out, splits)
    return splits, origin


def _build_locked(c: BuildConfig, out: Path, splits: dict[str, Listing], origin: dict,
                  timings: dict[str, float]) -> dict:
    work = out / WORK
    plan_path, journal_path = work / "plan.json", work / "done.jsonl"
    workers = c.workers or os.cpu_count() or 1
    total = sum(len(lst.records) for lst in splits.values())
    digest_ = _plan_digest(c, splits)
    rows_per_chunk = _resume_plan(plan_path, digest_, out) if plan_path.exists() else None
    if rows_per_chunk is None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    order = {split: (np.random.default_rng(c.seed).permutation(len(lst.records)) if split == "train"
                     else np.arange(len(lst.records))) for split, lst in splits.items()}
    chunk = rows_per_chunk or _chunk_rows(c, total, workers)
    arrays, sums, done = _work_arrays(c, work, splits, _read_journal(journal_path), chunk)
    if rows_per_chunk is None:
        with atomic_write(plan_path, "w") as f:
            json.dump({"digest": digest_, "rows_per_chunk": chunk}, f)
    tasks = []
    for split, lst in splits.items():
        read, positions = _file_order(lst, order[split])
        for k, (a, b) in enumerate(_bounds(lst, read, chunk)):  # the journal's chunk numbers mean these bounds
            if (split, k) not in done:
                tasks.append({"split": split, "chunk": k, "start": a, "resize": c.resize, "skip_bad": c.skip_bad,
                              "records": [lst.records[i] for i in read[a:b]],
                              "positions": None if positions is None else positions[a:b],
                              "arrays": {(s, m): arrays[(split, s, m)] for s, m in c.resize.combos},
                              "sums": sums.get(split)})
    with _pool(c, workers) as pool:  # one pool: the chunks, then the formats' jobs
        with _timed(timings, "resize"):
            _run_tasks(c, pool, tasks, journal_path, done, total, workers)
        manifests = _finish(c, out, splits, order, arrays, sums, done, origin, pool, timings)
    shutil.rmtree(work)
    return manifests


def _file_order(lst: Listing, order: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Which records each chunk reads, and where their rows go. Usually chunk k reads the records of rows
    k*chunk.. of the seeded order and writes them there (positions None). A parquet source is read in file order
    instead (a row group is compressed pages: read once, whole, by one worker), each row written to its place in
    the seeded order: the same bytes in the same rows."""
    if not lst.in_file_order:
        return order, None
    read = np.array(sorted(range(len(lst.records)), key=lambda i: (lst.records[i].path, lst.records[i].group,
                                                                     lst.records[i].offset)), np.int64)
    place = np.empty(len(order), np.int64)
    place[order] = np.arange(len(order))  # record i becomes row place[i]
    return read, place[read]


def _bounds(lst: Listing, read: np.ndarray, chunk: int) -> list[tuple[int, int]]:
    """The chunks' bounds in ``read``: ``chunk`` rows each, or, for a source read in file order, cut where a row
    group ends once ``chunk`` rows are reached (so that one worker reads each row group), at most 2 * ``chunk``
    rows (a row group larger than that is read by several). Never more chunks than ceil(n / chunk): the pixel
    sums' rows (_work_arrays) suffice, and those left over stay zeros."""
    n = len(read)
    if not lst.in_file_order:
        return [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    out, a = [], 0
    for i in range(1, n + 1):
        if i == n or i - a >= 2 * chunk:
            out.append((a, i))
            a = i
        elif i - a >= chunk:
            prev, rec = lst.records[read[i - 1]], lst.records[read[i]]
            if (prev.path, prev.group) != (rec.path, rec.group):
                out.append((a, i))
                a = i
    return out


def _work_arrays(c: BuildConfig, work: Path, splits: dict[str, Listing], done: dict,
                 rows_per_chunk: int) -> tuple[dict, dict, dict]:
    """The work arrays of every (split, size, method), and the train split's pixel sums (a row per chunk, every
    output's sums side by side), kept from an interrupted build or created; with the journal's entries of the
    splits whose files were all kept (a split with a file lost is done again)."""
    arrays, sums = {}, {}
    for split, lst in splits.items():
        n = len(lst.records)
        want = {(split, s, m): (work / f"{split}_{s}_{m}.npy", n, (s, s, 3), np.uint8) for s, m in c.resize.combos}
        if split == "train":
            width = sum(3 * s * s for s, _ in c.resize.combos)
            want["sums"] = (work / "train_sums.npy", -(-n // rows_per_chunk), (width,), np.int64)
        if not all(path.exists() for path, *_ in want.values()):  # new, or lost: every chunk is (re)done
            done = {k: v for k, v in done.items() if k[0] != split}
        for key, (path, count, shape, dtype) in want.items():
            a = native.RowArray(str(path), count, shape, np.dtype(dtype).str) if path.exists() else \
                native.RowArray.create(path, count, shape, dtype)
            if key == "sums":
                sums[split] = a
            else:
                arrays[key] = a
    return arrays, sums, done


@contextlib.contextmanager
def _pool(c: BuildConfig, workers: int) -> Iterator[cf.ProcessPoolExecutor]:
    """The worker processes (spawned as work is submitted); none outlives the build, however it ends."""
    ctx = multiprocessing.get_context("spawn")  # no inherited file descriptors (the lock) in the workers
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                initargs=(c.max_image_pixels, os.getpid())) as pool:
        try:
            yield pool
        except cf.process.BrokenProcessPool:
            raise BuildError("a worker process died (killed, or out of memory); run the same command again to "
                             "resume") from None
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # the jobs in flight finish; no worker outlives us
            raise


def _resume_plan(plan_path: Path, digest_: str, out: Path) -> int:
    """The rows per chunk of the unfinished build in ``plan_path``, which must be this build's plan."""
    work = plan_path.parent
    try:
        plan = json.loads(plan_path.read_bytes().decode("utf-8"))
        saved_digest, rows_per_chunk = plan["digest"], plan["rows_per_chunk"]
        if not isinstance(rows_per_chunk, int) or isinstance(rows_per_chunk, bool) or rows_per_chunk < 1:
            raise ValueError(f"rows_per_chunk {rows_per_chunk!r}")
    except (ValueError, KeyError, TypeError) as e:  # written atomically, so damaged by something else
        raise BuildError(f"{plan_path}: the unfinished build's plan is damaged ({type(e).__name__}: {e}); "
                         f"remove {work} to start over") from None
    if saved_digest != digest_:
        raise BuildError(f"{out}: holds an unfinished build with other settings or inputs; run the same "
                         f"command again to finish it, or remove {work} to start over")
    return rows_per_chunk


def _read_journal(journal_path: Path) -> dict:
    """{(split, chunk): entry} of the chunks an earlier run finished."""
    done = {}
    if journal_path.exists():
        for line in journal_path.read_text().splitlines():
            try:
                entry = json.loads(line)
                done[(entry["split"], entry["chunk"])] = entry
            except (ValueError, KeyError, TypeError):
                break  # a line cut by the kill: that chunk (and any after it) is done again
    return done


def _submit(pool: cf.ProcessPoolExecutor, fn, *args) -> cf.Future:
    """``pool.submit``, which may spawn a worker, shielded from Ctrl-C. Ctrl-C goes to the terminal's whole
    process group, workers included: a worker still starting died of it with a traceback of its own, and a
    build interrupted while writing a new worker's start-up data left that worker a traceback ("Ran out of
    input"). A signal mask survives fork and exec, so a worker spawned with SIGINT blocked never sees it; the
    build notes a Ctrl-C that arrives meanwhile and raises it once the worker is spawned, then ends its workers.
    """
    import signal
    import threading

    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        return pool.submit(fn, *args)
    caught: list = []
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # what a worker spawned now inherits
    try:
        future = pool.submit(fn, *args)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(*caught[0])  # Python's default handler: KeyboardInterrupt, now that no spawn is half done
    return future


def _run_tasks(c: BuildConfig, pool: cf.ProcessPoolExecutor, tasks: list[dict], journal_path: Path, done: dict,
               total: int, workers: int) -> None:
    from dsimagenet.progress import bar as progress_bar

    already = total - sum(len(t["records"]) for t in tasks)
    bar = progress_bar(total, "build", unit="img", quiet=c.quiet, initial=already)
    with open(journal_path, "a") as journal:
        pending: dict[cf.Future, dict] = {}
        it = iter(tasks)
        try:
            while True:
                while len(pending) < 2 * workers and (t := next(it, None)) is not None:
                    pending[_submit(pool, _run_chunk, t)] = t
                if not pending:
                    break
                finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for f in finished:
                    task, res = pending.pop(f), f.result()
                    if "error" in res:
                        raise BuildError(res["error"])
                    if "split" not in res:
                        _, key, why = res["bad"][0]
                        raise BuildError(f"{key}: {why} (--skip-bad skips such files and lists them in the "
                                         "manifest)")
                    for array in (*task["arrays"].values(), task["sums"]):
                        if array is not None:
                            array.sync()  # the chunk's rows durable before the journal says they are written
                    journal.write(json.dumps(res) + "\n")
                    journal.flush()
                    os.fsync(journal.fileno())
                    done[(res["split"], res["chunk"])] = res
                    bar.update(len(task["records"]))
        finally:
            bar.close()


# --- the formats, each written from the rows the workers computed -------------------------------------------

_READ_ROWS = 4096  # rows read at a time from a work array (48 MB at 64 px)


def _kept(array: native.RowArray, bad: set[int]) -> native.RowArray:
    """The work array without the rows of skipped images: the array itself when none were skipped, else a copy
    (the work array stays as it is, so that a build interrupted from here on resumes from the journal)."""
    if not bad:
        return array
    keep = np.setdiff1d(np.arange(array.count), np.fromiter(bad, np.int64))
    dst = array.path + ".kept.npy"
    w = native.NpyWriter(dst, array.row_shape, np.uint8, len(keep))
    for a in range(0, len(keep), _READ_ROWS):
        w.append(array.read(keep[a:a + _READ_ROWS]))
    w.close()
    return native.RowArray(dst, len(keep), array.row_shape)


def _finish(c: BuildConfig, out: Path, splits: dict[str, Listing], order: dict, arrays: dict, sums: dict,
            done: dict, origin: dict, pool: cf.ProcessPoolExecutor, timings: dict[str, float]) -> dict:
    """Every requested format of every (size, method), and its manifest; returns the manifests. What reads the
    rows (the native arrays' checksums, the official batches) runs in the worker pool, the largest job first;
    meta.json and the manifests are written here once it is done."""
    bad = {split: {pos: (key, why) for e in done.values() if e["split"] == split for pos, key, why in e["bad"]}
           for split in splits}
    if not c.skip_bad and any(bad.values()):
        key, why = next(iter(next(b for b in bad.values() if b).values()))
        raise BuildError(f"{key}: {why} (found by an earlier run with --skip-bad; pass it again to skip)")
    labels = {}
    for split, lst in splits.items():
        lab = np.array([lst.records[i].label for i in order[split]], np.int64)
        labels[split] = np.delete(lab, sorted(bad[split])) if bad[split] else lab
    first = next(iter(splits.values()))
    table = IMAGENET if first.imagenet else ClassTable(tuple(first.wnids), tuple(first.wnids))
    record = _record(c, splits, done, bad, labels, table, origin)
    train_sum = sums["train"].read_all().sum(axis=0) if "train" in sums else None  # every output's, side by side
    outputs, at = [], 0
    for size, method in c.resize.combos:
        dst = _combo_dir(out, size, method)
        if dst.exists():
            shutil.rmtree(dst)  # a previous complete build with these settings is replaced whole
        dst.mkdir(parents=True)
        mean = None
        if train_sum is not None and len(labels["train"]):  # exact: integer sums, as the official files' mean
            mean = train_sum[at:at + 3 * size * size].reshape(size, size, 3) / len(labels["train"])
        at += 3 * size * size
        rows = {split: _kept(arrays[(split, size, method)], set(bad[split])) for split in splits}
        outputs.append(_Output(c, dst, method, rows, labels, mean, table))
    with _timed(timings, "formats (checksums, official files: in the workers)"):
        _run_jobs(pool, [job for o in outputs for job in o.jobs()])
    with _timed(timings, "meta.json and manifests"):
        return {o.dst.name: o.finish(table, origin, record) for o in outputs}


def _run_jobs(pool: cf.ProcessPoolExecutor, jobs: list[tuple[int, Callable, tuple, Callable]]) -> None:
    """Run (bytes, function, arguments, done) jobs in the worker pool, the largest first (so that the last to
    end is a small one), and ``done(result)`` here as each one ends."""
    futures = {_submit(pool, fn, *args): done for _, fn, args, done in sorted(jobs, key=lambda j: -j[0])}
    for f in cf.as_completed(futures):
        futures[f](f.result())


class _Output:
    """One (size, method) folder: ``jobs()`` read its rows in the worker pool (the checksums of the native
    arrays, the official batches); ``finish`` then writes the native meta.json and the manifest."""

    def __init__(self, c: BuildConfig, dst: Path, method: str, rows: dict[str, native.RowArray], labels: dict,
                 mean: np.ndarray | None, table: ClassTable | None = None):
        self.c, self.dst, self.method, self.rows, self.labels, self.mean = c, dst, method, rows, labels, mean
        self.size = next(iter(rows.values())).row_shape[0]
        kinds = [f for f in c.formats if f in ("pickle", "npz")]
        self.official = {split: official.SplitWriter(dst, split, a.count, self.size, kinds, mean)
                         for split, a in rows.items()} if kinds else {}
        # the Hub formats' shards, cut from the same rows, one job a shard (their labels need the class table)
        self.shards = {(fmt, split): w.SplitWriter(dst, split, a.count, self.size, table)
                       for fmt, w in (("parquet", parquet_format), ("webdataset", webdataset_format))
                       if fmt in c.formats for split, a in rows.items()}
        self.digests: dict[str, tuple[str, str]] = {}  # split -> sha256 of images.npy's data, of the whole file

    def jobs(self) -> list[tuple[int, Callable, tuple, Callable]]:
        out = []
        if "native" in self.c.formats:
            for split, a in self.rows.items():
                out.append((a.count * 3 * self.size ** 2, native.array_digests, (a.path,),
                            functools.partial(self.digests.__setitem__, split)))
        for split, w in self.official.items():
            out += [(job.rows.nbytes, job.run, (), w.add) for job in w.jobs(self.rows[split].read_range,
                                                                          self.labels[split])]
        for (_, split), w in self.shards.items():
            out += [(job.nbytes, job.run, (), w.add) for job in w.jobs(self.rows[split].read_range,
                                                                     self.labels[split])]
        return out

    def finish(self, table: ClassTable, origin: dict, record: dict) -> dict:
        """The native meta.json (the images linked into place), then the manifest; returns the manifest."""
        files = {}
        for w in (*self.official.values(), *self.shards.values()):
            files.update(w.close())
        tars = {split: w.lengths() for (fmt, split), w in self.shards.items() if fmt == "webdataset"}
        if tars:  # the shard list timm reads, and the class table
            webdataset_format.write_info(self.dst, tars, table, self.size)
            files[webdataset_format.INFO] = digest(self.dst / webdataset_format.INFO)
        if "native" in self.c.formats:
            writer = native.NativeWriter(self.dst, self.size, list(table.wnids), list(table.names),
                                         method=self.method, source=json.dumps(origin),
                                         extra={"aspect": self.c.aspect, "fast": self.c.fast}, mean=self.mean)
            for split, array in self.rows.items():
                writer.adopt(split, array.path, self.labels[split], sha256=self.digests[split][0])
            writer.close()
            files.update({f"{split}/images.npy": whole for split, (_, whole) in self.digests.items()})
            files.update({rel: digest(p) for p in self.dst.rglob("*")  # the small files: labels, mean, meta
                          if p.is_file() and (rel := str(p.relative_to(self.dst))) not in files})
        files = dict(sorted(files.items(), key=lambda kv: Path(kv[0]).parts))
        manifest = {"dsimagenet_build": 1, "size": self.size, "method": self.method, **record, "files": files}
        with atomic_write(self.dst / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1)
        return manifest


def _record(c: BuildConfig, splits: dict[str, Listing], done: dict, bad: dict, labels: dict, table: ClassTable,
            origin: dict) -> dict:
    """What every output's manifest says about the build (in the manifest's order): settings, versions,
    sources, the class table, counts, and each image converted, skipped or ignored."""
    notes = sorted(k_n for e in done.values() for k_n in map(tuple, e["notes"]))
    skipped = sorted([(k, why) for lst in splits.values() for k, why in lst.problems] +
                     [(key, why) for b in bad.values() for key, why in b.values()])
    return {
        "config": {k: v for k, v in dataclasses.asdict(c).items() if k not in ("quiet",)},
        "versions": {**versions(with_torch=False), "libjpeg": libjpeg_version()}, "source": origin,
        "label_order": "devkit" if table is IMAGENET else "sorted class folders",
        "wnids": list(table.wnids), "names": list(table.names),  # the class table: label k is wnids[k - 1]
        "counts": {split: int(len(lab)) for split, lab in labels.items()},
        "per_class": {split: {table.wnids[k - 1]: int(v) for k, v in sorted(Counter(lab.tolist()).items())}
                      for split, lab in labels.items()},
        "converted": [list(x) for x in notes], "skipped": [list(x) for x in skipped],
        "ignored": sorted(list(x) for lst in splits.values() for x in lst.ignored),
    }
