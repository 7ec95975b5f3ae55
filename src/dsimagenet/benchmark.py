"""A multi-fidelity objective for hyperparameter and architecture search, in HPOBench's shape.

    >>> from dsimagenet import benchmark
    >>> r = benchmark.objective({"lr": 0.05, "width": 2}, {"epochs": 4, "size": 16},
    ...                         data="out/{size}_box", out="hpo/")
    >>> r["function_value"], r["cost"], r["info"]["run"]       # top-1 error (%), seconds, the run directory
    >>> benchmark.search_space(), benchmark.fidelity_space()   # plain data: ranges, scales, defaults

``config``: the searched settings, any TrainConfig field that decides what is trained (``lr``, ``weight_decay``,
``width``, ``depth``, ``momentum``, ``batch_size``, ``schedule``, ...) plus ``blocks`` (residual blocks per stack,
the paper's 4: depth 4 + 2 * blocks * stacks, whatever the size). ``fidelity``: ``epochs`` (default 40, the
paper's), ``size`` (``data`` holds ``{size}``), ``width``, ``classes`` (the first N in devkit order), ``fraction``
(of the training images: each class keeps its first ceil(fraction * n) images, n its largest class's count,
through ``max_per_class``; on ImageNet's nearly balanced train split about that fraction of it).

Every evaluation is a training run in ``out/<key>/``, the key a hash of what it computes (the data's path
and the resolved TrainConfig, less its length for a step or sgdr schedule). So a finished evaluation is answered
from its run (no training: ``info["reused"]``); with a schedule whose learning rate does not depend on the number
of epochs (``train.LENGTH_FREE_SCHEDULES``: the paper's step schedule), a lower-epoch evaluation is the first
epochs of a longer one, answered from its metrics, and a higher one continues the run (``train.extend_run``)
rather than training from scratch. A cosine schedule depends on its length: each epoch budget is its own run.
``cost`` is the seconds this call took (nearly 0 when answered from a run). A run that diverges answers
``function_value`` 100.0 (the worst top-1 error) with ``info["status"] == "diverged"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import math
import os
import time
from pathlib import Path

from dsimagenet.errors import ConfigError

__all__ = ["FIDELITIES", "fidelity_space", "objective", "sample", "search_space", "trial_config"]

FIDELITIES = ("epochs", "size", "width", "classes", "fraction")
WORST = 100.0  # the top-1 error (percent) a diverged run answers
# set by objective's own arguments and fidelities, never by config
OWNED = ("data", "out", "epochs", "seed", "device", "size")


def search_space() -> dict:
    """The paper's search space as plain data: each setting's type, range or choices, scale and default (the
    paper's recipe). The ranges of lr and weight decay are those ``dsimagenet tune`` searches by default; the
    widths are Table 1's; ``blocks`` per stack is 4 in every network of the paper (WRN-20/28/36 at 16/32/64 px)."""
    return {
        "lr": {"type": "float", "low": 1e-3, "high": 0.5, "log": True, "default": 0.01},
        "weight_decay": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True, "default": 5e-4},
        "width": {"type": "categorical", "choices": [0.5, 1.0, 2.0, 5.0, 10.0], "default": 1.0},
        "blocks": {"type": "int", "low": 1, "high": 6, "log": False, "default": 4},
        "momentum": {"type": "float", "low": 0.0, "high": 0.99, "log": False, "default": 0.9},
        "batch_size": {"type": "categorical", "choices": [64, 128, 256], "default": 128},
    }


def fidelity_space() -> dict:
    """The fidelities as plain data: the cheapest and the full value of each (the full one is the default)."""
    return {
        "epochs": {"type": "int", "low": 1, "high": 40, "log": True, "default": 40},
        "size": {"type": "categorical", "choices": [16, 32, 64], "default": 32},
        "width": {"type": "categorical", "choices": [0.5, 1.0, 2.0, 5.0, 10.0], "default": 1.0},
        "classes": {"type": "int", "low": 1, "high": 1000, "log": True, "default": 1000},
        "fraction": {"type": "float", "low": 0.01, "high": 1.0, "log": True, "default": 1.0},
    }


def sample(space: dict, rng) -> dict:
    """One configuration drawn from ``space`` (``search_space()`` or a part of it) with the numpy Generator
    ``rng``: log-uniform where ``log``, uniform otherwise, a choice for categoricals."""
    out = {}
    for name, s in space.items():
        if s["type"] == "categorical":
            out[name] = s["choices"][int(rng.integers(len(s["choices"])))]
            continue
        lo, hi = s["low"], s["high"]
        if s.get("log"):
            v = math.exp(rng.uniform(math.log(lo), math.log(hi + 1 if s["type"] == "int" else hi)))
        else:
            v = rng.uniform(lo, hi + 1 if s["type"] == "int" else hi)
        out[name] = min(int(v), hi) if s["type"] == "int" else float(v)
    return out


@functools.lru_cache(maxsize=64)
def _largest_class(data: str, order: str, classes: int | None) -> int:
    """The most training images of any class kept (what a fraction of train is counted against)."""
    import numpy as np

    from dsimagenet.dataset import ImageNetDS

    targets = ImageNetDS(data, "train", order, classes).targets
    return int(np.bincount(targets).max()) if len(targets) else 0


def _image_size(data: str) -> int:
    from dsimagenet.dataset import ImageNetDS
    from dsimagenet.formats import native

    return native.read_meta(data)["image_size"] if native.is_native(data) else ImageNetDS(data, "val").image_size


# a fidelity and the setting it decides: given both ways, which one counts would be a guess
CONFLICTS = {"width": "width", "classes": "classes", "fraction": "max_per_class"}


def trial_config(config: dict, fidelity: dict | None, *, data: str, out: str, device: str = "auto", seed: int = 0,
                 quiet: bool = True):
    """The TrainConfig one evaluation trains (its ``out`` is the run's folder ``out/<key>``) and the fidelity
    resolved; ConfigError naming the setting for anything out of place."""
    from dsimagenet.model import num_stacks
    from dsimagenet.recipe import TrainConfig

    config, fidelity = dict(config), dict(fidelity or {})
    known = {f.name for f in dataclasses.fields(TrainConfig)} | {"blocks"}
    bad = sorted(set(config) - known)
    if bad:
        raise ConfigError(f"objective config: {bad} are not TrainConfig fields (or blocks)")
    owned = sorted(set(config) & set(OWNED))
    if owned:
        raise ConfigError(f"objective config: {owned} are set by the objective's arguments and fidelities "
                          f"({', '.join(FIDELITIES)}), not by config")
    bad = sorted(set(fidelity) - set(FIDELITIES))
    if bad:
        raise ConfigError(f"objective fidelity: {bad} are not fidelities; they are {', '.join(FIDELITIES)}")
    both = sorted(f for f, setting in CONFLICTS.items() if f in fidelity and setting in config)
    if both:
        settings = ", ".join(CONFLICTS[f] for f in both)
        raise ConfigError(f"objective: {both} given as a fidelity and in config ({settings}): give each once")
    if "blocks" in config and "depth" in config:
        raise ConfigError("objective config: give depth or blocks (per stack), not both")
    size = fidelity.get("size")
    if "{size}" in data:
        if size is None:
            raise ConfigError(f"objective: data {data} holds {{size}}: give the fidelity size")
        data = data.replace("{size}", str(size))
    fraction = fidelity.get("fraction", 1.0)
    if not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 1):
        raise ConfigError(f"objective fidelity: fraction must be a number in (0, 1], not {fraction!r}")
    blocks = config.pop("blocks", None)
    values = {"quiet": quiet, **config, "data": data, "epochs": fidelity.get("epochs", 40), "seed": seed,
              "device": device, "out": str(out)}
    for f in ("width", "classes"):
        if f in fidelity:
            values[f] = fidelity[f]
    if size is not None and "{size}" not in data:  # a size asked of fixed data is checked against it
        values["size"] = size
    tc = TrainConfig(**values)  # its errors name the flag
    if blocks is not None:
        if not (isinstance(blocks, int) and not isinstance(blocks, bool) and blocks >= 1):
            raise ConfigError(f"objective config: blocks must be an integer >= 1, not {blocks!r}")
        tc = dataclasses.replace(tc, depth=4 + 2 * blocks * num_stacks(size or _image_size(data)))
    if fraction < 1:
        tc = dataclasses.replace(tc, max_per_class=max(1, math.ceil(
            fraction * _largest_class(str(Path(data).resolve()), tc.order, tc.classes))))
    tc = dataclasses.replace(tc, out=str(Path(out) / _key(tc)))
    return tc, {"epochs": tc.epochs, "size": size, "width": tc.width, "classes": tc.classes, "fraction": fraction,
                "max_per_class": tc.max_per_class}


def _key(tc) -> str:
    """What a run computes, as a name: the data's path and the computed configuration, less the length of a
    schedule that does not depend on it (its shorter runs are the first epochs of the longer ones)."""
    from dsimagenet.checkpoint import LENGTH_FREE_SCHEDULES, computed

    what = computed(tc)
    what.pop("report_epoch", None)
    if tc.schedule in LENGTH_FREE_SCHEDULES:
        what.pop("epochs")
    what["data"] = str(Path(tc.data).resolve())
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


class _Reached(Exception):
    """Stops a longer, unfinished run at the epochs asked for (its checkpoint is saved there)."""


def objective(config: dict, fidelity: dict | None = None, *, data: str, out: str, device: str = "auto",
              seed: int = 0, on_epoch=None, quiet: bool = True) -> dict:
    """Train (or reuse, or continue) the run of ``config`` at ``fidelity`` and return ``{"function_value": top-1
    error in percent, "cost": seconds, "info": {...}}``. ``on_epoch(line)`` is called with each metrics line up to
    the fidelity's epochs, those already on disk first; an exception it raises stops the run there (Optuna's
    pruning). See the module docstring."""
    start = time.perf_counter()
    tc, fid = trial_config(config, fidelity, data=str(data), out=str(out), device=device, seed=seed, quiet=quiet)
    with _held(Path(tc.out)):
        return _evaluate(tc, fid, on_epoch, start)


@contextlib.contextmanager
def _held(run: Path):
    """This run's evaluations one at a time: a second call on the same settings (another worker, whose sampler
    proposed them too) waits for the first to end, then reuses or continues its run instead of failing on the
    run's lock. A hidden file in the run's folder: the kernel releases it when the process ends."""
    run.mkdir(parents=True, exist_ok=True)
    fd = os.open(run / ".objective.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _check_same_data(before, data: str) -> None:
    """RunError unless the run was trained on the data at ``data`` as it is now. The run's key names the data's
    path, not its content: data rebuilt in place (another method, another seed) would otherwise be answered from
    the old run's metrics, a number of other data. Training checks this on resume; reuse must too."""
    from dsimagenet import runs
    from dsimagenet.dataset import fingerprint

    was, now = before.config.get("dataset_fingerprint"), fingerprint(data)
    if was != now:
        raise runs.RunError(f"{before.path}: trained on other data than {data} holds now (fingerprint "
                            f"{str(was)[:12]}, now {now[:12]}): the data changed since; remove the run to "
                            "evaluate it again, or give another out")


def _evaluate(tc, fid: dict, on_epoch, start: float) -> dict:
    from dsimagenet import runs
    from dsimagenet.errors import Diverged
    from dsimagenet.train import extend_run, train

    run, epochs = Path(tc.out), tc.epochs
    before = runs.load_run(run) if runs.exists(run) else None
    if before is not None:
        _check_same_data(before, tc.data)
    had = before.train_config.epochs if before is not None else None  # the run's length so far
    told: set[int] = set()

    def report(line: dict) -> None:
        if line["epoch"] <= epochs and line["epoch"] not in told:  # an epoch re-run after a kill: told once
            told.add(line["epoch"])
            if on_epoch is not None:
                on_epoch(line)

    def during(line: dict) -> None:
        report(line)
        if line["epoch"] >= epochs and had is not None and had > epochs:
            raise _Reached  # a longer run, unfinished: trained as far as asked, its checkpoint saved there

    for line in before.metrics if before is not None else []:  # what is on disk first, in order
        report(line)
    have = {m["epoch"] for m in before.metrics} if before is not None else set()
    status, continued, message = "finished", None, None
    reused = epochs in have  # trained before (a lower fidelity of a longer run is its first epochs)
    if not reused and before is not None and before.diverged:
        status = "diverged"  # within its first epochs, which any longer run repeats exactly
        message = (before.result or {}).get("message", f"{run}: diverged before")
    elif not reused:
        try:
            if before is None:
                train(tc, on_epoch=during)
            else:
                if had < epochs:
                    continued = extend_run(run, tc)
                train(dataclasses.replace(tc, epochs=max(had, epochs)), resume=True, on_epoch=during)
        except _Reached:
            pass
        except Diverged as e:
            status, message = "diverged", str(e)
    lines = [m for m in runs.read_metrics(run) if m["epoch"] == epochs] if status == "finished" else []
    if status == "finished" and not lines:
        raise runs.RunError(f"{run / runs.METRICS}: no line for epoch {epochs} after training it: the file was "
                            "changed; remove the run to evaluate it again")
    line = lines[0] if lines else {}
    info = {"run": str(run), "status": status, "message": message, "reused": reused, "continued_from": continued,
            "fidelity": fid, "top5_error": line.get("top5_error"), "val_loss": line.get("val_loss"),
            "train_seconds": line.get("train_seconds"),
            "config": {k: v for k, v in dataclasses.asdict(tc).items() if k not in ("out", "quiet")}}
    return {"function_value": line.get("top1_error", WORST), "cost": time.perf_counter() - start, "info": info}
