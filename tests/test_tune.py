"""Multi-fidelity search on a tiny dataset: trials complete and get pruned, the study resumes from storage."""

import csv
import json
import subprocess
import sys

import optuna
import pytest
from conftest import learnable_native

from dsimagenet.tune import TuneConfig, trial_config, tune

BASE = {"depth": 6, "batch_size": 32, "device": "cpu", "log_every": 1000}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return learnable_native(tmp_path_factory.mktemp("t") / "data", classes=4, per_class=12)


def test_trials_complete_prune_and_resume(data, tmp_path):
    c = TuneConfig(out=str(tmp_path / "tune"), data=str(data), trials=8, min_epochs=1, max_epochs=4,
                   reduction_factor=2, base=BASE)
    s = tune(c)
    assert s["trials"] == 8 and s["complete"] >= 1 and s["pruned"] >= 1
    assert s["complete"] + s["pruned"] == 8
    study = optuna.load_study(study_name="dsimagenet", storage=s["storage"])
    for t in study.trials:
        run = tmp_path / "tune" / "trials" / f"trial_{t.number:04d}"
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["top1_error"] for m in lines] == [t.intermediate_values[m["epoch"]] for m in lines]
        if t.state.name == "PRUNED":
            assert len(lines) < 4 and not (run / "result.json").exists()
        else:
            assert len(lines) == 4 and t.value == json.loads((run / "result.json").read_text())["top1_error"]
    # resumed from its storage: 3 more trials, the 8 before untouched
    s2 = tune(TuneConfig(**{**c.__dict__, "trials": 11}))
    assert s2["trials"] == 11
    rows = list(csv.DictReader(open(tmp_path / "tune" / "trials.csv")))
    assert len(rows) == 11 and {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}


def test_trial_space_and_sizes(tmp_path):
    c = TuneConfig(out=str(tmp_path), data="built/{size}_box", sizes=(16, 32), max_epochs=8,
                   lr=(0.001, 0.1), widths=(1.0, 2.0), base={"depth": 20})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    tc = trial_config(c, study.ask())
    assert tc.data in ("built/16_box", "built/32_box") and 0.001 <= tc.lr <= 0.1 and tc.width in (1.0, 2.0)
    assert tc.epochs == 8 and tc.milestones == (2, 4, 6) and tc.depth == 20
    with pytest.raises(ValueError, match="needs --data with {size}"):
        TuneConfig(out="x", data="built/16_box", sizes=(16, 32))


def test_cli_with_two_workers(data, tmp_path):
    r = subprocess.run([sys.executable, "-m", "dsimagenet", "tune", "--data", str(data), "--out",
                        str(tmp_path / "t"), "--trials", "4", "--min-epochs", "1", "--max-epochs", "2",
                        "--workers", "2", "--depth", "6", "--batch-size", "32", "--device", "cpu"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trials (" in r.stdout and "best: trial" in r.stdout
    best = json.loads((tmp_path / "t" / "best.json").read_text())
    assert best["trials"] >= 4 and best["best"]["params"]["lr"] > 0
