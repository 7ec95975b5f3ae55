"""Grids of training runs: every combination of the values given, with the train recipe as the base.

    dsimagenet sweep --grid "method=box,nearest lr=0.001,0.01 width=1,2 size=16,32 seed=0,1" \\
        --data out/{size}_{method} --epochs 40 --out sweeps/lr
    dsimagenet sweep spec.yaml --jobs 2                  # grid and base flags from a file
    dsimagenet sweep spec.yaml --index $SLURM_ARRAY_TASK_ID --of 8     # a job array: each task its share
    dsimagenet sweep spec.yaml --storage postgresql://host/db          # workers anywhere share one study

Every run gets its own directory under ``--out``, named by the values that vary. A finished run is skipped, an
interrupted one resumed, a diverged one kept as diverged (it would diverge again); a lock file per run makes
sure that two workers (processes, array tasks, machines sharing the folder) never run the same run. A run made
before with other settings is compared as ``train --resume`` does: the sweep refuses, naming the difference,
unless only ``--epochs`` grew and the schedule does not depend on it (step, sgdr): then the run is continued.
A run that fails (its data missing, a disk full) is recorded as failed and the sweep goes on; it exits nonzero.
``method`` and ``size`` choose the data: ``--data`` may hold ``{size}`` and ``{method}``; without them it is
taken as a ``dsimagenet build`` output folder and ``{data}/{size}_{method}`` is used. Results:
``load_runs(SWEEP_DIR)``, and ``SWEEP_DIR/results.csv`` (one row per run of the grid, with its status).
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import fcntl
import itertools
import json
import math
import multiprocessing
import os
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dsimagenet.errors import ConfigError, DSImageNetError, describe_os_error
from dsimagenet.recipe import TrainConfig, field_types

DATA_KEYS = ("method", "size")
# Schedules whose learning rate at (epoch, step) does not depend on --epochs: a run of E epochs is then exactly
# the first E epochs of a longer one, and a sweep re-run with more epochs continues it. step: x gamma after fixed
# milestone epochs; sgdr: periods t0, t0*mult, ... counted from the start. cosine anneals towards the last epoch:
# its every step depends on --epochs, so a finished cosine run is not a prefix of a longer one.
LENGTH_FREE_SCHEDULES = ("step", "sgdr")
FAILURES = ".failures"  # SWEEP/.failures/<run>.json: why a run failed, until it runs to an end


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
        validate(self)


def validate(s: SweepConfig) -> None:
    """Every field of a SweepConfig, in one place: ConfigError naming the flag (or grid key) and what is allowed.
    Grid and base values are typed like the TrainConfig fields they set (text is parsed: YAML reads ``1e-3`` as
    text) and each is checked by TrainConfig's own rules; the typed values replace the given ones."""
    if not isinstance(s.out, str) or not s.out:
        raise ConfigError(f"--out must be a folder, not {s.out!r}")
    for name, value, lo in (("jobs", s.jobs, 1), ("of", s.of, 1), ("index", s.index, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise ConfigError(f"--{name} must be an integer >= {lo}, not {value!r}")
    if s.index >= s.of:
        raise ConfigError(f"--index must be in 0..{s.of - 1} (--of {s.of}), not {s.index}")
    if s.storage is not None:
        from dsimagenet.tune import check_storage_url

        check_storage_url(s.storage)
    if not isinstance(s.grid, dict) or not isinstance(s.base, dict):
        raise ConfigError("the sweep's grid and base must be mappings of name to value(s)")
    known = {f.name for f in dataclasses.fields(TrainConfig)} | set(DATA_KEYS)
    unknown = sorted(set(map(str, s.grid)) - known) + sorted(set(map(str, s.base)) - known)
    if unknown:
        raise ConfigError(f"unknown sweep parameters {unknown}: use TrainConfig fields (the train command's "
                          "flags, with _ for -), method or size")
    if "out" in s.grid or "out" in s.base:
        raise ConfigError("'out' is chosen by the sweep (one directory per run under --out)")
    both = sorted(set(s.grid) & set(s.base))
    if both:
        raise ConfigError(f"{', '.join(both)}: given both in the grid and as a fixed value (a flag or the spec's "
                          "base): give each once")
    base = {k: _typed(k, v, "base") for k, v in s.base.items()}
    _probe(base, "base")
    grid = {}
    for name, values in s.grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"grid: {name} has no values (give one or more: {name}=a,b)")
        typed = [_typed(name, v, "grid") for v in values]
        seen = set()
        for v in typed:
            if v in seen:  # 1 == 1.0: the same run
                raise ConfigError(f"grid: {name}={v} is given twice (two runs would share one directory)")
            seen.add(v)
            if name != "method":
                _probe({**base, name: v}, f"grid: {name}={v}")
        grid[name] = typed
    object.__setattr__(s, "grid", grid)
    object.__setattr__(s, "base", base)


def _probe(fields: dict, where: str) -> None:
    """TrainConfig's own check of these values (the other fields at their defaults)."""
    fields = {k: v for k, v in fields.items() if k != "method"}
    try:
        TrainConfig(**{"data": "data", "out": "out", **fields})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _optional(name: str) -> bool:
    hint = typing.get_type_hints(TrainConfig)[name]
    return type(None) in typing.get_args(hint)


def _convert(name: str, value: str, where: str = "--grid"):
    """A value from text, typed like the TrainConfig field it sets."""
    if name == "method":
        return value
    base = field_types(TrainConfig).get(name, str)
    what = {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(base, "epochs as 10/20/30")
    if value.lower() == "none":
        if not _optional(name):
            raise ConfigError(f"{where}: {name}={value}: {name} cannot be none (expected {what})")
        return None
    try:
        if base is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if typing.get_origin(base) is tuple:
            return tuple(int(x) for x in value.split("/"))  # milestones=10/20/30
        out = base(value)
    except ValueError:
        raise ConfigError(f"{where}: {name}={value}: expected {what}") from None
    if isinstance(out, float) and not math.isfinite(out):
        raise ConfigError(f"{where}: {name}={value}: expected a finite number")
    return out


def _typed(name: str, value, where: str):
    """A grid or base value as the field takes it: text parsed; a list for a tuple field made a tuple; an integer
    for a number field kept (TrainConfig accepts both). Range checks are TrainConfig's."""
    if name == "method":
        if not isinstance(value, str) or not value or "/" in value:
            raise ConfigError(f"{where}: method={value!r}: expected a resize method name such as box or nearest")
        return value
    kind = field_types(TrainConfig)[name]
    if isinstance(value, str) and kind is not str:
        return _convert(name, value, where)
    if isinstance(value, list):
        return tuple(value)
    if typing.get_origin(kind) is tuple and isinstance(value, int) and not isinstance(value, bool):
        return (value,)  # milestones: 10 in a YAML base
    return value


def parse_grid(text: str) -> dict[str, list]:
    """``"lr=0.001,0.01 width=1,2"`` -> ``{"lr": [0.001, 0.01], "width": [1.0, 2.0]}``; a name given twice is an
    error (the last would win silently)."""
    grid = {}
    for part in text.split():
        name, sep, values = part.partition("=")
        if not sep or not name or not values:
            raise ConfigError(f"--grid: {part!r} is not name=value1,value2,...")
        if name in grid:
            raise ConfigError(f"--grid: {name} is given twice; give all its values once: {name}=a,b,c")
        items = values.split(",")
        if any(v == "" for v in items):
            raise ConfigError(f"--grid: {part!r} has an empty value")
        grid[name] = [_convert(name, v) for v in items]
    return grid


def merge_grids(spec: dict, flags: dict, spec_path: str) -> dict:
    """The spec file's grid and --grid's, refusing a name in both (neither may silently win)."""
    both = sorted(set(spec) & set(flags))
    if both:
        raise ConfigError(f"{', '.join(both)}: in the grid of {spec_path} and in --grid: give each once")
    return {**spec, **flags}


def _yaml_loader():
    """A safe YAML loader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the constructor below says so
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice (first on line {first})", key_node.start_mark)
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def load_spec(path: str | Path) -> tuple[dict, dict]:
    """(grid, base) from a YAML file: ``grid: {lr: [0.001, 0.01], ...}`` and ``base: {data: ..., epochs: 40}``.
    A file that is not such YAML is a ConfigError naming the file, the line and what is wrong."""
    import yaml

    try:
        text = Path(path).read_text()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e.reason} at byte {e.start})") from None
    try:
        spec = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = ": ".join(x for x in (e.context, e.problem) if x)
        raise ConfigError(f"{path}: {where}{what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    spec = {} if spec is None else spec
    shape = "a mapping with 'grid' (name: [values]) and optionally 'base' (name: value)"
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected {shape}, not {type(spec).__name__}")
    other = sorted(map(str, set(spec) - {"grid", "base"}))
    if other:
        raise ConfigError(f"{path}: unknown top-level keys {other}: expected {shape}")
    grid, base = spec.get("grid") or {}, spec.get("base") or {}
    if not isinstance(grid, dict) or not isinstance(base, dict):
        raise ConfigError(f"{path}: 'grid' and 'base' must be mappings (name: values, name: value)")
    for name, values in grid.items():
        if values is None or values == []:
            raise ConfigError(f"{path}: grid: {name} has no values")
    return {str(k): v if isinstance(v, list) else [v] for k, v in grid.items()}, {str(k): v for k, v in base.items()}


def run_name(values: dict) -> str:
    def text(v) -> str:
        return "-".join(map(str, v)) if isinstance(v, tuple) else str(v).replace("/", "-")  # never a subfolder

    return "_".join(f"{k}={text(v)}" for k, v in values.items()) or "run"


def expand(s: SweepConfig) -> list[tuple[str, TrainConfig]]:
    """Every run of the grid, in a fixed order: (name, config)."""
    names = list(s.grid)
    runs = []
    for combo in itertools.product(*(s.grid[n] for n in names)):
        values = dict(zip(names, combo, strict=True))
        fields = {**{k: v for k, v in s.base.items() if k != "method"},
                  **{k: v for k, v in values.items() if k not in DATA_KEYS}}
        data = str(fields.get("data", ""))
        if not data:
            raise ConfigError("no data: give --data (it may contain {size} and {method})")
        size = values.get("size", s.base.get("size"))
        method = values.get("method", s.base.get("method", "box"))
        if any(k in values for k in DATA_KEYS) and "{" not in data:
            data = os.path.join(data, "{size}_{method}")
        if "{size}" in data and size is None:
            raise ConfigError(f"--data {data} needs a size: put size in the grid or give --size")
        try:
            fields["data"] = data.format(size=size, method=method)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"--data {data}: only {{size}} and {{method}} may be filled in ({e!r})") from None
        if "size" in values:
            fields["size"] = values["size"]
        name = run_name(values)
        try:
            config = TrainConfig(**fields, out=str(Path(s.out) / name))
        except ConfigError as e:
            raise ConfigError(f"sweep run {name}: {e}") from None
        runs.append((name, config))
    twice = [n for n, k in Counter(n for n, _ in runs).items() if k > 1]
    if twice:
        raise ConfigError(f"grid values that differ only in spelling give runs of one name: {twice}")
    return runs


# --- one run: what is on disk, and what to do with it

def _load(out: Path):
    """The run at ``out``, or DSImageNetError naming the damaged file."""
    from dsimagenet.runs import load_run

    try:
        return load_run(out)
    except DSImageNetError:
        raise
    except ValueError as e:  # json's error for a damaged config.json or result.json
        raise DSImageNetError(f"{out}: a damaged run file ({e}); remove the run directory to run it again") \
            from None


class _Fingerprints(dict):
    def __missing__(self, data: str) -> str:
        from dsimagenet.train import dataset_fingerprint

        self[data] = dataset_fingerprint(data)
        return self[data]


def decide(config: TrainConfig, fingerprints: dict | None = None) -> tuple[str, str]:
    """What the sweep does with the run directory of ``config``: ("new" | "resume" | "finished" | "diverged" |
    "continue", "") or ("mismatch", why). The stored configuration and data are compared as ``train --resume``
    does; a run differing only in more --epochs of a schedule that does not depend on them is continued."""
    from dsimagenet.train import _check_resume

    fingerprints = _Fingerprints() if fingerprints is None else fingerprints
    out = Path(config.out)
    if not (out / "config.json").exists():
        return "new", ""
    run = _load(out)
    as_is = {"finished": "finished", "diverged": "diverged", "unfinished": "resume"}[run.status]
    fp = fingerprints[config.data]
    try:
        _check_resume(out, config, fp)
        return as_is, ""
    except (DSImageNetError, ValueError) as e:
        why = str(e)
    old = run.config.get("config", {}).get("epochs")
    if isinstance(old, int) and config.epochs > old:
        if config.schedule not in LENGTH_FREE_SCHEDULES:
            return "mismatch", (f"{why} (a {config.schedule} schedule depends on --epochs: the run cannot be "
                                "continued to more epochs)")
        try:
            _check_resume(out, dataclasses.replace(config, epochs=old), fp)
        except (DSImageNetError, ValueError):
            return "mismatch", why
        # a diverged run diverged within its first `old` epochs, which the longer run repeats exactly
        return ("diverged" if as_is == "diverged" else "continue"), ""
    return "mismatch", why


def _continue(out: Path, config: TrainConfig) -> int:
    """Make the run at ``out`` a run of ``config.epochs`` epochs; returns the epochs it had. Its last checkpoint
    (the end of its epochs) is then exactly epoch E of the longer run, and is stamped so. The result goes
    first and the configuration last: a kill in between leaves an unfinished run of the old length, which the
    same sweep command continues in the same way."""
    import torch

    from dsimagenet import runs
    from dsimagenet.train import _computed, _save_checkpoint

    with runs.hold(out):  # no `train --resume` of this run meanwhile
        stored = runs.read_json(out / runs.CONFIG)
        old = stored["config"]["epochs"]
        (out / runs.RESULT).unlink(missing_ok=True)
        ckpt = out / runs.CHECKPOINT
        if ckpt.exists():
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "config" in state:
                state["config"] = json.dumps(_computed(config), sort_keys=True)
                _save_checkpoint(ckpt, state)
        stored["config"]["epochs"] = config.epochs
        stored.setdefault("continued", []).append({"from_epochs": old, "to_epochs": config.epochs})
        runs.write_json(out / runs.CONFIG, stored)
    return old


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

    from dsimagenet.train import train

    torch.set_num_threads(threads)
    old = _continue(out, config) if action == "continue" else None
    try:
        train(config, resume=action != "new")
    except Diverged as e:
        return f"diverged: {e}"
    if old is not None:
        return f"continued from {old} to {config.epochs} epochs"
    return "resumed and finished" if action == "resume" else "ran"


def _record_failure(out: Path, message: str) -> None:
    from dsimagenet.runs import write_json

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
        raise ConfigError(f"{len(bad)} run(s) under this --out were made with other settings: " + "; ".join(bad)
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
        tell(name, outcome[name])
        if outcome[name] not in ("ran", "resumed and finished", "finished before") \
                and not outcome[name].startswith("continued"):
            raise optuna.TrialPruned(f"{name}: {outcome[name]}")
        return _load(Path(config_of[name].out)).result["top1_error"]

    if len(study.get_trials(deepcopy=False)) < len(names):
        study.optimize(objective, catch=())  # the grid sampler stops the study once every run was given out
    for name, config in runs:  # not tried here, or held by a worker that may have died since: tried once more
        if outcome.get(name) in (None, "running elsewhere"):
            outcome[name] = _run_one(name, config, lock_dir, threads)
            tell(name, outcome[name])
    return outcome


def sweep(s: SweepConfig) -> dict[str, str]:
    """Run this worker's share of the grid; returns {run name: what happened} and writes results.csv.
    Every run is planned and checked against what is on disk before anything is created."""
    runs = expand(s)
    mine = [r for i, r in enumerate(runs) if i % s.of == s.index]
    check_existing(mine)
    lock_dir = str(Path(s.out) / ".locks")
    threads = max(1, (os.cpu_count() or 1) // s.jobs)
    outcome: dict[str, str] = {}

    def tell(name: str, what: str) -> None:
        outcome[name] = what
        if not s.quiet:
            print(f"{name}: {what}", flush=True)

    if s.storage:
        _claimed_from_storage(s, mine, lock_dir, threads, tell)
    elif s.jobs == 1:
        for name, config in mine:
            tell(name, _run_one(name, config, lock_dir, threads))
    else:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(s.jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_run_one, name, config, lock_dir, threads): name for name, config in mine}
            for f in cf.as_completed(futures):
                tell(futures[f], f.result())
    write_results_csv(s.out, list(s.grid), runs)
    return {name: outcome[name] for name, _ in mine if name in outcome}


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
    return f"{len(outcome)} runs: " + (", ".join(parts) or "none")


# --- results.csv

RESULT_KEYS = ["top1_error", "top5_error", "top1_error_ep31", "top5_error_ep31", "params", "epochs",
               "train_seconds", "train_images_per_s"]


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


def _row_of(out: Path, cols: list[str]) -> dict:
    """One results.csv row from a run directory (or the lack of one)."""
    row = {"run": out.name}
    failure = _failure_path(out)
    if (out / "config.json").exists():
        try:
            r = _load(out)
            cfg = r.config["config"]
            row.update(status=r.status, data=cfg["data"], **{c: _setting(r, c) for c in cols})
            if r.status == "finished":
                row.update({k: r.result.get(k, "") for k in RESULT_KEYS})
            elif r.status == "diverged":
                res = r.result or {}
                row["message"] = res.get("message") or f"diverged at epoch {res.get('epoch')} step {res.get('step')}"
        except (DSImageNetError, KeyError, TypeError, AttributeError) as e:
            row.update(status="damaged", message=str(e) if isinstance(e, DSImageNetError) else
                       f"{out}/config.json lacks {e}")
    else:
        row["status"] = "not started"
    if failure.exists() and row["status"] not in ("finished", "diverged"):
        try:
            row.update(status="failed", message=json.loads(failure.read_text())["message"])
        except (OSError, ValueError, KeyError, TypeError):
            row.update(status="failed", message=f"see {failure}")
    if row["status"] == "unfinished" and _held(out.parent / ".locks" / f"{out.name}.lock"):
        row["status"] = "running"
    return row


def write_results_csv(sweep_dir: str | Path, varied: list[str] | None = None,
                      runs: list[tuple[str, TrainConfig]] | None = None) -> Path:
    """One row per run: every run of ``runs`` (the grid) and every other run directory under ``sweep_dir``, with
    its status (finished, diverged, failed, unfinished, running, not started, damaged), settings and result.
    Written atomically: a reader sees the old file or the new one."""
    from dsimagenet.formats.atomic import atomic_write

    sweep_dir = Path(sweep_dir)
    dirs = [Path(c.out) for _, c in runs or []]
    listed = {d.resolve() for d in dirs}
    dirs += [p.parent for p in sorted(sweep_dir.rglob("config.json"))
             if p.parent.resolve() not in listed and ".failures" not in p.parts]
    cols = varied or ["lr", "width", "depth", "size", "seed"]
    header = ["run", "status", "data", *cols, *RESULT_KEYS, "message"]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / "results.csv"
    with atomic_write(path, "w") as f:
        w = csv.DictWriter(f, fieldnames=header, restval="")
        w.writeheader()
        w.writerows(_row_of(d, cols) for d in dirs)
    return path


def _setting(run, name: str):
    if name == "method":
        return run.config.get("method") or Path(run.config["config"]["data"]).name.partition("_")[2]
    if name == "size":
        return run.config.get("image_size")
    return run.config["config"].get(name)
