"""Multi-fidelity search: Optuna's TPE sampler with its Hyperband pruner, epochs as the fidelity.

    dsimagenet tune --data out/{size}_box --out tune/ --trials 50 --max-epochs 40 --sizes 16 32
    dsimagenet tune --data out/16_box --out tune/ --trials 50            # a fixed low resolution as the proxy
    dsimagenet tune ... --storage postgresql://host/db --workers 4       # more workers, any machine

Dimensions: learning rate (log scale), width, weight decay (log scale) and, with ``--sizes``, the resolution.
Each trial is a training run under ``OUT/trials/`` that reports its validation top-1 error after every epoch;
Hyperband stops the unpromising ones early. The study lives in its storage (an SQLite file ``OUT/study.db`` by
default; any Optuna RDB URL, or ``journal:PATH`` for a journal file on a shared disk), so a tune that is
interrupted continues where it stopped, and workers on other machines join the same study.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import json
import multiprocessing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from dsimagenet.recipe import TrainConfig


@dataclass(frozen=True)
class TuneConfig:
    out: str
    data: str  # may hold {size}
    trials: int = 20  # in the whole study (all workers, all sessions)
    min_epochs: int = 1  # Hyperband's minimum resource
    max_epochs: int = 40
    reduction_factor: int = 3
    lr: tuple[float, float] = (1e-3, 0.5)
    widths: tuple[float, ...] = (1.0, 2.0)
    weight_decay: tuple[float, float] = (1e-5, 1e-3)
    sizes: tuple[int, ...] = ()  # resolution as a dimension; empty: the data's own
    storage: str | None = None
    study: str = "dsimagenet"
    workers: int = 1
    seed: int = 0
    base: dict = field(default_factory=dict)  # other TrainConfig fields (depth, device, batch_size, ...)

    def __post_init__(self):
        if self.sizes and "{size}" not in self.data:
            raise ValueError("--sizes needs --data with {size} in it (e.g. out/{size}_box)")
        if not 1 <= self.min_epochs <= self.max_epochs:
            raise ValueError("need 1 <= --min-epochs <= --max-epochs")


def storage_url(c: TuneConfig) -> str:
    return c.storage or f"sqlite:///{Path(c.out).resolve() / 'study.db'}"


def _storage(c: TuneConfig):
    return open_storage(storage_url(c))


def open_storage(url: str):
    """An Optuna storage from a URL: any RDB URL, or ``journal:PATH`` for a journal file on a shared disk."""
    import optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:"):]))
    # a trial whose worker was killed stops beating and is run again (Optuna calls heartbeats experimental)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)} \
            if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback") else \
            {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=3)}
        return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=90, **retry)


def _study(c: TuneConfig):
    import optuna

    Path(c.out).mkdir(parents=True, exist_ok=True)
    return optuna.create_study(
        study_name=c.study, storage=_storage(c), load_if_exists=True, direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=c.seed),
        pruner=optuna.pruners.HyperbandPruner(min_resource=c.min_epochs, max_resource=c.max_epochs,
                                              reduction_factor=c.reduction_factor))


def trial_config(c: TuneConfig, trial) -> TrainConfig:
    params = {"lr": trial.suggest_float("lr", *c.lr, log=True),
              "width": trial.suggest_categorical("width", list(c.widths)),
              "weight_decay": trial.suggest_float("weight_decay", *c.weight_decay, log=True)}
    data = c.data
    if c.sizes:
        size = trial.suggest_categorical("size", list(c.sizes))
        data = data.format(size=size)
    e = c.max_epochs  # the paper's schedule, stretched to the trial's length: x0.2 after 1/4, 1/2, 3/4
    base = {"milestones": (e // 4, e // 2, 3 * e // 4), "quiet": True, **c.base}
    return TrainConfig(**{**base, **params, "data": data, "epochs": e,
                          "out": str(Path(c.out) / "trials" / f"trial_{trial.number:04d}")})


def _objective(c: TuneConfig):
    import optuna

    from dsimagenet.train import train

    def objective(trial) -> float:
        tc = trial_config(c, trial)
        out = Path(tc.out)

        def report(line: dict) -> None:
            trial.report(line["top1_error"], line["epoch"])
            if line["epoch"] < tc.epochs and trial.should_prune():  # a finished run is a result, not pruned
                raise optuna.TrialPruned(f"pruned after epoch {line['epoch']}")

        # a trial run again after its worker died continues from its checkpoint
        result = train(tc, resume=(out / "config.json").exists(), on_epoch=report)
        return result["top1_error"]

    return objective


def _work(c: TuneConfig) -> None:
    import optuna

    study = _study(c)
    done = lambda: sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))  # noqa: E731
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    objective = _objective(c)
    while done() < c.trials:
        study.optimize(objective, n_trials=1, catch=())


def tune(c: TuneConfig) -> dict:
    """Run the study until it holds ``c.trials`` finished trials; returns the best, writes trials.csv."""
    study = _study(c)  # create it once before workers race to
    if c.workers == 1:
        _work(c)
    else:
        with cf.ProcessPoolExecutor(c.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for f in [pool.submit(_work, c) for _ in range(c.workers)]:
                f.result()
    trials = study.get_trials(deepcopy=False)
    with open(Path(c.out) / "trials.csv", "w", newline="") as f:
        names = sorted({k for t in trials for k in t.params})
        w = csv.writer(f)
        w.writerow(["number", "state", "top1_error", "epochs_run", *names])
        for t in trials:
            w.writerow([t.number, t.state.name, t.value if t.value is not None else "",
                        max(t.intermediate_values, default=0), *(t.params.get(n, "") for n in names)])
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = min(complete, key=lambda t: t.value) if complete else None
    summary = {"trials": len(trials), "complete": len(complete),
               "pruned": sum(t.state.name == "PRUNED" for t in trials),
               "best": {"number": best.number, "top1_error": best.value, "params": best.params} if best else None,
               "storage": storage_url(c), "study": c.study}
    (Path(c.out) / "best.json").write_text(json.dumps(summary, indent=1))
    return summary
