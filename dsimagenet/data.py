"""The batch loader: the uint8 split resident on the device, whole batches gathered, normalised and augmented
with tensor ops there (after KellerJordan/cifar10-airbench), deterministic for a seed, resumable at any step.

    >>> train = open_dataset("out/32_box")
    >>> loader = Loader(train, batch_size=128, device="cuda", augment="paper", seed=0)
    >>> for x, y in loader.epoch(0):          # x float (128, 3, 32, 32), y int64 (128,)
    ...     ...
    >>> val = Loader(open_dataset("out/32_box", "val"), 500, "cuda", augment="none", shuffle=False,
    ...              stats=loader.stats)     # normalise val with the training mean

Augmentations (per epoch, drawn from ``numpy.random.default_rng([seed, epoch])``):
  "paper": 2N samples, every image once as it is and once mirrored (the paper's code concatenates flipped
           copies), each shifted by up to 4 px: zero padding after mean subtraction, then a random crop;
  "flip":  N samples, random mirror and the same shift;
  "none":  N samples as they are.
Normalisation: "mean" subtracts the mean training image and divides by 255 (the paper's code); "meanstd"
uses per-channel mean and std of the training set; None only scales to [0, 1].
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

AUGMENTS = ("paper", "flip", "none")
NORMALIZE = ("mean", "meanstd", None)
PAD = 4


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch shows, sample by sample: image index, mirrored or not, shift offsets (0..2*PAD)."""

    index: np.ndarray  # int64 (M,)
    flip: np.ndarray  # bool (M,)
    shift: np.ndarray | None  # int64 (M, 2): (dy, dx) crop origin in the padded image; None for no shift


def epoch_plan(n: int, epoch: int, seed: int, augment: str, shuffle: bool) -> EpochPlan:
    """A pure function of its arguments: the same epoch of the same seed is the same on every machine."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, not {augment!r}")
    rng = np.random.default_rng([seed, epoch])
    m = 2 * n if augment == "paper" else n
    order = rng.permutation(m) if shuffle else np.arange(m)
    if augment == "paper":
        index, flip = order % n, order >= n  # samples n..2n-1 are the mirrored copies
    else:
        index, flip = order, (rng.random(m) < 0.5) if augment == "flip" else np.zeros(m, bool)
    shift = rng.integers(0, 2 * PAD + 1, size=(m, 2)) if augment != "none" else None
    return EpochPlan(index.astype(np.int64), flip, shift)


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class Stats:
    """What normalisation subtracts and divides by, as broadcastable float64 arrays (HWC)."""

    kind: str | None
    mean: np.ndarray  # (S, S, 3) for "mean", (3,) for "meanstd", () zero for None
    scale: np.ndarray  # 255, or per-channel std * 255


def compute_stats(dataset, normalize: str | None) -> Stats:
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, not {normalize!r}")
    if normalize is None:
        return Stats(None, np.zeros(()), np.array(255.0))
    if normalize == "mean":
        if dataset.mean is None:
            raise ValueError("this split carries no mean image (official val files do not): pass "
                             "stats=<the training Loader>.stats")
        return Stats("mean", np.asarray(dataset.mean, np.float64), np.array(255.0))
    s1, s2, n = np.zeros(3), np.zeros(3), 0
    for a in range(0, len(dataset.data), 65536):
        chunk = np.asarray(dataset.data[a: a + 65536], np.float64).reshape(-1, 3)
        s1 += chunk.sum(0)
        s2 += (chunk * chunk).sum(0)
        n += len(chunk)
    mean = s1 / n
    return Stats("meanstd", mean, np.sqrt(np.maximum(s2 / n - mean * mean, 0)))


class Loader:
    """Batches of ``(x, y)``: x ``dtype`` (B, 3, S, S) on ``device``, y int64 (B,). See the module docstring.

    ``resident``: keep the whole uint8 split on the device (None: when it fits in half the free memory);
    otherwise each batch is gathered from the (memory-mapped) array and copied through pinned memory.
    ``rank``/``world_size``: this process's share of every global batch of ``batch_size`` (DDP); without
    ``drop_last`` a final global batch smaller than ``world_size`` leaves some ranks an empty share.
    """

    def __init__(self, dataset, batch_size: int = 128, device: str | torch.device = "cpu", augment: str = "paper",
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, normalize: str | None = "mean", stats: Stats | None = None,
                 resident: bool | None = None, rank: int = 0, world_size: int = 1):
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, not {augment!r}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of world_size {world_size}")
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        self.dataset, self.batch_size, self.device = dataset, batch_size, torch.device(device)
        self.augment, self.shuffle, self.seed, self.drop_last = augment, shuffle, seed, drop_last
        self.dtype, self.channels_last, self.rank, self.world_size = dtype, channels_last, rank, world_size
        self.stats = stats if stats is not None else compute_stats(dataset, normalize)
        self.n = len(dataset)
        self.targets = torch.as_tensor(np.asarray(dataset.targets, np.int64), device=self.device)
        self._tables: tuple[torch.Tensor, ...] | None = None
        data = dataset.data
        if resident is None:
            if self.device.type == "cuda":
                free = torch.cuda.mem_get_info(self.device)[0]
            else:
                free = data.nbytes * 4 if not isinstance(data, np.memmap) else _available_ram()
            resident = data.nbytes <= free // 2
        self.resident = resident
        if resident:
            if self.device.type == "cpu":
                # a memory map is read into RAM once (np.array copies; ascontiguousarray would keep the map)
                self.images = torch.from_numpy(np.array(data) if isinstance(data, np.memmap)
                                               else np.ascontiguousarray(data))
            else:
                self.images = torch.empty(data.shape, dtype=torch.uint8, device=self.device)
                for a in range(0, len(data), 65536):  # copy in chunks: no full host copy of a memory map
                    self.images[a: a + 65536] = torch.from_numpy(np.array(data[a: a + 65536])).to(self.device)
        self.epoch_index = 0

    @property
    def samples_per_epoch(self) -> int:
        return 2 * self.n if self.augment == "paper" else self.n

    def __len__(self) -> int:
        m, b = self.samples_per_epoch, self.batch_size
        return m // b if self.drop_last else -(-m // b)

    def plan(self, epoch: int) -> EpochPlan:
        return epoch_plan(self.n, epoch, self.seed, self.augment, self.shuffle)

    def _stream(self, idx: np.ndarray) -> torch.Tensor:
        """Rows ``idx`` of a split that is not resident: gathered from the memory map, through pinned memory."""
        order = np.argsort(idx, kind="stable")  # read the memory map in ascending order, then restore order
        rows = np.empty((len(idx), *self.dataset.data.shape[1:]), np.uint8)
        rows[order] = self.dataset.data[idx[order]]
        t = torch.from_numpy(rows)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _maps(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per view code (flip, dy, dx): where each output value comes from, and how it is normalised.

        Output element (c, i, j) of view (f, dy, dx) is pixel (i + dy - PAD, j' + dx - PAD) of the image, with
        j' = S - 1 - j... mirrored when f, and channel c: its index in the HWC row (``src``), clamped when it
        falls in the padding. The value is ``x * mul + add`` with ``mul = valid / scale`` and ``add =
        -mean[src] * mul``, so padding becomes exactly 0 after mean subtraction, as the paper pads. All
        2 * 9 * 9 maps are made once; a batch is then one gather and one fused multiply-add."""
        if self._tables is None:
            s = self.dataset.data.shape[1]
            k = 2 * PAD + 1
            f, dy, dx = (a.reshape(-1, 1) for a in np.meshgrid([0, 1], np.arange(k), np.arange(k), indexing="ij"))
            ar = np.arange(s)
            r = dy + ar - PAD  # (162, S) source row of output row i
            c = dx + ar - PAD  # source column of output column j in the mirrored image ...
            c = np.where(f == 1, s - 1 - c, c)  # ... which is column S - 1 - c of the image itself
            valid = ((r >= 0) & (r < s))[:, None, :, None] & ((c >= 0) & (c < s))[:, None, None, :]
            pix = np.clip(r, 0, s - 1)[:, :, None] * s + np.clip(c, 0, s - 1)[:, None, :]  # (162, S, S)
            src = pix[:, None] * 3 + np.arange(3)[None, :, None, None]  # (162, 3, S, S) into the HWC row
            mean = np.broadcast_to(self.stats.mean, (s, s, 3)).reshape(-1)
            scale = np.broadcast_to(self.stats.scale, (s, s, 3)).reshape(-1)
            mul = valid / scale[src]
            add = -mean[src] * mul
            self._tables = tuple(torch.from_numpy(np.ascontiguousarray(t.reshape(len(t), -1))).to(self.device)
                                 for t in (src, mul.astype(np.float32), add.astype(np.float32)))
        return self._tables

    def _share(self, step: int, total: int) -> tuple[int, int]:
        """This rank's slice of global batch ``step`` (as ``np.array_split`` would cut it)."""
        a = step * self.batch_size
        n = min(a + self.batch_size, total) - a
        q, r = divmod(n, self.world_size)
        lo = a + self.rank * q + min(self.rank, r)
        return lo, lo + q + (self.rank < r)

    def _device_plan(self, plan: EpochPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Image indices and view codes of a whole epoch, moved to the device once (no copy per step)."""
        k = 2 * PAD + 1
        shift = plan.shift if plan.shift is not None else np.full((len(plan.index), 2), PAD)
        code = plan.flip * k * k + shift[:, 0] * k + shift[:, 1]
        return torch.from_numpy(plan.index).to(self.device), torch.from_numpy(code).to(self.device)

    def batch(self, plan: EpochPlan, step: int, _device_plan=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``step`` of an epoch's plan, this rank's share."""
        idx_all, code_all = _device_plan or self._device_plan(plan)
        lo, hi = self._share(step, len(plan.index))
        idx, code = idx_all[lo:hi], code_all[lo:hi]
        src, mul, add = (t.index_select(0, code) for t in self._maps())
        if self.resident:
            u = self.images.index_select(0, idx)
        else:
            u = self._stream(plan.index[lo:hi])
        b, s = u.shape[0], u.shape[1]
        x = torch.gather(u.view(b, -1), 1, src).float()  # (B, 3*S*S): mirrored, shifted, channel-planar
        x = torch.addcmul(add, x, mul).view(b, 3, s, s)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.to(dtype=self.dtype, memory_format=fmt), self.targets.index_select(0, idx)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch`` from ``start_step`` on: what a resumed run would have seen."""
        plan = self.plan(epoch)
        dplan = self._device_plan(plan)
        for step in range(start_step, len(self)):
            yield self.batch(plan, step, dplan)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from self.epoch(self.epoch_index)
        self.epoch_index += 1
