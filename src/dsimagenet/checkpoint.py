"""A run's checkpoint and the checks that a run or a checkpoint is this one: save, load, resume, extend.

    save_checkpoint(run / runs.CHECKPOINT, state)            # atomically; the previous one kept if it fails
    state = load_checkpoint(path, model, opt, config, fingerprint, steps, device)   # checked, then loaded
    check_resume(run, config, fingerprint)                   # RunError unless config.json is this run's
    extend_run(run, config)                                  # a step or sgdr run made config.epochs long

A checkpoint (``torch.save`` of a dict, read back with ``weights_only``) holds the weights, the optimizer, the
place (epoch, step), the running sums, the time and images so far, the RNGs, the data's fingerprint and the
``computed`` configuration. ``load_checkpoint`` loads it only once it is known to be this run's: its data, its
configuration (up to what does not change the weights so far), tensors that fit the model, finite values, a place
within the run; anything else is a ``RunError`` that says to remove it. ``train.py`` builds the state and calls
these; nothing here knows of the training loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from dsimagenet import runs
from dsimagenet.errors import ConfigError, Diverged
from dsimagenet.formats.atomic import atomic_write
from dsimagenet.model import WideResNet
from dsimagenet.recipe import OPERATIONAL, TrainConfig, stored_defaults
from dsimagenet.runs import RunError

__all__ = ["LENGTH_FREE_SCHEDULES", "computed", "check_resume", "extend_run", "save_checkpoint", "load_checkpoint",
           "non_finite"]

# Schedules whose learning rate at an epoch does not depend on --epochs: a run of them is the first epochs of any
# longer one, so it can be extended (``extend_run``) and its checkpoint resumed into the longer run.
LENGTH_FREE_SCHEDULES = ("step", "sgdr")


def computed(c: TrainConfig) -> dict:
    """The fields that decide what a run computes, as JSON values (what config.json and checkpoints store)."""
    return {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(c))).items() if k not in OPERATIONAL}


def _differences(was: dict, now: dict, skip: set[str] | frozenset[str] = frozenset()) -> list[str]:
    # ``was`` is stored (config.json, a checkpoint): a field it lacks is newer than the run, which ran as its old
    # default does (stored_defaults)
    was = {**{k: v for k, v in stored_defaults().items() if k in now}, **was}
    return sorted(k for k in set(was) | set(now) if k not in skip and was.get(k) != now.get(k))


def _weights_depend_on(config: dict) -> dict:
    """Of ``computed``, what decides the weights up to a checkpoint: the total of epochs only for a schedule
    that depends on it (not ``LENGTH_FREE_SCHEDULES``: their runs are the same up to any epoch, whatever the
    total; the checkpoint's epoch is checked against --epochs on its own); the reported epoch never."""
    skip = {"report_epoch"} | ({"epochs"} if config.get("schedule") in LENGTH_FREE_SCHEDULES else set())
    return {k: v for k, v in config.items() if k not in skip}


def check_resume(run: Path, config: TrainConfig, fingerprint: str) -> None:
    """RunError unless the run at ``run`` (its config.json) was made on the data of ``fingerprint`` with
    ``config``, up to the fields that do not change what is computed (``recipe.OPERATIONAL``)."""
    old = runs.read_json(run / runs.CONFIG)
    if old.get("dataset_fingerprint") != fingerprint:
        raise RunError(f"{run}: refusing to resume on different data: the run was trained on "
                       f"{old.get('config', {}).get('data')} (fingerprint {str(old.get('dataset_fingerprint'))[:12]}"
                       f"), --data {config.data} is {fingerprint[:12]}")
    new, was = computed(config), old.get("config", {})
    diff = _differences(was, new, OPERATIONAL)
    if diff:
        raise RunError(f"{run}: refusing to resume with a different configuration: " +
                       ", ".join(f"{k} was {was.get(k)!r}, now {new.get(k)!r}" for k in diff))


def extend_run(run: Path, config: TrainConfig) -> int:
    """Make the run at ``run`` a run of ``config.epochs`` epochs, to be trained on with ``train(config,
    resume=True)``; returns the epochs it had. Only for ``LENGTH_FREE_SCHEDULES``: its epochs so far are then
    exactly the first epochs of the longer run, and its checkpoint resumes into it as it is. config.json must
    otherwise match ``config`` (the caller checks the data: ``check_resume`` with the old epochs). Held
    throughout (no ``train --resume`` of it meanwhile); result.json goes first and config.json last: a kill in
    between leaves an unfinished run of the old length, which the same call extends again."""
    run = Path(run)
    if config.schedule not in LENGTH_FREE_SCHEDULES:
        raise ConfigError(f"--schedule {config.schedule}: its learning rate depends on --epochs, so a run of it "
                          f"cannot be extended to more epochs (only a {' or '.join(LENGTH_FREE_SCHEDULES)} schedule)")
    with runs.hold(run):
        stored = runs.read_json(run / runs.CONFIG)
        was = stored.get("config")
        old = was.get("epochs") if isinstance(was, dict) else None
        if type(old) is not int:
            raise RunError(f"{run / runs.CONFIG}: holds no configuration with its epochs")
        now = computed(config)
        diff = _differences(was, now, OPERATIONAL | {"epochs"})
        if diff:
            raise RunError(f"{run}: cannot be extended with a different configuration: " +
                           ", ".join(f"{k} was {was.get(k)!r}, now {now.get(k)!r}" for k in diff))
        if config.epochs < old:
            raise ConfigError(f"--epochs {config.epochs}: the run {run} has {old} epochs; a run is extended, never "
                              "shortened")
        result = run / runs.RESULT
        if result.exists() and runs.read_json(result).get("status") == "diverged":
            raise Diverged(f"{run}: this run diverged in its first {old} epochs: it cannot be extended")
        result.unlink(missing_ok=True)
        was["epochs"] = config.epochs
        stored.setdefault("continued", []).append({"from_epochs": old, "to_epochs": config.epochs})
        runs.write_json(run / runs.CONFIG, stored)
    return old


def save_checkpoint(path: Path, state: dict) -> None:
    with runs.naming(path, "; the previous checkpoint is kept"), atomic_write(path) as f:
        torch.save(state, f)


def non_finite(named: dict) -> str | None:
    """The name of the first floating tensor in ``named`` holding a NaN or an infinity, or None."""
    floats = [(k, t) for k, t in named.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not floats:
        return None
    ok = torch.stack([torch.isfinite(t).all() for _, t in floats]).tolist()  # one host synchronisation
    return next((k for (k, _), good in zip(floats, ok, strict=True) if not good), None)


def load_checkpoint(path: Path, model: WideResNet, opt: torch.optim.Optimizer, c: TrainConfig, fingerprint: str,
                     steps: int, dev: torch.device) -> dict:
    """The checkpoint's state, loaded into ``model`` and ``opt`` and the RNGs once it is known to be this run's:
    its data, its configuration, tensors that fit the model, finite values, a place within the run."""
    fix = "; remove it to restart the run from the beginning"
    runs.check_regular(path)
    try:  # weights_only: tensors and plain values only, never code from the file
        state = torch.load(path, map_location=dev, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for damaged or unsafe files
        raise RunError(f"{path}: unreadable checkpoint ({type(e).__name__}: "
                       f"{(str(e).splitlines() or [''])[0][:200]}){fix}") from None
    need = ("model", "optimizer", "epoch", "step", "acc", "train_seconds", "images_seen", "rng_cpu")
    missing = [k for k in need if k not in state] if isinstance(state, dict) else list(need)
    if missing or not isinstance(state["model"], dict) or not isinstance(state["optimizer"], dict):
        raise RunError(f"{path}: not a checkpoint of this trainer (no {', '.join(missing) or 'model tensors'}){fix}")
    if state.get("fingerprint") != fingerprint:
        raise RunError(f"{path}: belongs to a run on other data (dataset fingerprint "
                       f"{str(state.get('fingerprint'))[:12]}; this run's --data {c.data} is {fingerprint[:12]}){fix}")
    if isinstance(state.get("config"), str):  # checkpoints before it was stored are checked by their tensors
        theirs, ours = _weights_depend_on(json.loads(state["config"])), _weights_depend_on(computed(c))
        diff = _differences(theirs, ours)
        if diff:
            raise RunError(f"{path}: belongs to another run: " + ", ".join(
                f"{k} is {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in diff) + fix)
    ours, theirs = model.state_dict(), state["model"]
    problems = ([f"{k} is missing" for k in ours if k not in theirs]
                + [f"{k} is not in this model" for k in theirs if k not in ours]
                + [f"{k} is {tuple(getattr(theirs[k], 'shape', ()))} there, {tuple(ours[k].shape)} here"
                   for k in ours if k in theirs and getattr(theirs[k], "shape", None) != ours[k].shape])
    if problems:
        raise RunError(f"{path}: does not fit this run's model (WRN-{model.depth}-{model.width:g}, "
                       f"{model.num_classes} classes, {model.image_size} px): {'; '.join(problems[:3])}"
                       f"{'; ...' if len(problems) > 3 else ''}{fix}")
    buffers = {f"optimizer state {i} {k}": t for i, s in state["optimizer"].get("state", {}).items()
               if isinstance(s, dict) for k, t in s.items()}
    bad = non_finite({**theirs, **buffers})
    if bad:
        raise RunError(f"{path}: {bad} holds NaN or infinite values: the run that saved it had diverged{fix}")
    epoch, step, acc = state["epoch"], state["step"], state["acc"]
    if not (type(epoch) is int and type(step) is int and 0 <= epoch <= c.epochs and 0 <= step < steps
            and (epoch < c.epochs or step == 0)):
        raise RunError(f"{path}: at epoch {epoch!r} step {step!r}, outside this run ({c.epochs} epochs of "
                       f"{steps} steps){fix}")
    if not (isinstance(acc, list) and len(acc) == 3 and all(isinstance(v, float) and math.isfinite(v) for v in acc)):
        raise RunError(f"{path}: its running sums {acc!r} are not three finite numbers{fix}")
    try:
        model.load_state_dict(theirs)
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if dev.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu())
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise RunError(f"{path}: cannot be loaded into this run ({type(e).__name__}: "
                       f"{(str(e).splitlines() or [''])[0][:200]}){fix}") from None
    return state
