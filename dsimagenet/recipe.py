"""The training recipe as data: ``TrainConfig`` (the paper's defaults) and the learning rate as a pure function.

Kept free of torch so that the command line and the sweep can read it without importing torch; ``train.py``
runs it. Every field is checked in one place, ``validate`` (run by the dataclass itself, so no TrainConfig with
a value out of range exists): the error names the field as its flag and the allowed values. What needs the data
or the machine (the device, the number of images per process) is checked by ``train.check_environment``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass

from dsimagenet.errors import ConfigError

SCHEDULES = ("step", "cosine", "sgdr")
AUGMENTS = ("paper", "flip", "none")
NORMALIZE = ("mean", "meanstd")
ORDERS = ("devkit", "sorted")
DEVICES = ("auto", "cpu", "cuda")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64 bits, numpy any non-negative integer
# counts (epochs, batches, steps, pixels) go through numpy's and torch's int64 arithmetic (step * batch_size):
# 2**31 - 1 keeps every product of two of them in range, and is beyond any real run
MAX_COUNT = 2**31 - 1
LARGEST = 1e38  # the learning rate and the decay are float32 scalars inside the optimizer (at most 3.4e38)
MAX_WIDTH = 2.0**16  # 1M filters in the first stack; the model's memory is checked against the machine's
# Fields that may change when a run is resumed: they do not change what is computed.
OPERATIONAL = {"out", "data", "log_every", "checkpoint_minutes", "checkpoint_every_steps", "compile", "compile_mode",
               "quiet",
               "eval_batch_size"}


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str
    size: int | None = None  # default: the data's; must match it
    depth: int | None = None  # default: 20 / 28 / 36 for 16 / 32 / 64 px
    width: float = 1.0
    dropout: float = 0.0
    epochs: int = 40
    lr: float = 0.01
    schedule: str = "step"  # "step" (the paper), "cosine", or "sgdr" (warm restarts)
    milestones: tuple[int, ...] = (10, 20, 30)
    gamma: float = 0.2
    sgdr_t0: int = 10
    sgdr_mult: int = 2
    batch_size: int = 128
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4  # the paper's coefficient of sum(w^2): a gradient of 2 * 5e-4 * w
    label_smoothing: float = 0.0
    augment: str = "paper"  # "paper": every image and its mirror; "flip": random mirror; "none"
    normalize: str = "mean"
    classes: int | None = None  # the first N devkit classes (NAS-Bench-201's ImageNet16-120: 120)
    max_per_class: int | None = None
    order: str = "devkit"
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda"
    bf16: bool = True  # CUDA only: bf16 autocast
    channels_last: bool = True  # CUDA only
    compile: bool = False
    compile_mode: str = "default"  # or "reduce-overhead" (CUDA graphs: for small models), "max-autotune"
    log_every: int = 100
    checkpoint_minutes: float = 10.0
    checkpoint_every_steps: int | None = None
    eval_batch_size: int = 1000
    report_epoch: int = 31  # the paper reports errors after epoch 31; a later one than --epochs is left out
    quiet: bool = False

    def __post_init__(self):
        for name in ("data", "out"):  # a pathlib.Path is welcome; config.json stores the string
            if isinstance(getattr(self, name), os.PathLike):
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        if isinstance(self.milestones, (list, tuple)):
            object.__setattr__(self, "milestones", tuple(self.milestones))
        validate(self)


# --- the allowed values of every field ----------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int(lo: int, hi: int | None = None, optional: bool = False) -> tuple[Callable, str]:
    """Without ``hi``, a count: at most MAX_COUNT, which ``validate`` says only to a value above it."""
    text = f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}"
    return (lambda v: (optional and v is None) or (_is_int(v) and lo <= v <= (MAX_COUNT if hi is None else hi)),
            text + (" (or left out)" if optional else ""))


def _number(lo: float, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> tuple[Callable, str]:
    def ok(v) -> bool:
        return (_is_number(v) and (v > lo if lo_open else v >= lo)
                and (hi is None or (v < hi if hi_open else v <= hi)))

    low = f"> {lo:.9g}" if lo_open else f">= {lo:.9g}"
    if hi is None:
        return ok, f"a finite number {low}"
    return ok, f"a number in {'(' if lo_open else '['}{lo:.9g}, {hi:.9g}{')' if hi_open else ']'}"


def _one_of(choices: tuple) -> tuple[Callable, str]:
    return (lambda v: isinstance(v, str) and v in choices), "one of " + ", ".join(choices)


def _text() -> tuple[Callable, str]:
    return (lambda v: isinstance(v, str) and v != ""), "a path"


def _flag() -> tuple[Callable, str]:
    return (lambda v: isinstance(v, bool)), "true or false"


def _epochs_list() -> tuple[Callable, str]:
    # increasing: "5 3" or "3 3" is a typo more likely than a wish (the schedule would not tell them apart)
    return (lambda v: isinstance(v, tuple) and all(_is_int(m) and 1 <= m <= MAX_COUNT for m in v)
            and list(v) == sorted(set(v))), f"increasing epochs, each in 1..{MAX_COUNT}"


# field -> (accepts the value, the allowed values in words); a test checks that every field has its rule
RULES: dict[str, tuple[Callable, str]] = {
    "data": _text(),
    "out": _text(),
    "size": _int(1, optional=True),
    "depth": _int(6, optional=True),
    "width": _number(1 / 16, MAX_WIDTH),  # the first stack has round(16 * width) filters
    "dropout": _number(0, 1, hi_open=True),
    "epochs": _int(1),
    "lr": _number(0, LARGEST, lo_open=True),
    "schedule": _one_of(SCHEDULES),
    "milestones": _epochs_list(),
    "gamma": _number(0, LARGEST, lo_open=True),
    "sgdr_t0": _int(1),
    "sgdr_mult": _int(1),
    "batch_size": _int(1),
    "momentum": _number(0, 1, hi_open=True),
    "nesterov": _flag(),
    "weight_decay": _number(0, LARGEST),  # the optimizer's decay is 2 * weight_decay
    "label_smoothing": _number(0, 1),
    "augment": _one_of(AUGMENTS),
    "normalize": _one_of(NORMALIZE),
    "classes": _int(1, 1000, optional=True),
    "max_per_class": _int(1, optional=True),
    "order": _one_of(ORDERS),
    "seed": _int(0, MAX_SEED),
    "device": _one_of(DEVICES),
    "bf16": _flag(),
    "channels_last": _flag(),
    "compile": _flag(),
    "compile_mode": _one_of(COMPILE_MODES),
    "log_every": _int(1),
    "checkpoint_minutes": _number(0, 1e9),
    "checkpoint_every_steps": _int(1, optional=True),
    "eval_batch_size": _int(1),
    "report_epoch": _int(1),
    "quiet": _flag(),
}


def flag(name: str) -> str:
    """The command-line flag of a field: ``sgdr_t0`` -> ``--sgdr-t0``."""
    return "--" + name.replace("_", "-")


def validate(c: TrainConfig) -> None:
    """Raise ConfigError, naming the flag and the allowed values, for the first field out of range."""
    for f in dataclasses.fields(c):
        ok, allowed = RULES[f.name]
        value = getattr(c, f.name)
        if not ok(value):
            if _is_int(value) and value > MAX_COUNT and allowed.startswith("an integer >="):
                allowed = allowed.replace(" (or left out)", "") + f" and at most {MAX_COUNT}"
            raise ConfigError(f"{flag(f.name)} must be {allowed}, not {value!r}")
    if c.depth is not None and (c.depth - 4) % 2:
        raise ConfigError(f"--depth must be 4 + 2 * n * stacks (an even number >= 6), not {c.depth}")
    if c.nesterov and c.momentum == 0:
        raise ConfigError("--nesterov needs a --momentum above 0")
    if c.schedule == "step" and c.milestones and math.log(c.lr) + len(c.milestones) * max(0.0, math.log(c.gamma)) \
            > math.log(LARGEST):  # in logs: gamma ** k itself can overflow a float
        raise ConfigError(f"--lr {c.lr:g} times --gamma {c.gamma:g} after each of the {len(c.milestones)} "
                          f"--milestones exceeds {LARGEST:g}: the optimizer holds it as a float32")


def learning_rate(c: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The learning rate at ``step`` of ``epoch`` (both 0-based): a pure function."""
    if c.schedule == "step":  # constant within an epoch, times gamma after each milestone epoch
        return c.lr * c.gamma ** sum(epoch >= m for m in c.milestones)
    t = epoch + step / steps_per_epoch
    if c.schedule == "cosine":
        return c.lr * 0.5 * (1 + math.cos(math.pi * t / c.epochs))
    if not (_is_int(c.sgdr_t0) and c.sgdr_t0 >= 1 and _is_int(c.sgdr_mult) and c.sgdr_mult >= 1):
        # periods that shrink (or are empty) never reach t: the loop below would not end
        raise ConfigError(f"--sgdr-t0 and --sgdr-mult must be integers >= 1, not {c.sgdr_t0!r} and {c.sgdr_mult!r}")
    start, period = 0.0, float(c.sgdr_t0)  # SGDR: cosine within periods t0, t0*mult, ..., each >= 1 epoch
    while t >= start + period:  # so at most t + 1 turns
        start, period = start + period, period * c.sgdr_mult
    return c.lr * 0.5 * (1 + math.cos(math.pi * (t - start) / period))


def field_types(cls) -> dict[str, type]:
    """The type of each field of a config dataclass, ``X | None`` unwrapped to ``X`` (``tuple[int, ...]`` kept):
    what a command-line flag or a sweep value is parsed as."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        out[name] = hint
    return {f.name: out[f.name] for f in dataclasses.fields(cls)}
