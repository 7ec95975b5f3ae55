"""Official batch files: the safe unpickler (hand-built hostile pickles), zips and npz that are damaged or
forged, writing files every NumPy reads, empty batches."""

import io
import os
import pickle
import pickletools
import re
import struct
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest
from conftest import to_rows

from dsimagenet.formats import official
from dsimagenet.formats.official import FormatError, read_batch


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def refused(raw, match, where="val_data", expect="pickle", peak_mb=8):
    """``raw`` is refused with a FormatError naming ``where`` and matching ``match``, and reading it never
    held more than ``peak_mb`` MB (what a blow-up would exceed by orders of magnitude)."""
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=match) as e:
            read_batch(io.BytesIO(raw), where, expect)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(e.value).startswith(f"{where}: ")
    assert peak < peak_mb * 2**20, f"peak {peak / 2**20:.1f} MB"
    return str(e.value)


# --- building pickles by hand ------------------------------------------------------------------------------

def op(name, *args):
    return getattr(pickle, name) + b"".join(args)


def u(text):  # BINUNICODE
    b = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def glob(module, name):
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def dtype_op(code, byteorder="|"):
    return (glob("numpy", "dtype") + u(code) + pickle.NEWFALSE + pickle.NEWTRUE + pickle.TUPLE3 + pickle.REDUCE
            + pickle.MARK + op("BININT1", b"\x03") + u(byteorder) + pickle.NONE * 3
            + op("BININT", struct.pack("<i", -1)) * 2 + op("BININT1", b"\x00") + pickle.TUPLE + pickle.BUILD)


def int_op(v):
    return op("BININT", struct.pack("<i", v))


def shape_op(shape):
    return pickle.MARK + b"".join(int_op(v) for v in shape) + pickle.TUPLE


def array_op(shape, dtype_bytes, raw, core="numpy.core.multiarray"):
    """ndarray.__reduce__ as numpy writes it (protocol 3): _reconstruct(...) BUILD (1, shape, dtype, F, raw)."""
    return (glob(core, "_reconstruct") + glob("numpy", "ndarray") + op("BININT1", b"\x00") + pickle.TUPLE1
            + op("SHORT_BINBYTES", b"\x01b") + pickle.TUPLE3 + pickle.REDUCE
            + pickle.MARK + op("BININT1", b"\x01") + shape_op(shape) + dtype_bytes + pickle.NEWFALSE
            + pickle.BINBYTES + struct.pack("<I", len(raw)) + raw + pickle.TUPLE + pickle.BUILD)


def batch_pickle(*extra, n=2, labels=None):
    """A valid protocol 3 batch dict of n 4 px images, with ``extra`` (key, value opcodes) items added."""
    labels = list(range(1, n + 1)) if labels is None else labels
    items = [u("data") + array_op((n, 48), dtype_op("u1"), bytes(range(n * 48))),
             u("labels") + pickle.EMPTY_LIST + pickle.MARK + b"".join(int_op(v) for v in labels) + pickle.APPENDS,
             *(u(k) + v for k, v in extra)]
    return b"\x80\x03" + pickle.EMPTY_DICT + pickle.MARK + b"".join(items) + pickle.SETITEMS + pickle.STOP


def test_hand_built_pickle_is_what_plain_pickle_reads():
    raw = batch_pickle()
    ref = pickle.loads(raw)  # the independent reference for the helpers above
    b = read_batch(io.BytesIO(raw), "val_data", "pickle")
    np.testing.assert_array_equal(b.data, ref["data"])
    assert b.labels.tolist() == ref["labels"] == [1, 2] and b.image_size == 4


# --- case 1: constructs that amplify memory, each refused before it is built -------------------------------

def test_codecs_encode_hex_chain_is_refused():
    levels = 20  # each level doubles: 16 bytes -> 16 MB, from a file of a few hundred bytes
    chain = (glob("_codecs", "encode") + op("BINPUT", b"\x00") + op("BINGET", b"\x00") * (levels - 1)
             + op("SHORT_BINBYTES", b"\x10" + b"A" * 16) + (u("hex") + pickle.TUPLE2 + pickle.REDUCE) * levels)
    assert len(pickle.loads(b"\x80\x03" + chain + pickle.STOP)) == 16 << levels  # plain pickle amplifies
    msg = refused(batch_pickle(("unused", chain)), r"_codecs.encode\(.*only encode\(text, 'latin1'\)", peak_mb=4)
    assert "at byte" in msg


def test_object_dtype_array_is_refused():
    items = pickle.MARK + pickle.NONE * 3 + pickle.LIST  # the LIST opcode is refused too, but dtype comes first
    obj = array_op((1_000_000,), dtype_op("O8"), b"")[:-len(pickle.TUPLE + pickle.BUILD)]
    raw = batch_pickle(("unused", obj.replace(pickle.BINBYTES + b"\x00" * 4, b"") + items))
    refused(raw, r"dtype\('O8'.*only bool, integer and float dtypes", peak_mb=2)


def test_nested_list_labels_from_memo_are_refused():
    # L0 = [1]*10, L(k+1) = [Lk]*10 through memo references: 10**7 labels from a ~300-byte file
    levels = ((pickle.EMPTY_LIST + op("BINPUT", b"\x00") + pickle.MARK + op("BININT1", b"\x01") * 10
               + pickle.APPENDS + pickle.POP)
              + b"".join(pickle.EMPTY_LIST + op("BINPUT", bytes([k + 1])) + pickle.MARK
                         + op("BINGET", bytes([k])) * 10 + pickle.APPENDS + pickle.POP for k in range(7))
              + op("BINGET", b"\x07"))
    raw = batch_pickle(n=0).replace(u("labels") + pickle.EMPTY_LIST + pickle.MARK + pickle.APPENDS,
                                    u("labels") + levels)
    ref = pickle.loads(raw)["labels"]
    assert len(ref) == 10 and len(ref[0][0][0][0][0][0]) == 10  # what plain pickle builds
    refused(raw, "a list inside a list: lists hold numbers or strings only", peak_mb=2)


def test_array_never_given_its_state_is_refused():
    no_build = (glob("numpy.core.multiarray", "_reconstruct") + glob("numpy", "ndarray")
                + op("BININT1", b"\x00") + pickle.TUPLE1 + op("SHORT_BINBYTES", b"\x01b") + pickle.TUPLE3
                + pickle.REDUCE)
    raw = batch_pickle().replace(u("data") + array_op((2, 48), dtype_op("u1"), bytes(range(96))),
                                 u("data") + no_build)
    refused(raw, "'data' is an ndarray that was never given its state")
    # the same with the shape in _reconstruct's arguments: numpy would hand out an uninitialised (2, 48) array
    sized = no_build.replace(op("BININT1", b"\x00") + pickle.TUPLE1,
                             op("BININT1", b"\x02") + op("BININT1", b"\x30") + pickle.TUPLE2)
    raw = batch_pickle().replace(u("data") + array_op((2, 48), dtype_op("u1"), bytes(range(96))),
                                 u("data") + sized)
    assert pickle.loads(raw)["data"].shape == (2, 48)  # plain pickle: an array nobody wrote
    refused(raw, r"only _reconstruct\(ndarray, \(0,\), b'b'\)")


@pytest.mark.parametrize("name, body, match", [
    ("BINUNICODE claiming 4 GB", pickle.BINUNICODE + b"\xff\xff\xff\xff" + b"x" * 10, "a payload of 4,294,967,295"),
    ("BINBYTES8 claiming 2**60", pickle.BINBYTES8 + struct.pack("<Q", 2**60), "only .* bytes are left"),
    ("FRAME claiming 2**40", pickle.FRAME + struct.pack("<Q", 2**40), "a FRAME of 1,099,511,627,776 bytes"),
    ("out-of-band buffer", pickle.NEXT_BUFFER, "out-of-band buffer"),
    ("LONG4", pickle.LONG4 + b"\xff\xff\xff\x7f", "opcode LONG4"),
    ("protocol 0 INT", b"I1\n", "opcode INT"),
    ("GLOBAL os.system", glob("os", "system"), "refused to load os.system"),
    ("numpy.ndarray called", glob("numpy", "ndarray") + shape_op((10**9,)) + pickle.TUPLE1 + pickle.REDUCE,
     "calling numpy.ndarray: would allocate"),
    ("scalar of object dtype", glob("numpy.core.multiarray", "scalar") + dtype_op("O8"), r"dtype\('O8'"),
    ("scalar of the wrong size", glob("numpy.core.multiarray", "scalar") + dtype_op("i8", "<") + u("ab")
     + pickle.TUPLE2 + pickle.REDUCE, "not 8 bytes"),
    ("a dict keyed by a tuple", pickle.EMPTY_DICT + pickle.EMPTY_TUPLE + pickle.NONE + pickle.SETITEM,
     "a dict key of type tuple"),
    ("a long GLOBAL name", pickle.GLOBAL + b"n" * 5000, "GLOBAL name longer than 256"),
    ("a structured dtype", glob("numpy", "dtype") + u("V8") + pickle.NEWFALSE + pickle.NEWTRUE + pickle.TUPLE3
     + pickle.REDUCE, r"dtype\('V8'"),
    ("BUILD on a list", pickle.EMPTY_LIST + pickle.EMPTY_DICT + pickle.BUILD, "BUILD on"),
    ("memo references never stored", op("BINGET", b"\x07"), "memo entry 7"),
    ("APPEND to a dict", pickle.EMPTY_DICT + pickle.NONE + pickle.APPEND, "APPEND.* to a dict"),
])
def test_other_constructs_are_refused(name, body, match):
    refused(batch_pickle(("unused", body + pickle.POP + pickle.NONE)), match, peak_mb=2)


def test_a_memo_of_millions_of_entries_is_refused():
    raw = batch_pickle(("unused", pickle.NONE + pickle.MEMOIZE * 400_000))
    refused(raw, "the memo would build more than 32x the bytes read so far", peak_mb=24)


def test_protocol_2_from_python_2_cpickle():
    """Python 2's cPickle, protocol 2, numpy 1.x: byte strings (SHORT_BINSTRING/BINSTRING) hold the array data,
    dtype args are ints, the mean big-endian here."""
    data = bytes(range(96))
    mean = np.linspace(0, 255, 48)
    def pystr(b):
        return (op("SHORT_BINSTRING", bytes([len(b)])) if len(b) < 256 else
                pickle.BINSTRING + struct.pack("<i", len(b))) + b
    def arr(shape, code, bo, raw):
        dt = (glob("numpy", "dtype") + pystr(code.encode()) + op("BININT1", b"\x00") + op("BININT1", b"\x01")
              + pickle.TUPLE3 + pickle.REDUCE + pickle.MARK + op("BININT1", b"\x03") + pystr(bo.encode())
              + pickle.NONE * 3 + int_op(-1) * 2 + op("BININT1", b"\x00") + pickle.TUPLE + pickle.BUILD)
        return (glob("numpy.core.multiarray", "_reconstruct") + glob("numpy", "ndarray") + op("BININT1", b"\x00")
                + pickle.TUPLE1 + pystr(b"b") + pickle.TUPLE3 + pickle.REDUCE + pickle.MARK
                + op("BININT1", b"\x01") + shape_op(shape) + dt + pickle.NEWFALSE + pystr(raw) + pickle.TUPLE
                + pickle.BUILD)
    raw = (b"\x80\x02" + pickle.EMPTY_DICT + pickle.MARK + pystr(b"data") + arr((2, 48), "u1", "|", data)
           + pystr(b"labels") + pickle.EMPTY_LIST + pickle.MARK + op("BININT1", b"\x07") + op("BININT2", b"\xe8\x03")
           + pickle.APPENDS + pystr(b"mean") + arr((48,), "f8", ">", mean.astype(">f8").tobytes())
           + pickle.SETITEMS + pickle.STOP)
    ref = pickle.loads(raw, encoding="latin1")  # how the paper's scripts load it
    b = read_batch(io.BytesIO(raw), "train_data_batch_1", "pickle")
    np.testing.assert_array_equal(b.data, ref["data"])
    assert b.labels.tolist() == ref["labels"] == [7, 1000]
    np.testing.assert_array_equal(b.mean, mean)
    assert b.mean.dtype == np.float64


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_protocols(protocol):
    x = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, -1)
    big = np.random.default_rng(0).integers(0, 256, (300, 3 * 16 * 16), dtype=np.uint8)  # above the buffer size
    for data in (x, big, np.asfortranarray(big)):
        labels = [3, 1000] + [5] * (len(data) - 2)
        raw = pickle.dumps({"data": data, "labels": labels, "mean": data.mean(0)}, protocol=protocol)
        b = read_batch(io.BytesIO(raw), "b", "pickle")
        np.testing.assert_array_equal(b.data, data)
        assert b.labels.tolist() == labels and b.data.flags.c_contiguous and b.data.flags.writeable
        np.testing.assert_array_equal(b.mean, data.mean(0))


def test_labels_as_numpy_scalars_and_arrays():
    x = np.zeros((3, 12), np.uint8)
    for labels in (list(np.array([1, 5, 9])), np.array([1, 5, 9], np.uint16)):
        b = read_batch(io.BytesIO(pickle.dumps({"data": x, "labels": labels}, protocol=3)), "b", "pickle")
        assert b.labels.tolist() == [1, 5, 9] and b.labels.dtype == np.int64


def test_numpy1_module_names_are_accepted():
    x = np.arange(48, dtype=np.uint8).reshape(1, 48)
    raw = pickle.dumps({"data": x, "labels": [1]}, protocol=3).replace(b"numpy._core.multiarray",
                                                                     b"numpy.core.multiarray")
    np.testing.assert_array_equal(read_batch(io.BytesIO(raw), "b", "pickle").data, x)


@pytest.mark.parametrize("obj, msg", [
    ({"data": np.zeros((2, 10), np.uint8), "labels": [1, 2]}, "not 3\\*S\\*S"),
    ({"data": np.zeros((2, 12), np.float32), "labels": [1, 2]}, "must be a uint8 array"),
    ({"data": np.zeros((2, 12), np.uint8), "labels": [1]}, "1 labels for 2 images"),
    ({"data": np.zeros((2, 12), np.uint8), "labels": [0, 1]}, "labels must be 1..1000"),
    ({"data": np.zeros((2, 12), np.uint8), "labels": [1, 1001]}, "labels must be 1..1000"),
    ({"data": np.zeros((2, 12), np.uint8), "labels": [1, 2**70]}, "labels must be 1..1000"),
    ({"data": np.zeros((2, 12), np.uint8), "labels": [1.0, 2.0]}, "'labels' must be integers, found a float"),
    ({"data": np.zeros((2, 12), np.uint8), "labels": [True, 2]}, "'labels' must be integers, found a bool"),
    ({"data": np.zeros((2, 12), np.uint8), "labels": np.array([1.0, 2.0])}, "'labels' must be integers"),
    ({"data": np.zeros((2, 12), np.uint8), "labels": (1, 2)}, "a list or array of integers, found tuple"),
    ({"data": np.zeros((2, 12), np.uint8), "labels": [1, 2], "mean": np.full(12, np.nan)}, "NaN or infinite"),
    ({"data": np.zeros((2, 12), np.uint8), "labels": [1, 2], "mean": np.full(12, np.inf)}, "NaN or infinite"),
    ({"data": np.zeros((2, 12), np.uint8), "labels": [1, 2], "mean": np.full(12, 300.0)}, "0..255"),
    ({"data": np.zeros((2, 12), np.uint8), "labels": [1, 2], "mean": [0.0] * 12}, "'mean' must be a float array"),
    ({"images": np.zeros((2, 12), np.uint8)}, "expected a dict with 'data' and 'labels'"),
])
@pytest.mark.parametrize("kind", ["pickle", "npz"])
def test_bad_contents(obj, msg, kind):
    if kind == "npz":  # the same contents as arrays, where an array can hold them
        if any(isinstance(v, tuple) or (isinstance(v, list) and type(v[0]) is not float and max(v) > 2**62)
               or (isinstance(v, list) and type(v[0]) is bool) for v in obj.values()):
            pytest.skip("not an array")
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in obj.items()})
        raw = buf.getvalue()
        if msg.startswith("'labels' must be integers"):
            msg = "'labels' must be integers"
        elif msg.startswith("'mean' must be"):
            pytest.skip("a list of floats is an array in an npz")
    else:
        raw = pickle.dumps(obj, protocol=3)
    with pytest.raises(FormatError, match=msg) as e:
        read_batch(io.BytesIO(raw), "train_data_batch_2", kind)
    assert str(e.value).startswith("train_data_batch_2")


def test_truncated_empty_and_confused(tmp_path):
    x = {"data": np.zeros((100, 48), np.uint8), "labels": [1] * 100}
    raw = pickle.dumps(x, protocol=3)
    for cut in (len(raw) // 2, len(raw) - 1, 3):
        with pytest.raises(FormatError, match="truncated"):
            read_batch(io.BytesIO(raw[:cut]), "train_data_batch_3", "pickle")
    with pytest.raises(FormatError, match="bytes after the pickle's STOP"):
        read_batch(io.BytesIO(raw + b"junk"), "train_data_batch_3", "pickle")
    with pytest.raises(FormatError, match="empty"):
        read_batch(io.BytesIO(b""), "val_data", "pickle")
    with pytest.raises(FormatError, match="it is a pickle"):
        read_batch(io.BytesIO(raw), "val_data.npz", "npz")
    buf = io.BytesIO()
    np.savez(buf, data=x["data"], labels=np.ones(100, int))
    with pytest.raises(FormatError, match="this is an npz"):
        read_batch(io.BytesIO(buf.getvalue()), "val_data", "pickle")
    with pytest.raises(FormatError, match="not a readable zip"):
        read_batch(io.BytesIO(buf.getvalue()[:-200]), "val_data.npz", "npz")


def test_npz_object_arrays_refused():
    buf = io.BytesIO()
    np.savez(buf, data=np.zeros((1, 12), np.uint8), labels=np.array([1, "x"], dtype=object))
    buf.seek(0)
    with pytest.raises(FormatError, match="val_data.npz:labels.npy: dtype object is refused"):
        read_batch(buf, "val_data.npz", "npz")


# --- case 2: the pickles we write name what every NumPy imports ----------------------------------------

def globals_named(raw):
    """The "module name" of every GLOBAL and STACK_GLOBAL in a pickle (following memo references)."""
    names, recent, memo = set(), [], {}
    for opcode, arg, _ in pickletools.genops(raw):
        if opcode.name == "GLOBAL":
            names.add(arg)
        elif opcode.name == "STACK_GLOBAL":
            names.add(f"{recent[-2]} {recent[-1]}")
        elif opcode.name == "MEMOIZE":
            memo[len(memo)] = recent[-1]
        elif opcode.name in ("BINPUT", "LONG_BINPUT"):
            memo[arg] = recent[-1]
        elif opcode.name in ("BINGET", "LONG_BINGET"):
            recent.append(memo[arg])
        elif opcode.name not in ("FRAME", "PROTO"):
            recent.append(arg)
    return names


@pytest.mark.parametrize("protocol", [3, 4])  # 4: batches of 4 GiB and more
def test_written_pickles_name_numpy_as_numpy1_does(tmp_path, protocol):
    rows = np.arange(2 * 48, dtype=np.uint8).reshape(2, 48)
    obj = {"data": rows, "labels": [1, 2], "mean": rows.mean(0)}
    path = tmp_path / "train_data_batch_1"
    with open(path, "wb") as f:
        official._BatchPickler(f, protocol=protocol).dump(obj)
    raw = path.read_bytes()
    assert globals_named(raw) == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    assert b"numpy._core" not in raw
    # plain pickle.load in a fresh interpreter, every warning an error: NumPy 2 reads numpy.core silently
    code = ("import pickle, sys, warnings; warnings.simplefilter('error'); "
            "d = pickle.load(open(sys.argv[1], 'rb'), encoding='latin1'); "
            "print(d['data'].sum(), d['labels'], d['mean'].dtype)")
    r = subprocess.run([sys.executable, "-W", "error", "-c", code, str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == [str(rows.sum()), "[1,", "2]", "float64"], r.stderr
    b = read_batch(open(path, "rb"), str(path), "pickle")
    np.testing.assert_array_equal(b.data, rows)
    np.testing.assert_array_equal(b.mean, rows.mean(0))


# --- case 3: empty batches -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["pickle", "npz"])
def test_a_build_of_fewer_than_ten_images_reads_back(tmp_path, kind):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5])
    rows, mean = official.nhwc_to_planar(imgs), official.nhwc_to_planar(imgs).mean(0)
    bounds = official.batch_bounds(5)
    assert [b - a for a, b in bounds] == [0] * 9 + [5]
    for i, (a, b) in enumerate(bounds):
        official.write_batch(tmp_path / official.batch_name("train", i + 1, kind), rows[a:b], labels[a:b], mean, kind)
    members = official.split_members(official.find_members(tmp_path), "train", kind, str(tmp_path))
    batches = [m.read() for m in members]
    assert [len(b.labels) for b in batches] == [0] * 9 + [5]
    for b in batches:
        assert b.labels.dtype == np.int64 and b.data.shape[1:] == (48,) and b.image_size == 4
    assert np.concatenate([b.labels for b in batches]).tolist() == [3, 1, 4, 1, 5]
    np.testing.assert_array_equal(np.concatenate([b.data for b in batches]), rows)
    if kind == "pickle":
        with open(tmp_path / "train_data_batch_1", "rb") as f:
            d = pickle.load(f, encoding="latin1")
        assert d["labels"] == [] and d["data"].shape == (0, 48)  # plain pickle: an empty list of int


# --- cases 4, 5: damaged and forged zips and npz ---------------------------------------------------------

def batch_bytes(kind, n=20, size=4, compressed=False):
    rng = np.random.default_rng(n)
    d = {"data": rng.integers(0, 256, (n, 3 * size * size), dtype=np.uint8),
         "labels": rng.integers(1, 1001, n), "mean": np.full(3 * size * size, 127.5)}
    buf = io.BytesIO()
    if kind == "npz":
        (np.savez_compressed if compressed else np.savez)(buf, **d)
    else:
        d["labels"] = d["labels"].tolist()
        pickle.dump(d, buf, protocol=3)
    return buf.getvalue(), d


def zip_with(tmp_path, member, raw, compression=zipfile.ZIP_DEFLATED):
    path = tmp_path / "Imagenet4_train.zip"
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr(f"Imagenet4_train/{member}", raw)
    return path


def read_only_member(path):
    (m,) = official.find_members(path)
    return m.read()


def central_and_local_offsets(data):
    """Offsets of the one member's local header and its central directory entry."""
    return data.index(b"PK\x03\x04"), data.index(b"PK\x01\x02")


@pytest.mark.parametrize("kind", ["pickle", "npz"])
@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_zip_with_a_flipped_byte(tmp_path, kind, compression):
    raw, d = batch_bytes(kind)
    name = "train_data_batch_1" + (".npz" if kind == "npz" else "")
    path = zip_with(tmp_path, name, raw, compression)
    np.testing.assert_array_equal(read_only_member(path).data, d["data"])
    data = bytearray(path.read_bytes())
    local, central = central_and_local_offsets(data)
    pos = local + 30 + len(f"Imagenet4_train/{name}") + (central - local) // 2  # the middle of the member
    data[pos] ^= 0x20
    path.write_bytes(data)
    with pytest.raises(FormatError, match=f"{path}:Imagenet4_train/{name}") as e:
        read_only_member(path)
    assert any(w in str(e.value) for w in ("Bad CRC", "damaged", "Error -3")), str(e.value)


@pytest.mark.parametrize("field, value, match", [
    ("flags", 0x1, "the member is encrypted"),
    ("method", 9, r"compression method 9 \(Deflate64\) is not supported"),
    ("method", 12, r"compression method 12 \(bzip2\)"),
])
def test_zip_members_we_cannot_read(tmp_path, field, value, match):
    raw, _ = batch_bytes("pickle")
    path = zip_with(tmp_path, "val_data", raw)
    data = bytearray(path.read_bytes())
    local, central = central_and_local_offsets(data)
    for at in ((local + 6, central + 8) if field == "flags" else (local + 8, central + 10)):
        struct.pack_into("<H", data, at, struct.unpack_from("<H", data, at)[0] | value if field == "flags" else value)
    path.write_bytes(data)
    with pytest.raises(FormatError, match=f"{path}:Imagenet4_train/val_data: {match}"):
        read_only_member(path)


def npy_member(header_shape, payload):
    header = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {header_shape!r}, }}"
    header = header.ljust(118) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + payload


def test_npz_header_claiming_5e9_rows_is_refused_before_allocating():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("data.npy", npy_member((5_000_000_000, 48), bytes(96)))
        z.writestr("labels.npy", npy_member((2,), b"\x01\x02"))
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=r"val_data.npz:data.npy: its header claims shape \(5000000000, 48\)"):
            read_batch(io.BytesIO(buf.getvalue()), "val_data.npz", "npz")
        assert tracemalloc.get_traced_memory()[1] < 2**20
    finally:
        tracemalloc.stop()


def test_npz_of_other_dtypes_and_orders():
    data = np.asfortranarray(np.arange(96, dtype=np.uint8).reshape(2, 48))
    buf = io.BytesIO()
    np.savez(buf, data=data, labels=np.array([9, 1000], ">u2"), mean=np.full(48, 3.5, "<f4"), other=np.zeros(3))
    b = read_batch(io.BytesIO(buf.getvalue()), "val_data.npz", "npz")
    np.testing.assert_array_equal(b.data, data)
    assert b.labels.tolist() == [9, 1000] and b.mean.dtype == np.float64 and b.mean[0] == 3.5


def bomb_zip(tmp_path, name, prefix, nbytes):
    """A zip whose one member inflates to ``prefix`` + ``nbytes`` zeros, written by zipfile from a stream."""
    path = tmp_path / "Imagenet8_val.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z, z.open(f"Imagenet8_val/{name}", "w",
                                                                         force_zip64=True) as f:
        f.write(prefix)
        chunk = bytes(1 << 20)
        for _ in range(nbytes >> 20):
            f.write(chunk)
    return path


@pytest.mark.parametrize("name, prefix, match", [
    ("val_data.npz", b"", "expected an npz file but it is not one"),
    ("val_data.npz", b"PK\x03\x04", "not an npz: its first member is"),
    ("val_data", b"\x80\x03" + pickle.BINBYTES8 + struct.pack("<Q", 2**40), "only .* bytes are left"),
    ("val_data", b"", "not a binary pickle"),
])
def test_zip_bomb_costs_neither_memory_nor_time(tmp_path, name, prefix, match):
    path = bomb_zip(tmp_path, name, prefix, 256 << 20)
    assert path.stat().st_size < 2 << 20  # 256 MB from under 2 MB
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=match):
            read_only_member(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak >> 20} MB"


def test_a_zip_member_claiming_more_than_it_can_hold(tmp_path):
    raw, _ = batch_bytes("pickle")
    path = zip_with(tmp_path, "val_data", raw, zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    _, central = central_and_local_offsets(data)
    struct.pack_into("<I", data, central + 24, 2**31)  # uncompressed size in the central directory
    path.write_bytes(data)
    with pytest.raises(FormatError, match="claims 2,147,483,648 bytes from .* compressed"):
        read_only_member(path)


def test_train_batch_without_mean_and_npz_part_siblings(tmp_path):
    raw, d = batch_bytes("pickle")
    del d["mean"]
    (tmp_path / "train_data_batch_1").write_bytes(pickle.dumps(d, protocol=3))
    (m,) = official.find_members(tmp_path)
    with pytest.raises(FormatError, match="train_data_batch_1: no 'mean' in a train batch"):
        m.read()
    # Imagenet64_train_part1.zip takes its part2, never the _npz parts beside them
    for name in ("Imagenet64_train_part1.zip", "Imagenet64_train_part1_npz.zip", "Imagenet64_train_part2_npz.zip"):
        zip_with(tmp_path, "x", b"").rename(tmp_path / name)
    with pytest.raises(FormatError, match="Imagenet64_train_part2.zip: missing"):  # the _npz parts are another set
        official.zip_set(tmp_path / "Imagenet64_train_part1.zip")


def test_malicious_pickle_is_refused_without_side_effect(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps({"data": Evil(), "labels": [1]}, protocol=3)
    with pytest.raises(FormatError, match="refused to load posix.system|refused to load os.system"):
        read_batch(io.BytesIO(payload), "evil_batch", "pickle")
    assert not (tmp_path / "PWNED").exists()
    pickle.loads(payload)  # the same bytes through plain pickle would have run the command
    assert (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("kind", ["pickle", "npz"])
def test_write_batch_matches_format(tmp_path, kind):
    imgs = np.random.default_rng(0).integers(0, 256, (7, 5, 5, 3), dtype=np.uint8)
    rows = to_rows(imgs)
    mean = rows.mean(0)
    path = tmp_path / official.batch_name("train", 3, kind)
    official.write_batch(path, official.nhwc_to_planar(imgs), [5, 1, 2, 3, 4, 5, 6], mean, kind)
    if kind == "pickle":
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")  # how users load the official files
        assert isinstance(d["labels"], list) and all(type(v) is int for v in d["labels"])
    else:
        d = dict(np.load(path, allow_pickle=False))
    np.testing.assert_array_equal(d["data"], rows)
    assert d["data"].dtype == np.uint8 and d["mean"].dtype == np.float64
    np.testing.assert_array_equal(d["mean"], mean)
    assert list(d["labels"]) == [5, 1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(official.planar_to_nhwc(d["data"], 5), imgs)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_batch_bounds():
    b = official.batch_bounds(1_281_167)
    assert b[0] == (0, 128_116) and b[8][1] - b[8][0] == 128_116
    assert b[9] == (9 * 128_116, 1_281_167) and b[9][1] - b[9][0] == 128_123


# --- what the first hardening let through (found by attacking it) -------------------------------------------

@pytest.mark.parametrize("name, body", [
    ("EMPTY_DICT", pickle.EMPTY_DICT * (2 << 20)),  # 72 bytes of memory each: 140 MB from 2 MB
    ("EMPTY_LIST", pickle.EMPTY_LIST * (2 << 20)),
    ("TUPLE1", pickle.NONE + pickle.TUPLE1 * (2 << 20)),  # a chain of 2M nested tuples
    ("MARK", pickle.NONE * 1000 + pickle.MARK * (2 << 20)),  # each MARK keeps an int (1001) of its own
])
def test_one_byte_opcodes_that_make_objects_are_charged(name, body):
    """Every object an opcode makes counts against the file's budget (32x its bytes + 1 MiB), not only lists,
    memo entries and copies: before, 2 MB of EMPTY_DICT held 140 MB (70x) and 1.6 GB would have held 110 GB."""
    refused(batch_pickle(("unused", body + pickle.STOP)), f"opcode {name} .* the file amplifies itself", peak_mb=8)


def memo_doubling(levels):
    """A tuple that holds the one before it twice, ``levels`` deep, from memo references: 7 bytes a level,
    2**levels leaves when walked (its repr never ends)."""
    return (pickle.NONE + op("BINPUT", b"\x00") + pickle.POP
            + (op("BINGET", b"\x00") * 2 + pickle.TUPLE2 + op("BINPUT", b"\x00") + pickle.POP) * levels
            + op("BINGET", b"\x00"))


@pytest.mark.parametrize("call", [glob("numpy.core.multiarray", "_reconstruct"), glob("numpy", "dtype")],
                         ids=["_reconstruct", "dtype"])
@pytest.mark.parametrize("args, shown", [
    (memo_doubling(80), r"\(\(\(\(\.\.\.\), \(\.\.\.\)\), "),  # before: its repr, 2**80 leaves, never ended
    (pickle.NONE + pickle.TUPLE1 * 5000, r"\(\(\(\(\.\.\.\),\),\),\)"),  # before: RecursionError, a traceback
], ids=["doubling-80-levels", "5000-deep"])
def test_refused_arguments_are_described_in_bounded_time_and_depth(call, args, shown):
    msg = refused(batch_pickle(("unused", call + args + pickle.TUPLE1 + pickle.REDUCE)), "only", peak_mb=4)
    assert re.search(shown, msg), msg


@pytest.mark.parametrize("shape", [(0, 2**63), (0, 2**62, 2**62), (0, 2**70), (2**62, 0, 2)])
def test_an_empty_array_of_impossible_dimensions_is_refused(shape):
    """A zero dimension makes an array of 0 bytes, so the size check passes, but numpy cannot make an array whose
    other dimensions multiply past its index type (ValueError, a traceback before)."""
    dims = pickle.MARK + b"".join(op("LONG1", b"\x09", v.to_bytes(9, "little")) for v in shape) + pickle.TUPLE
    body = (glob("numpy.core.multiarray", "_reconstruct") + glob("numpy", "ndarray") + op("BININT1", b"\x00")
            + pickle.TUPLE1 + op("SHORT_BINBYTES", b"\x01b") + pickle.TUPLE3 + pickle.REDUCE + pickle.MARK
            + op("BININT1", b"\x01") + dims + dtype_op("u1") + pickle.NEWFALSE + op("SHORT_BINBYTES", b"\x00")
            + pickle.TUPLE + pickle.BUILD)
    raw = b"\x80\x03" + pickle.EMPTY_DICT + u("data") + body + pickle.SETITEM + pickle.STOP
    refused(raw, "multiply past what numpy can index")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("data.npy", npy_member(shape, b""))
        z.writestr("labels.npy", npy_member((0,), b""))
    with pytest.raises(FormatError, match=r"^val_data.npz:data.npy: its header claims an array shape .* past"):
        read_batch(io.BytesIO(buf.getvalue()), "val_data.npz", "npz")


def test_a_negative_npy_dimension_is_named():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("data.npy", npy_member((-1, 48), b""))
        z.writestr("labels.npy", npy_member((0,), b""))
    with pytest.raises(FormatError, match=r"^val_data.npz:data.npy: its header claims an array shape \(-1, 48\) "
                                          "with a negative size"):
        read_batch(io.BytesIO(buf.getvalue()), "val_data.npz", "npz")


def python2_pickle(data: np.ndarray) -> bytes:
    """As Python 2's cPickle wrote numpy 1.x arrays: the data as one BINSTRING (a latin-1 str to Python 3)."""
    raw = data.tobytes()
    dt = (glob("numpy", "dtype") + op("SHORT_BINSTRING", b"\x02u1") + op("BININT1", b"\x00")
          + op("BININT1", b"\x01") + pickle.TUPLE3 + pickle.REDUCE + pickle.MARK + op("BININT1", b"\x03")
          + op("SHORT_BINSTRING", b"\x01|") + pickle.NONE * 3 + int_op(-1) * 2 + op("BININT1", b"\x00")
          + pickle.TUPLE + pickle.BUILD)
    arr = (glob("numpy.core.multiarray", "_reconstruct") + glob("numpy", "ndarray") + op("BININT1", b"\x00")
           + pickle.TUPLE1 + op("SHORT_BINSTRING", b"\x01b") + pickle.TUPLE3 + pickle.REDUCE + pickle.MARK
           + op("BININT1", b"\x01") + shape_op(data.shape) + dt + pickle.NEWFALSE
           + pickle.BINSTRING + struct.pack("<i", len(raw)) + raw + pickle.TUPLE + pickle.BUILD)
    labels = pickle.EMPTY_LIST + pickle.MARK + op("BININT1", b"\x01") * len(data) + pickle.APPENDS
    return (b"\x80\x02" + pickle.EMPTY_DICT + pickle.MARK + op("SHORT_BINSTRING", b"\x04data") + arr
            + op("SHORT_BINSTRING", b"\x06labels") + labels + pickle.SETITEMS + pickle.STOP)


def traced_peak(fn):
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("writer", ["numpy protocol 2", "python 2 cpickle", "numpy protocol 3"])
def test_protocol_2_array_data_costs_no_more_memory_than_pickle_load(writer):
    """Protocol 2 holds array bytes as text: Python 3 writes _codecs.encode(<latin-1 text as UTF-8>, 'latin1'),
    Python 2 a BINSTRING. The reader held the text, its bytes and a copy of them (4.3x the data for protocol 2,
    2.9x for Python 2; 7 GB for a 1.6 GB batch); now each is encoded a chunk at a time into the array it becomes,
    and reading costs no more than pickle.load of the same stream does (the reference)."""
    data = np.random.default_rng(5).integers(0, 256, (200, 3 * 64 * 64), dtype=np.uint8)  # 2.4 MB
    raw = (pickle.dumps({"data": data, "labels": [1] * len(data)}, protocol=int(writer[-1]))
           if writer.startswith("numpy") else python2_pickle(data))
    ref, ref_peak = traced_peak(lambda: pickle.load(io.BytesIO(raw), encoding="latin1"))  # read as we read it
    np.testing.assert_array_equal(ref["data"], data)
    del ref
    b, peak = traced_peak(lambda: read_batch(io.BytesIO(raw), "val_data", "pickle"))
    np.testing.assert_array_equal(b.data, data)
    assert b.data.flags.writeable and b.labels.tolist() == [1] * len(data)
    ratio = f"ours {peak / data.nbytes:.2f}x the data, pickle.load {ref_peak / data.nbytes:.2f}x"
    assert peak <= 1.05 * ref_peak + (1 << 20), ratio


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("kind", ["int", "numpy int64"])
def test_labels_before_the_images_are_no_false_refusal(protocol, kind):
    """The budget must not refuse what writers really produce: 128,116 labels (a 64 px train batch's count) as
    list(array) of numpy int64 (each scalar memoized with its argument tuple) placed before tiny images, so that
    nothing but labels has been read when they are built (protocol 4 was refused at 16x)."""
    lab = np.random.default_rng(0).integers(1, 1001, 128_116)
    labels = list(lab) if kind == "numpy int64" else lab.tolist()
    data = np.zeros((len(lab), 3), np.uint8)  # 1 px images: the labels are most of the file
    raw = pickle.dumps({"labels": labels, "data": data, "mean": np.zeros(3)}, protocol=protocol)
    b = read_batch(io.BytesIO(raw), "train_data_batch_1", "pickle")
    np.testing.assert_array_equal(b.labels, lab)


@pytest.mark.parametrize("kind", ["pickle", "npz"])
@pytest.mark.parametrize("n, step", [(0, 0), (1, 0), (37, 5), (37, 37), (37, 100)])
def test_a_batch_streamed_from_a_row_source_is_the_batch_written_whole(tmp_path, kind, n, step):
    """The build streams each batch from its work arrays a piece at a time: the file must be byte-identical to
    the one written from the whole channel-planar array (an empty batch too), and its sha256 the file's."""
    import hashlib

    size = 4
    images = np.random.default_rng(n).integers(0, 256, (n, size, size, 3), dtype=np.uint8)  # NHWC, as built
    labels = np.arange(n) % 1000 + 1
    mean = np.full(3 * size * size, 127.5)
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    planar = images.transpose(0, 3, 1, 2).reshape(n, 3 * size * size)  # channel-planar rows, by hand
    h_whole = official.write_batch(whole, planar, labels, mean, kind)
    source = official.RowSource(n, size, lambda a, b: images[a:b], step)
    h_streamed = official.write_batch(streamed, source, labels, mean, kind)
    assert streamed.read_bytes() == whole.read_bytes()
    assert h_streamed == h_whole == hashlib.sha256(whole.read_bytes()).hexdigest()
    with open(streamed, "rb") as f:
        back = official.read_batch(f, str(streamed), kind)
    np.testing.assert_array_equal(back.data, planar)
    assert back.labels.tolist() == labels.tolist()
