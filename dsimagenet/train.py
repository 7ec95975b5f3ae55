"""Train a Wide ResNet with the paper's recipe: ``train(TrainConfig(data="out/32_box", out="runs/wrn-28-2"))``.

    dsimagenet train --data out/32_box --out runs/wrn28-2 --width 2            # the paper's recipe
    dsimagenet train ... --resume                                              # continue a killed run
    torchrun --nproc_per_node=4 -m dsimagenet train --data ... --out ...       # DistributedDataParallel

Paper defaults: SGD with momentum 0.9, batch 128, lr 0.01 times 0.2 after epochs 10, 20 and 30, 40 epochs, the
penalty 5e-4 * sum(w^2) on conv and linear weights only, mean-image subtraction, every image and its mirror
each epoch with 4-pixel shifts. The loop below is the whole training; the learning rate is a pure function of
(epoch, step). On CUDA: bf16 autocast, channels_last, the uint8 data resident on the GPU, no host
synchronisation inside an epoch except every ``log_every`` steps; optional ``torch.compile``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dsimagenet import runs
from dsimagenet.data import Loader
from dsimagenet.dataset import ImageNetDS
from dsimagenet.formats import native, official
from dsimagenet.formats.atomic import atomic_write
from dsimagenet.model import WideResNet, count_parameters, default_depth
from dsimagenet.recipe import OPERATIONAL, TrainConfig, learning_rate

__all__ = ["TrainConfig", "learning_rate", "train", "evaluate", "make_optimizer", "topk_correct"]


def dataset_fingerprint(path: str | Path) -> str:
    """Identifies the data a run was trained on: native checksums, or official files' sizes and ends."""
    path = Path(path)
    h = hashlib.sha256()
    if native.is_native(path):
        meta = native.read_meta(path)
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
    with atomic_write(path) as f:
        torch.save(state, f)


def _check_resume(run: Path, config: TrainConfig, fingerprint: str) -> None:
    old = json.loads((run / runs.CONFIG).read_text())
    if old.get("dataset_fingerprint") != fingerprint:
        raise ValueError(f"{run}: refusing to resume on different data: the run was trained on "
                         f"{old['config']['data']} (fingerprint {old.get('dataset_fingerprint', '?')[:12]}), "
                         f"--data {config.data} is {fingerprint[:12]}")
    new = json.loads(json.dumps(dataclasses.asdict(config)))
    diff = sorted(k for k in set(new) | set(old["config"])
                  if k not in OPERATIONAL and new.get(k) != old["config"].get(k))
    if diff:
        raise ValueError(f"{run}: refusing to resume with a different configuration: " +
                         ", ".join(f"{k} was {old['config'].get(k)!r}, now {new.get(k)!r}" for k in diff))


def train(config: TrainConfig, resume: bool = False, on_epoch=None) -> dict:
    """Run the recipe; returns the result dict (also written to ``config.out``/result.json).

    ``on_epoch(line)`` is called with each epoch's metrics line after it is written (and its checkpoint saved);
    an exception it raises stops the run there (``dsimagenet tune`` prunes trials so)."""
    c = config
    device = c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    d = _setup_distributed(device)
    dev = torch.device(f"cuda:{d.local_rank}" if device == "cuda" else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
    amp = dev.type == "cuda" and c.bf16
    run = Path(c.out)

    # --- data
    train_ds = ImageNetDS(c.data, "train", c.order, c.classes, c.max_per_class)
    val_ds = ImageNetDS(c.data, "val", c.order, c.classes)
    size = train_ds.image_size
    if c.size is not None and c.size != size:
        raise ValueError(f"{c.data}: the data is {size} px, but size={c.size} was asked for")
    fingerprint = dataset_fingerprint(c.data)
    # with several ranks the last partial batch is dropped: an empty share would break BatchNorm
    loader = Loader(train_ds, c.batch_size, dev, c.augment, shuffle=True, seed=c.seed, normalize=c.normalize,
                    channels_last=c.channels_last and dev.type == "cuda", rank=d.rank, world_size=d.world,
                    drop_last=d.world > 1)
    val_loader = Loader(val_ds, c.eval_batch_size * d.world, dev, "none", shuffle=False, stats=loader.stats,
                        channels_last=c.channels_last and dev.type == "cuda", rank=d.rank, world_size=d.world)
    num_classes = len(train_ds.wnids)

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
    if (run / runs.CONFIG).exists():
        if not resume:
            raise FileExistsError(f"{run}: already a run directory: pass --resume to continue it, or choose "
                                  "another --out")
        _check_resume(run, c, fingerprint)
        if ckpt_path.exists():
            try:  # weights_only: tensors and plain values only, never code from the file
                state = torch.load(ckpt_path, map_location=dev, weights_only=True)
            except Exception as e:  # noqa: BLE001 - torch raises several types for damaged or unsafe files
                raise ValueError(f"{ckpt_path}: unreadable checkpoint ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]}); remove it to restart the run") from None
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng_cpu"])
            if dev.type == "cuda" and "rng_cuda" in state:
                torch.cuda.set_rng_state(state["rng_cuda"].cpu())
            start_epoch, start_step = state["epoch"], state["step"]
            acc, train_seconds, images_seen = state["acc"], state["train_seconds"], state["images_seen"]
        if start_epoch >= c.epochs and (run / runs.RESULT).exists():
            return json.loads((run / runs.RESULT).read_text())  # finished already
        if d.main:
            runs.truncate_metrics(run, start_epoch)
    elif d.main:
        run.mkdir(parents=True, exist_ok=True)
        runs.write_json(run / runs.CONFIG, {"config": dataclasses.asdict(c), "versions": runs.versions(),
                                            "git_commit": runs.git_commit(), "dataset_fingerprint": fingerprint,
                                            "world_size": d.world, "device": str(dev), "params": params,
                                            "depth": depth, "image_size": size, "num_classes": num_classes,
                                            "method": native.read_meta(c.data).get("method")
                                            if native.is_native(c.data) else None})
        (run / runs.METRICS).touch()

    def checkpoint(epoch: int, step: int) -> None:
        if not d.main:
            return
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "step": step,
                 "acc": acc_values(), "train_seconds": train_seconds + (time.perf_counter() - t0),
                 "images_seen": images_seen, "rng_cpu": torch.get_rng_state(), "fingerprint": fingerprint}
        if dev.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state()
        _save_checkpoint(ckpt_path, state)

    def acc_values() -> list[float]:
        return [float(v) for v in acc_t.tolist()]

    # --- the loop
    steps = len(loader)
    last_ckpt, last_lr = time.monotonic(), None
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
            due = (c.checkpoint_every_steps and done % c.checkpoint_every_steps == 0) or (
                done % c.log_every == 0 and time.monotonic() - last_ckpt > 60 * c.checkpoint_minutes)
            if due and done < steps:
                checkpoint(epoch, done)
                last_ckpt = time.monotonic()
            if done % c.log_every == 0 and d.main and not c.quiet:
                print(f"  epoch {epoch + 1} step {done}/{steps} loss {loss.item():.4f} lr {lr:.5g}", flush=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - t0
        tr = d.all_reduce(acc_t.clone()).tolist()
        ev = evaluate(net, val_loader, num_classes, amp, d)
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
        if on_epoch is not None and d.main:
            on_epoch(line)

    # --- result
    metrics = runs.read_metrics(run) if d.main else []
    result = {}
    if d.main:
        final = metrics[-1]
        result = {"top1_error": final["top1_error"], "top5_error": final["top5_error"], "params": params,
                  "epochs": c.epochs, "depth": depth, "width": c.width, "image_size": size,
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
    with atomic_write(path, "w") as f:
        f.write("index,wnid,name,count,top1_accuracy,top5_accuracy\n")
        for i, (w, name) in enumerate(zip(ds.wnids, ds.classes, strict=True)):
            n = count[i]
            a1 = f"{100 * c1[i] / n:.2f}" if n else ""
            a5 = f"{100 * ck[i] / n:.2f}" if n else ""
            f.write(f"{i},{w},\"{name}\",{int(n)},{a1},{a5}\n")


if __name__ == "__main__":
    sys.exit("use: dsimagenet train --help")
