"""The native format's reader against damaged, hostile and merely unusual files: every field of meta.json and
every .npy header is checked before anything is read; each bad file is one NativeFormatError naming the file and
what is wrong, never a traceback, never a silently wrong read. Ends with a seeded fuzzer."""

import copy
import json
import math
import shutil
import signal
import tracemalloc

import numpy as np
import pytest

from dsimagenet import convert, describe, open_dataset
from dsimagenet.cli import main
from dsimagenet.errors import DSImageNetError
from dsimagenet.formats import native
from dsimagenet.formats.native import NativeFormatError


@pytest.fixture
def nat(tiny, tmp_path):
    convert(tiny.official(), tmp_path / "nat", ["native"])
    return tmp_path / "nat"


def edit_meta(root, fn):
    """meta.json replaced by ``fn(meta)``."""
    (root / "meta.json").write_text(json.dumps(fn(json.loads((root / "meta.json").read_text()))))


def setk(path, value):
    """A function that sets meta[path[0]][path[1]]... to value."""
    def fn(meta):
        d = meta
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
        return meta
    return fn


def delk(path):
    def fn(meta):
        d = meta
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
        return meta
    return fn


def rename_split(new):
    def fn(meta):
        meta["splits"][new] = meta["splits"].pop("val")
        return meta
    return fn


BAD_META = {
    "null": (lambda m: None, "expected a JSON object, found NoneType"),
    "list": (lambda m: [m], "expected a JSON object, found list"),
    "no splits": (delk(["splits"]), "missing 'splits'"),
    "no wnids": (delk(["wnids"]), "missing 'wnids'"),
    "splits a list": (setk(["splits"], []), "'splits' must be an object"),
    "version a string": (setk(["version"], "1"), "'version' must be an integer, found '1'"),
    "version a bool": (setk(["version"], True), "'version' must be an integer"),
    "image size 0": (setk(["image_size"], 0), "'image_size' must be an integer in 1..4096, found 0"),
    "image size 10^6": (setk(["image_size"], 10**6), "'image_size' must be an integer in 1..4096"),
    "image size a float": (setk(["image_size"], 8.0), "'image_size' must be an integer"),
    "negative count": (setk(["splits", "train", "count"], -1), "splits.train.count must be an integer in 0.."),
    "count a string": (setk(["splits", "train", "count"], "203"), "splits.train.count must be an integer"),
    "split ../x": (rename_split("../x"), "split '../x': splits are train and val"),
    "split a/b": (rename_split("a/b"), "split 'a/b'"),
    "split test": (rename_split("test"), "split 'test'"),
    "split a list": (setk(["splits", "train"], [203]), "splits.train must be an object with 'count' and 'sha256'"),
    "checksum a number": (setk(["splits", "train", "sha256", "images.npy"], 5), "splits.train.sha256 must map"),
    "checksums a list": (setk(["splits", "train", "sha256"], ["ab"]), "splits.train.sha256 must map"),
    "checksum of ../../x": (setk(["splits", "train", "sha256", "../../x"], "0" * 64), "splits.train.sha256 must map"),
    "num_classes off": (setk(["num_classes"], 999), "'wnids' has 1000 entries for 999 classes"),
    "num_classes 0": (setk(["num_classes"], 0), "'num_classes' must be an integer in 1.."),
    "wnids not strings": (setk(["wnids"], list(range(1000))), "'wnids' must be a list of non-empty strings"),
    "duplicate wnids": (setk(["wnids", 1], "n02119789"), "'wnids' lists a class twice: ['n02119789']"),
    "names too short": (setk(["names"], ["a"]), "'names' has 1 entries for 1000 classes"),
    "label order sorted": (setk(["label_order"], "sorted"), "this dsimagenet reads label_order 'devkit'"),
    "label base 0": (setk(["label_base"], 0), "label_base 1"),
    "mean file ../x": (setk(["mean", "file"], "../x.npy"), "'mean' must be an object with file 'mean.npy'"),
    "mean NaN": (setk(["mean", "per_channel"], [math.nan, 1.0, 2.0]), "mean.per_channel must be 3 numbers"),
    "mean inf": (setk(["mean", "per_channel"], [math.inf, 1.0, 2.0]), "mean.per_channel must be 3 numbers"),
    "method a number": (setk(["method"], 5), "'method' must be a string or null"),
    "another format": (setk(["format"], "ffcv"), "not a dsimagenet-native meta.json"),
}


@pytest.mark.parametrize("case", list(BAD_META))
def test_bad_meta_json_is_one_error_naming_file_and_key(nat, case, capsys):
    fn, message = BAD_META[case]
    edit_meta(nat, fn)
    with pytest.raises(NativeFormatError) as e:
        open_dataset(nat)
    assert str(e.value).startswith(f"{nat / 'meta.json'}: ") and message in str(e.value)
    for argv in (["info", str(nat)], ["info", str(nat), "--verify"],
                 ["convert", str(nat), "--out", str(nat.parent / "o"), "--formats", "pickle"]):
        capsys.readouterr()
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "meta.json" in err and "Traceback" not in err
    assert not (nat.parent / "o").exists()


@pytest.mark.parametrize("data, message", [
    (b"\xff\xfe{}", "not UTF-8 text"),
    (b'{"format": "dsimagenet-native", ', "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # nested too deeply for the parser
    (b'{"format": "dsimagenet-native", "version": 1' + b"0" * 5000 + b"}", "not valid JSON"),  # int too long
    (b"", "not valid JSON"),
])
def test_meta_json_that_is_not_utf8_json(nat, data, message):
    (nat / "meta.json").write_bytes(data)
    with pytest.raises(NativeFormatError, match=message):
        native.read_meta(nat)


def test_huge_meta_json_is_refused_before_it_is_parsed(nat, monkeypatch):
    monkeypatch.setattr(native, "MAX_META_BYTES", 1000)
    with pytest.raises(NativeFormatError, match="larger than"):
        native.read_meta(nat)


def save_npy(path, array):
    path.unlink()
    np.save(path, array)


def test_fortran_ordered_images_are_refused_not_scrambled(nat, tiny, tmp_path):
    # np.save keeps a Fortran-ordered array's order: the header says fortran_order True, the rows are columns
    path = nat / "train" / "images.npy"
    save_npy(path, np.asfortranarray(tiny.images))
    assert np.array_equal(np.load(path), tiny.images)  # a valid .npy file: numpy itself reads it right
    with pytest.raises(NativeFormatError, match="images.npy: fortran_order True"):
        open_dataset(nat)
    with pytest.raises(NativeFormatError, match="fortran_order True"):
        convert(nat, tmp_path / "pk", ["pickle"])
    assert not (tmp_path / "pk").exists()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.bool_])
def test_labels_of_float_or_bool_dtype_are_refused_on_open(nat, tiny, dtype):
    save_npy(nat / "train" / "labels.npy", tiny.labels.astype(dtype))
    with pytest.raises(NativeFormatError, match=f"labels.npy: {np.dtype(dtype)} .* integer labels"):
        open_dataset(nat)


@pytest.mark.parametrize("what, make, message", [
    ("images", lambda t: t.images[:-1], r"images.npy: uint8 \(202, 8, 8, 3\), meta.json says uint8 \(203, 8, 8, 3\)"),
    ("images", lambda t: t.images.astype(np.uint16), "images.npy: uint16"),
    ("images", lambda t: t.images.reshape(203, 64, 3), r"images.npy: uint8 \(203, 64, 3\)"),
    ("images", lambda t: t.images[..., :1], r"images.npy: uint8 \(203, 8, 8, 1\)"),
    ("labels", lambda t: np.r_[t.labels, 1].astype(np.int16), r"labels.npy: int16 \(204,\)"),
    ("labels", lambda t: t.labels[:-1].astype(np.int16), r"labels.npy: int16 \(202,\)"),
    ("labels", lambda t: t.labels.reshape(7, 29).astype(np.int16), r"labels.npy: int16 \(7, 29\)"),
    ("labels", lambda t: np.where(t.labels == 449, 0, t.labels).astype(np.int16), "labels must be 1..1000"),
    ("labels", lambda t: np.full(203, 1001, np.int16), r"labels must be 1..1000 .* found 1001..1001"),
    ("labels", lambda t: np.full(203, 2**40, np.uint64), "labels must be 1..1000"),
])
def test_headers_that_disagree_with_meta_json(nat, tiny, what, make, message):
    save_npy(nat / "train" / f"{what}.npy", make(tiny))
    with pytest.raises(NativeFormatError, match=message):
        open_dataset(nat)
    with pytest.raises(NativeFormatError, match=message):
        describe(nat)


def rewrite_header(path, text):
    data = path.read_bytes()
    header = text.ljust(117) + "\n"
    assert len(header) == 118
    path.write_bytes(data[:10] + header.encode() + data[128:])


@pytest.mark.parametrize("header, message", [
    ("{'descr': '|u1', 'fortran_order': False, 'shape': (203000000000, 8, 8, 3), }", "shorter than its header says"),
    ("{'descr': '|u1', 'fortran_order': False, 'shape': (-203, 8, 8, 3), }", "not a tuple of non-negative"),
    ("{'descr': '|O', 'fortran_order': False, 'shape': (203, 8, 8, 3), }", "expected a plain integer, float or bool"),
    ("{'descr': [('a', '|u1')], 'fortran_order': False, 'shape': (203, 8, 8, 3), }", "expected a plain integer"),
    ("{'descr': '|u1', 'fortran_order': 0, 'shape': (203, 8, 8, 3), }", "fortran_order 0"),
    ("{'descr': '|u1', 'shape': (203, 8, 8, 3), }", "without exactly"),
    ("{'descr': '|u1', 'fortran_order': False, 'shape': (203, 8, 8, 3), 'x': 1}", "without exactly"),
    ("{'descr': '|u1', 'fortran_order': False, 'shape': (203, 8, 8, 3)", "unreadable .npy header"),
    ("__import__('os').system('touch pwned')", "unreadable .npy header"),
    ("{'descr': '|u1', 'fortran_order': False, 'shape': (203, 8, 8, 3.0), }", "not a tuple of non-negative"),
])
def test_npy_headers_we_never_write_are_refused(nat, header, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rewrite_header(nat / "train" / "images.npy", header)
    with pytest.raises(NativeFormatError, match=message):
        open_dataset(nat)
    assert not (tmp_path / "pwned").exists()


def test_npy_cut_short_or_with_bytes_after_the_data(nat):
    p = nat / "train" / "labels.npy"
    full = p.read_bytes()
    for cut, message in [(0, "no \\\\x93NUMPY magic"), (4, "no \\\\x93NUMPY magic"), (9, "cut short inside"),
                         (60, "cut short inside"), (len(full) - 1, "shorter than its header says")]:
        p.write_bytes(full[:cut])
        with pytest.raises(NativeFormatError, match=message):
            open_dataset(nat)
    p.write_bytes(full + b"\0")
    with pytest.raises(NativeFormatError, match="longer than its header says"):
        open_dataset(nat)
    p.write_bytes(full[:6] + b"\x03\x00" + full[8:])
    with pytest.raises(NativeFormatError, match="version 3.0"):
        open_dataset(nat)


@pytest.mark.parametrize("value", [np.nan, np.inf, -1.0, 256.0])
def test_a_mean_image_outside_0_255_is_refused(nat, value):
    mean = np.load(nat / "mean.npy")
    mean[3, 4, 1] = value
    save_npy(nat / "mean.npy", mean)
    with pytest.raises(NativeFormatError, match="mean.npy: values outside 0..255"):
        open_dataset(nat)


def test_mean_file_missing_or_of_another_shape(nat):
    save_npy(nat / "mean.npy", np.zeros((4, 4, 3)))
    with pytest.raises(NativeFormatError, match=r"mean.npy: float64 \(4, 4, 3\), expected float64 \(8, 8, 3\)"):
        open_dataset(nat)
    (nat / "mean.npy").unlink()
    with pytest.raises(NativeFormatError, match="mean.npy: missing"):
        open_dataset(nat)


def test_an_array_file_missing(nat):
    (nat / "val" / "labels.npy").unlink()
    with pytest.raises(NativeFormatError, match="val/labels.npy: missing"):
        open_dataset(nat, "val")


def test_big_endian_labels_read_right(nat, tiny):
    save_npy(nat / "train" / "labels.npy", tiny.labels.astype(">i4"))
    np.testing.assert_array_equal(open_dataset(nat).targets, tiny.labels - 1)


def test_an_empty_split_round_trips(tmp_path):
    with native.NativeWriter(tmp_path / "n", 4, ["a", "b"]) as w:
        w.split("train").append(np.full((3, 4, 4, 3), 7, np.uint8), np.array([1, 2, 2]))
        w.split("val")
    ds = open_dataset(tmp_path / "n", "val")
    assert len(ds) == 0 and ds.data.shape == (0, 4, 4, 3) and ds.classes == ["a", "b"]
    assert describe(tmp_path / "n", check=True)["checksums"] == "ok"


# --- fuzzing ----------------------------------------------------------------------------------------------

_VALUES = [None, True, 0, -1, 1, 2**63, 10**6, 1.5, math.nan, math.inf, "", "x", "../x", "a/b", [], [1], {},
           {"count": 1}, "0" * 64, [[[[[]]]]]]


def _mutate_meta(rng, text: str) -> tuple[str, str]:
    """A random change to meta.json: of its bytes, or of one value anywhere in its tree."""
    kind = int(rng.integers(5))
    data = bytearray(text.encode())
    if kind == 0:
        i = int(rng.integers(len(data)))
        data[i] = int(rng.integers(256))
        return bytes(data).decode("latin-1"), f"byte {i} of meta.json set"
    if kind == 1:
        i = int(rng.integers(len(data)))
        return text[:i], f"meta.json cut at {i}"
    if kind == 2:
        i, n = int(rng.integers(len(data))), int(rng.integers(1, 20))
        return text[:i] + text[i + n:], f"meta.json: {n} chars removed at {i}"
    meta = json.loads(text)
    nodes = [([], meta)]
    paths = []
    while nodes:
        path, node = nodes.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for k, v in items:
            paths.append(path + [k])
            if isinstance(v, (dict, list)) and len(path) < 3:
                nodes.append((path + [k], v))
    path = paths[int(rng.integers(len(paths)))]
    parent = meta
    for k in path[:-1]:
        parent = parent[k]
    if kind == 3:
        value = copy.deepcopy(_VALUES[int(rng.integers(len(_VALUES)))])
        parent[path[-1]] = value
        return json.dumps(meta), f"meta.json {path} = {value!r}"
    del parent[path[-1]]
    return json.dumps(meta), f"meta.json {path} deleted"


def _mutate_npy(rng, data: bytes, name: str) -> tuple[bytes, str]:
    kind = int(rng.integers(5))
    out = bytearray(data)
    if kind == 0:  # the header, where a byte means the most
        i = int(rng.integers(min(128, len(out))))
        out[i] = int(rng.integers(256))
        return bytes(out), f"{name}: header byte {i} set to {out[i]}"
    if kind == 1:
        i = int(rng.integers(len(out)))
        out[i] ^= 1 << int(rng.integers(8))
        return bytes(out), f"{name}: a bit of byte {i} flipped"
    if kind == 2:
        i = int(rng.integers(len(out)))
        return data[:i], f"{name}: cut at {i}"
    if kind == 3:
        return data + bytes(int(rng.integers(1, 300))), f"{name}: bytes appended"
    header = data[10:128].decode()
    swaps = [("False", "True"), ("'|u1'", "'<u2'"), ("'<i2'", "'<f4'"), ("'<i2'", "'|b1'"), ("'<f8'", "'<f4'"),
             ("(", "(1, "), (", ", ", 2, "), ("'<i2'", "'|O'")]
    a, b = swaps[int(rng.integers(len(swaps)))]
    new = header.replace(a, b, 1)[:117].ljust(117) + "\n"
    return data[:10] + new.encode() + data[128:], f"{name}: header {a} -> {b}"


def _read_everything(root, dst):
    """Every public way in: both splits, info --verify, convert; the arrays read (or the error)."""
    out = {}
    for split in ("train", "val"):
        ds = open_dataset(root, split)
        assert ds.data.shape == (len(ds.targets), 8, 8, 3) and ds.data.dtype == np.uint8
        assert len(ds.targets) == 0 or 0 <= ds.targets.min() <= ds.targets.max() < len(ds.wnids)
        out[split] = (np.array(ds.data), ds.targets.copy(), None if ds.mean is None else ds.mean.copy())
    info = describe(root, check=True)
    # quiet: its progress lines, captured by pytest over 1000 iterations, would count in the memory measured
    convert(root, dst, ["pickle"], quiet=True)
    return out, info


def fuzz(nat, tmp_path, iterations, seed):
    """Mutate the native dataset ``nat`` ``iterations`` times; returns outcome counts and the peak traced
    memory of one iteration. Every outcome is a DSImageNetError, the same data, or data that --verify flags."""
    rng = np.random.default_rng(seed)
    reference, _ = _read_everything(nat, tmp_path / "ref")
    files = {p.relative_to(nat).as_posix(): p.read_bytes() for p in nat.rglob("*") if p.is_file()}
    npys = sorted(k for k in files if k.endswith(".npy"))
    outcomes = {"error": 0, "same data": 0, "changed data, flagged by --verify": 0}
    peak = 0
    work = tmp_path / "work"

    def hang(signum, frame):
        raise AssertionError("an iteration took over 120 s: a hang")

    old = signal.signal(signal.SIGALRM, hang)
    tracemalloc.start()
    try:
        for it in range(iterations):
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(nat, work / "nat")
            if rng.random() < 0.4:
                text, what = _mutate_meta(rng, files["meta.json"].decode())
                (work / "nat" / "meta.json").write_bytes(text.encode("latin-1", "replace"))
            else:
                name = npys[int(rng.integers(len(npys)))]
                data, what = _mutate_npy(rng, files[name], name)
                (work / "nat" / name).write_bytes(data)
            tracemalloc.reset_peak()
            signal.alarm(120)
            try:
                got, info = _read_everything(work / "nat", work / "out")
            except DSImageNetError as e:
                assert str(e), what
                outcomes["error"] += 1
                assert not (work / "out").exists(), f"{what}: a failed convert left its output"
                continue
            except Exception as e:
                raise AssertionError(f"iteration {it}, {what}: {type(e).__name__}: {e}") from e
            finally:
                signal.alarm(0)
                peak = max(peak, tracemalloc.get_traced_memory()[1])
            same = all(np.array_equal(got[s][0], reference[s][0]) and np.array_equal(got[s][1], reference[s][1])
                       and (got[s][2] is None) == (reference[s][2] is None)
                       and (got[s][2] is None or np.array_equal(got[s][2], reference[s][2])) for s in got)
            if same:
                outcomes["same data"] += 1
            else:
                assert isinstance(info["checksums"], list), f"iteration {it}, {what}: other data, and --verify is ok"
                outcomes["changed data, flagged by --verify"] += 1
    finally:
        tracemalloc.stop()
        signal.signal(signal.SIGALRM, old)
    return outcomes, peak


# The dataset is 45 KB (meta.json 30 KB); a try allocates about 1 MiB. The bound leaves room for the interpreter's
# own tables, which grow where they grow: the dict of interned strings, resized by whichever intern crosses its
# threshold (3.7 MB once, after a whole test suite was collected). A forged size asks for gigabytes.
FUZZ_MEMORY_BOUND = 8 << 20


def test_fuzz_native_reader_briefly(nat, tmp_path):
    outcomes, peak = fuzz(nat, tmp_path, 50, seed=12)
    assert sum(outcomes.values()) == 50 and outcomes["error"] > 0
    assert peak < FUZZ_MEMORY_BOUND, peak


@pytest.mark.reliability
def test_fuzz_native_reader_1000_mutations(nat, tmp_path):
    outcomes, peak = fuzz(nat, tmp_path, 1000, seed=2026)
    print(f"1000 mutations: {outcomes}; peak traced memory of one iteration {peak / 2**20:.2f} MiB")
    assert sum(outcomes.values()) == 1000 and min(outcomes.values()) > 0
    assert peak < FUZZ_MEMORY_BOUND, peak


@pytest.mark.parametrize("name", ["meta.json", "train/images.npy", "mean.npy"])
def test_a_fifo_or_device_in_place_of_a_file_is_refused_not_waited_on(nat, name):
    import os

    (nat / name).unlink()
    os.mkfifo(nat / name)  # opening it for reading would block until a writer came: forever
    with pytest.raises(NativeFormatError, match=f"{name}: not a regular file"):
        open_dataset(nat, format="native")
    (nat / name).unlink()
    (nat / name).symlink_to("/dev/zero")
    with pytest.raises(NativeFormatError, match=f"{name}: not a regular file"):
        open_dataset(nat, format="native")


@pytest.mark.parametrize("kind", ["a folder", "a link to a folder"])
def test_meta_json_that_is_a_folder_is_named_not_taken_for_no_dataset(nat, kind, capsys):
    (nat / "meta.json").unlink()
    if kind == "a folder":
        (nat / "meta.json").mkdir()
    else:
        (nat / "meta.json").symlink_to(nat / "train")
    with pytest.raises(NativeFormatError, match="meta.json: not a regular file"):
        open_dataset(nat)
    assert main(["info", str(nat)]) == 1
    assert capsys.readouterr().err.endswith("meta.json: not a regular file\n")


@pytest.mark.parametrize("target", ["/dev/zero", "a sparse file", "another dataset's labels"])
def test_arrays_that_are_links(nat, tmp_path, target):
    """A link is followed to what it points at, which is checked like any file: a device is not a file, a
    sparse file has no .npy header, another dataset's array of the same shape reads (its checksum differs)."""
    p = nat / "val" / "labels.npy"
    p.unlink()
    if target == "/dev/zero":
        p.symlink_to("/dev/zero")
        with pytest.raises(NativeFormatError, match="not a regular file"):
            open_dataset(nat, "val")
    elif target == "a sparse file":
        with open(tmp_path / "sparse", "wb") as f:
            f.truncate(1 << 34)  # 16 GB, none of it on disk
        p.symlink_to(tmp_path / "sparse")
        with pytest.raises(NativeFormatError, match="no \\\\x93NUMPY magic"):
            open_dataset(nat, "val")
    else:
        np.save(tmp_path / "other.npy", np.full(37, 3, np.int16))
        p.symlink_to(tmp_path / "other.npy")
        assert (open_dataset(nat, "val").targets == 2).all()
        assert describe(nat)["splits"]["val"] == 37  # info reads no data; --verify does
        assert any("val/labels.npy: sha256" in x for x in describe(nat, check=True)["checksums"])


def test_labels_truncated_while_being_read(nat, monkeypatch):
    """The header is read and checked, then the file is cut (another process rewriting it) before its data."""
    header = native.read_npy_header

    def then_cut(path):
        h = header(path)
        if path.name == "labels.npy":
            with open(path, "r+b") as f:
                f.truncate(h.offset + 10)
        return h

    monkeypatch.setattr(native, "read_npy_header", then_cut)
    with pytest.raises(NativeFormatError, match="labels.npy: cut short while being read"):
        open_dataset(nat, "val")


def test_rows_of_an_array_cut_after_it_was_opened(nat):
    h = native.read_npy_header(nat / "train" / "images.npy")
    with open(nat / "train" / "images.npy", "r+b") as f:
        f.truncate(h.offset + 100 * 192)
    rows = native.read_rows(nat / "train" / "images.npy", h.offset, (8, 8, 3), np.array([1, 2, 99]))
    assert rows.shape == (3, 8, 8, 3)
    with pytest.raises(NativeFormatError, match="cut short while being read"):
        native.read_rows(nat / "train" / "images.npy", h.offset, (8, 8, 3), np.array([5, 100, 101]))


def test_info_of_a_huge_sparse_dataset_reads_no_image(nat, monkeypatch):
    """1.28 million 64 px images claimed by a sparse 15.7 GB images.npy: ``info`` checks headers and labels only
    (memory ~ the labels, no image byte read); opening it maps the file and reads nothing either."""
    n, s = 1_281_167, 64
    meta = json.loads((nat / "meta.json").read_text())
    meta.pop("mean")
    meta["image_size"], meta["splits"] = s, {"train": {"count": n, "sha256": {a: "0" * 64 for a in native.ARRAYS}}}
    (nat / "meta.json").write_text(json.dumps(meta))
    (nat / "mean.npy").unlink()
    shutil.rmtree(nat / "val")
    with open(nat / "train" / "images.npy", "wb") as f:
        f.write(native.npy_header((n, s, s, 3), np.uint8))
        f.truncate(128 + n * s * s * 3)
    np.save(nat / "train" / "labels.npy", np.arange(n, dtype=np.int64) % 1000 + 1)
    monkeypatch.setattr(native, "digest", lambda *a, **k: pytest.fail("an array was read whole"))
    tracemalloc.start()
    try:
        info = describe(nat)
        ds = open_dataset(nat)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info["splits"] == {"train": n} and isinstance(ds.data, np.memmap) and ds.data.shape == (n, s, s, 3)
    assert peak < 64 << 20  # the labels (10 MB as int64, twice at most), not the 15.7 GB of images


def test_row_array_write_rows_puts_each_row_at_its_position(tmp_path):
    """The build's rows read in a source's file order land where the seeded order puts them: as numpy's
    fancy assignment does, and the rows never written stay zeros."""
    from dsimagenet.formats.native import RowArray

    a = RowArray.create(tmp_path / "a.npy", 10, (2, 2, 3))
    rows = np.random.default_rng(0).integers(1, 256, (4, 2, 2, 3), dtype=np.uint8)
    positions = np.array([7, 0, 9, 3])
    a.write_rows(positions, rows)
    want = np.zeros((10, 2, 2, 3), np.uint8)
    want[positions] = rows
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), want)
    with pytest.raises(ValueError, match="positions in 0..9"):
        a.write_rows(np.array([10]), rows[:1])
