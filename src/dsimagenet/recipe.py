"""The training recipe as data: ``TrainConfig`` (the paper's defaults) and the learning rate as a pure function.

Kept free of torch so that the command line and the sweep can read it without importing torch; ``train.py``
runs it. Every field is declared once (see dsimagenet.fields): its type (``Literal`` for a choice), help text,
allowed values, and whether it is part of the recipe (compared on resume) or a run option; the CLI's flags and
the checks come from there. ``validate`` (run by the dataclass itself, so no TrainConfig with a value out of range
exists) names the field as its flag and the allowed values. What needs the data or the machine (the device, the
number of images per process) is checked by ``train.check_environment``.
"""

from __future__ import annotations

import math
import os
import typing
from dataclasses import dataclass
from typing import Literal

from dsimagenet.errors import ConfigError
from dsimagenet.fields import (
    MAX_COUNT,
    check,
    field_types,
    flag,
    integer,
    is_int,
    number,
    operational,
    option,
    recipe,
    rules,
    text,
)

__all__ = ["OPERATIONAL", "RULES", "TrainConfig", "field_types", "flag", "learning_rate", "validate"]

Schedule = Literal["step", "cosine", "sgdr"]
Augment = Literal["paper", "flip", "none"]
Normalize = Literal["mean", "meanstd"]
Order = Literal["devkit", "sorted"]
Device = Literal["auto", "cpu", "cuda"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune"]
SCHEDULES, AUGMENTS, NORMALIZE, ORDERS, DEVICES, COMPILE_MODES = (
    typing.get_args(t) for t in (Schedule, Augment, Normalize, Order, Device, CompileMode))
MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64 bits, numpy any non-negative integer
LARGEST = 1e38  # the learning rate and the decay are float32 scalars inside the optimizer (at most 3.4e38)
MAX_WIDTH = 2.0**16  # 1M filters in the first stack; the model's memory is checked against the machine's


def _epochs_list():
    # increasing: "5 3" or "3 3" is a typo more likely than a wish (the schedule would not tell them apart)
    return (lambda v: isinstance(v, tuple) and all(is_int(m) and 1 <= m <= MAX_COUNT for m in v)
            and list(v) == sorted(set(v))), f"increasing epochs, each in 1..{MAX_COUNT}"


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``recipe`` fields decide what is computed (a resume with other values is refused);
    ``option`` fields say how the run is operated (free to change on resume). See dsimagenet.fields."""

    data: str = option(check=text(), help="dataset: native folder, official pickles/npz, or their zips")
    out: str = option(check=text(), help="run directory (created)")
    size: int | None = recipe(None, check=integer(1, optional=True),
                              help="image size; default the data's (must match it)")
    depth: int | None = recipe(None, check=integer(6, optional=True),
                               help="WRN depth; default 20/28/36 for 16/32/64 px")
    width: float = recipe(1.0, check=number(1 / 16, MAX_WIDTH),  # the first stack has round(16 * width) filters
                          help="WRN width k (may be fractional, e.g. 0.5)")
    dropout: float = recipe(0.0, check=number(0, 1, hi_open=True), help="dropout probability inside each block")
    epochs: int = recipe(40, check=integer(1), help="epochs to train")
    lr: float = recipe(0.01, check=number(0, LARGEST, lo_open=True), help="the initial learning rate")
    schedule: Schedule = recipe("step", help="step (the paper), cosine, or sgdr (warm restarts)")
    milestones: tuple[int, ...] = recipe((10, 20, 30), check=_epochs_list(),
                                         help="epochs after which the step schedule multiplies lr by --gamma")
    gamma: float = recipe(0.2, check=number(0, LARGEST, lo_open=True),
                          help="the step schedule's factor at each milestone")
    sgdr_t0: int = recipe(10, check=integer(1), help="sgdr: epochs of the first period")
    sgdr_mult: int = recipe(2, check=integer(1), help="sgdr: each period is this many times the one before")
    batch_size: int = recipe(128, check=integer(1), help="images per step (all processes together)")
    momentum: float = recipe(0.9, check=number(0, 1, hi_open=True), help="SGD momentum")
    nesterov: bool = recipe(False, help="Nesterov momentum")
    weight_decay: float = recipe(5e-4, check=number(0, LARGEST),  # the optimizer's decay is 2 * weight_decay
                                 help="the paper's coefficient of sum(w^2) on conv and linear weights "
                                      "(gradient 2*wd*w)")
    label_smoothing: float = recipe(0.0, check=number(0, 1), help="label smoothing of the cross-entropy loss")
    augment: Augment = recipe("paper", help="paper: every image and its mirror each epoch, 4 px shifts; "
                                            "flip: random mirror + shifts; none")
    normalize: Normalize = recipe("mean", help="mean: subtract the training set's mean image; meanstd: also "
                                               "divide by the per-channel standard deviation")
    classes: int | None = recipe(None, check=integer(1, 1000, optional=True),
                                 help="train on the first N classes in devkit order (120: NAS-Bench-201's "
                                      "ImageNet16-120)")
    max_per_class: int | None = recipe(None, check=integer(1, optional=True),
                                       help="at most N training images of each class")
    order: Order = recipe("devkit", help="label order: devkit (the official files') or sorted (torchvision's)")
    seed: int = recipe(0, check=integer(0, MAX_SEED), help="seed of the initialisation, shuffles and augmentation")
    device: Device = recipe("auto", help="auto, cpu or cuda")
    bf16: bool = recipe(True, help="bf16 autocast on CUDA")
    channels_last: bool = recipe(True, help="channels_last memory format on CUDA")
    compile: bool = option(False, help="torch.compile the model")
    compile_mode: CompileMode = option("default", help="torch.compile mode; reduce-overhead uses CUDA graphs "
                                                       "(pays off for small models)")
    cuda_graph: bool = option(False, help="capture the whole training step (batch gather and augmentation, forward, "
                                          "backward, optimizer step) in one CUDA graph, one launch a step (CUDA, one "
                                          "process; with --compile in its default mode)")
    log_every: int = option(100, check=integer(1), help="print (and read the loss from the device) every N steps")
    checkpoint_minutes: float = option(10.0, check=number(0, 1e9),
                                       help="also checkpoint inside an epoch every this many minutes")
    checkpoint_every_steps: int | None = option(None, check=integer(1, optional=True),
                                                help="also checkpoint every N steps")
    eval_batch_size: int = option(1000, check=integer(1), help="images per evaluation batch")
    report_epoch: int = recipe(31, check=integer(1),  # a later one than --epochs is left out
                               help="the epoch whose errors result.json also reports (the paper's 31)")
    quiet: bool = option(False, help="print nothing but errors")

    def __post_init__(self):
        for name in ("data", "out"):  # a pathlib.Path is welcome; config.json stores the string
            if isinstance(getattr(self, name), os.PathLike):
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        if isinstance(self.milestones, (list, tuple)):
            object.__setattr__(self, "milestones", tuple(self.milestones))
        validate(self)


# Derived from the declarations above, so that no field can be left out of them: the fields that may change when a
# run is resumed (they do not change what is computed), and field -> (accepts the value, the allowed values).
OPERATIONAL = operational(TrainConfig)
RULES = rules(TrainConfig)


def validate(c: TrainConfig) -> None:
    """Raise ConfigError, naming the flag and the allowed values, for the first field out of range, then for the
    rules between fields."""
    check(c)
    if c.depth is not None and (c.depth - 4) % 2:
        raise ConfigError(f"--depth must be 4 + 2 * n * stacks (an even number >= 6), not {c.depth}")
    if c.cuda_graph and c.compile and c.compile_mode != "default":  # its CUDA graphs cannot nest in the step's
        raise ConfigError(f"--cuda-graph captures the whole step itself: use it with --compile-mode default, not "
                          f"{c.compile_mode}")
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
    if not (is_int(c.sgdr_t0) and c.sgdr_t0 >= 1 and is_int(c.sgdr_mult) and c.sgdr_mult >= 1):
        # periods that shrink (or are empty) never reach t: the loop below would not end
        raise ConfigError(f"--sgdr-t0 and --sgdr-mult must be integers >= 1, not {c.sgdr_t0!r} and {c.sgdr_mult!r}")
    start, period = 0.0, float(c.sgdr_t0)  # SGDR: cosine within periods t0, t0*mult, ..., each >= 1 epoch
    while t >= start + period:  # so at most t + 1 turns
        start, period = start + period, period * c.sgdr_mult
    return c.lr * 0.5 * (1 + math.cos(math.pi * (t - start) / period))
