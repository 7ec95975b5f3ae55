"""Sweeps: grid parsing, naming, data templates, skip/resume, no run twice, job arrays, CSV."""

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import learnable_native

from dsimagenet.runs import load_runs
from dsimagenet.sweep import SweepConfig, expand, parse_grid, sweep

BASE = dict(depth=6, batch_size=32, epochs=1, device="cpu", quiet=True, log_every=1000)


def test_parse_grid_types_values_like_the_config():
    g = parse_grid("method=box,nearest lr=0.001,0.01 width=1,0.5 size=16,32 seed=0,1 nesterov=true "
                   "milestones=10/20/30 classes=none")
    assert g == {"method": ["box", "nearest"], "lr": [0.001, 0.01], "width": [1.0, 0.5], "size": [16, 32],
                 "seed": [0, 1], "nesterov": [True], "milestones": [(10, 20, 30)], "classes": [None]}
    with pytest.raises(ValueError, match="name=value"):
        parse_grid("lr")
    with pytest.raises(ValueError, match="unknown sweep parameters"):
        SweepConfig(out="x", grid={"learning_rate": [1]})


def test_expand_names_and_data_templates(tmp_path):
    s = SweepConfig(out=str(tmp_path), grid=parse_grid("method=box,nearest size=16,32 lr=0.1"),
                    base={"data": "built"})
    runs = expand(s)
    assert [n for n, _ in runs] == ["method=box_size=16_lr=0.1", "method=box_size=32_lr=0.1",
                                    "method=nearest_size=16_lr=0.1", "method=nearest_size=32_lr=0.1"]
    assert runs[1][1].data == "built/32_box" and runs[1][1].size == 32 and runs[1][1].lr == 0.1
    assert runs[1][1].out == str(tmp_path / "method=box_size=32_lr=0.1")
    s = SweepConfig(out=str(tmp_path), grid=parse_grid("size=8"), base={"data": "d/{size}/x"})
    assert expand(s)[0][1].data == "d/8/x"
    with pytest.raises(ValueError, match="needs a size"):
        expand(SweepConfig(out=str(tmp_path), grid=parse_grid("method=box"), base={"data": "built"}))
    assert expand(SweepConfig(out=str(tmp_path), grid=parse_grid("method=box"),
                              base={"data": "built", "size": 32}))[0][1].data == "built/32_box"


def test_a_2x2_sweep_runs_skips_and_writes_csv(tmp_path):
    data = learnable_native(tmp_path / "data")
    s = SweepConfig(out=str(tmp_path / "sw"), grid=parse_grid("lr=0.01,0.05 width=1,2"),
                    base={**BASE, "data": str(data)})
    assert set(sweep(s).values()) == {"ran"}
    assert set(sweep(s).values()) == {"finished before"}
    runs = load_runs([tmp_path / "sw"])
    assert len(runs) == 4 and {r.config["config"]["width"] for r in runs} == {1.0, 2.0}
    rows = list(csv.DictReader(open(tmp_path / "sw" / "results.csv")))
    assert len(rows) == 4 and {r["lr"] for r in rows} == {"0.01", "0.05"} and all(r["top1_error"] for r in rows)


def test_job_array_shares_and_jobs(tmp_path):
    data = learnable_native(tmp_path / "data")
    grid = parse_grid("lr=0.01,0.02,0.03 seed=0")
    a = sweep(SweepConfig(out=str(tmp_path / "sw"), grid=grid, base={**BASE, "data": str(data)}, index=0, of=2))
    b = sweep(SweepConfig(out=str(tmp_path / "sw"), grid=grid, base={**BASE, "data": str(data)}, index=1, of=2))
    assert sorted(a) == ["lr=0.01_seed=0", "lr=0.03_seed=0"] and sorted(b) == ["lr=0.02_seed=0"]
    c = sweep(SweepConfig(out=str(tmp_path / "sw2"), grid=grid, base={**BASE, "data": str(data)}, jobs=2))
    assert set(c.values()) == {"ran"} and len(load_runs([tmp_path / "sw2"])) == 3


def _cli(data, out, grid="lr=0.01,0.02,0.03,0.04"):
    return [sys.executable, "-m", "dsimagenet", "sweep", "--grid", grid, "--out", str(out), "--data", str(data),
            "--depth", "6", "--batch-size", "16", "--epochs", "2", "--device", "cpu", "--quiet",
            "--checkpoint-every-steps", "2"]


def test_two_workers_never_run_the_same_run(tmp_path):
    data = learnable_native(tmp_path / "data")
    procs = [subprocess.Popen(_cli(data, tmp_path / "sw"), stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    ran = [line.split(":")[0] for o in outs for line in o.splitlines() if line.endswith(": ran")]
    assert sorted(ran) == sorted(set(ran)) and len(ran) == 4  # each run ran exactly once
    for r in load_runs([tmp_path / "sw"]):
        assert [m["epoch"] for m in r.metrics] == [1, 2]  # no run's epochs were trained twice


def test_an_interrupted_sweep_resumes(tmp_path):
    data = learnable_native(tmp_path / "data")
    out = tmp_path / "sw"
    p = subprocess.Popen(_cli(data, out), stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*/result.json")):
        time.sleep(0.02)
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    finished = {r.path.name for r in load_runs([out])}
    assert 1 <= len(finished) < 4, "kill the sweep between its runs"
    r = subprocess.run(_cli(data, out), capture_output=True, text=True, check=True)
    said = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line and "=" in line.split(":")[0])
    assert all(said[n] == "finished before" for n in finished)
    assert len(load_runs([out])) == 4
    for run in load_runs([out]):
        assert [m["epoch"] for m in run.metrics] == [1, 2]
        assert json.loads((run.path / "result.json").read_text())["epochs"] == 2


def test_workers_sharing_an_optuna_storage(tmp_path):
    data = learnable_native(tmp_path / "data")
    storage = f"journal:{tmp_path / 'sweep.journal'}"
    cmd = _cli(data, tmp_path / "sw") + ["--storage", storage]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:]
    ran = [line.split(":")[0] for o, _ in outs for line in o.splitlines() if line.endswith(": ran")]
    assert sorted(ran) == sorted(set(ran)) and len(ran) == 4, outs
    import optuna

    from dsimagenet.tune import open_storage

    study = optuna.load_study(study_name=f"sweep:{(tmp_path / 'sw').resolve()}", storage=open_storage(storage))
    # the grid sampler may hand one run to both workers in a race: the second finds it finished (its trial is
    # complete too, with the same result) or held by the first (pruned); either way it never runs it again
    complete = {t.params["run"] for t in study.trials if t.state.name == "COMPLETE"}
    assert complete == set(ran)
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
