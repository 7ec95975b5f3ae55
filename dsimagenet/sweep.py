"""Grids of training runs: every combination of the values given, with the train recipe as the base.

    dsimagenet sweep --grid "method=box,nearest lr=0.001,0.01 width=1,2 size=16,32 seed=0,1" \\
        --data out/{size}_{method} --epochs 40 --out sweeps/lr
    dsimagenet sweep spec.yaml --jobs 2                  # grid and base flags from a file
    dsimagenet sweep spec.yaml --index $SLURM_ARRAY_TASK_ID --of 8     # a job array: each task its share
    dsimagenet sweep spec.yaml --storage postgresql://host/db          # workers anywhere share one study

Every run gets its own directory under ``--out``, named by the values that vary. A finished run (result.json)
is skipped and an interrupted one resumed; a lock file per run makes sure that two workers (processes, array
tasks, machines sharing the folder) never run the same run. ``method`` and ``size`` choose the data: ``--data``
may hold ``{size}`` and ``{method}``; without them it is taken as a ``dsimagenet build`` output folder and
``{data}/{size}_{method}`` is used. Results: ``load_runs(SWEEP_DIR)``, and ``SWEEP_DIR/results.csv``.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import fcntl
import itertools
import json
import multiprocessing
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from dsimagenet.recipe import TrainConfig, field_types

DATA_KEYS = ("method", "size")


@dataclass(frozen=True)
class SweepConfig:
    out: str
    grid: dict[str, list] = field(default_factory=dict)  # name -> values; TrainConfig fields, method, size
    base: dict = field(default_factory=dict)  # TrainConfig fields shared by every run (data, epochs, ...)
    jobs: int = 1
    index: int = 0
    of: int = 1
    storage: str | None = None  # an Optuna storage shared by workers: each takes the next run nobody started
    quiet: bool = False  # no line per run

    def __post_init__(self):
        known = {f.name for f in dataclasses.fields(TrainConfig)} | set(DATA_KEYS)
        unknown = sorted(set(self.grid) - known) + sorted(set(self.base) - known)
        if unknown:
            raise ValueError(f"unknown sweep parameters {unknown}: use TrainConfig fields, method or size")
        if "out" in self.grid or "out" in self.base:
            raise ValueError("'out' is chosen by the sweep (one directory per run under --out)")
        if not 0 <= self.index < self.of:
            raise ValueError(f"--index {self.index} must be in 0..{self.of - 1} (--of {self.of})")
        if self.jobs < 1:
            raise ValueError("--jobs must be at least 1")


def _convert(name: str, value: str):
    """A grid value from text, typed like the TrainConfig field it sets."""
    if name == "method":
        return value
    base = field_types(TrainConfig).get(name, str)
    if base is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{name}={value}: expected true or false")
        return value.lower() in ("true", "1")
    if value.lower() == "none":
        return None
    if typing.get_origin(base) is tuple:
        return tuple(int(x) for x in value.split("/"))  # milestones=10/20/30
    return base(value)


def parse_grid(text: str) -> dict[str, list]:
    """``"lr=0.001,0.01 width=1,2"`` -> ``{"lr": [0.001, 0.01], "width": [1.0, 2.0]}``."""
    grid = {}
    for part in text.split():
        name, sep, values = part.partition("=")
        if not sep or not values:
            raise ValueError(f"--grid: {part!r} is not name=value1,value2,...")
        grid[name] = [_convert(name, v) for v in values.split(",")]
    return grid


def load_spec(path: str | Path) -> tuple[dict, dict]:
    """(grid, base) from a YAML file: ``grid: {lr: [0.001, 0.01], ...}`` and ``base: {data: ..., epochs: 40}``."""
    import yaml

    spec = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(spec, dict) or not isinstance(spec.get("grid", {}), dict):
        raise ValueError(f"{path}: expected a mapping with 'grid' (name: [values]) and optional 'base'")
    grid = {k: v if isinstance(v, list) else [v] for k, v in spec.get("grid", {}).items()}
    return grid, dict(spec.get("base") or {})


def run_name(values: dict) -> str:
    return "_".join(f"{k}={'-'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in values.items()) \
        or "run"


def expand(s: SweepConfig) -> list[tuple[str, TrainConfig]]:
    """Every run of the grid, in a fixed order: (name, config)."""
    names = list(s.grid)
    runs = []
    for combo in itertools.product(*(s.grid[n] for n in names)):
        values = dict(zip(names, combo, strict=True))
        fields = {**s.base, **{k: v for k, v in values.items() if k not in DATA_KEYS}}
        data = str(fields.get("data", ""))
        if not data:
            raise ValueError("no data: give --data (it may contain {size} and {method})")
        size = values.get("size", s.base.get("size"))
        method = values.get("method", "box")
        if any(k in values for k in DATA_KEYS) and "{" not in data:
            data = os.path.join(data, "{size}_{method}")
        if "{size}" in data and size is None:
            raise ValueError(f"--data {data} needs a size: put size in the grid or give --size")
        fields["data"] = data.format(size=size, method=method)
        if "size" in values:
            fields["size"] = values["size"]
        name = run_name(values)
        runs.append((name, TrainConfig(**fields, out=str(Path(s.out) / name))))
    return runs


def _run_one(name: str, config: TrainConfig, lock_dir: str, threads: int) -> str:
    """Run (or resume) one run unless it is finished or another worker holds it; returns what happened."""
    out = Path(config.out)
    if (out / "result.json").exists():
        return "finished before"
    Path(lock_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(lock_dir) / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "running elsewhere"
        if (out / "result.json").exists():  # finished while we waited for the lock
            return "finished before"
        import torch

        from dsimagenet.train import train

        torch.set_num_threads(threads)
        resumed = (out / "config.json").exists()
        train(config, resume=resumed)
        return "resumed and finished" if resumed else "ran"
    finally:
        os.close(fd)


def _claimed_from_storage(s: SweepConfig, runs: list[tuple[str, TrainConfig]], lock_dir: str,
                          threads: int) -> dict[str, str]:
    """Take runs one at a time from an Optuna study over the grid (its GridSampler hands every worker a run
    that no worker was given before) until every run has been given out; then resume any run whose worker
    died (unless another worker holds it)."""
    import optuna

    from dsimagenet.tune import open_storage

    names = [n for n, _ in runs]
    config_of = dict(runs)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=f"sweep:{Path(s.out).resolve()}", storage=open_storage(s.storage),
                                load_if_exists=True, sampler=optuna.samplers.GridSampler({"run": names}, seed=0))
    outcome = {}

    def objective(trial) -> float:
        name = trial.suggest_categorical("run", names)
        outcome[name] = _run_one(name, config_of[name], lock_dir, threads)
        if not s.quiet:
            print(f"{name}: {outcome[name]}", flush=True)
        result = Path(config_of[name].out) / "result.json"
        if not result.exists():  # held by a worker that did not come through the storage
            raise optuna.TrialPruned(f"{name} is running elsewhere")
        return json.loads(result.read_text())["top1_error"]

    if len(study.get_trials(deepcopy=False)) < len(names):
        study.optimize(objective, catch=())  # the grid sampler stops the study once every run was given out
    for name, config in runs:  # a run given to a worker that died: resumed here unless finished or held
        if outcome.get(name) not in ("ran", "resumed and finished", "finished before"):
            outcome[name] = _run_one(name, config, lock_dir, threads)
    return outcome


def sweep(s: SweepConfig) -> dict[str, str]:
    """Run this worker's share of the grid; returns {run name: what happened}; writes results.csv."""
    runs = expand(s)
    mine = [r for i, r in enumerate(runs) if i % s.of == s.index]
    lock_dir = str(Path(s.out) / ".locks")
    threads = max(1, (os.cpu_count() or 1) // s.jobs)
    outcome = {}
    if s.storage:
        outcome = _claimed_from_storage(s, mine, lock_dir, threads)
    elif s.jobs == 1:
        for name, config in mine:
            outcome[name] = _run_one(name, config, lock_dir, threads)
            if not s.quiet:
                print(f"{name}: {outcome[name]}", flush=True)
    else:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(s.jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_run_one, name, config, lock_dir, threads): name for name, config in mine}
            for f in cf.as_completed(futures):
                outcome[futures[f]] = f.result()
                if not s.quiet:
                    print(f"{futures[f]}: {outcome[futures[f]]}", flush=True)
    write_results_csv(s.out, list(s.grid))
    return outcome


def write_results_csv(sweep_dir: str | Path, varied: list[str] | None = None) -> Path:
    """One row per finished run under ``sweep_dir``: its settings and its result."""
    from dsimagenet.runs import load_runs

    runs = load_runs([sweep_dir])
    keys = ["top1_error", "top5_error", "top1_error_ep31", "top5_error_ep31", "params", "epochs",
            "train_seconds", "train_images_per_s"]
    cols = varied or ["lr", "width", "depth", "size", "seed"]
    path = Path(sweep_dir) / "results.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "data", *cols, *keys])
        for r in runs:
            cfg = r.config["config"]
            w.writerow([r.path.name, cfg["data"], *(_setting(r, c) for c in cols),
                        *(r.result.get(k, "") for k in keys)])
    return path


def _setting(run, name: str):
    if name == "method":
        return run.config.get("method") or Path(run.config["config"]["data"]).name.partition("_")[2]
    if name == "size":
        return run.config.get("image_size")
    return run.config["config"].get(name)
