"""The whole training step in one CUDA graph (``--cuda-graph``): batch gather and augmentation, forward, loss,
backward and the optimizer step, replayed with one launch a step.

    dsimagenet train --data out/32_box --out runs/wrn28-2 --width 2 --cuda-graph             # eager kernels
    dsimagenet train --data out/32_box --out runs/wrn28-2 --width 2 --cuda-graph --compile   # inductor's kernels

At batch 128 a small network (WRN-28-2) is bound by the host launching its few hundred kernels a step; a graph
launches them all at once. What a graph needs, and how the step provides it:
- shapes and addresses that never change: each epoch's plan (``data.rank_plan``: the images in reading order,
  which are mirrored, every crop's offset, the labels) is copied once into static device buffers, and a step
  counter on the device picks the step's row of them (``data.gather_fixed`` cuts the batch);
- no host synchronisation: the learning rate lives in a device tensor that ``train._set_lr`` fills in place
  (a Python float would be captured as a constant), SGD is the fused kernel, autocast keeps no cache;
- the recipe unchanged: the same batch of 128, the same images, mirrors and crops, bf16 autocast as eager. The
  warm-up steps that capture needs (cudnn's choice of algorithms, the allocator, torch.compile) run on a copy of
  the state: weights, BatchNorm statistics, momentum buffers, step counter and RNG are put back before the graph
  is captured, so the run computes what the eager step computes (within float rounding);
- an epoch's last, smaller batch (when the samples do not divide by the batch) runs eagerly.

On a CPU the same static-buffer step runs without a graph (``capture=False``): that is what the tests compare
with the eager step. With several processes (DDP) or a split that is not resident on the GPU the option is
refused (ConfigError).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from dsimagenet.data import Loader, batch_buffers, gather_fixed, rank_plan
from dsimagenet.errors import ConfigError

WARMUP = 3  # steps before capture (the PyTorch recipe's count: cudnn benchmarking, the allocator, compilation)


def graph_forward(net: nn.Module, criterion: nn.Module, device_type: str, amp: bool) -> Callable:
    """train's forward, with autocast's cache of cast weights off: a cache filled while capturing would hold
    casts the replays never redo."""
    def forward(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
            out = net(x)
            loss = criterion(out, y)
        n = torch.full((), y.shape[0], dtype=torch.float32, device=y.device)
        return loss, torch.stack([loss.detach().float() * n, (out.argmax(1) == y).sum().float(), n])

    return forward


class GraphStep:
    """The training step of one process over ``loader``'s batches: ``epoch(e, first)`` yields ``(x, y)`` per step
    (x None for a step of the static path), ``step(x, y)`` trains it and returns (loss, sums) as train's forward
    does. ``forward``: (x, y) -> (loss, sums), compiled or not; ``capture``: record a CUDA graph (CUDA only)."""

    def __init__(self, loader: Loader, model: nn.Module, opt: torch.optim.Optimizer, forward: Callable,
                 capture: bool):
        if loader.world_size > 1:
            raise ConfigError("--cuda-graph: one process only (with several, leave it out: DDP's communication "
                              "is not captured)")
        if not loader.resident:
            raise ConfigError(f"--cuda-graph needs the training split resident on the device, and "
                              f"{loader.dataset.data.nbytes / 2**30:.1f} GiB does not fit in half of its free "
                              "memory: leave --cuda-graph out")
        self.loader, self.model, self.opt, self.forward, self.capture = loader, model, opt, forward, capture
        b, dev = loader.batch_size, loader.device
        self.full = loader.samples_per_epoch // b  # steps of a whole batch: the static path
        m = self.full * b
        self._read = torch.zeros(m, dtype=torch.int64, device=dev)
        self._base = torch.zeros(m, dtype=torch.int64, device=dev)
        self._mirrored = torch.zeros((self.full, b), dtype=torch.bool, device=dev)
        self._y = torch.zeros(m, dtype=torch.int64, device=dev)
        self._at = torch.zeros((1,), dtype=torch.int64, device=dev)  # the step the next replay trains
        self._buffers = batch_buffers(b, loader.size, dev)
        self._epoch_base: bool | None = None  # whether this epoch's plan shifts or mirrors (crops and flips)
        self.graph = None
        self.loss = self.sums = None

    def epoch(self, epoch: int, first: int = 0) -> Iterator[tuple[torch.Tensor | None, torch.Tensor]]:
        """Load ``epoch``'s plan into the static buffers; then per step from ``first`` on: (None, the step's
        labels) on the static path, the Loader's own (x, y) for a last partial batch."""
        ld, b = self.loader, self.loader.batch_size
        p = rank_plan(ld.plan(epoch), b, 0, 1, ld.drop_last, ld.size)
        m = self.full * b
        self._copy(self._read, p.read[:m])
        self._copy(self._y, ld.targets[p.index[:m]])
        if p.base is not None:
            self._copy(self._base, p.base[:m])
            mirrored = np.arange(b)[None, :] >= b - p.mirrored[:self.full, None]  # the mirrored tail of each batch
            self._copy(self._mirrored, mirrored)
        has_base = p.base is not None
        if self._epoch_base is not None and has_base != self._epoch_base:  # a plan is the same kind every epoch
            raise RuntimeError("an epoch plan changed kind between epochs; the captured graph cannot follow")
        self._epoch_base = has_base
        self._at.fill_(first)
        y = self._y.view(self.full, b) if self.full else self._y.view(0, b)
        for step in range(first, self.full):
            yield None, y[step]
        if self.full < len(ld):
            yield from ld.epoch(epoch, max(first, self.full))

    @staticmethod
    def _copy(dst: torch.Tensor, src: np.ndarray) -> None:
        dst.copy_(torch.from_numpy(np.ascontiguousarray(src)).view(dst.shape))

    def step(self, x: torch.Tensor | None, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x is not None:  # a partial last batch: eager, into the same gradient tensors as the graph's
            loss, sums = self.forward(x, y)
            self.opt.zero_grad(set_to_none=self.graph is None)
            loss.backward()
            self.opt.step()
            return loss, sums
        if not self.capture:
            self.opt.zero_grad(set_to_none=True)
            return self._body()
        if self.graph is None:
            self._record()
        self.graph.replay()
        return self.loss, self.sums

    def _body(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of the static path: the batch at the step counter, trained; the counter moves on."""
        b = self.loader.batch_size
        at = self._at
        read = self._read.view(self.full, b).index_select(0, at).view(b)
        y = self._y.view(self.full, b).index_select(0, at).view(b)
        base = self._base.view(self.full, b).index_select(0, at).view(b) if self._epoch_base else None
        mirrored = self._mirrored.index_select(0, at).view(b) if self._epoch_base else None
        x = gather_fixed(self.loader.images, read, mirrored, base, self.loader._norm, self._buffers)
        if self.loader.dtype != torch.float32 or self.loader.channels_last:
            x = x.to(dtype=self.loader.dtype, memory_format=torch.channels_last if self.loader.channels_last
                     else torch.contiguous_format)
        loss, sums = self.forward(x, y)
        loss.backward()
        self.opt.step()
        at += 1
        return loss, sums

    def _state(self) -> list[torch.Tensor]:
        """Every tensor a step changes: weights and BatchNorm buffers, momentum buffers, the step counter."""
        moments = [s["momentum_buffer"] for s in self.opt.state.values() if s.get("momentum_buffer") is not None]
        return [*self.model.state_dict().values(), *moments, self._at]

    def _record(self) -> None:
        """Warm up on a side stream, put the state back as it was, and capture one step."""
        dev = self.loader.device
        for g in self.opt.param_groups:  # the graph reads the learning rate from device memory
            g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=dev)
        fresh = [p for g in self.opt.param_groups for p in g["params"]
                 if self.opt.state.get(p, {}).get("momentum_buffer") is None]
        torch.cuda.synchronize(dev)
        saved = [t.clone() for t in self._state()]
        before = self._state()
        rng = torch.cuda.get_rng_state(dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                self.opt.zero_grad(set_to_none=True)
                self._body()
        torch.cuda.current_stream(dev).wait_stream(side)
        with torch.no_grad():
            for t, s in zip(before, saved, strict=True):
                t.copy_(s)
            for p in fresh:  # no momentum before: the first step's buffer is its gradient, as 0.9 * 0 + g
                self.opt.state[p]["momentum_buffer"].zero_()
        torch.cuda.set_rng_state(rng, dev)
        self.opt.zero_grad(set_to_none=True)  # the captured backward allocates the gradients in the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss, self.sums = self._body()
