"""Benchmark: one ImageNet16-120 epoch with NAS-Bench-201's recipe (--recipe nasbench201), dsimagenet's Loader
against NAS-Bench-201's own input pipeline, reimplemented without torchvision, in the same run on the same model.

    .venv/bin/python bench/nasbench201.py --workers 0 1              # 20,000 images, CPU, 1 thread, median of 3
    .venv/bin/python bench/nasbench201.py --threads 16 --workers 0 8 # a bigger CPU: the baseline with 0 and 8 workers
    .venv/bin/python bench/nasbench201.py --images 2000 --train-images 512 --runs 1   # a quick check that it runs

Data: ``--images`` generated 16 px images over 120 classes (ImageNet16-120's shape; the content does not change
the cost). Baseline: what NAS-Bench-201 trains with (xautodl's ImageNet16 Dataset and get_datasets): a Dataset
that makes each sample with PIL and numpy, RandomHorizontalFlip, RandomCrop(16, padding=2), ToTensor,
Normalize, in a DataLoader(batch_size=256, shuffle=True, pin_memory on CUDA). Ours: ``Loader(..., augment="flip",
normalize="nasbench201", pad=2, pad_fill="black")``, the same samples by whole-batch tensor ops. Both feed the
same WRN-20-1 (16 px, 120 classes; NAS-Bench-201's cell networks are not in dsimagenet) with the recipe's
optimizer (``train.make_optimizer``: Nesterov SGD, weight decay on every parameter). Two figures each, median of
``--runs`` interleaved runs: the input pipeline alone (images/s over a whole pass of the ``--images``) and full
training steps (images/s over the first ``--train-images`` of a pass: the model, not the data, sets that rate),
each also as the seconds of one 151,700-image epoch at that rate.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
import torch

EPOCH = 151_700  # ImageNet16-120's training images
MEAN, STD = (122.68, 116.66, 104.01), (63.22, 61.26, 65.09)  # NAS-Bench-201's, over 255


class Split:
    def __init__(self, data, targets):
        self.data, self.targets, self.mean, self.wnids = data, targets, None, None

    def __len__(self):
        return len(self.data)


class NASBench201Dataset(torch.utils.data.Dataset):
    """NAS-Bench-201's ImageNet16 training samples, one at a time, as torchvision's transforms make them:
    Image.fromarray, RandomHorizontalFlip, RandomCrop(16, padding=2) (ImageOps.expand with 0, then a crop at an
    origin drawn from 0..4), ToTensor (HWC uint8 -> CHW float / 255), Normalize ((x - mean) / std per channel)."""

    def __init__(self, data, targets):
        self.data, self.targets = data, targets
        self.mean = torch.tensor([m / 255 for m in MEAN])[:, None, None]
        self.std = torch.tensor([s / 255 for s in STD])[:, None, None]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        from PIL import Image, ImageOps

        img = Image.fromarray(self.data[i])
        if random.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img = ImageOps.expand(img, border=2, fill=0)
        x, y = random.randint(0, 4), random.randint(0, 4)
        img = img.crop((x, y, x + 16, y + 16))
        t = torch.from_numpy(np.array(img, np.uint8)).permute(2, 0, 1).contiguous().float().div(255)
        return t.sub_(self.mean).div_(self.std), int(self.targets[i])


def model_and_optimizer(device: torch.device):
    from dsimagenet.model import WideResNet
    from dsimagenet.recipe import TrainConfig
    from dsimagenet.train import make_optimizer

    torch.manual_seed(0)
    net = WideResNet(20, 1, 120, 16).to(device)
    opt = make_optimizer(net, TrainConfig(recipe="nasbench201", data="-", out="-"))
    return net, opt


def one_pass(batches, device: torch.device, step=None, limit: int | None = None) -> float:
    """Images/s of one pass over ``batches`` (on ``device``; the first ``limit`` images of it), with a training
    ``step`` on each batch or without."""
    n = 0
    t = time.perf_counter()
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if step is not None:
            step(x, y)
        n += len(y)
        if limit is not None and n >= limit:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20_000, help="images in the subset timed")
    p.add_argument("--train-images", type=int, default=2048, help="images of each timed training pass")
    p.add_argument("--runs", type=int, default=3, help="interleaved runs of each; the median is reported")
    # 1 by default: on a CPU shared with other work, torch's OpenMP threads wait on each other for whole time
    # slices (seen here: 2 threads on 2 busy cores trained at 57 images/s, 1 thread at 940)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the model's, and the Loader's)")
    p.add_argument("--workers", type=int, nargs="+", default=[0], help="the baseline DataLoader's worker counts")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()

    from dsimagenet.data import Loader

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (args.images, 16, 16, 3), dtype=np.uint8)
    targets = rng.integers(0, 120, args.images)
    ours = Loader(Split(data, targets), args.batch_size, device, augment="flip", normalize="nasbench201", pad=2,
                  pad_fill="black", seed=0)
    theirs = {w: torch.utils.data.DataLoader(NASBench201Dataset(data, targets), batch_size=args.batch_size,
                                             shuffle=True, num_workers=w, pin_memory=device.type == "cuda",
                                             persistent_workers=w > 0)
              for w in args.workers}
    net, opt = model_and_optimizer(device)
    criterion = torch.nn.CrossEntropyLoss()
    net.train()

    def step(x, y):
        loss = criterion(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    pipelines = {"dsimagenet Loader (--recipe nasbench201)": lambda e: ours.epoch(e)}
    pipelines.update({f"NAS-Bench-201's per-sample pipeline, {w} workers": (lambda e, d=d: d)
                      for w, d in theirs.items()})
    for x, y in ours.epoch(100):  # warm: first allocations, the model's kernels chosen
        step(x.to(device), y.to(device))
        break
    rates = {(name, what): [] for name in pipelines for what in ("input", "train")}
    for r in range(args.runs):  # interleaved, so that every pipeline sees the same machine load
        for name, batches in pipelines.items():
            rates[name, "input"].append(one_pass(batches(r), device))
            rates[name, "train"].append(one_pass(batches(r), device, step, args.train_images))

    print(f"one ImageNet16-120 epoch ({EPOCH:,} images) with NAS-Bench-201's recipe, timed on {args.images:,} "
          f"generated 16 px images ({args.train_images:,} of them trained on), batch {args.batch_size}, "
          f"{device.type}, {args.threads} torch threads, median of {args.runs}; WRN-20-1 (120 classes):")
    base = {}
    for what, title in (("input", "input pipeline alone"), ("train", "full training step")):
        print(f"  {title}:")
        for name in pipelines:
            rate = statistics.median(rates[name, what])
            ratio = f"  (ours: {base[what] / rate:.2f}x this)" if what in base else ""
            base.setdefault(what, rate)
            print(f"    {name:<52} {rate:10,.0f} images/s  {EPOCH / rate:8.1f} s/epoch{ratio}")


if __name__ == "__main__":
    main()
