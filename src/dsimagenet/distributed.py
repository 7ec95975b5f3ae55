"""Several training processes (``torchrun --nproc_per_node=K -m dsimagenet train ...``): who this process is,
the collectives the trainer needs, and BatchNorm over the global batch.

    with process_group(device) as d:   # Dist(rank, world, local_rank): one process without torchrun
    d.all_reduce(t); d.broadcast(t); d.barrier()   # no-ops with one process

NCCL on CUDA, gloo on the CPU (what the tests use).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


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


def use_global_bn(module: nn.Module) -> nn.Module:
    """Make every BatchNorm2d a GlobalBatchNorm2d in place: the same parameters and buffers, so an optimizer
    made before still holds them."""
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d
    return module


@dataclass
class Dist:
    """This process among ``world`` (rank 0 is the main one: it alone writes the run directory)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place; returns it."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``t`` on every rank, in place; returns it."""
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast(t, 0)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def setup(device: str) -> Dist:
    """This process's place, from torchrun's WORLD_SIZE and LOCAL_RANK; joins the process group if there are
    several ("cuda" uses NCCL, "cpu" gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Dist(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def process_group(device: str) -> Iterator[Dist]:
    """``setup(device)`` for the length of a run; a group joined here is left again when the run ends normally,
    as torch asks: a gloo group left to the interpreter's exit can abort the process at exit ("terminate called
    without an active exception") after the run has finished. All ranks meet first: a rank that destroys the
    group while another still uses it aborts the same way. After an exception the group is left alone:
    destroying it while other ranks may still be in a collective can hang."""
    import torch.distributed as dist

    joined_here = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    d = setup(device)
    yield d
    if joined_here:
        dist.barrier()  # every rank is done with the group before any leaves it
        dist.destroy_process_group()
