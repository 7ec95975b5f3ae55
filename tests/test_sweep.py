"""Sweeps: grid parsing, naming, data templates, skip/resume, no run twice, job arrays, CSV; diverged and failed
runs, runs made with other settings, bad grids and specs; kills at random moments."""

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import learnable_native

from dsimagenet.errors import ConfigError
from dsimagenet.recipe import SCHEDULES, TrainConfig, learning_rate
from dsimagenet.runs import load_runs
from dsimagenet.sweep import LENGTH_FREE_SCHEDULES, SweepConfig, expand, load_spec, parse_grid, sweep

BASE = dict(depth=6, batch_size=32, epochs=1, device="cpu", quiet=True, log_every=1000)


def test_parse_grid_types_values_like_the_config():
    g = parse_grid("method=box,nearest lr=0.001,0.01 width=1,0.5 size=16,32 seed=0,1 nesterov=true "
                   "milestones=10/20/30 classes=none")
    assert g == {"method": ["box", "nearest"], "lr": [0.001, 0.01], "width": [1.0, 0.5], "size": [16, 32],
                 "seed": [0, 1], "nesterov": [True], "milestones": [(10, 20, 30)], "classes": [None]}
    with pytest.raises(ConfigError, match="name=value"):
        parse_grid("lr")
    with pytest.raises(ConfigError, match="unknown sweep parameters"):
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
    with pytest.raises(ConfigError, match="needs a size"):
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


# Runs the sweep command with the training of one run stopped after its first epoch (checkpoint and metrics
# line written) until the test kills the process: a kill between runs, at a moment the test observes.
BLOCKING = """
import pathlib, sys, time
import dsimagenet.train as t
real, block, marker = t.train, sys.argv[1], pathlib.Path(sys.argv[2])

def train(config, resume=False, on_epoch=None):
    def hook(line):
        if on_epoch is not None:
            on_epoch(line)
        if pathlib.Path(config.out).name == block and line["epoch"] == 1:
            marker.write_text("epoch 1 done")
            time.sleep(3600)  # the test kills the process here
    return real(config, resume=resume, on_epoch=hook)

t.train = train
from dsimagenet.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _wait_for(path: Path, proc, timeout=300) -> None:
    """Until ``path`` exists (the event), with a generous timeout; fails at once if ``proc`` ended first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the process ended (exit {proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.02)


def test_an_interrupted_sweep_resumes(tmp_path):
    data = learnable_native(tmp_path / "data")
    out, marker = tmp_path / "sw", tmp_path / "blocked"
    p = subprocess.Popen([sys.executable, "-c", BLOCKING, "lr=0.02", str(marker), *_cli(data, out)[3:]],
                         stdout=subprocess.DEVNULL)
    _wait_for(marker, p)  # lr=0.01 finished, lr=0.02 mid-way (after epoch 1), the other two not started
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert {r.path.name for r in load_runs([out])} == {"lr=0.01"}
    assert [m["epoch"] for m in load_runs([out / "lr=0.02"], finished_only=False)[0].metrics] == [1]
    r = subprocess.run(_cli(data, out), capture_output=True, text=True, check=True)
    said = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line and "=" in line.split(":")[0])
    assert said == {"lr=0.01": "finished before", "lr=0.02": "resumed and finished", "lr=0.03": "ran",
                    "lr=0.04": "ran"}
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
    assert complete <= set(ran)  # a run taken outside a trial (its trial's worker not yet holding it) has none
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}


def _said(stdout: str) -> dict:
    return dict(line.split(": ", 1) for line in stdout.splitlines() if ": " in line and "=" in line.split(":")[0])


def test_bad_grids_and_settings_are_config_errors_before_anything_is_made(tmp_path):
    out = tmp_path / "sw"
    base = {**BASE, "data": str(tmp_path / "data")}
    with pytest.raises(ConfigError, match="--grid: lr is given twice"):
        parse_grid("lr=0.1 width=1 lr=0.2")
    with pytest.raises(ConfigError, match="lr=abc: expected a number"):
        parse_grid("lr=abc")
    with pytest.raises(ConfigError, match="width=1x: expected a number"):
        parse_grid("width=1x")
    with pytest.raises(ConfigError, match="empty value"):
        parse_grid("lr=0.1,,0.2")
    with pytest.raises(ConfigError, match="seed cannot be none"):
        parse_grid("seed=none")
    for grid, base_, match in (
            ({"lr": []}, base, "lr has no values"),
            ({"lr": [0.1, 0.1]}, base, "lr=0.1 is given twice"),
            ({"lr": [-1.0]}, base, "grid: lr=-1.0: --lr must be"),
            ({"sgdr_t0": [0]}, base, "--sgdr-t0 must be"),
            ({"lr": [0.1]}, {**base, "lr": 0.2}, "lr: given both in the grid and as a fixed value"),
            ({"lr": [0.1]}, {**base, "epochs": 0}, "base: --epochs must be"),
            ({"learning_rate": [0.1]}, base, r"unknown sweep parameters \['learning_rate'\]"),
            ({"lr": [1, 1.0]}, base, "lr=1.0 is given twice")):
        with pytest.raises(ConfigError, match=match):
            sweep(SweepConfig(out=str(out), grid=grid, base=base_))
    for kw, match in (({"jobs": 0}, "--jobs must be an integer >= 1"),
                      ({"index": 2, "of": 2}, r"--index must be in 0..1"),
                      ({"of": 0}, "--of must be"), ({"index": -1}, "--index must be"),
                      ({"storage": "postgres//host"}, "--storage postgres//host: not an RDB URL"),
                      ({"storage": "journal:"}, "no journal file")):
        with pytest.raises(ConfigError, match=match):
            SweepConfig(out=str(out), grid={"lr": [0.1]}, base=base, **kw)
    assert not out.exists()  # refused before anything was created


def test_sweep_spec_yaml_errors_name_file_line_and_problem(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("grid:\n  lr: [1e-3, 0.01]\n  width: 2\nbase:\n  epochs: 3\n")
    grid, base = load_spec(spec)
    assert base == {"epochs": 3}
    typed = SweepConfig(out="x", grid=grid, base=base).grid  # YAML 1.1 reads 1e-3 as text: parsed as the field's
    assert typed == {"lr": [0.001, 0.01], "width": [2]}
    for text, match in (
            ("grid:\n  lr: [0.1, 0.2\nbase: {}\n", r"spec.yaml: line \d+, column \d+: .*expected ',' or ']'"),
            ("grid:\n  lr: [0.1]\n  width: [1]\n  lr: [0.2]\n", r"spec.yaml: line 4, column 3: 'lr' is given twice "
                                                              r"\(first on line 2\)"),
            ("grid:\n  lr: [0.1]\nbase:\n\tepochs: 3\n", r"line 4, column 1: .*character '\\t' that cannot start"),
            ("- lr\n- width\n", "expected a mapping with 'grid'"),
            ("grids:\n  lr: [0.1]\n", r"unknown top-level keys \['grids'\]"),
            ("grid:\n  lr: []\n", "grid: lr has no values"),
            ("grid: [lr, width]\n", "'grid' and 'base' must be mappings")):
        spec.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_spec(spec)
    spec.write_bytes(b"grid:\n  lr: [\xff]\n")
    with pytest.raises(ConfigError, match="spec.yaml: not a text file"):
        load_spec(spec)
    spec.write_text("grid:\n  lr: [abc]\n")
    with pytest.raises(ConfigError, match="grid: lr=abc: expected a number"):
        SweepConfig(out="x", grid=load_spec(spec)[0])


def test_the_schedules_that_may_be_continued_are_those_that_do_not_depend_on_the_epochs():
    for schedule in SCHEDULES:
        short = TrainConfig(data="d", out="o", schedule=schedule, epochs=5, sgdr_t0=2, milestones=(2, 4))
        long = TrainConfig(data="d", out="o", schedule=schedule, epochs=12, sgdr_t0=2, milestones=(2, 4))
        prefix = all(learning_rate(short, e, s, 7) == learning_rate(long, e, s, 7) for e in range(5) for s in range(7))
        assert prefix == (schedule in LENGTH_FREE_SCHEDULES), schedule


def _weights(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def _same_numbers(a: dict, b: dict) -> bool:
    drop = lambda d: {k: v for k, v in d.items() if "seconds" not in k and "per_s" not in k}  # noqa: E731
    return drop(a) == drop(b)


def test_a_rerun_with_more_epochs_continues_exactly_or_is_refused(tmp_path):
    data = learnable_native(tmp_path / "data")
    grid = parse_grid("lr=0.02,0.05")
    base = {**BASE, "data": str(data), "dropout": 0.1, "milestones": (1,), "epochs": 1}
    sweep(SweepConfig(out=str(tmp_path / "sw"), grid=grid, base=base))
    straight = sweep(SweepConfig(out=str(tmp_path / "straight"), grid=grid, base={**base, "epochs": 2}))
    assert set(straight.values()) == {"ran"}
    again = sweep(SweepConfig(out=str(tmp_path / "sw"), grid=grid, base={**base, "epochs": 2}))
    assert set(again.values()) == {"continued from 1 to 2 epochs"}
    rows = list(csv.DictReader(open(tmp_path / "sw" / "results.csv")))
    assert [r["epochs"] for r in rows] == ["2", "2"] and {r["status"] for r in rows} == {"finished"}
    for name in grid_names(grid):
        a, b = tmp_path / "sw" / name, tmp_path / "straight" / name
        wa, wb = _weights(a), _weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wb)  # bitwise the run that had 2 epochs from the start
        ra, rb = load_runs([a])[0], load_runs([b])[0]
        assert [_same_numbers(x, y) for x, y in zip(ra.metrics, rb.metrics, strict=True)] == [True, True]
        assert _same_numbers(ra.result, rb.result)
    assert set(sweep(SweepConfig(out=str(tmp_path / "sw"), grid=grid, base={**base, "epochs": 2})).values()) == \
        {"finished before"}
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "sw").rglob("*") if p.is_file()}
    for change, match in (({"epochs": 1}, "epochs was 2, now 1"), ({"batch_size": 16}, "batch_size was 32, now 16"),
                          ({"epochs": 3, "schedule": "cosine"}, "schedule was 'step', now 'cosine'"),
                          ({"epochs": 3, "weight_decay": 0.0}, "weight_decay was 0.0005, now 0.0")):
        with pytest.raises(ConfigError, match=f"2 runs under this --out were made with other settings: .*{match}"):
            sweep(SweepConfig(out=str(tmp_path / "sw"), grid=grid, base={**base, **change}))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "sw").rglob("*") if p.is_file()} == before  # untouched


def test_a_cosine_run_is_not_continued(tmp_path):
    data = learnable_native(tmp_path / "data")
    base = {**BASE, "data": str(data), "schedule": "cosine"}
    sweep(SweepConfig(out=str(tmp_path / "sw"), grid=parse_grid("lr=0.02"), base=base))
    with pytest.raises(ConfigError, match="epochs was 1, now 2 .a cosine schedule depends on --epochs"):
        sweep(SweepConfig(out=str(tmp_path / "sw"), grid=parse_grid("lr=0.02"), base={**base, "epochs": 2}))


def grid_names(grid: dict) -> list[str]:
    return [f"{k}={v}" for k, vs in grid.items() for v in vs]


def test_a_diverged_run_is_recorded_not_retried_and_not_a_result(tmp_path):
    data = learnable_native(tmp_path / "data")
    cmd = [sys.executable, "-m", "dsimagenet", "sweep", "--grid", "lr=0.02,1e6", "--out", str(tmp_path / "sw"),
           "--data", str(data), "--depth", "6", "--batch-size", "32", "--epochs", "1", "--device", "cpu", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # a diverged run is an outcome of its settings, not a fault
    said = _said(r.stdout)
    assert said["lr=0.02"] == "ran" and said["lr=1000000.0"].startswith("diverged: ") and "--lr" in said["lr=1000000.0"]
    assert "2 runs: 1 finished (here or before), 1 diverged" in r.stdout
    rows = {row["run"]: row for row in csv.DictReader(open(tmp_path / "sw" / "results.csv"))}
    assert rows["lr=0.02"]["status"] == "finished" and float(rows["lr=0.02"]["top1_error"]) >= 0
    bad = rows["lr=1000000.0"]
    assert bad["status"] == "diverged" and bad["top1_error"] == bad["top5_error"] == ""  # never an error figure
    assert "epoch 1" in bad["message"]
    assert [x.path.name for x in load_runs([tmp_path / "sw"])] == ["lr=0.02"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert _said(r.stdout) == {"lr=0.02": "finished before", "lr=1000000.0": "diverged before"}  # not retried


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    built = tmp_path / "built"
    learnable_native(built / "8_box")  # no 8_nearest: that run fails
    cmd = [sys.executable, "-m", "dsimagenet", "sweep", "--grid", "method=nearest,box size=8", "--out",
           str(tmp_path / "sw"), "--data", str(built), "--depth", "6", "--batch-size", "32", "--epochs", "1",
           "--device", "cpu", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    said = _said(r.stdout)
    assert said["method=box_size=8"] == "ran"  # after the failed one
    assert said["method=nearest_size=8"].startswith("failed: ") and "8_nearest" in said["method=nearest_size=8"]
    assert "2 runs: 1 finished (here or before), 1 failed" in r.stdout
    assert r.stderr.startswith("dsimagenet sweep: error: method=nearest_size=8: failed: ") and "8_nearest" in r.stderr
    rows = {row["run"]: row for row in csv.DictReader(open(tmp_path / "sw" / "results.csv"))}
    failed = rows["method=nearest_size=8"]
    assert failed["status"] == "failed" and "8_nearest" in failed["message"]
    assert rows["method=box_size=8"]["status"] == "finished"
    learnable_native(built / "8_nearest")  # the cause removed: the next sweep runs it, and forgets the failure
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0
    assert _said(r.stdout) == {"method=nearest_size=8": "ran", "method=box_size=8": "finished before"}
    rows = {row["run"]: row for row in csv.DictReader(open(tmp_path / "sw" / "results.csv"))}
    assert {row["status"] for row in rows.values()} == {"finished"} and not any(row["message"] for row in rows.values())


def test_damaged_runs_in_the_sweep_folder_fail_alone(tmp_path):
    data = learnable_native(tmp_path / "data")
    s = SweepConfig(out=str(tmp_path / "sw"), grid=parse_grid("lr=0.01,0.02,0.03"), base={**BASE, "data": str(data)})
    sweep(s)
    (tmp_path / "sw" / "lr=0.01" / "result.json").write_text('{"status": "finished", "top1_err')
    (tmp_path / "sw" / "lr=0.02" / "config.json").write_text("[1, 2]")
    outcome = sweep(s)
    assert outcome["lr=0.03"] == "finished before"
    assert outcome["lr=0.01"].startswith("failed: ") and "lr=0.01/result.json" in outcome["lr=0.01"]
    assert outcome["lr=0.02"].startswith("failed: ") and "lr=0.02/config.json" in outcome["lr=0.02"]
    rows = {row["run"]: row for row in csv.DictReader(open(tmp_path / "sw" / "results.csv"))}
    assert rows["lr=0.03"]["status"] == "finished"
    assert rows["lr=0.01"]["status"] == "failed" and "result.json" in rows["lr=0.01"]["message"]
    assert rows["lr=0.02"]["status"] == "failed" and "config.json" in rows["lr=0.02"]["message"]


def test_results_csv_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import builtins

    data = learnable_native(tmp_path / "data")
    s = SweepConfig(out=str(tmp_path / "sw"), grid=parse_grid("lr=0.01,0.02"), base={**BASE, "data": str(data)})
    sweep(s)
    good = (tmp_path / "sw" / "results.csv").read_bytes()
    real_open = builtins.open

    class DiskFull:  # a file whose second write finds the disk full
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, text):
            self.writes += 1
            if self.writes > 1:
                raise OSError(28, "No space left on device")
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def full_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return DiskFull(f) if "results.csv" in str(file) and "w" in mode else f

    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(OSError, match="No space left"):
        sweep(s)
    monkeypatch.undo()
    assert (tmp_path / "sw" / "results.csv").read_bytes() == good  # the old file, whole
    assert sorted(p.name for p in (tmp_path / "sw").iterdir() if p.is_file()) == ["results.csv"]  # no temp file


def _progress(out: Path) -> tuple:
    """What an observer sees of a sweep's progress: each run's checkpoint (a new file each time it is written),
    metrics and result."""
    sig = []
    for run in sorted(out.glob("lr=*")):
        files = [run / n for n in ("checkpoint.pt", "metrics.jsonl", "result.json")]
        sig.append(tuple((f.stat().st_ino, f.stat().st_mtime_ns, f.stat().st_size) if f.exists() else None
                         for f in files))
    return tuple(sig)


@pytest.mark.reliability
def test_a_sweep_survives_random_kills(tmp_path):
    """A 3-run sweep (--jobs 1) killed with SIGKILL at random moments, each a random time after a random number of
    progress events (a checkpoint, a metrics line, a result), resumed each time: every run ends bitwise equal to
    an uninterrupted sweep's, its metrics and result the same."""
    data = learnable_native(tmp_path / "d", per_class=24)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cmd(out):
        return [sys.executable, "-m", "dsimagenet", "sweep", "--grid", "lr=0.02,0.05,0.1", "--out", str(out),
                "--data", str(data), "--epochs", "3", "--depth", "6", "--batch-size", "16", "--device", "cpu",
                "--dropout", "0.1", "--milestones", "2", "--checkpoint-every-steps", "2", "--quiet", "--jobs", "1"]

    t = time.monotonic()
    subprocess.run(cmd(tmp_path / "whole"), check=True, env=env, stdout=subprocess.DEVNULL)
    gap = (time.monotonic() - t) / 60  # about the time between two progress events (3 runs, ~20 events each)
    rng = random.Random(6)
    out, kills, landed = tmp_path / "killed", 10, 0
    for _ in range(kills):
        p = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        need, seen, last = rng.randint(1, 6), 0, _progress(out)
        while p.poll() is None and seen < need:
            time.sleep(0.005)
            now = _progress(out)
            seen, last = seen + (now != last), now
        time.sleep(rng.uniform(0, gap))  # a moment between events: mid-step, mid-write
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            landed += 1
        p.wait()
    r = subprocess.run(cmd(out), env=env, capture_output=True, text=True, check=True)
    assert "3 runs: 3 finished" in r.stdout
    for name in ("lr=0.02", "lr=0.05", "lr=0.1"):
        a, b = tmp_path / "whole" / name, out / name
        wa, wb = _weights(a), _weights(b)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
        ra, rb = load_runs([a])[0], load_runs([b])[0]
        assert len(ra.metrics) == len(rb.metrics) == 3
        assert all(_same_numbers(x, y) for x, y in zip(ra.metrics, rb.metrics, strict=True)), name
        assert _same_numbers(ra.result, rb.result), name
    (tmp_path.parent / "sweep_kills.json").write_text(json.dumps({"kills": kills, "landed": landed}))
    print(f"sweep killed {kills} times, {landed} while it ran; every run bitwise equal")
    assert landed >= kills // 2


def test_results_csv_has_the_errors_after_the_runs_report_epoch(tmp_path):
    data = learnable_native(tmp_path / "data")
    base = {**BASE, "data": str(data), "epochs": 2, "milestones": (1,), "report_epoch": 1}
    sweep(SweepConfig(out=str(tmp_path / "sw"), grid=parse_grid("lr=0.02"), base=base))
    rows = list(csv.DictReader(open(tmp_path / "sw" / "results.csv")))
    first = load_runs([tmp_path / "sw" / "lr=0.02"])[0].metrics[0]  # the epoch-1 line of metrics.jsonl
    assert (rows[0]["top1_error_ep1"], rows[0]["top5_error_ep1"]) == (str(first["top1_error"]),
                                                                      str(first["top5_error"]))
    assert "top1_error_ep31" not in rows[0]  # no column for an epoch no run reports


def test_results_csv_writes_what_was_measured_not_float_noise(tmp_path):
    """A run written before results were rounded holds 100 * (1 - 91/100) = 8.999999999999996: results.csv says
    9.0; a rounded one (runs.percent) is written as it is."""
    from dsimagenet.runs import config_record
    from dsimagenet.sweep import write_results_csv

    for name, top1 in (("old", 100 * (1 - 91 / 100)), ("new", 33.3)):
        run = tmp_path / name
        run.mkdir()
        c = TrainConfig(data="d", out=str(run), epochs=1, depth=6)
        (run / "config.json").write_text(json.dumps(config_record(c, depth=6, image_size=8, num_classes=4)))
        (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "top1_error": top1, "top5_error": 0.0}) + "\n")
        (run / "result.json").write_text(json.dumps({"status": "finished", "top1_error": top1, "top5_error": 0.0,
                                                     "epochs": 1, "train_seconds": 0.1 + 0.2}))
    rows = {r["run"]: r for r in csv.DictReader(open(write_results_csv(tmp_path)))}
    assert rows["old"]["top1_error"] == "9.0" and rows["new"]["top1_error"] == "33.3"
    assert rows["old"]["train_seconds"] == "0.3"  # 0.30000000000000004
    assert "99999" not in (tmp_path / "results.csv").read_text()
