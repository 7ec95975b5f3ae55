"""The training recipe as data: ``TrainConfig`` (the paper's defaults) and the learning rate as a pure function.

Kept free of torch so that the command line and the sweep can read it without importing torch; ``train.py``
runs it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass

SCHEDULES = ("step", "cosine", "sgdr")
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
    report_epoch: int = 31  # the paper reports errors after epoch 31
    quiet: bool = False

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, not {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")
        object.__setattr__(self, "milestones", tuple(self.milestones))


def learning_rate(c: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The learning rate at ``step`` of ``epoch`` (both 0-based): a pure function."""
    if c.schedule == "step":  # constant within an epoch, times gamma after each milestone epoch
        return c.lr * c.gamma ** sum(epoch >= m for m in c.milestones)
    t = epoch + step / steps_per_epoch
    if c.schedule == "cosine":
        return c.lr * 0.5 * (1 + math.cos(math.pi * t / c.epochs))
    start, period = 0.0, float(c.sgdr_t0)  # SGDR: cosine within periods t0, t0*mult, ...
    while t >= start + period:
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
