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

from dsimagenet.errors import ConfigError

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
        raise ConfigError(f"augment (--augment) must be one of {AUGMENTS}, not {augment!r}")
    rng = np.random.default_rng([seed, epoch])
    m = 2 * n if augment == "paper" else n
    order = rng.permutation(m) if shuffle else np.arange(m)
    if augment == "paper":
        index, flip = order % n, order >= n  # samples n..2n-1 are the mirrored copies
    else:
        index, flip = order, (rng.random(m) < 0.5) if augment == "flip" else np.zeros(m, bool)
    shift = rng.integers(0, 2 * PAD + 1, size=(m, 2)) if augment != "none" else None
    return EpochPlan(index.astype(np.int64), flip, shift)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


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
    wnids: tuple[str, ...] | None = None  # the classes of the split they come from, in label order


def compute_stats(dataset, normalize: str | None) -> Stats:
    wnids = tuple(dataset.wnids) if getattr(dataset, "wnids", None) is not None else None
    if normalize not in NORMALIZE:
        raise ConfigError(f"normalize (--normalize) must be one of {NORMALIZE}, not {normalize!r}")
    if normalize is None:
        return Stats(None, np.zeros(()), np.array(255.0), wnids)
    if normalize == "mean":
        if dataset.mean is None:
            raise ConfigError("this split carries no mean image (official val files do not): pass "
                             "stats=<the training Loader>.stats")
        return Stats("mean", np.asarray(dataset.mean, np.float64), np.array(255.0), wnids)
    s1, s2, n = np.zeros(3), np.zeros(3), 0
    for a in range(0, len(dataset.data), 65536):
        chunk = np.asarray(dataset.data[a: a + 65536], np.float64).reshape(-1, 3)
        s1 += chunk.sum(0)
        s2 += (chunk * chunk).sum(0)
        n += len(chunk)
    mean = s1 / n
    return Stats("meanstd", mean, np.sqrt(np.maximum(s2 / n - mean * mean, 0)), wnids)


@dataclass(frozen=True)
class _Epoch:
    """This rank's part of one epoch, laid out for the batch function; made once per epoch on the host and
    moved to the device in one copy each. Within each step's share the images are read unmirrored first and
    mirrored last (``read``), so one flip covers the mirrored tail; ``base`` places every output sample's crop
    window in the padded batch buffer, in output order."""

    bounds: list[int]  # (steps + 1,) start of each step's share in the arrays below
    mirrored: list[int]  # (steps,) how many of each share are mirrored
    read: np.ndarray  # (M,) image index, reading order (host: the streamed path reads the memory map with it)
    read_dev: torch.Tensor | None  # the same on the device, when the images are resident there
    base: torch.Tensor  # (M,) offset of the crop window in the padded buffer, output order
    targets: torch.Tensor  # (M,) labels, output order


class Loader:
    """Batches of ``(x, y)``: x ``dtype`` (B, 3, S, S) on ``device``, y int64 (B,). See the module docstring.

    ``resident``: keep the whole split on the device as planar uint8 (N, 3, S, S), one copy made at start
    (None: when it fits in half the free memory); otherwise each batch is gathered from the (memory-mapped)
    array and copied through pinned memory. ``rank``/``world_size``: this process's share of every global
    batch of ``batch_size`` (DDP); without ``drop_last`` a final global batch smaller than ``world_size`` leaves
    some ranks an empty share.
    """

    def __init__(self, dataset, batch_size: int = 128, device: str | torch.device = "cpu", augment: str = "paper",
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, normalize: str | None = "mean", stats: Stats | None = None,
                 resident: bool | None = None, rank: int = 0, world_size: int = 1):
        if augment not in AUGMENTS:
            raise ConfigError(f"augment (--augment) must be one of {AUGMENTS}, not {augment!r}")
        if not _is_int(world_size) or world_size < 1 or not _is_int(rank) or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank!r:.20} and world_size {world_size!r:.20}: world_size must be an integer "
                              "of at least 1 and rank an integer in 0..world_size - 1")
        if not _is_int(batch_size) or batch_size < 1 or batch_size % world_size:
            raise ConfigError(f"batch_size (--batch-size) {batch_size!r:.20} must be a positive multiple of the "
                              f"number of processes, {world_size}")
        if len(dataset) == 0:
            where = f"{getattr(dataset, 'root', 'the dataset')} {getattr(dataset, 'split', '')}".strip()
            raise ConfigError(f"{where}: no images to load (the split is empty, or --classes / --max-per-class "
                              "kept none)")
        self.dataset, self.batch_size, self.device = dataset, batch_size, torch.device(device)
        self.augment, self.shuffle, self.seed, self.drop_last = augment, shuffle, seed, drop_last
        self.dtype, self.channels_last, self.rank, self.world_size = dtype, channels_last, rank, world_size
        if drop_last and (2 * len(dataset) if augment == "paper" else len(dataset)) < batch_size:
            raise ConfigError(f"batch_size (--batch-size) {batch_size} is more than the {len(dataset)} images of "
                              f"the split{' (twice, mirrored)' if augment == 'paper' else ''}: with drop_last an "
                              "epoch would have no batch")
        self.stats = stats if stats is not None else compute_stats(dataset, normalize)
        self.n = len(dataset)
        self.size = dataset.data.shape[1]
        self._check_stats(dataset)
        self.targets = np.asarray(dataset.targets, np.int64)
        data = dataset.data
        if resident is None:
            if self.device.type == "cuda":
                resident = data.nbytes <= torch.cuda.mem_get_info(self.device)[0] // 2
            else:  # where free RAM is unknown (not Linux), an array already in memory is copied, a map streamed
                free = _available_ram()
                resident = data.nbytes <= free // 2 if free else not isinstance(data, np.memmap)
        self.resident = resident
        if resident:  # planar, so that a batch is NCHW as gathered: copied in chunks, never a second full copy
            self.images = torch.empty((self.n, 3, self.size, self.size), dtype=torch.uint8, device=self.device)
            for a in range(0, self.n, 65536):
                chunk = data[a: a + 65536]  # read from a memory map here, once
                if self.device.type == "cpu":
                    self.images.numpy()[a: a + len(chunk)] = chunk.transpose(0, 3, 1, 2)
                else:
                    self.images[a: a + len(chunk)] = torch.from_numpy(np.array(chunk)).to(self.device).permute(
                        0, 3, 1, 2)
        self._norm = self._normalisation()
        self._buf: tuple[torch.Tensor, ...] | None = None
        self.epoch_index = 0

    def _check_stats(self, dataset) -> None:
        """Stats handed in (``stats=train_loader.stats``) must fit this split: images of the same size, and the
        same classes in the same label order (a val split opened with another ``order`` or ``classes`` would be
        scored against the wrong labels without a word)."""
        s = self.stats
        try:
            np.broadcast_shapes(np.shape(s.mean), np.shape(s.scale), (self.size, self.size, 3))
        except ValueError:
            raise ConfigError(f"stats for images of shape {np.shape(s.mean)}, and this split's are "
                              f"{self.size}x{self.size}: they come from another dataset") from None
        wnids = getattr(dataset, "wnids", None)
        if s.wnids is not None and wnids is not None and tuple(wnids) != s.wnids:
            raise ConfigError(f"this split's {len(wnids)} classes are not the stats' split's {len(s.wnids)} classes "
                              "in the same label order: open both with the same order= and classes=")

    @property
    def samples_per_epoch(self) -> int:
        return 2 * self.n if self.augment == "paper" else self.n

    def __len__(self) -> int:
        m, b = self.samples_per_epoch, self.batch_size
        return m // b if self.drop_last else -(-m // b)

    def plan(self, epoch: int) -> EpochPlan:
        return epoch_plan(self.n, epoch, self.seed, self.augment, self.shuffle)

    def _normalisation(self) -> tuple[torch.Tensor, ...]:
        """``x * mul + add`` for an image as it is and for a mirrored one (planar, broadcastable): ``mul =
        1 / scale``, ``add = -mean / scale``; mirrored, the mean image is mirrored too."""
        s = self.size
        mean = np.broadcast_to(self.stats.mean, (s, s, 3)).transpose(2, 0, 1)
        scale = np.broadcast_to(self.stats.scale, (s, s, 3)).transpose(2, 0, 1)
        mul, add = 1.0 / scale, -mean / scale
        return tuple(torch.from_numpy(np.ascontiguousarray(t, np.float32)).to(self.device)
                     for t in (mul, add, mul[:, :, ::-1], add[:, :, ::-1]))

    def _shares(self, total: int) -> np.ndarray:
        """(steps, 2): this rank's slice of every global batch (as ``np.array_split`` would cut each)."""
        a = np.arange(len(self), dtype=np.int64) * self.batch_size
        n = np.minimum(a + self.batch_size, total) - a
        q, r = np.divmod(n, self.world_size)
        lo = a + self.rank * q + np.minimum(self.rank, r)
        return np.stack([lo, lo + q + (self.rank < r)], 1)

    def _epoch(self, plan: EpochPlan) -> _Epoch:
        shares = self._shares(len(plan.index))
        lengths = shares[:, 1] - shares[:, 0]
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        step = np.repeat(np.arange(len(shares)), lengths)
        pos = np.arange(bounds[-1]) - bounds[step] + shares[step, 0]  # this rank's samples, output order
        flip = plan.flip[pos]
        order = np.argsort(step * 2 + flip, kind="stable")  # per share: unmirrored first, mirrored last
        slot = np.empty_like(order)
        slot[order] = np.arange(len(order))
        slot -= bounds[step]  # where each output sample sits in its batch's reading order
        s2 = self.size + 2 * PAD
        dy, dx = (plan.shift[pos].T if plan.shift is not None else (np.full(len(pos), PAD),) * 2)
        base = slot * (3 * s2 * s2) + dy * s2 + dx
        index = plan.index[pos]
        read = index[order]
        dev = self.device
        mirrored = np.bincount(step, weights=flip, minlength=len(shares)).astype(np.int64)
        return _Epoch(bounds.tolist(), mirrored.tolist(), read,
                      torch.from_numpy(read).to(dev) if self.resident else None,
                      torch.from_numpy(base).to(dev), torch.from_numpy(self.targets[index]).to(dev))

    def _stream(self, idx: np.ndarray) -> torch.Tensor:
        """Rows ``idx`` of a split that is not resident: gathered from the memory map, through pinned memory,
        made planar on the device."""
        order = np.argsort(idx, kind="stable")  # read the memory map in ascending order, then restore order
        rows = np.empty((len(idx), *self.dataset.data.shape[1:]), np.uint8)
        rows[order] = self.dataset.data[idx[order]]
        t = torch.from_numpy(rows)
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        return t.permute(0, 3, 1, 2).contiguous()

    def _buffers(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kept from batch to batch: the middle of a zero-bordered padded batch, the view ``crops`` of that
        padded batch (``crops[o]`` is the (3, S, S) crop whose first value is at flat offset ``o``), and room
        for the gathered images."""
        if self._buf is None or len(self._buf[2]) < b:
            s, s2, dev, b = self.size, self.size + 2 * PAD, self.device, max(b, 1)
            pad = torch.zeros((b, 3, s2, s2), device=dev)
            last = pad.numel() - ((2 * s2 + s - 1) * s2 + s)  # the last offset whose crop stays inside
            self._buf = (pad[:, :, PAD:PAD + s, PAD:PAD + s],
                         pad.view(-1).as_strided((last + 1, 3, s, s), (1, s2 * s2, s2, 1)),
                         torch.empty((b, 3, s, s), dtype=torch.uint8, device=dev))
        return self._buf

    def _batch(self, ep: _Epoch, step: int, shifted: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``step``, this rank's share: gather the uint8 images, mirror the mirrored tail, normalise into
        the middle of a zero-bordered buffer, then cut every shifted crop out of it with one ``index_select``
        of a view whose rows are all the crops the buffer holds (the border is 0 after mean subtraction, as
        the paper pads)."""
        lo, hi = ep.bounds[step], ep.bounds[step + 1]
        b, k = hi - lo, hi - lo - ep.mirrored[step]  # the first k are shown as they are, the rest mirrored
        mul, add, mul_f, add_f = self._norm
        if not shifted and k == b:
            u = self.images.index_select(0, ep.read_dev[lo:hi]) if self.resident else self._stream(ep.read[lo:hi])
            x = u.float()
            torch.addcmul(add, x, mul, out=x)
        else:
            # everything but the batch itself lives in buffers kept from batch to batch: on a CPU, fresh
            # megabyte allocations cost page faults that would take as long as the work
            mid, crops, u = self._buffers(b)
            if b < len(u):
                mid, u = mid[:b], u[:b]
            if self.resident:
                torch.index_select(self.images, 0, ep.read_dev[lo:hi], out=u)
            else:
                u = self._stream(ep.read[lo:hi])
            m0, m1 = mid[:k], mid[k:]
            m0.copy_(u[:k])
            m1.copy_(u[k:].flip(3))
            torch.addcmul(add, m0, mul, out=m0)
            torch.addcmul(add_f, m1, mul_f, out=m1)
            x = crops.index_select(0, ep.base[lo:hi])
        if self.dtype != torch.float32 or self.channels_last:
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format
            x = x.to(dtype=self.dtype, memory_format=fmt)
        return x, ep.targets[lo:hi]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch`` from ``start_step`` on: what a resumed run would have seen."""
        plan = self.plan(epoch)
        ep = self._epoch(plan)
        for step in range(start_step, len(self)):
            yield self._batch(ep, step, plan.shift is not None)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from self.epoch(self.epoch_index)
        self.epoch_index += 1
