"""The training recipe as data: ``TrainConfig`` (the paper's defaults, or another named recipe's: ``RECIPES``)
and the learning rate as a pure function.

    TrainConfig(data="out/32_box", out="runs/a")                                       # the paper's recipe
    TrainConfig(recipe="nasbench201", data="Imagenet16_train", out="runs/b", classes=120, epochs=12)

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

from dsimagenet import fields
from dsimagenet.errors import ConfigError
from dsimagenet.fields import (
    MAX_COUNT,
    check,
    field_types,
    flag,
    integer,
    is_int,
    is_number,
    number,
    operational,
    option,
    recipe,
    rules,
    text,
)

__all__ = ["OPERATIONAL", "RECIPES", "RULES", "TrainConfig", "field_types", "flag", "learning_rate", "stored_defaults",
           "validate"]

Schedule = Literal["step", "cosine", "sgdr", "cosine-epoch"]
Augment = Literal["paper", "flip", "none"]
Normalize = Literal["mean", "meanstd", "nasbench201"]
PadFill = Literal["mean", "black"]
Decay = Literal["paper", "all"]
RecipeName = Literal["paper", "nasbench201"]
Order = Literal["devkit", "sorted"]
Device = Literal["auto", "cpu", "cuda"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune"]
SCHEDULES, AUGMENTS, NORMALIZE, ORDERS, DEVICES, COMPILE_MODES = (
    typing.get_args(t) for t in (Schedule, Augment, Normalize, Order, Device, CompileMode))
ValSplit = Literal["val", "validation", "x-valid", "x-test", "search-valid"]  # see dsimagenet.splits
VAL_SPLITS = typing.get_args(ValSplit)
MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64 bits, numpy any non-negative integer
LARGEST = 1e38  # the learning rate and the decay are float32 scalars inside the optimizer (at most 3.4e38)
MAX_WIDTH = 2.0**16  # 1M filters in the first stack; the model's memory is checked against the machine's

# The named recipes: the values that the fields a recipe sets take when they are left out (None). "paper" is the
# paper's (and every run's before recipes existed); "nasbench201" is NAS-Bench-201's ImageNet16-120 training
# (its ImageNet-16.config, and the transforms of xautodl's get_datasets): its scheduler sets the cosine's lr once
# an epoch (it ignores the iteration), so lr(e) = 0.1 * (1 + cos(pi * e / 200)) / 2 through the epoch e, which is
# torch's CosineAnnealingLR(T_max=200) stepped per epoch: "cosine-epoch".
RECIPES: dict[str, dict] = {
    "paper": {"epochs": 40, "lr": 0.01, "schedule": "step", "batch_size": 128, "nesterov": False, "decay": "paper",
              "augment": "paper", "pad": 4, "pad_fill": "mean", "normalize": "mean"},
    "nasbench201": {"epochs": 200, "lr": 0.1, "schedule": "cosine-epoch", "batch_size": 256, "nesterov": True,
                    "decay": "all", "augment": "flip", "pad": 2, "pad_fill": "black", "normalize": "nasbench201"},
}


def _by_recipe(name: str) -> str:
    """The help's default of a field that a recipe sets: ``default: the --recipe's (paper 40, nasbench201 200)``."""
    def typed(value):  # a switch as its other defaults show it (cli.shown), not Python's True/False
        return ("on" if value else "off") if isinstance(value, bool) else value

    return "default: the --recipe's (" + ", ".join(f"{r} {typed(v[name])}" for r, v in RECIPES.items()) + ")"


def _epochs_list():
    # increasing: "5 3" or "3 3" is a typo more likely than a wish (the schedule would not tell them apart)
    return (lambda v: isinstance(v, tuple) and all(is_int(m) and 1 <= m <= MAX_COUNT for m in v)
            and list(v) == sorted(set(v))), f"increasing epochs, each in 1..{MAX_COUNT}"


@dataclass(frozen=True, kw_only=True)
class _Named:
    """The field ``recipe``, declared apart: inside TrainConfig's body that name is dsimagenet.fields.recipe, which
    declares the fields after it (keyword-only, so that it may come first with its default)."""

    recipe: RecipeName = fields.recipe(
        "paper", help="the named recipe that the flags saying \"default: the --recipe's\" take their values from "
                      "when not given: paper, or nasbench201 (NAS-Bench-201's ImageNet16-120 training)")


@dataclass(frozen=True)
class TrainConfig(_Named):
    """One training run. ``recipe`` fields decide what is computed (a resume with other values is refused);
    ``option`` fields say how the run is operated (free to change on resume). See dsimagenet.fields.

    A field that the named ``recipe`` sets (``RECIPES``: epochs, lr, schedule, batch size, nesterov, decay,
    augment, pad, pad_fill, normalize) defaults to None, which means the recipe's value; the config holds the
    value resolved (``TrainConfig(recipe="nasbench201", data=..., out=..., epochs=12)``: NAS-Bench-201's recipe
    for 12 epochs). ``dataclasses.replace(c, recipe=...)`` keeps the other values as they are."""

    data: str = option(check=text(), help="dataset: native folder, official pickles/npz, or their zips")
    out: str = option(check=text(), help="run directory (created)")
    size: int | None = recipe(None, check=integer(1, optional=True),
                              help="image size; default the data's (must match it)")
    depth: int | None = recipe(None, check=integer(6, optional=True),
                               help="WRN depth; default 20/28/36 for 16/32/64 px")
    width: float = recipe(1.0, check=number(1 / 16, MAX_WIDTH),  # the first stack has round(16 * width) filters
                          help="WRN width k (may be fractional, e.g. 0.5)")
    dropout: float = recipe(0.0, check=number(0, 1, hi_open=True), help="dropout probability inside each block")
    epochs: int | None = recipe(None, check=integer(1), help=f"epochs to train; {_by_recipe('epochs')}")
    lr: float | None = recipe(None, check=number(0, LARGEST, lo_open=True),
                              help=f"the initial learning rate; {_by_recipe('lr')}")
    schedule: Schedule | None = recipe(None, help="step (the paper), cosine, sgdr (warm restarts), or cosine-epoch "
                                                  "(cosine, constant within each epoch: torch's CosineAnnealingLR "
                                                  f"stepped once an epoch); {_by_recipe('schedule')}")
    milestones: tuple[int, ...] = recipe((10, 20, 30), check=_epochs_list(),
                                         help="epochs after which the step schedule multiplies lr by --gamma")
    gamma: float = recipe(0.2, check=number(0, LARGEST, lo_open=True),
                          help="the step schedule's factor at each milestone")
    sgdr_t0: int = recipe(10, check=integer(1), help="sgdr: epochs of the first period")
    sgdr_mult: int = recipe(2, check=integer(1), help="sgdr: each period is this many times the one before")
    batch_size: int | None = recipe(None, check=integer(1), help="images per step (all processes together); "
                                                                 f"{_by_recipe('batch_size')}")
    momentum: float = recipe(0.9, check=number(0, 1, hi_open=True), help="SGD momentum")
    nesterov: bool | None = recipe(None, help=f"Nesterov momentum; {_by_recipe('nesterov')}")
    weight_decay: float = recipe(5e-4, check=number(0, LARGEST),  # with --decay paper the optimizer's is 2 * this
                                 help="the weight decay, as --decay says")
    decay: Decay | None = recipe(None, help="paper: --weight-decay is the coefficient of the penalty sum(w^2) on "
                                            "conv and linear weights (gradient 2*wd*w); all: it is PyTorch's "
                                            "weight_decay on every parameter, BN and biases too (gradient wd*w); "
                                            f"{_by_recipe('decay')}")
    label_smoothing: float = recipe(0.0, check=number(0, 1), help="label smoothing of the cross-entropy loss")
    augment: Augment | None = recipe(None, help="paper: every image and its mirror each epoch, shifted; "
                                                "flip: random mirror, shifted; none; "
                                                f"{_by_recipe('augment')}")
    pad: int | None = recipe(None, check=integer(0, 1024),
                             help="the random crop's padding on each side: shifts of up to this many px "
                                  f"(at most the image size); {_by_recipe('pad')}")
    pad_fill: PadFill | None = recipe(None, help="the padding: mean: 0 after normalisation, the mean (the "
                                                 "paper's); black: pixels of 0 before it (torchvision's "
                                                 "RandomCrop(padding=)); needs a per-channel --normalize; "
                                                 f"{_by_recipe('pad_fill')}")
    normalize: Normalize | None = recipe(None, help="mean: subtract the training set's mean image and /255; "
                                                    "meanstd: per-channel mean and std of the training set; "
                                                    "nasbench201: NAS-Bench-201's per-channel constants; "
                                                    f"{_by_recipe('normalize')}")
    classes: int | None = recipe(None, check=integer(1, 1000, optional=True),
                                 help="train on the first N classes in devkit order (120: NAS-Bench-201's "
                                      "ImageNet16-120); left out, on the classes that occur in train")
    max_per_class: int | None = recipe(None, check=integer(1, optional=True),
                                       help="at most N training images of each class")
    order: Order = recipe("devkit", help="label order: devkit (the official files') or sorted (torchvision's)")
    val_split: ValSplit = recipe("val", help="the split to evaluate on: val (or validation); x-valid or x-test, "
                                              "NAS-Bench-201's halves of ImageNet16-120's val (with --classes 120); "
                                              "search-valid, its half of train (training then uses the other half)")
    val_fraction: float | None = recipe(None, check=(lambda v: v is None or (is_number(v) and 0 < v < 1),
                                                     "a number in (0, 1) (or left out)"),
                                        help="hold out this fraction of each class of train, chosen by --seed, and "
                                             "evaluate on it instead of a val split")
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
    quiet: bool = option(False, help="no progress or epoch lines: only the outcome (a run's result, a sweep's "
                                      "runs) and errors")

    def __post_init__(self):
        resolve(self)
        for name in ("data", "out"):  # a pathlib.Path is welcome; config.json stores the string
            if isinstance(getattr(self, name), os.PathLike):
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        if isinstance(self.milestones, (list, tuple)):
            object.__setattr__(self, "milestones", tuple(self.milestones))
        if self.val_split == "validation":  # one name for one split: a resume compares them
            object.__setattr__(self, "val_split", "val")
        validate(self)


# Derived from the declarations above, so that no field can be left out of them: the fields that may change when a
# run is resumed (they do not change what is computed), and field -> (accepts the value, the allowed values).
OPERATIONAL = operational(TrainConfig)
RULES = rules(TrainConfig)


def resolve(c: TrainConfig) -> None:
    """Give the fields left out (None) that the named recipe sets its values, in place (a config being made)."""
    ok, allowed = RULES["recipe"]
    if not ok(c.recipe):  # before it is looked up
        raise ConfigError(f"--recipe must be {allowed}, not {c.recipe!r}")
    for name, value in RECIPES[c.recipe].items():
        if getattr(c, name) is None:
            object.__setattr__(c, name, value)


def stored_defaults() -> dict:
    """What a configuration stored before a field existed (config.json, a checkpoint) ran with for it, as JSON
    values: the paper recipe's value for a field a recipe sets, else the field's default. Compared on resume in
    place of the missing fields, so that a run made before them resumes."""
    import dataclasses

    out = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    out.update(RECIPES["paper"])
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def validate(c: TrainConfig) -> None:
    """Raise ConfigError, naming the flag and the allowed values, for the first field out of range, then for the
    rules between fields."""
    check(c)
    if c.depth is not None and (c.depth - 4) % 2:
        raise ConfigError(f"--depth must be 4 + 2 * n * stacks (an even number >= 6), not {c.depth}")
    if c.val_fraction is not None and c.val_split != "val":
        raise ConfigError(f"--val-fraction holds out a part of train to evaluate on, and --val-split {c.val_split} "
                          "names another split: give one of them")
    if c.val_split not in ("val", "validation") and c.classes != 120:  # dsimagenet.splits.NASBENCH201_CLASSES
        given = f"not {c.classes} (NAS-Bench-201 publishes no split files for it)" if c.classes else \
            "which was not given"
        raise ConfigError(f"--val-split {c.val_split} is NAS-Bench-201's split of ImageNet16-120: it needs --classes "
                          f"120, {given}")
    if c.cuda_graph and c.compile and c.compile_mode != "default":  # its CUDA graphs cannot nest in the step's
        raise ConfigError(f"--cuda-graph captures the whole step itself: use it with --compile-mode default, not "
                          f"{c.compile_mode}")
    if c.nesterov and c.momentum == 0:
        raise ConfigError("--nesterov needs a --momentum above 0")
    if c.pad_fill == "black" and c.normalize == "mean" and c.augment != "none":
        # a black border is -mean / scale: one value a channel, which a mean image has not
        raise ConfigError("--pad-fill black needs a per-channel --normalize (meanstd or nasbench201), not mean "
                          "(the mean image has no value outside the image)")
    if c.schedule == "step" and c.milestones and math.log(c.lr) + len(c.milestones) * max(0.0, math.log(c.gamma)) \
            > math.log(LARGEST):  # in logs: gamma ** k itself can overflow a float
        raise ConfigError(f"--lr {c.lr:g} times --gamma {c.gamma:g} after each of the {len(c.milestones)} "
                          f"--milestones exceeds {LARGEST:g}: the optimizer holds it as a float32")


def learning_rate(c: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The learning rate at ``step`` of ``epoch`` (both 0-based): a pure function."""
    if c.schedule == "step":  # constant within an epoch, times gamma after each milestone epoch
        return c.lr * c.gamma ** sum(epoch >= m for m in c.milestones)
    if c.schedule == "cosine-epoch":  # NAS-Bench-201's: the epoch's value throughout it, 0 never reached
        return c.lr * 0.5 * (1 + math.cos(math.pi * epoch / c.epochs))
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
