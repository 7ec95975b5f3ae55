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
from dsimagenet.runs import RunError
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
    (tmp_path / "run" / "result.json").unlink()  # as if killed before the result: the checkpoint is read
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(RunError, match="checkpoint.pt: unreadable checkpoint"):
        train(c, resume=True)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_malicious_checkpoint_is_refused_without_side_effect(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = learnable_native(tmp_path / "d")
    c = TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=1, **FAST)
    train(c)
    (tmp_path / "run" / "result.json").unlink()
    ckpt = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    state["evil"] = Evil()
    torch.save(state, ckpt)
    with pytest.raises(RunError, match="unreadable checkpoint"):
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


def _stop_after(epoch):
    """An ``on_epoch`` that stops the run after ``epoch``'s line and checkpoint, as a kill there would."""
    def hook(line):
        if line["epoch"] == epoch:
            raise KeyboardInterrupt
    return hook


def _lines(run):
    return [{k: v for k, v in json.loads(x).items() if "seconds" not in k and "per_s" not in k}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def _strict_json(text):
    def refuse(name):
        raise AssertionError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_killed_after_its_last_checkpoint_the_run_resumes_to_its_result(tmp_path):
    data = learnable_native(tmp_path / "d")
    c = TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=2, **FAST)
    whole = train(TrainConfig(**{**c.__dict__, "out": str(tmp_path / "whole")}))
    with pytest.raises(KeyboardInterrupt):  # the last checkpoint is written, result.json is not
        train(c, on_epoch=_stop_after(2))
    assert not (tmp_path / "run" / "result.json").exists()
    resumed = train(c, resume=True)  # the same process again: the run directory was let go
    timing = ("train_seconds", "train_images_per_s")
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in whole.items() if k not in timing}
    assert resumed["status"] == "finished"
    assert (tmp_path / "run" / "per_class.csv").read_text() == (tmp_path / "whole" / "per_class.csv").read_text()
    assert _lines(tmp_path / "run") == _lines(tmp_path / "whole")


def test_two_trainings_into_one_run_directory(tmp_path):
    data = learnable_native(tmp_path / "d")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dsimagenet", "train", "--data", str(data), "--out", str(out), "--epochs", "1000",
           "--depth", "6", "--batch-size", "16", "--device", "cpu", "--quiet"]
    first = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (out / "config.json").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert first.poll() is None, "the first training ended early"
        c = TrainConfig(data=str(data), out=str(out), epochs=1000, **{**FAST, "lr": 0.01})
        for resume in (False, True):  # a second run, and a --resume while the run is going
            with pytest.raises(RunError, match=f"{out}: another process \\(pid {first.pid}\\) is training this run"):
                train(c, resume=resume)
        r = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and f"(pid {first.pid})" in r.stderr
    finally:
        first.kill()
        first.wait()
    from dsimagenet.runs import hold

    with hold(out):  # the lock died with its process
        pass


def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(tmp_path):
    ours = learnable_native(tmp_path / "ours")
    theirs = learnable_native(tmp_path / "theirs", seed=5)
    c = TrainConfig(data=str(ours), out=str(tmp_path / "run"), epochs=2, **FAST)
    others = {"other data": TrainConfig(**{**c.__dict__, "data": str(theirs), "out": str(tmp_path / "a")}),
              "other width": TrainConfig(**{**c.__dict__, "width": 2, "out": str(tmp_path / "b")})}
    for cfg in (c, *others.values()):
        with pytest.raises(KeyboardInterrupt):
            train(cfg, on_epoch=_stop_after(1))
    ckpt = tmp_path / "run" / "checkpoint.pt"
    own = tmp_path / "own.pt"
    own.write_bytes(ckpt.read_bytes())
    fix = "; remove it to restart the run from the beginning"
    cases = [(tmp_path / "a" / "checkpoint.pt", None, "belongs to a run on other data \\(dataset fingerprint"),
             (tmp_path / "b" / "checkpoint.pt", None, "belongs to another run: width is 2 there, 1 here"),
             # a checkpoint from before the configuration was stored in it: its tensors tell
             (tmp_path / "b" / "checkpoint.pt", lambda s: s.pop("config"),
              "does not fit this run's model \\(WRN-6-1, 4 classes, 8 px\\): blocks.0.conv1.weight is "
              "\\(32, 16, 3, 3\\) there, \\(16, 16, 3, 3\\) here"),
             (own, lambda s: s["model"]["fc.weight"].view(-1).__setitem__(7, float("nan")),
              "fc.weight holds NaN or infinite values"),
             (own, lambda s: s["optimizer"]["state"][0]["momentum_buffer"].view(-1).__setitem__(0, float("inf")),
              "optimizer state 0 momentum_buffer holds NaN"),
             (own, lambda s: s.update(epoch=3), "at epoch 3 step 0, outside this run \\(2 epochs of 8 steps\\)"),
             (own, lambda s: s.pop("rng_cpu"), "not a checkpoint of this trainer \\(no rng_cpu\\)")]
    for source, change, message in cases:
        state = torch.load(source, weights_only=True)
        if change is not None:
            change(state)
        torch.save(state, ckpt)
        with pytest.raises(RunError, match=f"^{ckpt}: {message}.*{fix}$"):
            train(c, resume=True)
    ckpt.write_bytes(own.read_bytes())
    assert train(c, resume=True)["status"] == "finished"


def test_divergence_stops_the_run_with_exit_status_3(tmp_path, capsys):
    from dsimagenet.cli import main
    from dsimagenet.runs import load_run

    data = learnable_native(tmp_path / "d")
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(out), "--epochs", "3", "--depth", "6", "--batch-size", "32",
            "--lr", "1e6", "--device", "cpu", "--quiet"]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"dsimagenet train: error: {out}: diverged in epoch 1 by step ")
    assert "start a new one with a lower --lr (it was 1e+06)" in err
    result = _strict_json((out / "result.json").read_text())
    assert sorted(result) == ["epoch", "message", "status", "step"] and result["status"] == "diverged"
    assert result["epoch"] == 1 and err.strip().endswith(result["message"])
    for line in (out / "metrics.jsonl").read_text().splitlines():
        _strict_json(line)
    if (out / "checkpoint.pt").exists():  # none with broken weights is ever written
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert load_run(out).status == "diverged" and not load_run(out).finished
    before = (out / "metrics.jsonl").read_bytes()
    assert main([*argv, "--resume"]) == 3  # diverged is final: not trained again
    assert (out / "metrics.jsonl").read_bytes() == before and result["message"] in capsys.readouterr().err


def test_a_non_finite_validation_loss_is_divergence(tmp_path, monkeypatch):
    from dsimagenet import train as train_module
    from dsimagenet.errors import Diverged

    real = train_module.evaluate

    def infinite_second_time(*a, **k):
        ev = real(*a, **k)
        calls.append(1)
        return {**ev, "val_loss": float("inf")} if len(calls) == 2 else ev

    calls = []
    monkeypatch.setattr(train_module, "evaluate", infinite_second_time)
    data = learnable_native(tmp_path / "d")
    c = TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=3, **FAST)
    with pytest.raises(Diverged, match="diverged in epoch 2 by step 8/8: the validation loss is inf"):
        train(c)
    assert [m["epoch"] for m in _lines(tmp_path / "run")] == [1]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_disk_full_while_checkpointing_names_the_checkpoint_and_keeps_the_last(tmp_path, monkeypatch):
    import errno

    from dsimagenet.errors import describe_os_error

    real, calls = torch.save, []

    def full_second_time(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"part of a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    data = learnable_native(tmp_path / "d")
    c = TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=2, **FAST)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    monkeypatch.setattr(torch, "save", full_second_time)
    with pytest.raises(OSError) as e:
        train(c)
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(ckpt)
    assert describe_os_error(e.value) == f"{ckpt}: No space left on device; the previous checkpoint is kept"
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [".run.lock", "checkpoint.pt", "config.json",
                                                             "metrics.jsonl"]
    assert train(c, resume=True)["status"] == "finished"
    assert [m["epoch"] for m in _lines(tmp_path / "run")] == [1, 2]


def test_a_metrics_line_cut_short_resumes_and_a_damaged_one_is_named(tmp_path):
    from dsimagenet.runs import load_run

    data = learnable_native(tmp_path / "d")
    c = TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=2, **FAST)
    train(TrainConfig(**{**c.__dict__, "out": str(tmp_path / "whole")}))
    with pytest.raises(KeyboardInterrupt):
        train(c, on_epoch=_stop_after(1))
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"epoch": 2, "lr": 0.0')  # killed while appending epoch 2's line
    assert [m["epoch"] for m in load_run(tmp_path / "run").metrics] == [1]
    train(c, resume=True)
    assert _lines(tmp_path / "run") == _lines(tmp_path / "whole")
    metrics.write_text("garbage\n" + metrics.read_text())
    with pytest.raises(RunError, match="metrics.jsonl: line 1 is damaged"):
        load_run(tmp_path / "run")


def test_out_that_is_a_file_or_another_folder_is_refused_untouched(tmp_path):
    data = learnable_native(tmp_path / "d")
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    with pytest.raises(RunError, match="notes.txt: --out exists and is not a folder"):
        train(TrainConfig(data=str(data), out=str(afile), epochs=1, **FAST))
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"x")
    for resume in (False, True):
        with pytest.raises(RunError, match=r"photos: not a run directory \(no config.json\) and not empty \(cat.jpg"):
            train(TrainConfig(data=str(data), out=str(folder), epochs=1, **FAST), resume=resume)
    assert afile.read_text() == "mine" and [p.name for p in folder.iterdir()] == ["cat.jpg"]


def test_resume_without_a_checkpoint_or_without_a_run_starts_from_the_beginning(tmp_path):
    data = learnable_native(tmp_path / "d")
    c = TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=2, **FAST)
    train(TrainConfig(**{**c.__dict__, "out": str(tmp_path / "whole")}))
    with pytest.raises(KeyboardInterrupt):
        train(c, on_epoch=_stop_after(1))
    (tmp_path / "run" / "checkpoint.pt").unlink()  # killed before its first checkpoint
    train(c, resume=True)
    assert _lines(tmp_path / "run") == _lines(tmp_path / "whole")
    fresh = TrainConfig(**{**c.__dict__, "out": str(tmp_path / "fresh")})
    train(fresh, resume=True)  # nothing to continue: --resume starts it (a sweep or a script can always pass it)
    assert _lines(tmp_path / "fresh") == _lines(tmp_path / "whole")


def _train_cli(data, out, *extra):
    return [sys.executable, "-m", "dsimagenet", "train", "--data", str(data), "--out", str(out), "--epochs", "3",
            "--depth", "6", "--batch-size", "8", "--lr", "0.05", "--device", "cpu", "--log-every", "1",
            "--dropout", "0.1", *extra]


@pytest.mark.parametrize("sig, name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")])
def test_sigterm_or_sigint_checkpoints_the_step_reached_and_resumes_exactly(tmp_path, sig, name):
    """A cluster's preemption (SIGTERM) or Ctrl-C (SIGINT) in the middle of an epoch: before, SIGTERM lost every
    step since the last checkpoint and SIGINT gave a traceback; now the step reached is checkpointed, the error
    says so, and --resume gives what an uninterrupted run gives, bitwise."""
    data = learnable_native(tmp_path / "d")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_train_cli(data, tmp_path / "whole", "--quiet"), check=True, env=env)
    run = tmp_path / "run"
    p = subprocess.Popen(_train_cli(data, run), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:  # the event: epoch 2 has taken 3 steps (16 in all), and no checkpoint since epoch 1's
        if line.startswith("  epoch 2 step 3/"):
            p.send_signal(sig)
            break
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0, "the run finished before the signal"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and 3 <= state["step"] < 16  # the step reached, not the end of epoch 1
    # (the one line and the exit status: test_sigterm_on_the_command_line_is_one_line_with_exit_status_143)
    assert sorted(x.name for x in run.iterdir()) == [".run.lock", "checkpoint.pt", "config.json", "metrics.jsonl"]
    subprocess.run(_train_cli(data, run, "--quiet", "--resume"), check=True, env=env)
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _lines(run) == _lines(tmp_path / "whole")


def test_sigterm_on_the_command_line_is_one_line_with_exit_status_143(tmp_path):
    data = learnable_native(tmp_path / "d")
    run = tmp_path / "run"
    p = subprocess.Popen(_train_cli(data, run), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in p.stdout:
        if line.startswith("  epoch 1 step 2/"):
            p.send_signal(signal.SIGTERM)
            break
    _, err = p.communicate(timeout=120)
    err = "".join(x for x in err.splitlines(True) if not x.startswith("train: "))  # the progress lines (a log's)
    step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert (p.returncode, err) == (143, f"dsimagenet train: {run}: stopped by SIGTERM in epoch 1 at step {step}/16; "
                                        "the checkpoint is saved there: --resume to continue\n")


@pytest.mark.parametrize("name, kind", [("checkpoint.pt", "fifo"), ("checkpoint.pt", "link to /dev/zero"),
                                        ("config.json", "fifo"), ("metrics.jsonl", "fifo"), ("result.json", "folder")])
def test_a_fifo_a_device_or_a_folder_in_place_of_a_run_file_is_refused(tmp_path, name, kind):
    """Before, a FIFO in place of checkpoint.pt (or config.json...) made --resume wait forever for a writer."""
    data = learnable_native(tmp_path / "d")
    run = tmp_path / "run"
    train(TrainConfig(data=str(data), out=str(run), epochs=1, **FAST))
    (run / "result.json").unlink()
    (run / name).unlink(missing_ok=True)
    {"fifo": os.mkfifo, "link to /dev/zero": lambda p: os.symlink("/dev/zero", p), "folder": os.mkdir}[kind](run / name)
    cmd = [sys.executable, "-c", "import sys; from dsimagenet.cli import main; sys.exit(main(sys.argv[1:]))",
           "train", "--data", str(data), "--out", str(run), "--epochs", "1", "--depth", "6", "--batch-size", "16",
           "--lr", "0.05", "--device", "cpu", "--quiet", "--resume"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # a generous bound: the wait was endless
    what = {"fifo": "a FIFO", "link to /dev/zero": "a device or socket", "folder": "a folder"}[kind]
    assert p.returncode == 1 and p.stderr == f"dsimagenet train: error: {run / name}: is {what}, not a file: a run " \
                                             "directory holds only files it wrote; remove it\n"


def test_a_result_json_that_is_not_this_runs_is_refused(tmp_path):
    """Before, a result.json copied from another run (or left from a longer one) was returned as this run's."""
    data = learnable_native(tmp_path / "d")
    c = TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=1, **FAST)
    mine = train(c)
    other = train(TrainConfig(**{**c.__dict__, "out": str(tmp_path / "other"), "epochs": 2, "lr": 0.2}))
    assert (other["top1_error"], other["epochs"]) != (mine["top1_error"], mine["epochs"])
    (tmp_path / "run" / "result.json").write_text((tmp_path / "other" / "result.json").read_text())
    with pytest.raises(RunError, match=r"run/result.json: not this run's result: .*it is a result after 2 epochs, "
                                       r"metrics.jsonl holds epochs \[1\] and the run has 1; remove it"):
        train(c, resume=True)
    (tmp_path / "run" / "result.json").unlink()  # as the message says: derived again from the checkpoint
    again = train(c, resume=True)
    assert {k: again[k] for k in ("top1_error", "top5_error", "epochs")} == \
        {k: mine[k] for k in ("top1_error", "top5_error", "epochs")}


def test_data_changed_in_place_after_the_build_is_refused(tmp_path):
    """Before, an image changed in the arrays after the build kept the fingerprint (made from meta.json), so a
    run trained and resumed on it without a word."""
    from dsimagenet.errors import FormatError

    data = learnable_native(tmp_path / "d")
    c = TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=1, **FAST)
    train(c)
    images = data / "val" / "images.npy"
    raw = bytearray(images.read_bytes())
    raw[-1] ^= 0xFF  # one channel of one pixel of the last image
    images.write_bytes(bytes(raw))
    (tmp_path / "run" / "result.json").unlink()
    for config, resume in ((c, True), (TrainConfig(**{**c.__dict__, "out": str(tmp_path / "new")}), False)):
        with pytest.raises(FormatError, match=r"the data differs from its meta.json \(.*val/images.npy: sha256 "):
            train(config, resume=resume)
    assert not (tmp_path / "new").exists()


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


def _identity(path):
    """Which file is at ``path`` now: an atomic replace makes a new one (a new inode)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


@pytest.mark.reliability
def test_training_survives_10_random_kills(tmp_path):
    """Each kill comes after a random number (0-3) of checkpoints seen written, then a random moment more
    (up to 50 ms: between writes, inside one, or after the last one before result.json): events, not a guess of
    how long the machine takes."""
    data = learnable_native(tmp_path / "d", per_class=24)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = lambda out: [sys.executable, "-m", "dsimagenet", "train", "--data", str(data), "--out", str(out),  # noqa
                       "--epochs", "4", "--depth", "6", "--batch-size", "16", "--lr", "0.05", "--device", "cpu",
                       "--dropout", "0.1", "--checkpoint-every-steps", "2", "--quiet"]
    subprocess.run(cmd(tmp_path / "whole"), check=True, env=env)
    rng = random.Random(10)
    landed, out = 0, tmp_path / "killed"
    ckpt = out / "checkpoint.pt"
    for _ in range(10):
        # --resume also starts a run that has no run directory yet
        p = subprocess.Popen(cmd(out) + ["--resume"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wanted, seen, last = rng.randint(0, 3), 0, _identity(ckpt)  # of the 24 the whole run writes
        deadline = time.time() + 300
        while seen < wanted and p.poll() is None and time.time() < deadline:
            now = _identity(ckpt)
            seen, last = seen + (now != last), now
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            landed += 1
        p.wait()
    subprocess.run(cmd(out) + ["--resume"], check=True, env=env, stdout=subprocess.DEVNULL)
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _lines(tmp_path / "whole") == _lines(out)  # every epoch once, with the same numbers
    (tmp_path.parent / "train_kills.json").write_text(json.dumps({"kills": 10, "landed": landed}))
    assert landed >= 5


def test_resuming_with_other_settings_is_refused(rel, tmp_path, monkeypatch):
    from dsimagenet.formats import official

    def interrupted(*a, **k):  # Ctrl-C while the official files are written, after every chunk is done
        raise KeyboardInterrupt

    monkeypatch.setattr(official.SplitWriter, "close", interrupted)
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
