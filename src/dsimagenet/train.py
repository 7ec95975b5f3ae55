"""Train a Wide ResNet with the paper's recipe: ``train(TrainConfig(data="out/32_box", out="runs/wrn-28-2"))``.

    dsimagenet train --data out/32_box --out runs/wrn28-2 --width 2            # the paper's recipe
    dsimagenet train ... --resume                                              # continue a killed run
    torchrun --nproc_per_node=4 -m dsimagenet train --data ... --out ...       # DistributedDataParallel

Paper defaults: SGD with momentum 0.9, batch 128, lr 0.01 times 0.2 after epochs 10, 20 and 30, 40 epochs, the
penalty 5e-4 * sum(w^2) on conv and linear weights only, mean-image subtraction, every image and its mirror
each epoch with 4-pixel shifts. ``train`` below is the whole loop: ``build`` the parts, ``open_run`` (new or
resumed), then per epoch ``train_epoch``, ``evaluate``, ``record_epoch``; ``finish`` writes the result from what
is on disk. The learning rate is a pure function of (epoch, step). On CUDA: bf16 autocast, channels_last, the
uint8 data resident on the GPU, no host synchronisation inside an epoch except every ``log_every`` steps;
optional ``torch.compile``.

Before anything is written, every value is checked (``TrainConfig`` itself; then ``preflight.check_environment``:
the device, the data against the batch and the processes). One process holds a run directory at a time (an flock
that dies with it). A resumed checkpoint must be this run's (data, configuration, shapes, finite values: checked
in checkpoint.py, which also holds ``check_resume`` and ``extend_run``, re-exported here with
``check_environment``, ``LENGTH_FREE_SCHEDULES`` and ``dataset_fingerprint``). A
non-finite loss (read at the log points and at the epoch's end) or weight stops the run: ``Diverged``, exit
status 3, result.json ``{"status": "diverged", ...}``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from torch import nn

from dsimagenet import distributed, runs
from dsimagenet.checkpoint import (  # LENGTH_FREE_SCHEDULES, check_resume, extend_run: also train's API (__all__)
    LENGTH_FREE_SCHEDULES,
    check_resume,
    computed,
    extend_run,
    load_checkpoint,
    non_finite,
    save_checkpoint,
)
from dsimagenet.data import Loader
from dsimagenet.dataset import ImageNetDS
from dsimagenet.dataset import fingerprint as dataset_fingerprint  # its name here before it moved: kept
from dsimagenet.distributed import Dist
from dsimagenet.errors import Diverged
from dsimagenet.formats import native
from dsimagenet.formats.atomic import atomic_write
from dsimagenet.graphstep import GraphStep, graph_forward
from dsimagenet.model import WideResNet, count_parameters, default_depth
from dsimagenet.placement import device_facts
from dsimagenet.preflight import check_environment  # also train's API (__all__)
from dsimagenet.recipe import TrainConfig, learning_rate
from dsimagenet.runs import RunError

__all__ = ["TrainConfig", "learning_rate", "train", "evaluate", "make_optimizer", "topk_correct", "check_environment",
           "check_resume", "extend_run", "LENGTH_FREE_SCHEDULES", "dataset_fingerprint"]


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
    with distributed.process_group(device) as d:
        p = build(c, d, _torch_device(device, d), train_ds, val_ds, dataset_fingerprint(c.data))
        with open_run(p, resume) as at, _stop_signals() as stop, _run_bar(p, at):
            if isinstance(at, dict):  # finished (or diverged) before: its result
                return at
            ev = None
            for epoch in range(at.start_epoch, c.epochs):
                sums = train_epoch(p, at, epoch, stop)
                ev = evaluate(p.net, p.val_loader, p.num_classes, p.amp, d)
                line = record_epoch(p, at, epoch, sums, ev)
                if epoch + 1 < c.epochs and _stopping(p, stop):  # after the last epoch: the result is moments away
                    _interrupted(p, stop, epoch + 1, 0)
                if on_epoch is not None and d.main:
                    on_epoch(line)
            return finish(p, at, ev)


# --- the parts a run trains with

@dataclass(frozen=True)
class Parts:
    """What a run trains with, made once before its loop (a resumed checkpoint is loaded into them)."""

    config: TrainConfig
    dist: Dist
    device: torch.device
    fingerprint: str  # of the data (``dataset.fingerprint``): stored in config.json and in every checkpoint
    loader: Loader
    steps: int  # of an epoch: len(loader)
    val_loader: Loader
    val_ds: ImageNetDS  # its classes head per_class.csv
    model: WideResNet  # the weights a checkpoint holds
    opt: torch.optim.Optimizer
    net: nn.Module  # the model as the loop runs it: in DDP with several processes, compiled with --compile
    forward: Callable  # (x, y) -> (loss, [loss * n, correct, n]) of a training batch
    opt_step: Callable  # opt.step, compiled with --compile
    amp: bool  # bf16 autocast
    params: int
    graph: GraphStep | None = None  # with --cuda-graph on CUDA: the whole step, one launch (graphstep.py)

    @property
    def run(self) -> Path:
        return Path(self.config.out)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes


def _torch_device(device: str, d: Dist) -> torch.device:
    dev = torch.device(f"cuda:{d.local_rank}" if device == "cuda" else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
    return dev


def build(c: TrainConfig, d: Dist, dev: torch.device, train_ds: ImageNetDS, val_ds: ImageNetDS,
          fingerprint: str) -> Parts:
    """The loaders, the model (seeded by --seed) and its optimizer, and the networks the loop runs."""
    channels_last = c.channels_last and dev.type == "cuda"
    # with several ranks the last partial batch is dropped: an empty share would break BatchNorm
    loader = Loader(train_ds, c.batch_size, dev, c.augment, shuffle=True, seed=c.seed, normalize=c.normalize,
                    channels_last=channels_last, rank=d.rank, world_size=d.world, drop_last=d.world > 1,
                    pad=c.pad, pad_fill=c.pad_fill)
    val_loader = Loader(val_ds, c.eval_batch_size * d.world, dev, "none", shuffle=False, stats=loader.stats,
                        channels_last=channels_last, rank=d.rank, world_size=d.world)
    torch.manual_seed(c.seed)
    size = train_ds.image_size
    model = WideResNet(c.depth or default_depth(size), c.width, len(train_ds.wnids), size, c.dropout).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # compiled, the optimizer step is compiled too (inductor fuses it); eager on CUDA, the fused kernel (which a
    # CUDA graph captures with its learning rate in device memory)
    opt = make_optimizer(model, c, fused=dev.type == "cuda" and (not c.compile or c.cuda_graph))
    params = count_parameters(model)
    amp = dev.type == "cuda" and c.bf16
    net, forward, opt_step = _networks(c, d, dev, model, opt, amp)
    return Parts(c, d, dev, fingerprint, loader, len(loader), val_loader, val_ds, model, opt, net, forward, opt_step,
                 amp, params, _graph_step(c, dev, loader, model, opt, net, forward, amp))


def _graph_step(c: TrainConfig, dev: torch.device, loader: Loader, model: WideResNet, opt: torch.optim.Optimizer,
                net: nn.Module, forward: Callable, amp: bool) -> GraphStep | None:
    """With --cuda-graph on CUDA, the step that captures itself; on a CPU there are no CUDA graphs: the step runs
    as it always does, and says so."""
    if not c.cuda_graph:
        return None
    if dev.type != "cuda":
        if not c.quiet:
            print("--cuda-graph: no CUDA device here, the step runs without a graph", flush=True)
        return None
    if not c.compile:  # compiled, the forward is traced with its autocast; eager, autocast must keep no cache
        forward = graph_forward(net, nn.CrossEntropyLoss(label_smoothing=c.label_smoothing), dev.type, amp)
    return GraphStep(loader, model, opt, forward, capture=True)


def _networks(c: TrainConfig, d: Dist, dev: torch.device, model: WideResNet, opt: torch.optim.Optimizer,
              amp: bool) -> tuple[nn.Module, Callable, Callable]:
    """(the network to evaluate, the training forward, the optimizer step): the model, in DDP with global
    BatchNorm with several processes; with --compile, each compiled."""
    net: nn.Module = model
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(distributed.use_global_bn(model),
                                                  device_ids=[dev] if dev.type == "cuda" else None)
    criterion = nn.CrossEntropyLoss(label_smoothing=c.label_smoothing)
    if not c.compile:
        return net, _make_forward(net, criterion, dev.type, amp), opt.step
    # static shapes: a handful of batch sizes (train, its last partial batch, eval) each get their own graph,
    # which CUDA graphs need anyway; dynamic shapes would make every graph slower
    mode = None if c.compile_mode == "default" else c.compile_mode
    compiled = torch.compile(net, mode=mode, dynamic=False)
    if d.world == 1:  # the loss and the running sums join the network's graph (one launch with CUDA graphs)
        forward = torch.compile(_make_forward(net, criterion, dev.type, amp), mode=mode, dynamic=False)
    else:
        forward = _make_forward(compiled, criterion, dev.type, amp)
    return compiled, forward, torch.compile(opt.step)


def _make_forward(net: nn.Module, criterion: nn.Module, device_type: str, amp: bool) -> Callable:
    def forward(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss, and (loss * n, correct, n) to add to the epoch's running sums: one graph when compiled."""
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
            out = net(x)
            loss = criterion(out, y)
        n = torch.full((), y.shape[0], dtype=torch.float32, device=y.device)
        return loss, torch.stack([loss.detach().float() * n, (out.argmax(1) == y).sum().float(), n])

    return forward


# --- the run directory: new or resumed

@dataclass
class Progress:
    """Where the run is: with the weights and the optimizer, what a checkpoint keeps. The run began, in this
    process, at (``start_epoch``, ``start_step``): (0, 0) for a new run."""

    start_epoch: int
    start_step: int
    sums: torch.Tensor  # this epoch's (loss * n, correct, n) so far, on the device: never read inside a step
    train_seconds: float  # up to ``since``
    images_seen: int
    since: float = field(default_factory=time.perf_counter)  # when the time not yet in train_seconds began
    last_checkpoint: float = field(default_factory=time.monotonic)
    lr: float | None = None  # what the optimizer holds, once this process has set it
    bar: object = None  # the run's progress bar (dsimagenet.progress), on rank 0 unless quiet


def _progress(p: Parts, epoch: int = 0, step: int = 0, sums: list[float] | None = None, seconds: float = 0.0,
              images: int = 0) -> Progress:
    acc = torch.tensor(sums or [0.0, 0.0, 0.0], dtype=torch.float64, device=p.device)
    return Progress(epoch, step, acc, seconds, images)


@contextlib.contextmanager
def open_run(p: Parts, resume: bool) -> Iterator[Progress | dict]:
    """Hold the run directory throughout (rank 0 takes its lock; every rank hears what it found) and open the
    run in it: a new run (config.json and an empty metrics.jsonl), or with ``resume`` the one there, checked to be
    this one (``check_resume``); yields where it is, or the result of a run that ended before."""
    with _hold(p.run, p.dist, p.device) as (is_run, has_result):
        yield _resume(p, resume, has_result) if is_run else _start(p)


def _start(p: Parts) -> Progress:
    from dsimagenet.preflight import split_record

    c, run = p.config, p.run
    if p.dist.main:
        method = native.read_meta(c.data).get("method") if native.is_native(c.data) else None
        runs.write_json(run / runs.CONFIG, runs.config_record(
            c, dataset_fingerprint=p.fingerprint, world_size=p.dist.world, device=str(p.device), params=p.params,
            depth=p.model.depth, image_size=p.model.image_size, num_classes=p.num_classes, method=method,
            class_wnids=list(p.val_ds.wnids), splits=split_record(p.loader.dataset, p.val_ds),
            **device_facts(p.device)))
        with runs.naming(run / runs.METRICS):
            (run / runs.METRICS).touch()
    return _progress(p)


def _resume(p: Parts, resume: bool, has_result: bool) -> Progress | dict:
    """The run already in the directory: its result if it ended, or where its checkpoint is (the beginning
    without one); metrics.jsonl is cut back to the checkpoint's epoch."""
    run = p.run
    if not resume:
        raise RunError(f"{run}: already a run directory: pass --resume to continue it, or choose another --out")
    check_resume(run, p.config, p.fingerprint)
    if has_result:  # finished (or diverged) before
        result = runs.read_json(run / runs.RESULT)
        if result.get("status") == "diverged":
            raise Diverged(result.get("message") or f"{run}: this run diverged; start a new one with a lower --lr")
        runs.check_result(run, result, runs.read_metrics(run), p.config.epochs)
        return result
    at = _progress(p)
    if (run / runs.CHECKPOINT).exists():
        s = load_checkpoint(run / runs.CHECKPOINT, p.model, p.opt, p.config, p.fingerprint, p.steps, p.device)
        at = _progress(p, s["epoch"], s["step"], s["acc"], s["train_seconds"], s["images_seen"])
    if p.dist.main:
        runs.truncate_metrics(run, at.start_epoch)
    return at


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
            state = d.broadcast(torch.tensor(state, device=dev)).tolist()
        if error is not None:
            raise error
        if not state[0]:
            raise RunError(f"{run}: rank 0 could not take the run directory (its error says why)")
        yield bool(state[1]), bool(state[2])


def checkpoint(p: Parts, at: Progress, epoch: int, step: int) -> None:
    """Rank 0 saves the run as it is at (``epoch``, ``step``): weights, optimizer, ``at``, the RNGs. Weights
    holding a NaN or an infinity are never saved (a step since the last loss check can have broken them): the
    run is stopped as diverged instead."""
    if not p.dist.main:
        return
    weights = p.model.state_dict()
    bad = non_finite(weights)
    if bad is not None:
        _diverged(p, epoch if step else epoch - 1, step or p.steps, f"{bad} holds NaN or infinite values")
    state = {"model": weights, "optimizer": p.opt.state_dict(), "epoch": epoch, "step": step,
             "acc": [float(v) for v in at.sums.tolist()],
             "train_seconds": at.train_seconds + (time.perf_counter() - at.since),
             "images_seen": at.images_seen, "rng_cpu": torch.get_rng_state(), "fingerprint": p.fingerprint,
             "config": json.dumps(computed(p.config), sort_keys=True)}
    if p.device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state()
    save_checkpoint(p.run / runs.CHECKPOINT, state)




# --- an epoch

def train_epoch(p: Parts, at: Progress, epoch: int, stop: list[int]) -> list[float]:
    """Train ``epoch`` (from ``at.start_step`` in the epoch the run began in); returns its (loss * n, correct, n)
    summed over the ranks. Between steps ``_after_step`` logs, checkpoints and stops."""
    c = p.config
    at.since = time.perf_counter()
    p.net.train()
    first = at.start_step if epoch == at.start_epoch else 0
    batches = p.loader.epoch(epoch, first) if p.graph is None else p.graph.epoch(epoch, first)
    for step, (x, y) in enumerate(batches, first):
        lr = learning_rate(c, epoch, step, p.steps)
        if lr != at.lr:
            _set_lr(p.opt, lr, c.compile)
            at.lr = lr
        if p.graph is not None:  # gather, forward, backward and optimizer step: one graph (x None) or eager
            loss, sums = p.graph.step(x, y)
        else:
            loss, sums = p.forward(x, y)
            p.opt.zero_grad(set_to_none=True)
            loss.backward()
            p.opt_step()
        # running sums stay on the device: no host synchronisation per step
        # (a tensor made from a Python number here would be a host-to-device copy, which synchronises)
        at.sums += sums
        at.images_seen += len(y) * p.dist.world
        _after_step(p, at, epoch, step + 1, loss, lr, stop)
    if p.device.type == "cuda":
        torch.cuda.synchronize()
    at.train_seconds += time.perf_counter() - at.since
    total = p.dist.all_reduce(at.sums.clone()).tolist()
    if not math.isfinite(total[0]):
        _diverged(p, epoch, p.steps, f"the training loss is {total[0] / total[2]}")
    return total


def _after_step(p: Parts, at: Progress, epoch: int, done: int, loss: torch.Tensor, lr: float,
                stop: list[int]) -> None:
    """After ``done`` steps of ``epoch``: every ``log_every`` steps the loss check and a progress line; a
    checkpoint when one is due; a stop asked for by a signal (checkpointed here)."""
    c, d = p.config, p.dist
    log = done % c.log_every == 0
    if log:  # the one host synchronisation inside an epoch: a NaN or inf in any step stays in the sum
        running = d.all_reduce(at.sums[:1].clone()).item() if d.world > 1 else at.sums[0].item()
        if not math.isfinite(running):
            _diverged(p, epoch, done, f"the running training loss is {running}")
    due = (c.checkpoint_every_steps and done % c.checkpoint_every_steps == 0) or (
        log and time.monotonic() - at.last_checkpoint > 60 * c.checkpoint_minutes)
    if done < p.steps and (d.world == 1 or log) and _stopping(p, stop):
        checkpoint(p, at, epoch, done)
        _interrupted(p, stop, epoch, done)
    if due and done < p.steps:
        checkpoint(p, at, epoch, done)
        at.last_checkpoint = time.monotonic()
    if log and d.main and not c.quiet:
        value = loss.item()
        if at.bar is not None:  # set before the update, which may print it
            seconds = at.train_seconds + time.perf_counter() - at.since
            at.bar.set_postfix_str(f"epoch {epoch + 1}/{c.epochs}, loss {value:.4f}, lr {lr:.3g}, "
                                   f"{at.images_seen / seconds if seconds > 0 else 0:,.0f} img/s")
        if not _on_terminal(at):  # there the bar shows it; in a log, the line
            print(f"  epoch {epoch + 1} step {done}/{p.steps} loss {value:.4f} lr {lr:.5g}", flush=True)
    if at.bar is not None:
        at.bar.update(1)


@contextlib.contextmanager
def _run_bar(p: Parts, at: Progress | dict) -> Iterator[None]:
    """The run's progress (steps of all its epochs, from where it resumed): a tqdm bar on a terminal, plain lines
    on stderr in a log (dsimagenet.progress), on rank 0, none with --quiet; held in ``at.bar``."""
    from dsimagenet.progress import bar

    if isinstance(at, dict) or not p.dist.main or p.config.quiet:
        yield
        return
    with bar(p.config.epochs * p.steps, "train", unit="step", initial=at.start_epoch * p.steps + at.start_step) as b:
        at.bar = b
        try:
            yield
        finally:
            at.bar = None


def _on_terminal(at: Progress) -> bool:
    """Whether a tqdm bar is drawn on the terminal that stdout prints to (lines go above it, by ``_say``)."""
    return hasattr(at.bar, "write") and sys.stdout.isatty()


def _say(at: Progress, text: str) -> None:
    if _on_terminal(at):
        at.bar.write(text, file=sys.stdout)
    else:
        print(text, flush=True)


def record_epoch(p: Parts, at: Progress, epoch: int, sums: list[float], ev: dict) -> dict:
    """After ``epoch`` is trained (``sums``) and evaluated (``ev``): stopped if anything went non-finite; else
    its metrics line, appended to metrics.jsonl (and printed), and a checkpoint at its end. Returns the line."""
    c, d = p.config, p.dist
    if not math.isfinite(ev["val_loss"]):
        _diverged(p, epoch, p.steps, f"the validation loss is {ev['val_loss']}")
    bad = non_finite(p.model.state_dict())  # an infinite BN variance leaves the losses finite, and meaningless
    if bad is not None:
        _diverged(p, epoch, p.steps, f"{bad} holds NaN or infinite values")
    line = {"epoch": epoch + 1, "lr": learning_rate(c, epoch, 0, p.steps),
            "train_loss": runs.measured(sums[0] / sums[2]), "train_error": runs.percent(sums[2] - sums[1], sums[2]),
            "val_loss": ev["val_loss"], "top1_error": ev["top1_error"], "top5_error": ev["top5_error"],
            "train_seconds": round(at.train_seconds, 3), "images_per_s": round(at.images_seen / at.train_seconds, 1)}
    at.sums.zero_()
    at.since = time.perf_counter()  # checkpoint() adds the time since then to train_seconds
    if d.main:
        runs.append_metrics(p.run, line)
        if not c.quiet:
            # top-5 of 10 classes or fewer holds the true class half the time by chance: not worth a column
            top5 = f" top-5 {line['top5_error']}%" if p.num_classes > 10 else ""
            _say(at, f"epoch {epoch + 1}/{c.epochs}  train loss {line['train_loss']:.4f} error "
                     f"{line['train_error']}%  val top-1 {line['top1_error']}%{top5}  "
                     f"{line['images_per_s']:,.0f} img/s")  # errors as measured
    checkpoint(p, at, epoch + 1, 0)
    at.last_checkpoint = time.monotonic()
    return line


def _diverged(p: Parts, epoch: int, step: int, what: str) -> NoReturn:
    """Stop the run: it is marked diverged (rank 0) and every rank raises, having seen the same values."""
    msg = (f"{p.run}: diverged in epoch {epoch + 1} by step {step}/{p.steps}: {what}; the run is stopped and "
           f"marked diverged; start a new one with a lower --lr (it was {p.config.lr:g})")
    if p.dist.main:
        runs.write_json(p.run / runs.RESULT, {"status": "diverged", "epoch": epoch + 1, "step": step, "message": msg})
    raise Diverged(msg)


def _stopping(p: Parts, stop: list[int]) -> bool:
    """Whether a signal asked to stop: every step with one process (a Python list, no synchronisation);
    with several, all must stop at the same step, so they agree at the log points and epoch ends."""
    if p.dist.world == 1:
        return bool(stop)
    return p.dist.all_reduce(torch.tensor([float(bool(stop))], device=p.device)).item() > 0


def _interrupted(p: Parts, stop: list[int], epoch: int, step: int) -> NoReturn:
    import signal

    signum = stop[0] if stop else signal.SIGTERM  # another rank got it
    raise runs.Interrupted(f"{p.run}: stopped by {signal.Signals(signum).name} in epoch {epoch + 1} at step "
                           f"{step}/{p.steps}; the checkpoint is saved there: --resume to continue", signum)


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


# --- the result

def finish(p: Parts, at: Progress, ev: dict | None) -> dict:
    """The run's result, from metrics.jsonl as it is on disk; rank 0 writes it to result.json, and ``ev`` (the
    last evaluation) to per_class.csv. ``ev`` None: every epoch was done before (the run stopped after its last
    checkpoint): the checkpoint's weights are evaluated."""
    c, d = p.config, p.dist
    if ev is None:
        if d.main and not c.quiet:
            done = "its epoch was" if c.epochs == 1 else f"all {c.epochs} epochs were"
            print(f"{p.run}: {done} done; the result comes from the checkpoint", flush=True)
        ev = evaluate(p.net, p.val_loader, p.num_classes, p.amp, d)
    result = {}
    if d.main:
        result = _result(p, at, runs.read_metrics(p.run))
        _write_per_class(p.run / runs.PER_CLASS, ev["per_class"], p.val_ds)
        runs.write_json(p.run / runs.RESULT, result)
    d.barrier()
    return result


def _result(p: Parts, at: Progress, metrics: list[dict]) -> dict:
    c, final = p.config, metrics[-1]
    result = {"status": "finished", "top1_error": final["top1_error"], "top5_error": final["top5_error"],
              "params": p.params, "epochs": c.epochs, "depth": p.model.depth, "width": c.width,
              "image_size": p.model.image_size, "train_seconds": round(at.train_seconds, 3),
              "train_images_per_s": round(at.images_seen / at.train_seconds, 1), "device": str(p.device),
              "world_size": p.dist.world, "val_images": len(p.val_ds),  # errors are k wrong of these, in percent
              **device_facts(p.device)}
    at_report = [m for m in metrics if m["epoch"] == c.report_epoch]
    if at_report:
        result[f"top1_error_ep{c.report_epoch}"] = at_report[0]["top1_error"]
        result[f"top5_error_ep{c.report_epoch}"] = at_report[0]["top5_error"]
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


# --- the optimizer, the learning rate, evaluation

def make_optimizer(model: WideResNet, c: TrainConfig, fused: bool = False) -> torch.optim.SGD:
    """SGD; with ``--decay paper`` the paper's penalty wd * sum(w^2) on conv and linear weights, a gradient of
    2 * wd * w; with ``all`` PyTorch's weight_decay wd on every parameter, BN and biases too (NAS-Bench-201's
    ``SGD(net.parameters(), ..., weight_decay=decay)``). ``fused`` (CUDA): one kernel per parameter group and
    step instead of several per tensor list."""
    if c.decay == "all":
        return torch.optim.SGD([{"params": list(model.parameters()), "weight_decay": c.weight_decay}],
                               lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, fused=fused or None)
    decay, no_decay = model.decayed_parameters()
    return torch.optim.SGD([{"params": decay, "weight_decay": 2 * c.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, fused=fused or None)


def _set_lr(opt: torch.optim.Optimizer, lr: float, tensor: bool) -> None:
    """A compiled step reads the learning rate from a (CPU) tensor, changed in place (a Python float would be
    compiled in as a constant); a new optimizer or a resumed checkpoint brings a float or a tensor: the first
    call of a run, before the first step, makes it the kind this run needs."""
    for g in opt.param_groups:
        if isinstance(g["lr"], torch.Tensor) and g["lr"].is_cuda:  # --cuda-graph's: the graph reads it there
            g["lr"].fill_(lr)
        elif not tensor:
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
    return {"val_loss": runs.measured(loss / n), "top1_error": runs.percent(n - c1, n),
            "top5_error": runs.percent(n - ck, n),
            "per_class": per_class.cpu().numpy()}


if __name__ == "__main__":
    sys.exit("use: dsimagenet train --help")
