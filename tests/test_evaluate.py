"""dsimagenet evaluate: a run's own val gives its last metrics line; other data is mapped by WNID; data the run's
classes cannot cover is refused, naming what is missing."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import learnable_native

from dsimagenet import runs
from dsimagenet.dataset import open_dataset
from dsimagenet.errors import ConfigError
from dsimagenet.evaluation import evaluate
from dsimagenet.formats.native import NativeWriter
from dsimagenet.labels import IMAGENET
from dsimagenet.train import TrainConfig, train

TINY = dict(depth=6, epochs=2, batch_size=16, device="cpu", quiet=True, log_every=1000, eval_batch_size=7)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return learnable_native(tmp_path_factory.mktemp("ev") / "data", classes=4, per_class=12, val_per_class=6)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "all"
    train(TrainConfig(data=str(data), out=str(out), **TINY))
    return out


@pytest.fixture(scope="module")
def run2(data, tmp_path_factory):
    """A run of the first two classes only (a 2-way head)."""
    out = tmp_path_factory.mktemp("runs") / "two"
    train(TrainConfig(data=str(data), out=str(out), classes=2, **TINY))
    return out


def per_class_rows(path):
    return {r["wnid"]: r for r in csv.DictReader(open(path))}


def test_own_val_reproduces_the_last_metrics_line_exactly(run, data):
    last = runs.read_metrics(run)[-1]
    r = evaluate(run, data, quiet=True)
    assert (r["top1_error"], r["top5_error"], r["loss"]) == (last["top1_error"], last["top5_error"], last["val_loss"])
    assert r["images"] == 24 and r["classes"] == 4 and r["class_mapping"] == "same labels" and r["epoch"] == 2
    dest = run / "eval" / "data_val"
    assert json.loads((dest / "result.json").read_text()) == r
    assert (dest / "per_class.csv").read_bytes() == (run / "per_class.csv").read_bytes()


def _subset(root, data, keep_wnids, table_wnids, names=None):
    """The val images of ``keep_wnids`` from ``data``, written as a native dataset whose class table is
    ``table_wnids`` (any order): labels are positions in that table."""
    val = open_dataset(data, "val")
    wnid_of = np.array(val.wnids)[val.targets]
    rows = np.flatnonzero(np.isin(wnid_of, keep_wnids))
    labels = np.array([table_wnids.index(w) + 1 for w in wnid_of[rows]])
    with NativeWriter(root, 8, table_wnids, names=names, method="synthetic") as w:
        w.split("val").append(np.asarray(val.data)[rows], labels)
    return root


def test_a_class_subset_in_another_order_is_mapped_by_wnid(run, data, tmp_path):
    """Two of the four classes, in a class table of their own in reverse order (labels 1 and 2): each class's
    accuracies equal its row of the run's own per_class.csv, and the errors follow from those rows by hand."""
    w = list(IMAGENET.wnids[:4])
    sub = _subset(tmp_path / "sub", data, [w[0], w[2]], [w[2], w[0]])
    r = evaluate(run, sub, quiet=True)
    assert r["class_mapping"] == "by WNID" and r["classes"] == 2 and r["images"] == 12
    own = per_class_rows(run / "per_class.csv")
    got = per_class_rows(run / "eval" / "sub_val" / "per_class.csv")
    for wnid in (w[0], w[2]):
        assert got[wnid] == own[wnid]
    assert all(got[x]["count"] == "0" and got[x]["top1_accuracy"] == "" for x in (w[1], w[3]))
    correct = sum(float(own[x]["top1_accuracy"]) / 100 * int(own[x]["count"]) for x in (w[0], w[2]))
    assert r["top1_error"] == pytest.approx(100 * (1 - correct / 12))


def test_classes_the_run_never_learned_are_refused_or_left_out_when_asked(run2, data):
    w = list(IMAGENET.wnids[:4])
    with pytest.raises(ConfigError, match=rf"12 images of 2 classes the run never learned \({w[2]}, {w[3]}\): pass "
                                          "--known-classes-only"):
        evaluate(run2, data, quiet=True)
    assert not (run2 / "eval").exists()
    r = evaluate(run2, data, known_classes_only=True, quiet=True)
    assert r["left_out"] == {"images": 12, "classes": [w[2], w[3]]} and r["images"] == 12 and r["classes"] == 2
    last = runs.read_metrics(run2)[-1]  # the run's own val is its two classes: the same images, the same result
    assert (r["top1_error"], r["loss"]) == (last["top1_error"], last["val_loss"])


def test_data_whose_classes_cannot_be_mapped_is_refused_naming_them(run, data, tmp_path):
    pets = tmp_path / "pets"  # the run's val images under class names it never saw
    val = open_dataset(data, "val")
    with NativeWriter(pets, 8, ["cat", "dog"], method="synthetic") as wr:
        wr.split("val").append(np.asarray(val.data), val.targets % 2 + 1)
    with pytest.raises(ConfigError, match=r"none of its 2 classes is among the run's \d+ \(cat, dog are not\)"):
        evaluate(run, pets, quiet=True)


def test_other_sizes_names_and_checkpoints_are_refused_clearly(run, data, tmp_path):
    big = learnable_native(tmp_path / "big", classes=2, per_class=2, val_per_class=2, size=12)
    with pytest.raises(ConfigError, match="its images are 12 px, the run .* was trained on 8 px"):
        evaluate(run, big, quiet=True)
    evaluate(run, data, name="mine", quiet=True)
    with pytest.raises(ConfigError, match="holds the evaluation on .*data \\(val\\): choose another --name"):
        evaluate(run, tmp_path / "big", name="mine", quiet=True)
    with pytest.raises(runs.RunError, match="no checkpoint"):
        evaluate(run, data, checkpoint=tmp_path / "none.pt", quiet=True)


def test_the_command_line(run, data, tmp_path):
    r = subprocess.run([sys.executable, "-m", "dsimagenet", "evaluate", str(run), "--data", str(data), "--name",
                        "cli", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("\n") == 1 and "top-1 error" in r.stdout and str(run / "eval" / "cli") in r.stdout
    assert (run / "eval" / "cli" / "result.json").exists() and (run / "eval" / "cli" / "per_class.csv").exists()
    r = subprocess.run([sys.executable, "-m", "dsimagenet", "evaluate", str(tmp_path), "--data", str(data)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.startswith("dsimagenet evaluate: error: ") and "not a run directory" in \
        r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_checkpoint_of_another_run_of_the_same_shape_and_data_is_refused(run, data, tmp_path):
    """Another seed: the same tensors' shapes, the same data fingerprint; scored as this run's it would be
    written into this run's folder as its result. Refused, naming what differs; nothing written."""
    other = tmp_path / "seed5"
    train(TrainConfig(data=str(data), out=str(other), seed=5, **{**TINY, "epochs": 1}))
    with pytest.raises(runs.RunError, match=r"a checkpoint of another run than .*seed is 5 there, 0 in the run"):
        evaluate(run, data, checkpoint=other / "checkpoint.pt", name="other", quiet=True)
    assert not (run / "eval" / "other").exists()
    wider = tmp_path / "wider"
    train(TrainConfig(data=str(data), out=str(wider), width=2, **{**TINY, "epochs": 1}))
    with pytest.raises(runs.RunError, match=r"width is 2"):
        evaluate(run, data, checkpoint=wider / "checkpoint.pt", name="wider", quiet=True)


def test_non_finite_or_misfitting_weights_are_refused_naming_the_tensor(run, data, tmp_path):
    """NaN weights once gave a traceback (result.json cannot hold a NaN loss) after writing per_class.csv under
    its final name; a misfitting checkpoint named no tensor."""
    import torch

    state = torch.load(run / "checkpoint.pt", weights_only=True)
    first = next(iter(state["model"]))
    state["model"][first] = state["model"][first] * float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(runs.RunError, match=f"{first} holds NaN or infinite values"):
        evaluate(run, data, checkpoint=tmp_path / "nan.pt", name="nan", quiet=True)
    assert not (run / "eval" / "nan").exists()
    del state["model"][first]
    torch.save(state, tmp_path / "short.pt")
    with pytest.raises(runs.RunError, match=f"does not fit the run's WRN-6-1 with 4 classes: {first} is missing"):
        evaluate(run, data, checkpoint=tmp_path / "short.pt", name="short", quiet=True)


def test_a_run_that_diverged_before_any_checkpoint_says_so(data, tmp_path):
    from dsimagenet.errors import Diverged

    with pytest.raises(Diverged):
        train(TrainConfig(data=str(data), out=str(tmp_path / "div"), lr=1e6, **TINY))
    with pytest.raises(runs.RunError, match="diverged before it saved a checkpoint"):
        evaluate(tmp_path / "div", data, quiet=True)


def test_another_evaluation_under_the_same_name_that_ends_meanwhile_is_not_overwritten(run, data, tmp_path,
                                                                                        monkeypatch):
    """Two datasets whose folders have the same name (the default --name) scored at the same time: the one that
    ends second once overwrote the first's result.json (checked only before scoring), or paired its own
    result.json with the other's per_class.csv. Made deterministic: the other evaluation runs to its end while
    this one is scoring."""
    import dsimagenet.train

    w = list(IMAGENET.wnids[:4])
    other = _subset(tmp_path / "b" / "data", data, w[:2], w[:2])
    real = dsimagenet.train.evaluate
    calls = []

    def meanwhile(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            monkeypatch.setattr(dsimagenet.train, "evaluate", real)
            evaluate(run, other, name="same", quiet=True)  # ends first
        return real(*args, **kw)

    monkeypatch.setattr(dsimagenet.train, "evaluate", meanwhile)
    with pytest.raises(ConfigError, match=r"holds the evaluation on .*b/data \(val\): choose another --name"):
        evaluate(run, data, name="same", quiet=True)
    kept = json.loads((run / "eval" / "same" / "result.json").read_text())
    assert kept["data"] == str(other) and kept["images"] == 12
    rows = per_class_rows(run / "eval" / "same" / "per_class.csv")
    assert sum(int(r["count"]) for r in rows.values()) == 12
