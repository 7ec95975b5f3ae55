"""Bad input and faults, each with the behaviour the build, load and train issues promise. RELIABILITY.md lists
every case with the test that checks it. The long cases (many random kills) are marked ``reliability`` and run
with ``make reliability``; the rest run in ``make test``."""

import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import learnable_native
from PIL import Image
from release import CLASSES, encode, make_release, reference, tar_bytes

from dsimagenet import open_dataset
from dsimagenet.build import BuildConfig, BuildError, build
from dsimagenet.sources import imagenet as imagenet_source
from dsimagenet.train import TrainConfig, train

QUIET = dict(quiet=True, workers=1)


@pytest.fixture(scope="module")
def rel(tmp_path_factory):
    return make_release(tmp_path_factory.mktemp("release"))


def files_of(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "meta.json")}


def one_class(tmp_path, files):
    root = tmp_path / "src" / CLASSES[0]
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return tmp_path / "src"


# --- inputs ------------------------------------------------------------------------------------------------

def test_corrupt_exif(tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8))
    good = encode(img)
    # an APP1 segment that says Exif but holds garbage, right after the SOI marker
    payload = b"Exif\x00\x00" + b"\xff\x00garbage" * 8
    bad = good[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + good[2:]
    src = one_class(tmp_path, {"a.JPEG": bad})
    build(BuildConfig(out=str(tmp_path / "o"), train=str(src), sizes=(8,), allow_partial=True, **QUIET))
    np.testing.assert_array_equal(open_dataset(tmp_path / "o" / "8_box").data[0], reference(bad, 8, "box"))
    # with --exif-transpose the broken EXIF is ignored (Pillow reads no orientation) or named as the error
    try:
        build(BuildConfig(out=str(tmp_path / "e"), train=str(src), sizes=(8,), allow_partial=True,
                          exif_transpose=True, **QUIET))
    except BuildError as e:
        assert "a.JPEG: unreadable EXIF" in str(e)
    else:
        np.testing.assert_array_equal(open_dataset(tmp_path / "e" / "8_box").data[0], reference(bad, 8, "box"))


@pytest.mark.parametrize("w, h", [(1, 1), (1, 500), (500, 1)])
def test_degenerate_sizes(tmp_path, w, h):
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)))
    src = one_class(tmp_path, {"x.JPEG": data})
    build(BuildConfig(out=str(tmp_path / "o"), train=str(src), sizes=(8, 32), methods=("box", "lanczos"),
                      allow_partial=True, **QUIET))
    for s in (8, 32):
        for m in ("box", "lanczos"):
            np.testing.assert_array_equal(open_dataset(tmp_path / "o" / f"{s}_{m}").data[0], reference(data, s, m))


def _outer_tar(class_tars: dict[str, bytes]) -> bytes:
    return tar_bytes(class_tars)


MISSING_ONE_CLASS = r"18 images, full ILSVRC-2012 has 27 \(9 missing\); 998 classes have no images"


@pytest.fixture
def full(rel, monkeypatch):
    """Make the miniature release count as complete, so that what is missing from it shows."""
    monkeypatch.setattr(imagenet_source, "NUM_TRAIN_IMAGES", len(rel.train))
    return rel


def test_complete_release_needs_no_flag(full, tmp_path):
    build(BuildConfig(out=str(tmp_path / "o"), train=str(full.train_tar), sizes=(8,), **QUIET))


def test_tar_cut_at_a_member_boundary_is_caught_by_the_counts(full, tmp_path):
    data = full.train_tar.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        last = t.getmembers()[-1]
    cut = tmp_path / "ILSVRC2012_img_train.tar"
    cut.write_bytes(data[: last.offset])  # ends exactly before the last class tar: tarfile reads no error
    with tarfile.open(cut) as t:
        assert len(t.getmembers()) == len(CLASSES) - 1
    with pytest.raises(BuildError, match=MISSING_ONE_CLASS):
        build(BuildConfig(out=str(tmp_path / "o"), train=str(cut), sizes=(8,), **QUIET))


def test_missing_class_tar_in_a_folder(full, tmp_path):
    d = tmp_path / "train"
    d.mkdir()
    with tarfile.open(full.train_tar) as t:
        for m in t.getmembers()[:-1]:
            (d / m.name).write_bytes(t.extractfile(m).read())
    with pytest.raises(BuildError, match=MISSING_ONE_CLASS):
        build(BuildConfig(out=str(tmp_path / "o"), train=str(d), sizes=(8,), **QUIET))


def test_junk_in_tars_and_folders_is_listed_not_read(rel, tmp_path):
    files = {n.split("/")[1]: d for n, d in rel.train.items() if n.startswith(CLASSES[0])}
    files["README.txt"] = b"not an image"
    files[".DS_Store"] = b"\x00\x01"
    outer = tmp_path / "train.tar"
    outer.write_bytes(_outer_tar({f"{CLASSES[0]}.tar": tar_bytes(files), "checksums.md5": b"x"}))
    with pytest.raises(BuildError, match="checksums.md5: not a class tar"):
        build(BuildConfig(out=str(tmp_path / "o"), train=str(outer), sizes=(8,), allow_partial=True, **QUIET))
    build(BuildConfig(out=str(tmp_path / "o"), train=str(outer), sizes=(8,), allow_partial=True, skip_bad=True,
                      **QUIET))
    m = json.loads((tmp_path / "o" / "8_box" / "manifest.json").read_text())
    assert m["counts"]["train"] == len(files) - 2
    assert sorted(k.rsplit(":", 1)[1] for k, _ in m["ignored"]) == [".DS_Store", "README.txt"]
    assert [k.rsplit(":", 1)[1] for k, _ in m["skipped"]] == ["checksums.md5"]


def test_same_image_in_two_classes_is_kept_in_both(rel, tmp_path):
    data = rel.train[f"{CLASSES[0]}/{CLASSES[0]}_1.JPEG"]
    for c in CLASSES[:2]:
        (tmp_path / "src" / c).mkdir(parents=True)
        (tmp_path / "src" / c / "same.JPEG").write_bytes(data)
    build(BuildConfig(out=str(tmp_path / "o"), train=str(tmp_path / "src"), sizes=(8,), allow_partial=True,
                      **QUIET))
    ds = open_dataset(tmp_path / "o" / "8_box")
    assert sorted(ds.targets.tolist()) == [0, 1]
    np.testing.assert_array_equal(ds.data[0], ds.data[1])


def test_two_builds_at_once(rel, tmp_path):
    cmd = [sys.executable, "-m", "dsimagenet", "build", "--train", str(rel.train_tar), "--out", str(tmp_path / "o"),
           "--sizes", "8", "64", "--methods", "box", "lanczos", "--workers", "1", "--chunk-rows", "1",
           "--allow-partial", "--quiet"]
    first = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "o" / ".build" / "plan.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    second = subprocess.run(cmd, capture_output=True, text=True)
    first.communicate(timeout=120)
    assert first.returncode == 0
    assert second.returncode == 1 and "another build is writing into this folder" in second.stderr


# --- training faults ---------------------------------------------------------------------------------------

FAST = dict(depth=6, width=1, batch_size=16, lr=0.05, log_every=1000, quiet=True, device="cpu")


def test_a_checkpoint_cut_short_while_writing_leaves_the_previous_one(tmp_path):
    data = learnable_native(tmp_path / "d")
    c = TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=2, **FAST)
    train(c)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    before = ckpt.read_bytes()
    # a kill while writing leaves a part-written temp file beside the complete previous checkpoint
    (tmp_path / "run" / f".checkpoint.pt.tmp-{os.getpid() + 1}").write_bytes(before[: len(before) // 3])
    assert train(c, resume=True)["epochs"] == 2
    assert ckpt.read_bytes() == before


def test_a_damaged_checkpoint_is_an_error_naming_it(tmp_path):
    data = learnable_native(tmp_path / "d")
    c = TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=1, **FAST)
    train(c)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(ValueError, match="checkpoint.pt: unreadable checkpoint"):
        train(c, resume=True)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_malicious_checkpoint_is_refused_without_side_effect(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = learnable_native(tmp_path / "d")
    c = TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=1, **FAST)
    train(c)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    state["evil"] = Evil()
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match="unreadable checkpoint"):
        train(c, resume=True)
    assert not (tmp_path / "PWNED").exists()


def test_a_malicious_official_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "data"
    d.mkdir()
    for name in [f"train_data_batch_{k}" for k in range(1, 11)] + ["val_data"]:
        (d / name).write_bytes(pickle.dumps({"data": Evil(), "labels": [1]}))
    r = subprocess.run([sys.executable, "-m", "dsimagenet", "info", str(d)], capture_output=True, text=True)
    assert r.returncode == 1 and "refused to load" in r.stderr
    assert not (tmp_path / "PWNED").exists()


# --- many random kills (make reliability) ------------------------------------------------------------------

def _kill_until_done(cmd, rng, max_seconds, kills):
    """Run ``cmd``, SIGKILL it after a random delay, again and again, ``kills`` times; then let it finish.
    Returns how many kills landed while it was still running."""
    landed = 0
    for _ in range(kills):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, max_seconds))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            landed += 1
        p.wait()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return landed


@pytest.mark.reliability
def test_build_survives_20_random_kills(rel, tmp_path):
    cmd = lambda out: [sys.executable, "-m", "dsimagenet", "build", "--train", str(rel.train_tar), "--val",  # noqa
                       str(rel.val_tar), "--out", str(out), "--sizes", "8", "32", "64", "--methods", "box",
                       "lanczos", "--workers", "2", "--chunk-rows", "1", "--allow-partial", "--quiet"]
    t = time.time()
    subprocess.run(cmd(tmp_path / "whole"), check=True)
    full = time.time() - t
    landed = _kill_until_done(cmd(tmp_path / "killed"), random.Random(20), full, 20)
    for combo in ("8_box", "32_lanczos", "64_box"):
        assert files_of(tmp_path / "whole" / combo) == files_of(tmp_path / "killed" / combo)
    (tmp_path.parent / "build_kills.json").write_text(json.dumps({"kills": 20, "landed": landed}))
    assert landed >= 10


@pytest.mark.reliability
def test_training_survives_10_random_kills(tmp_path):
    data = learnable_native(tmp_path / "d", per_class=24)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = lambda out: [sys.executable, "-m", "dsimagenet", "train", "--data", str(data), "--out", str(out),  # noqa
                       "--epochs", "4", "--depth", "6", "--batch-size", "16", "--lr", "0.05", "--device", "cpu",
                       "--dropout", "0.1", "--checkpoint-every-steps", "2", "--quiet"]
    t = time.time()
    subprocess.run(cmd(tmp_path / "whole"), check=True, env=env)
    full = time.time() - t
    rng = random.Random(10)
    landed = 0
    out = tmp_path / "killed"
    for _ in range(10):
        p = subprocess.Popen(cmd(out) + (["--resume"] if (out / "config.json").exists() else []), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, full))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            landed += 1
        p.wait()
    subprocess.run(cmd(out) + ["--resume"], check=True, env=env, stdout=subprocess.DEVNULL)
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    def lines(run):
        return [{k: v for k, v in json.loads(x).items() if "seconds" not in k and "per_s" not in k}
                for x in (run / "metrics.jsonl").read_text().splitlines()]

    assert lines(tmp_path / "whole") == lines(out)  # every epoch once, with the same numbers
    (tmp_path.parent / "train_kills.json").write_text(json.dumps({"kills": 10, "landed": landed}))
    assert landed >= 5


def test_resuming_with_other_settings_is_refused(rel, tmp_path, monkeypatch):
    module = sys.modules["dsimagenet.convert"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(BuildConfig(out=str(tmp_path / "o"), train=str(rel.train_tar), sizes=(8,), allow_partial=True,
                          **QUIET))
    monkeypatch.undo()
    with pytest.raises(BuildError, match=r"unfinished build with other settings.*remove .*\.build to start over"):
        build(BuildConfig(out=str(tmp_path / "o"), train=str(rel.train_tar), sizes=(16,), allow_partial=True,
                          **QUIET))
    build(BuildConfig(out=str(tmp_path / "o"), train=str(rel.train_tar), sizes=(8,), allow_partial=True,
                      skip_bad=True, **QUIET))  # the same build; --skip-bad alone does not change its bytes
    assert (tmp_path / "o" / "8_box" / "manifest.json").exists()
