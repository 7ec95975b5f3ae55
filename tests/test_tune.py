"""Multi-fidelity search on a tiny dataset: trials complete and get pruned, the study resumes from storage."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import learnable_native

from dsimagenet.errors import ConfigError, DSImageNetError
from dsimagenet.tune import TuneConfig, milestones, open_storage, trial_config, tune

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
        run = Path(t.user_attrs["run"])
        assert run.parent == tmp_path / "tune" / "trials"
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
    assert all(Path(r["run"]).parent == tmp_path / "tune" / "trials" for r in rows)


def test_trial_space_and_sizes(tmp_path):
    c = TuneConfig(out=str(tmp_path), data="built/{size}_box", sizes=(16, 32), max_epochs=8,
                   lr=(0.001, 0.1), widths=(1.0, 2.0), base={"depth": 20})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    tc = trial_config(c, study.ask())
    assert tc.data in ("built/16_box", "built/32_box") and 0.001 <= tc.lr <= 0.1 and tc.width in (1.0, 2.0)
    assert tc.epochs == 8 and tc.milestones == (2, 4, 6) and tc.depth == 20
    with pytest.raises(ConfigError, match="needs --data with {size}"):
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


def test_quiet_prints_nothing_on_stderr_with_several_workers(data, tmp_path):
    """--quiet leaves stderr empty (no progress, no logs): Optuna's own INFO lines ("A new study created in RDB
    ...", "Using an existing study ...", one a worker) were printed before its verbosity was lowered."""
    r = subprocess.run([sys.executable, "-m", "dsimagenet", "tune", "--data", str(data), "--out",
                        str(tmp_path / "t"), "--trials", "2", "--min-epochs", "1", "--max-epochs", "1",
                        "--workers", "2", "--depth", "6", "--batch-size", "32", "--device", "cpu", "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]


def test_every_setting_is_checked_before_anything_is_made(tmp_path):
    out = tmp_path / "t"
    ok = dict(out=str(out), data="d")
    for kw, match in (({"trials": 0}, "--trials must be an integer >= 1, not 0"),
                      ({"min_epochs": 0}, "--min-epochs must be an integer >= 1"),
                      ({"min_epochs": 5, "max_epochs": 4}, "--min-epochs 5 must be at most --max-epochs 4"),
                      ({"reduction_factor": 1}, "--reduction-factor must be an integer >= 2"),
                      ({"workers": 0}, "--workers must be"),
                      ({"lr": (0.5, 0.001)}, "--lr: the low end 0.5 is above the high end 0.001"),
                      ({"lr": (0.0, 0.1)}, r"--lr ends must be finite numbers > 0 \(a log scale\)"),
                      ({"lr": (0.1,)}, "--lr takes two numbers"),
                      ({"lr": [0.001, 0.1, 1.0]}, "--lr takes two numbers"),
                      ({"weight_decay": (float("nan"), 1e-3)}, "--weight-decay ends must be finite"),
                      ({"widths": ()}, "--widths must be one or more"),
                      ({"widths": (1.0, 0.0)}, "--widths must be one or more different numbers > 0"),
                      ({"sizes": (16, 16), "data": "d/{size}"}, "--sizes must be different integers"),
                      ({"data": "d/{size}"}, "holds {size}: give the sizes to search with --sizes"),
                      ({"storage": "postgres//host/db"}, "--storage postgres//host/db: not an RDB URL"),
                      ({"storage": "nosuchdb://host/db"}, "--storage nosuchdb://host/db: not an RDB URL"),
                      ({"base": {"learning_rate": 1}}, r"unknown trial settings \['learning_rate'\]"),
                      ({"base": {"lr": 0.1}}, "chosen by the search"),
                      ({"base": {"batch_size": 0}}, "tune trials: --batch-size must be an integer >= 1"),
                      ({"lr": (1e-3, float("inf"))}, "--lr ends must be finite")):
        with pytest.raises(ConfigError, match=match):
            tune(TuneConfig(**{**ok, **kw}))
    assert not out.exists()


def test_the_stretched_schedule_never_lowers_the_lr_from_the_start():
    assert milestones(40) == (10, 20, 30) and milestones(8) == (2, 4, 6)
    assert milestones(4) == (1, 2, 3) and milestones(3) == (1, 2) and milestones(2) == (1,) and milestones(1) == ()
    c = TuneConfig(out="x", data="d", min_epochs=1, max_epochs=2)
    tc = trial_config(c, optuna.create_study().ask())
    assert tc.milestones == (1,)


def test_a_diverged_trial_is_pruned_never_a_value(data, tmp_path):
    c = TuneConfig(out=str(tmp_path / "tune"), data=str(data), trials=2, min_epochs=1, max_epochs=1, lr=(1e6, 1e6),
                   base=BASE)
    s = tune(c)
    assert s["trials"] == 2 and s["diverged"] == 2 and s["complete"] == 0 and s["best"] is None
    study = optuna.load_study(study_name="dsimagenet", storage=s["storage"])
    for t in study.trials:
        assert t.state.name == "PRUNED" and t.value is None and "--lr" in t.user_attrs["diverged"]
    rows = list(csv.DictReader(open(tmp_path / "tune" / "trials.csv")))
    assert [r["state"] for r in rows] == ["PRUNED", "PRUNED"] and all(r["top1_error"] == "" for r in rows)
    assert all("diverged in epoch 1" in r["diverged"] for r in rows)


def test_storage_that_cannot_be_opened_is_an_error_naming_it(tmp_path):
    url = f"sqlite:///{tmp_path}/no/such/folder/study.db"
    with pytest.raises(DSImageNetError, match=f"--storage {url}: cannot open it: .*unable to open database file"):
        open_storage(url)
    (tmp_path / "text.db").write_text("not a database " * 100)
    with pytest.raises(DSImageNetError, match="cannot open it: .*file is not a database"):
        open_storage(f"sqlite:///{tmp_path}/text.db")
    with pytest.raises(ConfigError, match="no journal file"):
        open_storage("journal:")


def test_progress_counts_trials_and_shows_the_best(data, tmp_path, capsys):
    """Where stderr is not a terminal, a plain line at each 10% of the trials (each of 2 trials is 50%): trials
    done of the total and the best top-1 error so far, the study's best; --quiet prints nothing."""
    c = TuneConfig(out=str(tmp_path / "tune"), data=str(data), trials=2, min_epochs=1, max_epochs=1, base=BASE)
    s = tune(c)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("tune: ")]
    assert [x.split(",")[0] for x in lines] == ["tune: 1/2 trial (50%)", "tune: 2/2 trial (100%)"], err
    assert lines[-1].endswith(f"best {s['best']['top1_error']:.2f}% (trial {s['best']['number']})"), err
    tune(TuneConfig(**{**c.__dict__, "trials": 3, "quiet": True}))
    assert capsys.readouterr().err == ""


def test_a_trial_of_settings_trained_before_is_answered_from_its_run(data, tmp_path):
    """A second study in the same folder that suggests the same settings (the same sampler seed) trains nothing:
    its trials point at the same runs, whose files are untouched."""
    c = TuneConfig(out=str(tmp_path / "tune"), data=str(data), trials=2, min_epochs=1, max_epochs=2, base=BASE,
                   quiet=True)
    tune(c)
    runs = sorted((tmp_path / "tune" / "trials").iterdir())
    stamps = [(r / "metrics.jsonl").stat().st_mtime_ns for r in runs]
    s = tune(TuneConfig(**{**c.__dict__, "study": "again"}))
    study = optuna.load_study(study_name="again", storage=s["storage"])
    assert sorted(Path(t.user_attrs["run"]) for t in study.trials) == runs
    assert [(r / "metrics.jsonl").stat().st_mtime_ns for r in runs] == stamps
