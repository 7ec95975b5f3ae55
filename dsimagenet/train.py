"""Train a Wide ResNet with the paper's recipe: ``train(TrainConfig(data="out/32_box", out="runs/wrn-28-2"))``.

    dsimagenet train --data out/32_box --out runs/wrn28-2 --width 2            # the paper's recipe
    dsimagenet train ... --resume                                              # continue a killed run
    torchrun --nproc_per_node=4 -m dsimagenet train --data ... --out ...       # DistributedDataParallel

Paper defaults: SGD with momentum 0.9, batch 128, lr 0.01 times 0.2 after epochs 10, 20 and 30, 40 epochs, the
penalty 5e-4 * sum(w^2) on conv and linear weights only, mean-image subtraction, every image and its mirror
each epoch with 4-pixel shifts. The loop below is the whole training; the learning rate is a pure function of
(epoch, step). On CUDA: bf16 autocast, channels_last, the uint8 data resident on the GPU, no host
synchronisation inside an epoch except every ``log_every`` steps; optional ``torch.compile``.

Before anything is written, every value is checked (``TrainConfig`` itself; then ``check_environment``: the
device, the data against the batch and the processes). One process holds a run directory at a time (an flock
that dies with it). A resumed checkpoint must be this run's (data, configuration, shapes, finite values). A
non-finite loss (read at the log points and at the epoch's end) or weight stops the run: ``Diverged``, exit
status 3, result.json ``{"status": "diverged", ...}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dsimagenet import runs
from dsimagenet.data import Loader
from dsimagenet.dataset import ImageNetDS
from dsimagenet.errors import ConfigError, Diverged, FormatError
from dsimagenet.formats import native, official
from dsimagenet.formats.atomic import atomic_write
from dsimagenet.model import WideResNet, count_parameters, default_depth, num_stacks, parameter_count
from dsimagenet.recipe import OPERATIONAL, TrainConfig, learning_rate
from dsimagenet.runs import RunError

__all__ = ["TrainConfig", "learning_rate", "train", "evaluate", "make_optimizer", "topk_correct", "check_environment"]


def dataset_fingerprint(path: str | Path) -> str:
    """Identifies the data a run was trained on: native checksums, or official files' sizes and ends."""
    path = Path(path)
    h = hashlib.sha256()
    if native.is_native(path):
        meta = native.read_meta(path)
        # the fingerprint stands for the data only while the arrays are what meta.json says they are: an image
        # changed in place after the build would otherwise train (and resume) unnoticed; training reads all of
        # the data anyway, so hashing it costs a read it does first
        problems = native.verify(path)
        if problems:
            raise FormatError(f"{path}: the data differs from its meta.json ({'; '.join(problems[:3])}"
                              f"{'; ...' if len(problems) > 3 else ''}): rebuild it")
        h.update(json.dumps([meta["splits"], meta.get("mean")], sort_keys=True).encode())
        return h.hexdigest()
    files = sorted({Path(m.where.split(".zip:")[0] + ".zip") if ".zip:" in m.where else Path(m.where)
                    for m in official.find_members(path)})
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read())
    return h.hexdigest()


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the global batch of all ranks (sums all-reduced with autograd), so that K processes
    compute what one process with the whole batch would; works with gloo (CPU) and NCCL."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        import torch.distributed.nn.functional as dnn

        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        xf = x.float()
        count = torch.tensor([xf.numel() / xf.shape[1]], device=x.device)
        stats = dnn.all_reduce(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c:2 * c] / n - mean * mean
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
            self.num_batches_tracked.add_(1)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        return (y * self.weight[None, :, None, None] + self.bias[None, :, None, None]).to(x.dtype)


def _use_global_bn(module: nn.Module) -> nn.Module:
    """Make every BatchNorm2d a GlobalBatchNorm2d in place: the same parameters and buffers, so an optimizer
    made before still holds them."""
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d
    return module


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t


def _setup_distributed(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Dist(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def make_optimizer(model: WideResNet, c: TrainConfig, fused: bool = False) -> torch.optim.SGD:
    """SGD; the paper's penalty wd * sum(w^2) on conv and linear weights is a gradient of 2 * wd * w.
    ``fused`` (CUDA): one kernel per parameter group and step instead of several per tensor list."""
    decay, no_decay = model.decayed_parameters()
    return torch.optim.SGD([{"params": decay, "weight_decay": 2 * c.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, fused=fused or None)


def _set_lr(opt: torch.optim.Optimizer, lr: float, tensor: bool) -> None:
    """A compiled step reads the learning rate from a (CPU) tensor, changed in place (a Python float would be
    compiled in as a constant); a new optimizer or a resumed checkpoint brings a float or a tensor: the first
    call of a run, before the first step, makes it the kind this run needs."""
    for g in opt.param_groups:
        if not tensor:
            g["lr"] = lr
        elif isinstance(g["lr"], torch.Tensor) and not g["lr"].is_cuda:
            g["lr"].fill_(lr)
        else:
            g["lr"] = torch.tensor(lr)


def topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 correct, top-k correct) per sample, as bool tensors."""
    top = logits.topk(min(k, logits.shape[1]), 1).indices
    return top[:, 0] == y, (top == y[:, None]).any(1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader, num_classes: int, amp: bool, d: Dist) -> dict:
    """Loss, top-1/top-5 error (percent) and per-class accuracies over the whole split, summed over ranks."""
    model.eval()
    dev = loader.device
    sums = torch.zeros(3, dtype=torch.float64, device=dev)  # loss, top-1 correct, top-k correct
    per_class = torch.zeros(3, num_classes, dtype=torch.float64, device=dev)  # count, top-1, top-k correct
    for x, y in loader.epoch(0):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        out = out.float()
        c1, ck = (t.double() for t in topk_correct(out, y, 5))
        sums += torch.stack([nn.functional.cross_entropy(out, y, reduction="sum").double(), c1.sum(), ck.sum()])
        per_class[0].index_add_(0, y, torch.ones_like(c1))
        per_class[1].index_add_(0, y, c1)
        per_class[2].index_add_(0, y, ck)
    d.all_reduce(sums)
    d.all_reduce(per_class)
    n = per_class[0].sum().item()
    loss, c1, ck = sums.tolist()
    return {"val_loss": loss / n, "top1_error": 100 * (1 - c1 / n), "top5_error": 100 * (1 - ck / n),
            "per_class": per_class.cpu().numpy()}


def _save_checkpoint(path: Path, state: dict) -> None:
    with runs.naming(path, "; the previous checkpoint is kept"), atomic_write(path) as f:
        torch.save(state, f)


def _computed(c: TrainConfig) -> dict:
    """The fields that decide what a run computes, as JSON values (what config.json and checkpoints store)."""
    return {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(c))).items() if k not in OPERATIONAL}


def _weights_depend_on(config: dict) -> dict:
    """Of ``_computed``, what decides the weights up to a checkpoint: the total of epochs only for the cosine
    schedule (the others are the same up to any epoch, whatever the total); the reported epoch never."""
    skip = {"report_epoch"} | ({"epochs"} if config.get("schedule") != "cosine" else set())
    return {k: v for k, v in config.items() if k not in skip}


def _check_resume(run: Path, config: TrainConfig, fingerprint: str) -> None:
    old = runs.read_json(run / runs.CONFIG)
    if old.get("dataset_fingerprint") != fingerprint:
        raise RunError(f"{run}: refusing to resume on different data: the run was trained on "
                       f"{old.get('config', {}).get('data')} (fingerprint {str(old.get('dataset_fingerprint'))[:12]}"
                       f"), --data {config.data} is {fingerprint[:12]}")
    new, was = _computed(config), old.get("config", {})
    diff = sorted(k for k in set(new) | set(was) if k not in OPERATIONAL and new.get(k) != was.get(k))
    if diff:
        raise RunError(f"{run}: refusing to resume with a different configuration: " +
                       ", ".join(f"{k} was {was.get(k)!r}, now {new.get(k)!r}" for k in diff))


def _non_finite(named: dict) -> str | None:
    """The name of the first floating tensor in ``named`` holding a NaN or an infinity, or None."""
    floats = [(k, t) for k, t in named.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not floats:
        return None
    ok = torch.stack([torch.isfinite(t).all() for _, t in floats]).tolist()  # one host synchronisation
    return next((k for (k, _), good in zip(floats, ok, strict=True) if not good), None)


def _load_checkpoint(path: Path, model: WideResNet, opt: torch.optim.Optimizer, c: TrainConfig, fingerprint: str,
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
        theirs, ours = _weights_depend_on(json.loads(state["config"])), _weights_depend_on(_computed(c))
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
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
    bad = _non_finite({**theirs, **buffers})
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
    train_ds = ImageNetDS(c.data, "train", c.order, c.classes, c.max_per_class)
    val_ds = ImageNetDS(c.data, "val", c.order, c.classes)
    size = train_ds.image_size
    if c.size is not None and c.size != size:
        raise ConfigError(f"--size {c.size}: the data {c.data} is {size} px")
    stacks = num_stacks(size)
    if c.depth is not None and (c.depth - 4) % (2 * stacks):
        raise ConfigError(f"--depth {c.depth} is not 4 + 2 * n * {stacks} ({stacks} stacks for {size} px images): "
                          f"try {4 + 8 * stacks}")
    _check_memory(c, device, local_rank, size, len(train_ds.wnids), len(train_ds), world)
    chosen = f" of the first {c.classes} classes (--classes)" if c.classes else ""
    for split, ds in (("train", train_ds), ("val", val_ds)):
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


BLOCK_BYTES = 8 << 10  # a block's Python objects (six modules, their parameters): about 14 KiB measured


def _check_memory(c: TrainConfig, device: str, local_rank: int, size: int, num_classes: int, images: int,
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


@contextlib.contextmanager
def _hold(run: Path, d: Dist, dev: torch.device) -> Iterator[tuple[bool, bool]]:
    """Rank 0 holds the run directory (another process training it is an error) and tells every rank what it
    found there, before it writes anything: (a run directory already, with its result.json)."""
    error, state = None, [0, 0, 0]
    with contextlib.ExitStack() as stack:
        if d.main:
            try:
                stack.enter_context(runs.hold(run))
                state = [1, int(runs.check_out(run)), int((run / runs.RESULT).exists())]
            except Exception as e:  # noqa: BLE001 - raised below, after the other ranks have heard of it
                error = e
        if d.world > 1:
            import torch.distributed as dist

            t = torch.tensor(state, device=dev)
            dist.broadcast(t, 0)
            state = t.tolist()
        if error is not None:
            raise error
        if not state[0]:
            raise RunError(f"{run}: rank 0 could not take the run directory (its error says why)")
        yield bool(state[1]), bool(state[2])


@contextlib.contextmanager
def _stop_signals() -> Iterator[list[int]]:
    """While training, SIGINT and SIGTERM ask the loop to stop after the step it is in (the list they go into is
    read there): it checkpoints that step and raises ``runs.Interrupted``. A second SIGINT interrupts at once, as
    a KeyboardInterrupt anywhere (the previous checkpoint is kept). Only the main thread can take signals."""
    import signal
    import threading

    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def handler(signum, frame):
        if got and signum == signal.SIGINT:
            raise KeyboardInterrupt
        got.append(signum)

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in before:
        signal.signal(s, handler)
    try:
        yield got
    finally:
        for s, h in before.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)  # None: set outside Python


def train(config: TrainConfig, resume: bool = False, on_epoch=None) -> dict:
    """Run the recipe; returns the result dict (also written to ``config.out``/result.json).

    ``on_epoch(line)`` is called with each epoch's metrics line after it is written (and its checkpoint saved);
    an exception it raises stops the run there (``dsimagenet tune`` prunes trials so). The run directory is held
    by this process (rank 0) throughout. A non-finite loss stops the run with ``Diverged``, after writing a
    result.json with "status": "diverged"; a run already finished returns its result; one whose last checkpoint
    is at its end gets its result from that checkpoint and metrics.jsonl."""
    c = config  # its values were checked when it was made (recipe.validate)
    device, train_ds, val_ds = check_environment(c, int(os.environ.get("WORLD_SIZE", "1")),
                                                 int(os.environ.get("LOCAL_RANK", "0")))
    d = _setup_distributed(device)
    dev = torch.device(f"cuda:{d.local_rank}" if device == "cuda" else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
    fingerprint = dataset_fingerprint(c.data)
    with _hold(Path(c.out), d, dev) as (is_run, has_result), _stop_signals() as stop:
        return _train(c, d, dev, train_ds, val_ds, fingerprint, is_run, has_result, resume, on_epoch, stop)


def _train(c: TrainConfig, d: Dist, dev: torch.device, train_ds: ImageNetDS, val_ds: ImageNetDS, fingerprint: str,
           is_run: bool, has_result: bool, resume: bool, on_epoch, stop: list[int]) -> dict:
    amp = dev.type == "cuda" and c.bf16
    run = Path(c.out)
    size = train_ds.image_size
    # with several ranks the last partial batch is dropped: an empty share would break BatchNorm
    loader = Loader(train_ds, c.batch_size, dev, c.augment, shuffle=True, seed=c.seed, normalize=c.normalize,
                    channels_last=c.channels_last and dev.type == "cuda", rank=d.rank, world_size=d.world,
                    drop_last=d.world > 1)
    val_loader = Loader(val_ds, c.eval_batch_size * d.world, dev, "none", shuffle=False, stats=loader.stats,
                        channels_last=c.channels_last and dev.type == "cuda", rank=d.rank, world_size=d.world)
    num_classes = len(train_ds.wnids)
    steps = len(loader)

    # --- model and optimizer
    torch.manual_seed(c.seed)
    depth = c.depth or default_depth(size)
    model = WideResNet(depth, c.width, num_classes, size, c.dropout).to(dev)
    if c.channels_last and dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    # compiled, the optimizer step is compiled too (inductor fuses it); eager on CUDA, the fused kernel
    opt = make_optimizer(model, c, fused=dev.type == "cuda" and not c.compile)
    opt_step = opt.step
    params = count_parameters(model)
    net: nn.Module = model
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(_use_global_bn(model), device_ids=[dev] if dev.type == "cuda"
                                                  else None)
    criterion = nn.CrossEntropyLoss(label_smoothing=c.label_smoothing)
    step_net = net

    def forward(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss, and (loss * n, correct, n) to add to the epoch's running sums: one graph when compiled."""
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = step_net(x)
            loss = criterion(out, y)
        n = torch.full((), y.shape[0], dtype=torch.float32, device=y.device)
        return loss, torch.stack([loss.detach().float() * n, (out.argmax(1) == y).sum().float(), n])

    if c.compile:
        # static shapes: a handful of batch sizes (train, its last partial batch, eval) each get their own graph,
        # which CUDA graphs need anyway; dynamic shapes would make every graph slower
        mode = None if c.compile_mode == "default" else c.compile_mode
        net = torch.compile(net, mode=mode, dynamic=False)  # for evaluation
        if d.world == 1:  # the loss and the running sums join the network's graph (one launch with CUDA graphs)
            forward = torch.compile(forward, mode=mode, dynamic=False)
        else:
            step_net = net
        opt_step = torch.compile(opt.step)

    # --- run directory, or resume
    start_epoch, start_step, acc, train_seconds, images_seen = 0, 0, [0.0, 0.0, 0.0], 0.0, 0
    ckpt_path = run / runs.CHECKPOINT
    if is_run:
        if not resume:
            raise RunError(f"{run}: already a run directory: pass --resume to continue it, or choose another --out")
        _check_resume(run, c, fingerprint)
        if has_result:  # finished (or diverged) before
            result = runs.read_json(run / runs.RESULT)
            if result.get("status") == "diverged":
                raise Diverged(result.get("message") or f"{run}: this run diverged; start a new one with a lower --lr")
            runs.check_result(run, result, runs.read_metrics(run), c.epochs)
            return result
        if ckpt_path.exists():
            state = _load_checkpoint(ckpt_path, model, opt, c, fingerprint, steps, dev)
            start_epoch, start_step = state["epoch"], state["step"]
            acc, train_seconds, images_seen = state["acc"], state["train_seconds"], state["images_seen"]
        if d.main:
            runs.truncate_metrics(run, start_epoch)
    elif d.main:
        runs.write_json(run / runs.CONFIG, {"config": dataclasses.asdict(c), "versions": runs.versions(),
                                            "git_commit": runs.git_commit(), "dataset_fingerprint": fingerprint,
                                            "world_size": d.world, "device": str(dev), "params": params,
                                            "depth": depth, "image_size": size, "num_classes": num_classes,
                                            "method": native.read_meta(c.data).get("method")
                                            if native.is_native(c.data) else None})
        with runs.naming(run / runs.METRICS):
            (run / runs.METRICS).touch()

    def diverged(epoch: int, step: int, what: str) -> None:
        """Stop the run: it is marked diverged (rank 0) and every rank raises, having seen the same values."""
        msg = (f"{run}: diverged in epoch {epoch + 1} by step {step}/{steps}: {what}; the run is stopped and "
               f"marked diverged; start a new one with a lower --lr (it was {c.lr:g})")
        if d.main:
            runs.write_json(run / runs.RESULT, {"status": "diverged", "epoch": epoch + 1, "step": step,
                                                "message": msg})
        raise Diverged(msg)

    def checkpoint(epoch: int, step: int) -> None:
        if not d.main:
            return
        weights = model.state_dict()
        bad = _non_finite(weights)  # never saved: a step since the last loss check can have broken them
        if bad is not None:
            diverged(epoch if step else epoch - 1, step or steps, f"{bad} holds NaN or infinite values")
        state = {"model": weights, "optimizer": opt.state_dict(), "epoch": epoch, "step": step,
                 "acc": acc_values(), "train_seconds": train_seconds + (time.perf_counter() - t0),
                 "images_seen": images_seen, "rng_cpu": torch.get_rng_state(), "fingerprint": fingerprint,
                 "config": json.dumps(_computed(c), sort_keys=True)}
        if dev.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state()
        _save_checkpoint(ckpt_path, state)

    def acc_values() -> list[float]:
        return [float(v) for v in acc_t.tolist()]

    def stopping() -> bool:
        """Whether a signal asked to stop: every step with one process (a Python list, no synchronisation);
        with several, all must stop at the same step, so they agree at the log points and epoch ends."""
        if d.world == 1:
            return bool(stop)
        return d.all_reduce(torch.tensor([float(bool(stop))], device=dev)).item() > 0

    def interrupted(epoch: int, step: int) -> None:
        import signal

        signum = stop[0] if stop else signal.SIGTERM  # another rank got it
        raise runs.Interrupted(f"{run}: stopped by {signal.Signals(signum).name} in epoch {epoch + 1} at step "
                               f"{step}/{steps}; the checkpoint is saved there: --resume to continue", signum)

    # --- the loop
    last_ckpt, last_lr, ev = time.monotonic(), None, None
    for epoch in range(start_epoch, c.epochs):
        t0 = time.perf_counter()
        net.train()
        acc_t = torch.tensor(acc if epoch == start_epoch else [0.0, 0.0, 0.0], dtype=torch.float64, device=dev)
        first = start_step if epoch == start_epoch else 0
        for step, (x, y) in enumerate(loader.epoch(epoch, first), first):
            lr = learning_rate(c, epoch, step, steps)
            if lr != last_lr:
                _set_lr(opt, lr, c.compile)
                last_lr = lr
            loss, sums = forward(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt_step()
            # running sums stay on the device: no host synchronisation per step
            # (a tensor made from a Python number here would be a host-to-device copy, which synchronises)
            acc_t += sums
            images_seen += len(y) * d.world
            done = step + 1
            log = done % c.log_every == 0
            if log:  # the one host synchronisation inside an epoch: a NaN or inf in any step stays in the sum
                running = d.all_reduce(acc_t[:1].clone()).item() if d.world > 1 else acc_t[0].item()
                if not math.isfinite(running):
                    diverged(epoch, done, f"the running training loss is {running}")
            due = (c.checkpoint_every_steps and done % c.checkpoint_every_steps == 0) or (
                log and time.monotonic() - last_ckpt > 60 * c.checkpoint_minutes)
            if done < steps and (d.world == 1 or log) and stopping():
                checkpoint(epoch, done)
                interrupted(epoch, done)
            if due and done < steps:
                checkpoint(epoch, done)
                last_ckpt = time.monotonic()
            if log and d.main and not c.quiet:
                print(f"  epoch {epoch + 1} step {done}/{steps} loss {loss.item():.4f} lr {lr:.5g}", flush=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - t0
        tr = d.all_reduce(acc_t.clone()).tolist()
        if not math.isfinite(tr[0]):
            diverged(epoch, steps, f"the training loss is {tr[0] / tr[2]}")
        ev = evaluate(net, val_loader, num_classes, amp, d)
        if not math.isfinite(ev["val_loss"]):
            diverged(epoch, steps, f"the validation loss is {ev['val_loss']}")
        bad = _non_finite(model.state_dict())  # an infinite BN variance leaves the losses finite, and meaningless
        if bad is not None:
            diverged(epoch, steps, f"{bad} holds NaN or infinite values")
        line = {"epoch": epoch + 1, "lr": learning_rate(c, epoch, 0, steps), "train_loss": tr[0] / tr[2],
                "train_error": 100 * (1 - tr[1] / tr[2]), "val_loss": ev["val_loss"],
                "top1_error": ev["top1_error"], "top5_error": ev["top5_error"], "train_seconds": train_seconds,
                "images_per_s": images_seen / train_seconds}
        acc_t.zero_()
        t0 = time.perf_counter()  # checkpoint() adds the time since t0 to train_seconds
        if d.main:
            runs.append_metrics(run, line)
            if not c.quiet:
                print(f"epoch {epoch + 1}/{c.epochs}  train loss {line['train_loss']:.4f} err "
                      f"{line['train_error']:.2f}%  val top-1 {line['top1_error']:.2f}% top-5 "
                      f"{line['top5_error']:.2f}%  {line['images_per_s']:,.0f} img/s", flush=True)
        checkpoint(epoch + 1, 0)
        last_ckpt = time.monotonic()
        if epoch + 1 < c.epochs and stopping():  # after the last epoch: the result is a moment away
            interrupted(epoch + 1, 0)
        if on_epoch is not None and d.main:
            on_epoch(line)

    # --- result
    if ev is None:  # every epoch was done before (stopped after its last checkpoint): evaluate those weights
        if d.main and not c.quiet:
            print(f"{run}: all {c.epochs} epochs were done; the result comes from the checkpoint", flush=True)
        ev = evaluate(net, val_loader, num_classes, amp, d)
    metrics = runs.read_metrics(run) if d.main else []
    result = {}
    if d.main:
        final = metrics[-1]
        result = {"status": "finished", "top1_error": final["top1_error"], "top5_error": final["top5_error"],
                  "params": params, "epochs": c.epochs, "depth": depth, "width": c.width, "image_size": size,
                  "train_seconds": train_seconds, "train_images_per_s": images_seen / train_seconds,
                  "device": str(dev), "world_size": d.world}
        at = [m for m in metrics if m["epoch"] == c.report_epoch]
        if at:
            result[f"top1_error_ep{c.report_epoch}"] = at[0]["top1_error"]
            result[f"top5_error_ep{c.report_epoch}"] = at[0]["top5_error"]
        _write_per_class(run / runs.PER_CLASS, ev["per_class"], val_ds)
        runs.write_json(run / runs.RESULT, result)
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()
    return result


def _write_per_class(path: Path, per_class: np.ndarray, ds: ImageNetDS) -> None:
    count, c1, ck = per_class
    with runs.naming(path), atomic_write(path, "w") as f:
        f.write("index,wnid,name,count,top1_accuracy,top5_accuracy\n")
        for i, (w, name) in enumerate(zip(ds.wnids, ds.classes, strict=True)):
            n = count[i]
            a1 = f"{100 * c1[i] / n:.2f}" if n else ""
            a5 = f"{100 * ck[i] / n:.2f}" if n else ""
            f.write(f"{i},{w},\"{name}\",{int(n)},{a1},{a5}\n")


if __name__ == "__main__":
    sys.exit("use: dsimagenet train --help")
