"""Official batch files: the safe unpickler, format detection errors, writing compatible files."""

import io
import os
import pickle

import numpy as np
import pytest
from conftest import to_rows

from dsimagenet.formats import official
from dsimagenet.formats.official import FormatError, read_batch


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_pickle_is_refused_without_side_effect(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps({"data": Evil(), "labels": [1]}, protocol=3)
    with pytest.raises(FormatError, match="refused to load posix.system|refused to load os.system"):
        read_batch(io.BytesIO(payload), "evil_batch", "pickle")
    assert not (tmp_path / "PWNED").exists()
    pickle.loads(payload)  # the same bytes through plain pickle would have run the command
    assert (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_protocols(protocol):
    x = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, -1)
    raw = pickle.dumps({"data": x, "labels": [3, 1000], "mean": x.mean(0)}, protocol=protocol)
    b = read_batch(io.BytesIO(raw), "b", "pickle")
    np.testing.assert_array_equal(b.data, x)
    assert b.labels.tolist() == [3, 1000] and b.image_size == 4
    np.testing.assert_array_equal(b.mean, x.mean(0))


def test_numpy1_module_names_are_accepted():
    x = np.arange(48, dtype=np.uint8).reshape(1, 48)
    raw = pickle.dumps({"data": x, "labels": [1]}, protocol=3).replace(b"numpy._core.multiarray",
                                                                     b"numpy.core.multiarray")
    np.testing.assert_array_equal(read_batch(io.BytesIO(raw), "b", "pickle").data, x)


@pytest.mark.parametrize("obj, msg", [
    ({"data": np.zeros((2, 10), np.uint8), "labels": [1, 2]}, "not 3\\*S\\*S"),
    ({"data": np.zeros((2, 12), np.float32), "labels": [1, 2]}, "must be a uint8 array"),
    ({"data": np.zeros((2, 12), np.uint8), "labels": [1]}, "labels of type"),
    ({"data": np.zeros((2, 12), np.uint8), "labels": [0, 1]}, "labels must be 1..1000"),
    ({"data": np.zeros((2, 12), np.uint8), "labels": [1, 1001]}, "labels must be 1..1000"),
    ({"images": np.zeros((2, 12), np.uint8)}, "expected a dict with 'data' and 'labels'"),
])
def test_bad_contents(obj, msg):
    with pytest.raises(FormatError, match=msg):
        read_batch(io.BytesIO(pickle.dumps(obj)), "batch", "pickle")


def test_truncated_empty_and_confused(tmp_path):
    x = {"data": np.zeros((100, 48), np.uint8), "labels": [1] * 100}
    raw = pickle.dumps(x, protocol=3)
    with pytest.raises(FormatError, match="truncated or damaged"):
        read_batch(io.BytesIO(raw[: len(raw) // 2]), "train_data_batch_3", "pickle")
    with pytest.raises(FormatError, match="empty"):
        read_batch(io.BytesIO(b""), "val_data", "pickle")
    with pytest.raises(FormatError, match="it is a pickle"):
        read_batch(io.BytesIO(raw), "val_data.npz", "npz")
    buf = io.BytesIO()
    np.savez(buf, data=x["data"], labels=np.ones(100, int))
    with pytest.raises(FormatError, match="this is an npz"):
        read_batch(io.BytesIO(buf.getvalue()), "val_data", "pickle")
    with pytest.raises(FormatError, match="truncated or damaged"):
        read_batch(io.BytesIO(buf.getvalue()[:-200]), "val_data.npz", "npz")


def test_npz_object_arrays_refused():
    buf = io.BytesIO()
    np.savez(buf, data=np.zeros((1, 12), np.uint8), labels=np.array([1, "x"], dtype=object))
    buf.seek(0)
    with pytest.raises(FormatError, match="pickle"):
        read_batch(buf, "val_data.npz", "npz")


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
