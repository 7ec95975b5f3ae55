"""Multi-fidelity search: Optuna's TPE sampler with its Hyperband pruner, epochs as the fidelity.

    dsimagenet tune --data out/{size}_box --out tune/ --trials 50 --max-epochs 40 --sizes 16 32
    dsimagenet tune --data out/16_box --out tune/ --trials 50            # a fixed low resolution as the proxy
    dsimagenet tune ... --storage postgresql://host/db --workers 4       # more workers, any machine
    dsimagenet tune ... --gpus 0,1 --runs-per-gpu 4                      # 8 trials at a time on two GPUs

Dimensions: learning rate (log scale), width, weight decay (log scale) and, with ``--sizes``, the resolution.
Each trial is one call of ``dsimagenet.benchmark.objective``: a training run under ``OUT/trials/<key>/`` (its
path is the trial's user attribute ``run``, and a column of trials.csv) that reports its validation top-1 error
after every epoch; a trial of settings run before is answered from that run. Hyperband stops the unpromising
ones early, and a trial whose loss diverges ends as pruned (never a value). A progress line (trials done of
``--trials``, the best so far) follows the study, from every worker on this machine. The
study lives in its storage (an SQLite file ``OUT/study.db`` by default; any Optuna RDB URL, or ``journal:PATH``
for a journal file on a shared disk), so a tune that is interrupted continues where it stopped, and workers on
other machines join the same study. Trials on CUDA are spread over the machine's GPUs (``--gpus``, default every
visible one; ``--runs-per-gpu``), each worker seeing only its own GPU (see dsimagenet.placement).
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from dsimagenet.errors import ConfigError
from dsimagenet.fields import check, is_int, is_number, option, recipe, text, whole
from dsimagenet.recipe import TrainConfig
from dsimagenet.storage import check_storage_url, open_storage  # noqa: F401 - open_storage is tune's API too

TUNED = ("lr", "width", "weight_decay")  # set by each trial; with data, epochs and out never from --base


_RANGE = (lambda v: isinstance(v, tuple) and len(v) == 2 and all(is_number(x) and x > 0 for x in v) and v[0] <= v[1],
          "a low and a high number > 0")  # a log scale


@dataclass(frozen=True)
class TuneConfig:
    """One study. ``recipe`` fields define what is searched, ``option`` fields how and where the search runs;
    each declares its help and allowed values once (dsimagenet.fields), for the flags; ``validate`` adds the rules
    between fields."""

    out: str = option(check=text(), help="the tune folder (created): trials/, study.db, trials.csv")
    data: str = recipe(check=text(), help="dataset, as for train; with --sizes it holds {size} (e.g. out/{size}_box)")
    trials: int = option(20, check=whole(1),  # in the whole study (all workers, all sessions)
                         help="finished trials the study should hold (all workers together)")
    min_epochs: int = recipe(1, check=whole(1), help="Hyperband's smallest budget in epochs")
    max_epochs: int = recipe(40, check=whole(1), help="epochs of a full trial")
    reduction_factor: int = recipe(3, check=whole(2), help="Hyperband's reduction factor")
    lr: tuple[float, float] = recipe((1e-3, 0.5), check=_RANGE, help="learning rates searched (log scale): low high")
    widths: tuple[float, ...] = recipe(
        (1.0, 2.0), check=(lambda v: len(v) > 0 and all(is_number(w) and w > 0 for w in v), "numbers > 0"),
        help="widths k to choose from")
    weight_decay: tuple[float, float] = recipe((1e-5, 1e-3), check=_RANGE,
                                               help="weight decays searched (log scale): low high")
    sizes: tuple[int, ...] = recipe(  # empty: the data's own
        (), check=(lambda v: all(is_int(s) and s >= 1 for s in v), "integers >= 1"),
        help="resolutions to search (--data needs {size}); default: the data's own")
    storage: str | None = option(
        None, check=text(optional=True),
        help="Optuna storage: an RDB URL (sqlite:///..., postgresql://...) or journal:PATH (default: OUT/study.db)")
    study: str = option("dsimagenet", check=(lambda v: isinstance(v, str) and v != "", "a name"),
                        help="the study's name in the storage")
    workers: int | None = option(None, check=whole(1, optional=True),
                                 help="trials at a time on this machine (default: one a GPU slot, or 1 on the CPU)")
    gpus: str | None = option(None, check=(lambda v: v is None or isinstance(v, (str, tuple, list)),
                                           "GPU indices, comma-separated"),
                              help="GPUs of this machine to spread the workers over, e.g. 0,1,2,3 (default: every "
                                   "visible one)")
    runs_per_gpu: int | None = option(None, check=whole(1, optional=True),
                                      help="trials sharing one GPU (default: one, or --workers spread over the GPUs)")
    quiet: bool = option(False, help="no progress line: only the outcome (the best trial) and errors")
    seed: int = recipe(0, check=whole(0), help="seed of the sampler")
    base: dict = recipe(default_factory=dict, check=(lambda v: isinstance(v, dict), "a mapping of train settings"),
                        help="other TrainConfig fields of every trial (depth, device, batch_size, ...)")

    def __post_init__(self):
        for name in ("lr", "widths", "weight_decay", "sizes"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        validate(self)
        check(self)  # what validate leaves to the declarations (the type of --storage, --study, --base)


def _positive(v) -> bool:
    return is_number(v) and v > 0


def validate(c: TuneConfig) -> None:
    """Every field of a TuneConfig, in one place, before anything is created: ConfigError naming the flag and
    the allowed values. The trials' own settings (``base``, and each end of every range) are checked by
    TrainConfig's rules through one probe configuration per end."""
    for name in ("out", "data", "study"):
        if not isinstance(getattr(c, name), str) or not getattr(c, name):
            raise ConfigError(f"--{name} must not be empty")
    for name, lo in (("trials", 1), ("min_epochs", 1), ("max_epochs", 1), ("reduction_factor", 2),
                     ("seed", 0)):
        v = getattr(c, name)
        if not is_int(v) or v < lo:
            raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= {lo}, not {v!r}")
    if c.min_epochs > c.max_epochs:
        raise ConfigError(f"--min-epochs {c.min_epochs} must be at most --max-epochs {c.max_epochs}")
    for name in ("lr", "weight_decay"):
        v, flag = getattr(c, name), f"--{name.replace('_', '-')}"
        if not isinstance(v, tuple) or len(v) != 2:
            raise ConfigError(f"{flag} takes two numbers, the low and the high end, not {v!r}")
        if not all(_positive(x) for x in v):  # searched on a log scale
            raise ConfigError(f"{flag} ends must be finite numbers > 0 (a log scale), not {v[0]!r} and {v[1]!r}")
        if v[0] > v[1]:
            raise ConfigError(f"{flag}: the low end {v[0]:g} is above the high end {v[1]:g}")
    if not c.widths or not all(_positive(w) for w in c.widths) or len(set(c.widths)) != len(c.widths):
        raise ConfigError(f"--widths must be one or more different numbers > 0, not {c.widths!r}")
    if not all(is_int(s) and s >= 1 for s in c.sizes) or len(set(c.sizes)) != len(c.sizes):
        raise ConfigError(f"--sizes must be different integers >= 1, not {c.sizes!r}")
    if c.sizes and "{size}" not in c.data:
        raise ConfigError("--sizes needs --data with {size} in it (e.g. out/{size}_box)")
    if not c.sizes and "{size}" in c.data:
        raise ConfigError(f"--data {c.data} holds {{size}}: give the sizes to search with --sizes")
    if c.storage is not None:
        check_storage_url(c.storage)
    from dsimagenet.placement import check_count, parse_gpus

    check_count(c.workers, "--workers")
    check_count(c.runs_per_gpu, "--runs-per-gpu")
    parse_gpus(c.gpus)
    if not isinstance(c.base, dict):
        raise ConfigError(f"base must be a mapping of TrainConfig fields, not {type(c.base).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(c.base) - known)
    if unknown:
        raise ConfigError(f"unknown trial settings {unknown}: use TrainConfig fields")
    owned = sorted(set(c.base) & {*TUNED, "data", "epochs", "out"})
    if owned:
        raise ConfigError(f"{owned}: chosen by the search (--lr, --widths, --weight-decay, --data, --max-epochs, "
                          "--out), not a fixed trial setting")
    for lr, width, wd, size in ((c.lr[0], c.widths[0], c.weight_decay[0], (c.sizes or (None,))[0]),
                                (c.lr[1], max(c.widths), c.weight_decay[1], (c.sizes or (None,))[-1])):
        _config(c, {"lr": lr, "width": width, "weight_decay": wd}, size)


def storage_url(c: TuneConfig) -> str:
    return c.storage or f"sqlite:///{Path(c.out).resolve() / 'study.db'}"


def _storage(c: TuneConfig):
    return open_storage(storage_url(c))


def _study(c: TuneConfig):
    import optuna

    # before the study is made or loaded: Optuna logs both at INFO to stderr ("A new study created ..."), in the
    # main process and in each worker, which --quiet must silence and our progress bar replaces
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(c) if c.storage else None  # one that cannot be opened fails before --out is made
    Path(c.out).mkdir(parents=True, exist_ok=True)
    return optuna.create_study(
        study_name=c.study, storage=storage or _storage(c), load_if_exists=True, direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=c.seed),
        pruner=optuna.pruners.HyperbandPruner(min_resource=c.min_epochs, max_resource=c.max_epochs,
                                              reduction_factor=c.reduction_factor))


def milestones(epochs: int) -> tuple[int, ...]:
    """The paper's schedule stretched to ``epochs``: x0.2 after 1/4, 1/2 and 3/4 of them. A milestone that falls
    on epoch 0 or on another one is left out: it would lower the learning rate from the start, or twice at
    once, and the trial's lr would not be the one it trains with."""
    return tuple(sorted({m for m in (epochs // 4, epochs // 2, 3 * epochs // 4) if m >= 1}))


def _config(c: TuneConfig, params: dict, size: int | None) -> TrainConfig:
    """The TrainConfig of a trial: ``benchmark.trial_config`` of the searched ``params`` over --base, at the
    fidelity of --max-epochs (and ``size``); its folder under OUT/trials/ is named by what it computes."""
    from dsimagenet.benchmark import trial_config as resolve

    try:
        return resolve(*_call(c, params, size), data=c.data, out=str(Path(c.out) / "trials"), **_where(c))[0]
    except ConfigError as e:
        raise ConfigError(f"tune trials: {e}") from None


def _call(c: TuneConfig, params: dict, size: int | None) -> tuple[dict, dict]:
    """(config, fidelity) of the objective for a trial: --base's settings and the searched ones; the epochs,
    and the size (searched, or --base's --size), --base's --classes as fidelities."""
    base = {"milestones": milestones(c.max_epochs), **c.base}
    fidelity = {"epochs": c.max_epochs}
    for name in ("size", "classes"):
        if base.get(name) is not None:
            fidelity[name] = base[name]
        base.pop(name, None)
    if size is not None:
        fidelity["size"] = size
    base = {k: v for k, v in base.items() if k not in ("seed", "device")}
    return {**base, **params}, fidelity


def _where(c: TuneConfig) -> dict:
    return {"device": c.base.get("device", "auto"), "seed": c.base.get("seed", 0)}


def _params(c: TuneConfig, trial) -> tuple[dict, int | None]:
    params = {"lr": trial.suggest_float("lr", *c.lr, log=True),
              "width": trial.suggest_categorical("width", list(c.widths)),
              "weight_decay": trial.suggest_float("weight_decay", *c.weight_decay, log=True)}
    return params, trial.suggest_categorical("size", list(c.sizes)) if c.sizes else None


def trial_config(c: TuneConfig, trial) -> TrainConfig:
    """The TrainConfig the trial trains (the objective's, for the parameters the trial suggests)."""
    return _config(c, *_params(c, trial))


def _diverged(trial, message: str):
    """A diverged trial ends as PRUNED, not FAIL, and never with a value (its "error" would be noise at best).
    TPE learns from pruned trials: it ranks them below every complete one (by how far they got), so it learns
    that this region of learning rates is bad; FAIL trials it ignores, and it would go on proposing learning
    rates that diverge. The message is kept as the trial's user attribute ``diverged``."""
    import optuna

    trial.set_user_attr("diverged", message)
    return optuna.TrialPruned(f"diverged: {message}")


def _objective(c: TuneConfig):
    """A trial: ``benchmark.objective`` of the suggested parameters at --max-epochs, reporting each epoch's
    top-1 error to the pruner (which may stop it there)."""
    import optuna

    from dsimagenet import benchmark

    def objective(trial) -> float:
        params, size = _params(c, trial)
        config, fidelity = _call(c, params, size)
        trial.set_user_attr("run", _config(c, params, size).out)

        def report(line: dict) -> None:
            trial.report(line["top1_error"], line["epoch"])
            if line["epoch"] < c.max_epochs and trial.should_prune():  # a finished run is a result, not pruned
                raise optuna.TrialPruned(f"pruned after epoch {line['epoch']}")

        r = benchmark.objective(config, fidelity, data=c.data, out=str(Path(c.out) / "trials"), on_epoch=report,
                                **_where(c))
        if r["info"]["status"] == "diverged":
            raise _diverged(trial, r["info"]["message"])
        return r["function_value"]

    return objective


def _work(c: TuneConfig, after_trial=None) -> None:
    import optuna

    study = _study(c)
    done = lambda: sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))  # noqa: E731
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    objective = _objective(c)
    while done() < c.trials:
        study.optimize(objective, n_trials=1, catch=())
        if after_trial is not None:
            after_trial()


class _Progress:
    """The study's progress as one bar (dsimagenet.progress): finished trials of --trials, and the best so far;
    ``refresh`` reads them from the storage, so it counts every worker's trials."""

    def __init__(self, c: TuneConfig, study):
        from dsimagenet.progress import bar

        self.study = study
        self.bar = bar(c.trials, "tune", unit="trial", quiet=c.quiet, initial=min(self._done()[0], c.trials))

    def _done(self) -> tuple[int, object]:
        trials = self.study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None]
        return sum(t.state.is_finished() for t in trials), min(complete, key=lambda t: t.value, default=None)

    def refresh(self) -> None:
        n, best = self._done()
        if best is not None:
            self.bar.set_postfix_str(f"best {best.value:.2f}% (trial {best.number})")
        if n > self.bar.n:
            self.bar.update(min(n, self.bar.total) - self.bar.n)

    def wait(self, futures: list, every: float = 5.0) -> None:
        """Refresh while the workers run; their first error is raised (the others are still waited for)."""
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=every)
            self.refresh()
        for f in futures:
            f.result()

    def close(self) -> None:
        self.refresh()
        self.bar.close()


def tune(c: TuneConfig) -> dict:
    """Run the study until it holds ``c.trials`` finished trials; returns the best, writes trials.csv."""
    from dsimagenet.formats.atomic import atomic_write
    from dsimagenet.placement import pool, resolve

    placement = resolve(c.gpus, c.runs_per_gpu, c.workers, c.base.get("device", "auto"), "--workers")
    study = _study(c)  # create it once before workers race to
    progress = _Progress(c, study)
    if placement.workers == 1 and not placement.pinned:
        _work(c, progress.refresh)
    else:  # each worker its own process, pinned to its GPU
        with pool(placement) as workers:
            progress.wait([workers.submit(_work, c) for _ in range(placement.workers)])
    progress.close()
    trials = study.get_trials(deepcopy=False)
    with atomic_write(Path(c.out) / "trials.csv", "w") as f:
        names = sorted({k for t in trials for k in t.params})
        w = csv.writer(f)
        w.writerow(["number", "state", "top1_error", "epochs_run", *names, "diverged", "run"])
        for t in trials:
            w.writerow([t.number, t.state.name, t.value if t.value is not None else "",
                        max(t.intermediate_values, default=0), *(t.params.get(n, "") for n in names),
                        t.user_attrs.get("diverged", ""), t.user_attrs.get("run", "")])
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = min(complete, key=lambda t: t.value) if complete else None
    diverged = [t for t in trials if "diverged" in t.user_attrs]
    summary = {"trials": len(trials), "complete": len(complete),
               "pruned": sum(t.state.name == "PRUNED" and "diverged" not in t.user_attrs for t in trials),
               "diverged": len(diverged),
               "best": {"number": best.number, "top1_error": best.value, "params": best.params} if best else None,
               "storage": storage_url(c), "study": c.study}
    with atomic_write(Path(c.out) / "best.json", "w") as f:
        json.dump(summary, f, indent=1)
    return summary
