"""Grids of training runs: every combination of the values given, with the train recipe as the base.

    dsimagenet sweep --grid "method=box,nearest lr=0.001,0.01 width=1,2 size=16,32 seed=0,1" \\
        --data out/{size}_{method} --epochs 40 --out sweeps/lr
    dsimagenet sweep spec.yaml --jobs 2                  # grid and base flags from a file
    dsimagenet sweep spec.yaml --index $SLURM_ARRAY_TASK_ID --of 8     # a job array: each task its share
    dsimagenet sweep spec.yaml --storage postgresql://host/db          # workers anywhere share one study
    dsimagenet sweep spec.yaml --gpus 0,1,2,3 --runs-per-gpu 2          # 8 runs at a time, 2 on each GPU

Every run gets its own directory under ``--out``, named by the values that vary. A finished run is skipped, an
interrupted one resumed, a diverged one kept as diverged (it would diverge again); a lock file per run makes
sure that two workers (processes, array tasks, machines sharing the folder) never run the same run. A run made
before with other settings is compared as ``train --resume`` does: the sweep refuses, naming the difference,
unless only ``--epochs`` grew and the schedule does not depend on it (step, sgdr): then the run is continued.
A run that fails (its data missing, a disk full) is recorded as failed and the sweep goes on; it exits nonzero.
``method`` and ``size`` choose the data: ``--data`` may hold ``{size}`` and ``{method}``; without them it is
taken as a ``dsimagenet build`` output folder and ``{data}/{size}_{method}`` is used. Results:
``load_runs(SWEEP_DIR)``, and ``SWEEP_DIR/results.csv`` (one row per run of the grid, with its status).
Runs on CUDA are spread over the machine's GPUs (``--gpus``, default every visible one; ``--runs-per-gpu``), each
worker seeing only its own GPU; how that combines with ``--jobs`` is in dsimagenet.placement.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import fcntl
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dsimagenet.errors import ConfigError, DSImageNetError, describe_os_error
from dsimagenet.grid import DATA_KEYS, check, load_spec, merge_grids, parse_grid, run_name  # noqa: F401 - API
from dsimagenet.grid import expand as expand_grid
from dsimagenet.recipe import TrainConfig
from dsimagenet.runs import exists as is_run
from dsimagenet.runs import find_runs, load_run, plural, write_json

FAILURES = ".failures"  # SWEEP/.failures/<run>.json: why a run failed, until it runs to an end
LOCKS = ".locks"  # SWEEP/.locks/<run>.lock: held by the worker running that run


@dataclass(frozen=True)
class SweepConfig:
    out: str
    grid: dict[str, list] = field(default_factory=dict)  # name -> values; TrainConfig fields, method, size
    base: dict = field(default_factory=dict)  # TrainConfig fields shared by every run (data, epochs, ...)
    jobs: int | None = None  # runs at a time here; None: one per GPU slot (dsimagenet.placement), 1 on the CPU
    index: int = 0
    of: int = 1
    storage: str | None = None  # an Optuna storage shared by workers: each takes the next run nobody started
    quiet: bool = False  # no line per run
    gpus: str | tuple[int, ...] | None = None  # the GPUs of this machine to use ("0,1"); None: every visible one
    runs_per_gpu: int | None = None  # runs sharing one GPU

    def __post_init__(self):
        validate(self)


def validate(s: SweepConfig) -> None:
    """Every field of a SweepConfig, in one place: ConfigError naming the flag (or grid key) and what is allowed.
    Grid and base values are typed and checked by ``grid.check``; the typed values replace the given ones."""
    if not isinstance(s.out, str) or not s.out:
        raise ConfigError(f"--out must be a folder, not {s.out!r}")
    from dsimagenet.placement import check_count, parse_gpus

    check_count(s.jobs, "--jobs")
    check_count(s.runs_per_gpu, "--runs-per-gpu")
    object.__setattr__(s, "gpus", parse_gpus(s.gpus))
    for name, value, lo in (("of", s.of, 1), ("index", s.index, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise ConfigError(f"--{name} must be an integer >= {lo}, not {value!r}")
    if s.index >= s.of:
        raise ConfigError(f"--index must be in 0..{s.of - 1} (--of {s.of}), not {s.index}")
    if s.storage is not None:
        from dsimagenet.storage import check_storage_url

        check_storage_url(s.storage)
    grid, base = check(s.grid, s.base)
    object.__setattr__(s, "grid", grid)
    object.__setattr__(s, "base", base)


def expand(s: SweepConfig) -> list[tuple[str, TrainConfig]]:
    """Every run of the sweep's grid, in a fixed order: (name, config)."""
    return expand_grid(s.grid, s.base, s.out)


# --- one run: what is on disk, and what to do with it

class _Fingerprints(dict):
    def __missing__(self, data: str) -> str:
        from dsimagenet.train import dataset_fingerprint

        self[data] = dataset_fingerprint(data)
        return self[data]


def decide(config: TrainConfig, fingerprints: dict | None = None) -> tuple[str, str]:
    """What the sweep does with the run directory of ``config``: ("new" | "resume" | "finished" | "diverged" |
    "continue", "") or ("mismatch", why). The stored configuration and data are compared as ``train --resume``
    does; a run differing only in more --epochs of a schedule that does not depend on them is continued."""
    from dsimagenet.train import LENGTH_FREE_SCHEDULES, check_resume

    fingerprints = _Fingerprints() if fingerprints is None else fingerprints
    out = Path(config.out)
    if not is_run(out):
        return "new", ""
    run = load_run(out)
    as_is = {"finished": "finished", "diverged": "diverged", "unfinished": "resume"}[run.status]
    fp = fingerprints[config.data]
    try:
        check_resume(out, config, fp)
        return as_is, ""
    except (DSImageNetError, ValueError) as e:
        why = str(e)
    try:
        old = run.train_config.epochs
    except DSImageNetError:  # what it stores is no TrainConfig: the difference is named above
        return "mismatch", why
    if config.epochs > old:
        if config.schedule not in LENGTH_FREE_SCHEDULES:
            return "mismatch", (f"{why} (a {config.schedule} schedule depends on --epochs: the run cannot be "
                                "continued to more epochs)")
        try:
            check_resume(out, dataclasses.replace(config, epochs=old), fp)
        except (DSImageNetError, ValueError):
            return "mismatch", why
        # a diverged run diverged within its first `old` epochs, which the longer run repeats exactly
        return ("diverged" if as_is == "diverged" else "continue"), ""
    return "mismatch", why


def _failure_path(out: Path) -> Path:
    return out.parent / FAILURES / f"{out.name}.json"


def _run_one(name: str, config: TrainConfig, lock_dir: str, threads: int) -> str:
    """Run (or resume, or continue) one run unless it is finished, diverged, or held by another worker; returns
    what happened. A DSImageNetError or OSError of the run is returned as "failed: ..." (and recorded) so that
    the sweep goes on; anything else is a bug and stops it."""
    out = Path(config.out)
    Path(lock_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(lock_dir) / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "running elsewhere"
        try:
            outcome = _run_locked(config, threads)
        except (DSImageNetError, OSError) as e:
            message = describe_os_error(e) if isinstance(e, OSError) else str(e)
            _record_failure(out, message)
            return f"failed: {message}"
        _failure_path(out).unlink(missing_ok=True)
        return outcome
    finally:
        os.close(fd)


def _run_locked(config: TrainConfig, threads: int) -> str:
    from dsimagenet.errors import Diverged

    out = Path(config.out)
    action, why = decide(config)
    if action == "mismatch":
        raise ConfigError(why)
    if action == "finished":
        return "finished before"
    if action == "diverged":
        return "diverged before"
    import torch

    from dsimagenet.train import extend_run, train

    torch.set_num_threads(threads)
    old = extend_run(out, config) if action == "continue" else None
    try:
        train(config, resume=action != "new")
    except Diverged as e:
        return f"diverged: {e}"
    if old is not None:
        return f"continued from {old} to {config.epochs} epochs"
    return "resumed and finished" if action == "resume" else "ran"


def _record_failure(out: Path, message: str) -> None:
    path = _failure_path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"message": message})
    except OSError:  # a full disk fails the run and this note alike; the outcome still says why
        pass


def check_existing(runs: list[tuple[str, TrainConfig]]) -> None:
    """Refuse the sweep, before anything runs, if any run of it was made before with other settings (naming each
    and what differs). Damaged runs and missing data are left to each run (it fails, the others go on)."""
    fingerprints = _Fingerprints()
    bad = []
    for _, config in runs:
        try:
            action, why = decide(config, fingerprints)
        except (DSImageNetError, OSError):
            continue
        if action == "mismatch":
            bad.append(why)
    if bad:
        raise ConfigError(f"{plural(len(bad), 'run')} under this --out {'was' if len(bad) == 1 else 'were'} made "
                          "with other settings: " + "; ".join(bad)
                          + ". A sweep continues a run only to more --epochs of a step or sgdr schedule; choose "
                          "another --out, or remove those runs to run them again")


# --- the sweep

def _claimed_from_storage(s: SweepConfig, runs: list[tuple[str, TrainConfig]], lock_dir: str,
                          threads: int, tell) -> dict[str, str]:
    """Take runs one at a time from an Optuna study over the grid (its GridSampler hands every worker a run
    that no worker was given before) until every run has been given out; then resume any run whose worker
    died (unless another worker holds it). The study only hands out runs: a run that is not finished (held
    elsewhere, diverged, failed) ends its trial as pruned."""
    import optuna

    from dsimagenet.storage import open_storage

    names = [n for n, _ in runs]
    config_of = dict(runs)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=f"sweep:{Path(s.out).resolve()}", storage=open_storage(s.storage),
                                load_if_exists=True, sampler=optuna.samplers.GridSampler({"run": names}, seed=0))
    outcome = {}

    def objective(trial) -> float:
        name = trial.suggest_categorical("run", names)
        outcome[name] = _run_one(name, config_of[name], lock_dir, threads)
        tell(name, outcome[name])
        if outcome[name] not in ("ran", "resumed and finished", "finished before") \
                and not outcome[name].startswith("continued"):
            raise optuna.TrialPruned(f"{name}: {outcome[name]}")
        return load_run(Path(config_of[name].out)).result["top1_error"]

    if len(study.get_trials(deepcopy=False)) < len(names):
        study.optimize(objective, catch=())  # the grid sampler stops the study once every run was given out
    for name, config in runs:  # not tried here, or held by a worker that may have died since: tried once more
        if outcome.get(name) in (None, "running elsewhere"):
            outcome[name] = _run_one(name, config, lock_dir, threads)
            tell(name, outcome[name])
    return outcome


def _storage_worker(s: SweepConfig, runs: list[tuple[str, TrainConfig]], lock_dir: str, threads: int) -> dict:
    """One of several workers of this machine taking runs from the shared study (in its own process)."""
    def tell(name: str, what: str) -> None:
        if not s.quiet:
            print(f"{name}: {what}", flush=True)

    return _claimed_from_storage(s, runs, lock_dir, threads, tell)


def _merge(outcomes: list[dict[str, str]]) -> dict[str, str]:
    """The outcome of each run over several workers: what the worker that ran it says, over another's
    "finished before" (it looked after the run ended) or "running elsewhere" (while it ran)."""
    rank = {"running elsewhere": 0, "finished before": 1}
    merged: dict[str, str] = {}
    for outcome in outcomes:
        for name, what in outcome.items():
            if name not in merged or rank.get(what, 2) > rank.get(merged[name], 2):
                merged[name] = what
    return merged


def sweep(s: SweepConfig) -> dict[str, str]:
    """Run this worker's share of the grid; returns {run name: what happened} and writes results.csv.
    Every run is planned and checked against what is on disk before anything is created."""
    from dsimagenet.placement import pool, resolve, threads_per_worker

    runs = expand(s)
    mine = [r for i, r in enumerate(runs) if i % s.of == s.index]
    placement = resolve(s.gpus, s.runs_per_gpu, s.jobs, {c.device for _, c in mine} or {"auto"})
    check_existing(mine)
    lock_dir = str(Path(s.out) / LOCKS)
    threads = threads_per_worker(placement.workers)
    here = placement.workers == 1 and not placement.pinned  # one CPU worker: in this process
    outcome: dict[str, str] = {}
    progress = _progress_bar(len(mine), s.quiet or s.base.get("quiet", False))  # --quiet: the runs' outcomes only

    def tell(name: str, what: str) -> None:
        outcome[name] = what
        if not s.quiet:
            _say(progress, f"{name}: {what}")
        progress.update(1)

    if s.storage and here:
        _claimed_from_storage(s, mine, lock_dir, threads, tell)
    elif s.storage:
        with pool(placement) as workers:
            futures = [workers.submit(_storage_worker, s, mine, lock_dir, threads) for _ in range(placement.workers)]
            outcome.update(_merge([f.result() for f in futures]))
    elif here:
        for name, config in mine:
            tell(name, _run_one(name, config, lock_dir, threads))
    else:
        with pool(placement) as workers:
            futures = {workers.submit(_run_one, name, config, lock_dir, threads): name for name, config in mine}
            for f in cf.as_completed(futures):
                tell(futures[f], f.result())
    progress.close()
    write_results_csv(s.out, list(s.grid), runs)
    return {name: outcome[name] for name, _ in mine if name in outcome}


def _progress_bar(total: int, quiet: bool):
    """Runs done of this worker's share, with the rate and the time left: tqdm on a terminal, plain lines on
    stderr in a log (dsimagenet.progress); silent with ``quiet``."""
    from dsimagenet.progress import bar

    return bar(total, "sweep", unit="run", quiet=quiet)


def _say(progress, text: str) -> None:
    """A line on stdout, above the bar when it is drawn on the terminal stdout prints to."""
    if hasattr(progress, "write") and sys.stdout.isatty():
        progress.write(text, file=sys.stdout)
    else:
        print(text, flush=True)


def kind(outcome: str) -> str:
    """An outcome of ``sweep`` in one word: finished, diverged, failed or elsewhere."""
    if outcome.startswith("failed"):
        return "failed"
    if outcome.startswith("diverged"):
        return "diverged"
    return "elsewhere" if outcome == "running elsewhere" else "finished"


def summary(outcome: dict[str, str]) -> str:
    counts = Counter(kind(v) for v in outcome.values())
    parts = [f"{counts[k]} {word}" for k, word in (("finished", "finished (here or before)"),
                                                    ("diverged", "diverged"), ("failed", "failed"),
                                                    ("elsewhere", "running elsewhere")) if counts[k]]
    return f"{plural(len(outcome), 'run')}: " + (", ".join(parts) or "none")


# --- results.csv

def result_keys(report_epochs) -> list[str]:
    """The result columns of results.csv: the final errors, the errors after each reported epoch (a run's
    ``report_epoch``; the paper's 31 by default), and the run's size and speed."""
    at = [f"top{k}_error_ep{e}" for e in sorted(set(report_epochs)) for k in (1, 5)]
    return ["top1_error", "top5_error", *at, "params", "epochs", "train_seconds", "train_images_per_s"]


RESULT_KEYS = result_keys([next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "report_epoch")])


def _held(lock: Path) -> bool:
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _short(value):
    """A result value for results.csv: a float at most 10 significant digits, so that a run written before results
    were rounded (runs.percent) shows 9 where its result.json holds 8.999999999999996."""
    return float(f"{value:.10g}") if isinstance(value, float) else value


def _row_of(out: Path, cols: list[str]) -> tuple[dict, int | None]:
    """One results.csv row from a run directory (or the lack of one), and the run's report epoch if known."""
    row, report_epoch = {"run": out.name}, None
    failure = _failure_path(out)
    if is_run(out):
        try:
            r = load_run(out)
            tc = r.train_config
            report_epoch = tc.report_epoch
            row.update(status=r.status, data=tc.data, **{c: _setting(r, c) for c in cols})
            if r.status == "finished":
                row.update({k: _short(r.result.get(k, "")) for k in result_keys([report_epoch])})
            elif r.status == "diverged":
                res = r.result or {}
                row["message"] = res.get("message") or f"diverged at epoch {res.get('epoch')} step {res.get('step')}"
        except DSImageNetError as e:
            row.update(status="damaged", message=str(e))
    else:
        row["status"] = "not started"
    if failure.exists() and row["status"] not in ("finished", "diverged"):
        try:
            row.update(status="failed", message=json.loads(failure.read_text())["message"])
        except (OSError, ValueError, KeyError, TypeError):
            row.update(status="failed", message=f"see {failure}")
    if row["status"] == "unfinished" and _held(out.parent / LOCKS / f"{out.name}.lock"):
        row["status"] = "running"
    return row, report_epoch


def write_results_csv(sweep_dir: str | Path, varied: list[str] | None = None,
                      runs: list[tuple[str, TrainConfig]] | None = None) -> Path:
    """One row per run: every run of ``runs`` (the grid) and every other run directory under ``sweep_dir``, with
    its status (finished, diverged, failed, unfinished, running, not started, damaged), settings and result.
    Written atomically: a reader sees the old file or the new one."""
    from dsimagenet.formats.atomic import atomic_write

    sweep_dir = Path(sweep_dir)
    dirs = [Path(c.out) for _, c in runs or []]
    listed = {d.resolve() for d in dirs}
    if sweep_dir.is_dir():
        dirs += [p for p in find_runs(sweep_dir) if p.resolve() not in listed and FAILURES not in p.parts]
    cols = varied or ["lr", "width", "depth", "size", "seed"]
    rows = [_row_of(d, cols) for d in dirs]
    epochs = {c.report_epoch for _, c in runs or []} | {e for _, e in rows if e is not None}
    header = ["run", "status", "data", *cols, *(result_keys(epochs) if epochs else RESULT_KEYS), "message"]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / "results.csv"
    with atomic_write(path, "w") as f:
        w = csv.DictWriter(f, fieldnames=header, restval="")
        w.writeheader()
        w.writerows(row for row, _ in rows)
    return path


def _setting(run, name: str):
    """A run's value of a grid key, as config.json stores it (a tuple as a list)."""
    if name == "method":
        return run.method or Path(run.train_config.data).name.partition("_")[2]
    if name == "size":
        return run.image_size
    value = getattr(run.train_config, name)
    return list(value) if isinstance(value, tuple) else value


def __getattr__(name: str):
    if name == "LENGTH_FREE_SCHEDULES":  # defined beside the trainer; importing it at once would import torch
        from dsimagenet.train import LENGTH_FREE_SCHEDULES

        return LENGTH_FREE_SCHEDULES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
