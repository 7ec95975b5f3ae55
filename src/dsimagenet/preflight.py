"""What the configuration alone cannot tell, checked before a run exists: the device, the data and the memory.

    device, train_ds, val_ds = check_environment(config, world=1, local_rank=0)   # ConfigError if it cannot run

``train`` calls ``check_environment`` first, before anything is written or built: the device asked for must exist
(and a C++ compiler for ``--compile`` on the CPU); the data must agree with --size, --depth and --classes and have
images in both splits; the batch must divide among the processes (and, with several, leave a step an epoch); and
``check_memory`` refuses a model whose lower bound of memory is more than the device has. Each failure is a
``ConfigError`` naming the flag. Nothing here writes or trains.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from dsimagenet import splits
from dsimagenet.dataset import PRESENT, ImageNetDS, has_split, take_rows, with_classes
from dsimagenet.errors import ConfigError
from dsimagenet.formats import native
from dsimagenet.model import default_depth, num_stacks, parameter_count
from dsimagenet.recipe import TrainConfig

__all__ = ["check_environment", "check_memory", "open_splits", "split_record", "BLOCK_BYTES"]


def check_environment(c: TrainConfig, world: int = 1, local_rank: int = 0) -> tuple[str, ImageNetDS, ImageNetDS]:
    """What the configuration alone cannot tell, checked before anything is written: the device; the data's
    size, classes and images against --size, --depth, --classes and the batch shared by ``world`` processes.
    Returns the device ("cpu" or "cuda") and the train and val splits."""
    import shutil

    device = c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a build without CUDA"
        raise ConfigError(f"--device cuda: no CUDA GPU is available to torch {torch.__version__} ({built}): use "
                          "--device cpu or auto")
    if device == "cuda" and local_rank >= torch.cuda.device_count():
        raise ConfigError(f"--device cuda: process LOCAL_RANK={local_rank} has no GPU of its own "
                          f"({torch.cuda.device_count()} visible)")
    if device == "cpu" and c.compile and not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        raise ConfigError("--compile on the CPU needs a C++ compiler (c++, g++ or clang++) on PATH; leave "
                          "--compile out")
    if c.classes is not None and native.is_native(c.data):
        have = len(native.read_meta(c.data)["wnids"])
        if c.classes > have:
            raise ConfigError(f"--classes {c.classes}: {c.data} has {have} classes")
    train_ds, val_ds = open_splits(c)
    size = train_ds.image_size
    if c.size is not None and c.size != size:
        raise ConfigError(f"--size {c.size}: the data {c.data} is {size} px")
    stacks = num_stacks(size)
    if c.depth is not None and (c.depth - 4) % (2 * stacks):
        raise ConfigError(f"--depth {c.depth} is not 4 + 2 * n * {stacks} ({stacks} stacks for {size} px images): "
                          f"try {4 + 8 * stacks}")
    check_memory(c, device, local_rank, size, len(train_ds.wnids), len(train_ds), world)
    chosen = f" of the first {c.classes} classes (--classes)" if c.classes else ""
    for split, ds in ((train_ds.split, train_ds), (val_ds.split, val_ds)):
        if len(ds) == 0:
            raise ConfigError(f"--data {c.data}: no {split} images{chosen}")
    if c.batch_size % world:
        raise ConfigError(f"--batch-size {c.batch_size} must be a multiple of the {world} processes")
    samples = len(train_ds) * (2 if c.augment == "paper" else 1)
    if world > 1 and samples < c.batch_size:  # several ranks drop the last partial batch: no step would be left
        raise ConfigError(f"--batch-size {c.batch_size}: {c.data} gives {samples} samples an epoch ({len(train_ds)} "
                          f"images{', each also mirrored' if c.augment == 'paper' else ''}), less than one batch, and "
                          f"{world} processes drop an epoch's last partial batch: use a --batch-size of at most "
                          f"{max(world, samples - samples % world)}")
    return device, train_ds, val_ds


def open_splits(c: TrainConfig) -> tuple[ImageNetDS, ImageNetDS]:
    """The run's train and val splits. Train: --classes, or by default the classes that occur in train (a
    dataset of C classes trains a C-way head, whatever its class table holds), capped by --max-per-class. Val:
    the split --val-split names, over train's classes (an image of another class is an error), or the part of
    train --val-fraction holds out (seeded by --seed, stratified by class; the rest trains). ConfigError when the
    data lacks the split asked for, naming --val-fraction."""
    classes = c.classes if c.classes is not None else PRESENT
    train_split = "search-train" if c.val_split == "search-valid" else "train"  # NAS-Bench-201's search halves
    if c.val_fraction is None and not has_split(c.data, c.val_split):
        stored = splits.stored_split(c.val_split)
        if c.val_split != "val":
            raise ConfigError(f"--val-split {c.val_split} draws from the {stored} split, and --data {c.data} has none")
        raise ConfigError(f"--data {c.data} has no val split to evaluate on: pass --val-fraction F to hold out that "
                          "fraction of each class of train (e.g. --val-fraction 0.1)")
    train_ds = ImageNetDS(c.data, train_split, c.order, classes, c.max_per_class)
    if c.val_fraction is not None:
        mask = splits.holdout(train_ds.targets, c.val_fraction, c.seed, train_ds.wnids, where=f"--data {c.data} train")
        record = splits.holdout_record(mask, train_ds.targets, c.val_fraction, c.seed)
        return (take_rows(train_ds, np.flatnonzero(~mask), train_split),
                take_rows(train_ds, np.flatnonzero(mask), splits.HOLDOUT, record))
    if c.classes is None and c.val_split == "val":  # every val image, each checked to be of a class train has
        return train_ds, with_classes(ImageNetDS(c.data, "val", c.order), train_ds.wnids)
    return train_ds, ImageNetDS(c.data, c.val_split, c.order, classes if c.classes is not None else train_ds.wnids)


def split_record(train_ds: ImageNetDS, val_ds: ImageNetDS) -> dict:
    """What a run's config.json records of its splits: their names and images, and how val was chosen."""
    return {"train": {"name": train_ds.split, "images": len(train_ds)},
            "val": val_ds.selection or {"name": val_ds.split, "of": splits.stored_split(val_ds.split),
                                        "images": len(val_ds)}}


BLOCK_BYTES = 8 << 10  # a block's Python objects (six modules, their parameters): about 14 KiB measured


def check_memory(c: TrainConfig, device: str, local_rank: int, size: int, num_classes: int, images: int,
                  world: int) -> None:
    """Refuse a model that cannot fit, before it is built: building a WRN of depth 10**9 would take hours, and
    one of width 10**6 fails deep in torch's allocator. A lower bound is compared, so nothing that fits is refused:
    weights, gradients and momentum in float32, the blocks' objects, and each block's output kept for backward."""
    depth = c.depth or default_depth(size)
    stacks = num_stacks(size)
    n = (depth - 4) // (2 * stacks)
    params = parameter_count(depth, c.width, num_classes, size)
    batch = min(c.batch_size, images * (2 if c.augment == "paper" else 1)) // world or 1
    kept = sum(n * round(16 * c.width * 2**s) * max(1, size >> s) ** 2 for s in range(stacks))  # floats a sample
    need = 12 * params + BLOCK_BYTES * n * stacks + 4 * kept * batch
    if device == "cuda":
        have, where = torch.cuda.get_device_properties(local_rank).total_memory, f"GPU {local_rank}"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine"
    if need > have:
        raise ConfigError(f"--depth {depth} --width {c.width:g}: WRN-{depth}-{c.width:g} has {params:,} parameters; "
                          f"training it at a batch of {batch} needs at least {need / 2**30:,.1f} GiB, more than the "
                          f"{have / 2**30:,.1f} GiB of {where}: choose a smaller --depth, --width or --batch-size")
