"""The batch loader: the uint8 split resident on the device, whole batches gathered, normalised and augmented
with tensor ops there (after KellerJordan/cifar10-airbench), deterministic for a seed, resumable at any step.

    >>> train = open_dataset("out/32_box")
    >>> loader = Loader(train, batch_size=128, device="cuda", augment="paper", seed=0)
    >>> for x, y in loader.epoch(0):          # x float (128, 3, 32, 32), y int64 (128,)
    ...     ...
    >>> val = Loader(open_dataset("out/32_box", "val"), 500, "cuda", augment="none", shuffle=False,
    ...              stats=loader.stats)     # normalise val with the training mean
    >>> stats = compute_stats(train, "mean")  # the same stats without a Loader (reads no image)

The Loader is a thin iterable over small pure functions, each usable alone (plan -> indices -> batch):

    compute_stats(split, normalize)       what normalisation subtracts and divides by
    decide_residency(data, device)        keep the split on the device (make_resident), or stream it per batch
    epoch_plan(n, epoch, seed, augment)   every sample of an epoch: image, mirrored or not, shift
    rank_plan(plan, batch_size, ...)      this rank's share of every global batch, in reading order, with the
                                          offset of each sample's crop window (crop_offsets)
    gather_batch(images, read, ...)       one batch: one gather, mirror, normalise into a zero-bordered
                                          buffer (batch_buffers), every crop cut by one fused index_select

Augmentations (per epoch, drawn from ``numpy.random.default_rng([seed, epoch])``):
  "paper": 2N samples, every image once as it is and once mirrored (the paper's code concatenates flipped
           copies), each shifted by up to ``pad`` px (4: the paper's): zero padding after mean subtraction
           (``pad_fill="mean"``), then a random crop;
  "flip":  N samples, random mirror and the same shift;
  "none":  N samples as they are.
``pad_fill="black"`` pads with pixels of 0 before normalisation instead, as torchvision's RandomCrop(S,
padding=pad) does on the uint8 image (NAS-Bench-201: flip, RandomCrop(16, padding=2), ToTensor, Normalize).
Normalisation: "mean" subtracts the mean training image and divides by 255 (the paper's code); "meanstd"
uses per-channel mean and std of the training set; "nasbench201" NAS-Bench-201's per-channel constants
(``NB201_MEAN``, ``NB201_STD``); None only scales to [0, 1].

Tested by ``.venv/bin/python -m pytest -q tests/test_data.py`` (every batch against a float64 per-sample
reference); measured by ``.venv/bin/python bench/load.py`` (against a PIL + DataLoader pipeline).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from dsimagenet.errors import ConfigError

AUGMENTS = ("paper", "flip", "none")
NORMALIZE = ("mean", "meanstd", "nasbench201", None)
PAD_FILLS = ("mean", "black")
PAD = 4  # the paper's shift; any other is the Loader's ``pad``
# NAS-Bench-201's Normalize(mean=[x / 255 for x in NB201_MEAN], std=[x / 255 for x in NB201_STD]) after ToTensor's
# /255: the same as (x - NB201_MEAN) / NB201_STD on 0..255 values
NB201_MEAN = (122.68, 116.66, 104.01)
NB201_STD = (63.22, 61.26, 65.09)


# --- statistics and residency: decided once, before any batch


@dataclass(frozen=True)
class Stats:
    """What normalisation subtracts and divides by, as broadcastable float64 arrays (HWC)."""

    kind: str | None
    mean: np.ndarray  # (S, S, 3) for "mean", (3,) for "meanstd", () zero for None
    scale: np.ndarray  # 255, or per-channel std * 255
    wnids: tuple[str, ...] | None = None  # the classes of the split they come from, in label order


def compute_stats(dataset, normalize: str | None = "mean") -> Stats:
    """The stats of a training split: "mean" and None read no image (the mean image comes with the split's
    files); "meanstd" reads the split once, in chunks, without a copy of it."""
    wnids = tuple(dataset.wnids) if getattr(dataset, "wnids", None) is not None else None
    if normalize not in NORMALIZE:
        raise ConfigError(f"normalize (--normalize) must be one of {NORMALIZE}, not {normalize!r}")
    if normalize is None:
        return Stats(None, np.zeros(()), np.array(255.0), wnids)
    if normalize == "nasbench201":
        return Stats("nasbench201", np.array(NB201_MEAN), np.array(NB201_STD), wnids)
    if normalize == "mean":
        if dataset.mean is None:
            raise ConfigError("this split carries no mean image (official val files do not): pass "
                              "stats=<the training Loader>.stats")
        return Stats("mean", np.asarray(dataset.mean, np.float64), np.array(255.0), wnids)
    if len(dataset) == 0:
        raise ConfigError(f"{_where(dataset)}: no images to compute a mean and std from (the split is empty, or "
                          "--classes / --max-per-class kept none)")
    s1, s2, n = np.zeros(3), np.zeros(3), 0
    for a in range(0, len(dataset.data), 65536):
        chunk = np.asarray(dataset.data[a: a + 65536], np.float64).reshape(-1, 3)
        s1 += chunk.sum(0)
        s2 += (chunk * chunk).sum(0)
        n += len(chunk)
    mean = s1 / n
    return Stats("meanstd", mean, np.sqrt(np.maximum(s2 / n - mean * mean, 0)), wnids)


def check_stats(stats: Stats, dataset) -> None:
    """Stats handed in (``stats=train_loader.stats``) must fit this split: images of the same size, and the
    same classes in the same label order (a val split opened with another ``order`` or ``classes`` would be
    scored against the wrong labels without a word)."""
    size = dataset.data.shape[1]
    try:
        np.broadcast_shapes(np.shape(stats.mean), np.shape(stats.scale), (size, size, 3))
    except ValueError:
        raise ConfigError(f"stats for images of shape {np.shape(stats.mean)}, and this split's are "
                          f"{size}x{size}: they come from another dataset") from None
    wnids = getattr(dataset, "wnids", None)
    if stats.wnids is not None and wnids is not None and tuple(wnids) != stats.wnids:
        raise ConfigError(f"this split's {len(wnids)} classes are not the stats' split's {len(stats.wnids)} "
                          "classes in the same label order: open both with the same order= and classes=")


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def decide_residency(data, device: str | torch.device, free: int | None = None) -> bool:
    """Whether the split ``data`` (N, S, S, 3) should live on ``device``: when it fits in half of ``free``
    bytes (None: the device's free memory, or the host's available RAM for a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return data.nbytes <= (torch.cuda.mem_get_info(device)[0] if free is None else free) // 2
    free = _available_ram() if free is None else free
    # where free RAM is unknown (0: not Linux), an array already in memory is copied, a map streamed
    return data.nbytes <= free // 2 if free else not isinstance(data, np.memmap)


def make_resident(data, device: str | torch.device) -> torch.Tensor:
    """The split as planar uint8 (N, 3, S, S) on ``device``, so that a gathered batch is NCHW: copied in
    chunks (a memory map is read once), never a second full copy."""
    device = torch.device(device)
    n, s = len(data), data.shape[1]
    images = torch.empty((n, 3, s, s), dtype=torch.uint8, device=device)
    for a in range(0, n, 65536):
        chunk = data[a: a + 65536]
        if device.type == "cpu":
            images.numpy()[a: a + len(chunk)] = chunk.transpose(0, 3, 1, 2)
        else:
            images[a: a + len(chunk)] = torch.from_numpy(np.array(chunk)).to(device).permute(0, 3, 1, 2)
    return images


def stream_rows(data, idx: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """Rows ``idx`` of a split that is not resident, as planar uint8 on ``device``: gathered from the
    (memory-mapped) array in ascending order, through pinned memory to a GPU."""
    order = np.argsort(idx, kind="stable")  # read the memory map in ascending order, then restore order
    rows = np.empty((len(idx), *data.shape[1:]), np.uint8)
    rows[order] = data[idx[order]]
    t = torch.from_numpy(rows)
    if torch.device(device).type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t.permute(0, 3, 1, 2).contiguous()


# --- the plan: which image, mirrored or not, cropped where; pure numpy, the same on every machine


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch shows, sample by sample: image index, mirrored or not, shift offsets (0..2*PAD)."""

    index: np.ndarray  # int64 (M,)
    flip: np.ndarray  # bool (M,)
    shift: np.ndarray | None  # int64 (M, 2): (dy, dx) crop origin in the padded image; None for no shift


def epoch_plan(n: int, epoch: int, seed: int, augment: str, shuffle: bool = True, pad: int = PAD) -> EpochPlan:
    """A pure function of its arguments: the same epoch of the same seed is the same on every machine. Shifts
    are crop origins in the image padded by ``pad`` on each side, 0..2*pad (torchvision's RandomCrop draws them
    so)."""
    if augment not in AUGMENTS:
        raise ConfigError(f"augment (--augment) must be one of {AUGMENTS}, not {augment!r}")
    rng = np.random.default_rng([seed, epoch])
    m = samples_per_epoch(n, augment)
    order = rng.permutation(m) if shuffle else np.arange(m)
    if augment == "paper":
        index, flip = order % n, order >= n  # samples n..2n-1 are the mirrored copies
    else:
        index, flip = order, (rng.random(m) < 0.5) if augment == "flip" else np.zeros(m, bool)
    shift = rng.integers(0, 2 * pad + 1, size=(m, 2)) if augment != "none" else None
    return EpochPlan(index.astype(np.int64), flip, shift)


def samples_per_epoch(n: int, augment: str) -> int:
    return 2 * n if augment == "paper" else n


def steps_per_epoch(samples: int, batch_size: int, drop_last: bool) -> int:
    return samples // batch_size if drop_last else -(-samples // batch_size)


def rank_shares(samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                drop_last: bool = False) -> np.ndarray:
    """(steps, 2): the slice of the epoch's samples that is ``rank``'s share of every global batch, each
    global batch cut as ``np.array_split(batch, world_size)`` would (the first ranks get one more)."""
    a = np.arange(steps_per_epoch(samples, batch_size, drop_last), dtype=np.int64) * batch_size
    n = np.minimum(a + batch_size, samples) - a
    q, r = np.divmod(n, world_size)
    lo = a + rank * q + np.minimum(rank, r)
    return np.stack([lo, lo + q + (rank < r)], 1)


def crop_offsets(slot: np.ndarray, shift: np.ndarray | None, size: int, pad: int = PAD) -> np.ndarray:
    """Where each sample's (3, S, S) crop window starts, as a flat offset into the zero-bordered batch
    buffer of ``batch_buffers`` (B, 3, S + 2*pad, S + 2*pad): ``slot`` is the sample's place in that buffer,
    ``shift`` its (dy, dx) crop origin in the padded image (None: no shift, the image itself)."""
    s2 = size + 2 * pad
    dy, dx = shift.T if shift is not None else (np.full(len(slot), pad),) * 2
    return slot * (3 * s2 * s2) + dy * s2 + dx


@dataclass(frozen=True)
class RankPlan:
    """This rank's part of one epoch, laid out for ``gather_batch``. Within each step's share the images are
    read unmirrored first and mirrored last (``read``), so one flip covers the mirrored tail; ``base`` places
    every output sample's crop window in the batch buffer, in output order."""

    bounds: np.ndarray  # (steps + 1,) start of each step's share in the arrays below
    mirrored: np.ndarray  # (steps,) how many of each share are mirrored
    read: np.ndarray  # (M,) image index, reading order
    base: np.ndarray | None  # (M,) crop offsets (crop_offsets); None where no sample is shifted or mirrored
    index: np.ndarray  # (M,) image index, output order (the labels' order)


def rank_plan(plan: EpochPlan, batch_size: int, rank: int = 0, world_size: int = 1, drop_last: bool = False,
              size: int = 32, pad: int = PAD) -> RankPlan:
    """``plan`` cut into this rank's batches (``rank_shares``) for images of ``size`` px padded by ``pad``."""
    shares = rank_shares(len(plan.index), batch_size, rank, world_size, drop_last)
    lengths = shares[:, 1] - shares[:, 0]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    step = np.repeat(np.arange(len(shares)), lengths)
    pos = np.arange(bounds[-1]) - bounds[step] + shares[step, 0]  # this rank's samples, output order
    flip = plan.flip[pos]
    order = np.argsort(step * 2 + flip, kind="stable")  # per share: unmirrored first, mirrored last
    slot = np.empty_like(order)
    slot[order] = np.arange(len(order))
    slot -= bounds[step]  # where each output sample sits in its batch's reading order
    plain = plan.shift is None and not plan.flip.any()
    base = None if plain else crop_offsets(slot, None if plan.shift is None else plan.shift[pos], size, pad)
    index = plan.index[pos]
    mirrored = np.bincount(step, weights=flip, minlength=len(shares)).astype(np.int64)
    return RankPlan(bounds, mirrored, index[order], base, index)


# --- the batch: tensor ops on the device


class Normalisation(NamedTuple):
    """``x * mul + add`` for an image as it is and for a mirrored one (planar (3, S, S) float32):
    ``mul = 1 / scale``, ``add = -mean / scale``; mirrored, the mean image is mirrored too."""

    mul: torch.Tensor
    add: torch.Tensor
    mul_flipped: torch.Tensor
    add_flipped: torch.Tensor


def normalisation(stats: Stats, size: int, device: str | torch.device) -> Normalisation:
    mean = np.broadcast_to(stats.mean, (size, size, 3)).transpose(2, 0, 1)
    scale = np.broadcast_to(stats.scale, (size, size, 3)).transpose(2, 0, 1)
    mul, add = 1.0 / scale, -mean / scale
    return Normalisation(*(torch.from_numpy(np.ascontiguousarray(t, np.float32)).to(device)
                           for t in (mul, add, mul[:, :, ::-1], add[:, :, ::-1])))


class BatchBuffers(NamedTuple):
    """Kept from batch to batch (on a CPU, fresh megabyte allocations cost page faults that would take as
    long as the work)."""

    middle: torch.Tensor  # (B, 3, S, S) view: the middle of a zero-bordered padded batch
    crops: torch.Tensor  # view of the padded batch: crops[o] is the (3, S, S) crop whose first value is at offset o
    rows: torch.Tensor  # (B, 3, S, S) uint8: room for the gathered images


def batch_buffers(batch_size: int, size: int, device: str | torch.device, pad: int = PAD,
                  fill: np.ndarray | None = None) -> BatchBuffers:
    """``fill``: the border's value in each of the 3 channels (``border``); None: 0."""
    s, s2, b, p = size, size + 2 * pad, max(batch_size, 1), pad
    buf = torch.zeros((b, 3, s2, s2), device=device)
    if fill is not None:  # the middle is overwritten by every batch; the border keeps this
        buf.copy_(torch.as_tensor(np.asarray(fill, np.float32)).view(1, 3, 1, 1).expand_as(buf))
    last = buf.numel() - ((2 * s2 + s - 1) * s2 + s)  # the last offset whose crop stays inside
    return BatchBuffers(buf[:, :, p:p + s, p:p + s],
                        buf.view(-1).as_strided((last + 1, 3, s, s), (1, s2 * s2, s2, 1)),
                        torch.empty((b, 3, s, s), dtype=torch.uint8, device=device))


def border(stats: Stats, pad_fill: str) -> np.ndarray | None:
    """The padding's value in each channel after normalisation: "mean" 0 (None), "black" the value a pixel of 0
    becomes, -mean / scale (float32, as ``normalisation`` computes it), which needs per-channel stats."""
    if pad_fill not in PAD_FILLS:
        raise ConfigError(f"pad_fill (--pad-fill) must be one of {PAD_FILLS}, not {pad_fill!r}")
    if pad_fill == "mean":
        return None
    if np.ndim(stats.mean) > 1 or np.ndim(stats.scale) > 1:
        raise ConfigError(f"pad_fill (--pad-fill) black needs per-channel normalisation (--normalize meanstd or "
                          f"nasbench201), not {stats.kind}: a mean image has no value outside the image")
    # as normalisation's ``add`` (-mean / scale in float64, then float32): a 0 pixel is exactly this there
    return np.broadcast_to(-np.asarray(stats.mean, np.float64) / stats.scale, (3,)).astype(np.float32)


def gather_batch(images, read, unmirrored: int, base: torch.Tensor | None, norm: Normalisation,
                 buffers: BatchBuffers | None) -> torch.Tensor:
    """One batch, float32 (B, 3, S, S) on ``norm``'s device: images ``read`` (reading order: the first
    ``unmirrored`` as they are, the rest mirrored), normalised, each cut at its crop offset ``base`` (output
    order). ``images``: the resident planar uint8 tensor (``read`` a device tensor), or the (memory-mapped)
    HWC array (``read`` a numpy array). With ``base`` None (nothing shifted or mirrored) the batch is the
    images as they are, and needs no ``buffers``.

    Otherwise: mirror the mirrored tail, normalise into the middle of the zero-bordered buffer (the border is
    0 after mean subtraction, as the paper pads), then cut every shifted crop out of it with one
    ``index_select`` of a view whose rows are all the crops the buffer holds."""
    device = norm.mul.device
    if base is None:
        x = images.index_select(0, read) if isinstance(images, torch.Tensor) else stream_rows(images, read, device)
        x = x.float()
        torch.addcmul(norm.add, x, norm.mul, out=x)
        return x
    mid, crops, u = buffers
    b, k = len(read), unmirrored
    if b < len(u):
        mid, u = mid[:b], u[:b]
    if isinstance(images, torch.Tensor):
        torch.index_select(images, 0, read, out=u)
    else:
        u = stream_rows(images, read, device)
    m0, m1 = mid[:k], mid[k:]
    m0.copy_(u[:k])
    m1.copy_(u[k:].flip(3))
    torch.addcmul(norm.add, m0, norm.mul, out=m0)
    torch.addcmul(norm.add_flipped, m1, norm.mul_flipped, out=m1)
    return crops.index_select(0, base)


def gather_fixed(images: torch.Tensor, read: torch.Tensor, mirrored: torch.Tensor | None, base: torch.Tensor | None,
                 norm: Normalisation, buffers: BatchBuffers | None) -> torch.Tensor:
    """``gather_batch`` with shapes and addresses that never change from step to step, so that it can be
    captured in a CUDA graph: every batch has ``len(read)`` images, ``mirrored`` (bool, reading order) says which
    are mirrored (instead of a count that cuts the batch in two), and ``images`` is the resident tensor. The
    values are gather_batch's: the same products and sums, chosen per image."""
    u = images.index_select(0, read)
    if base is None:
        x = u.float()
        return torch.addcmul(norm.add, x, norm.mul, out=x)
    mid, crops, _ = buffers
    x = u.float()
    plain = torch.addcmul(norm.add, x, norm.mul)
    flipped = torch.addcmul(norm.add_flipped, x.flip(3), norm.mul_flipped)
    torch.where(mirrored[:, None, None, None], flipped, plain, out=mid[:len(read)])
    return crops.index_select(0, base)


# --- the Loader: checks its arguments, then composes the functions above


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _where(dataset) -> str:
    return f"{getattr(dataset, 'root', 'the dataset')} {getattr(dataset, 'split', '')}".strip()


def check_loader_arguments(dataset, batch_size: int, augment: str, drop_last: bool, rank: int,
                           world_size: int) -> None:
    """ConfigError naming the flag for an argument the Loader cannot work with."""
    if augment not in AUGMENTS:
        raise ConfigError(f"augment (--augment) must be one of {AUGMENTS}, not {augment!r}")
    if not _is_int(world_size) or world_size < 1 or not _is_int(rank) or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank!r:.20} and world_size {world_size!r:.20}: world_size must be an integer "
                          "of at least 1 and rank an integer in 0..world_size - 1")
    if not _is_int(batch_size) or batch_size < 1 or batch_size % world_size:
        raise ConfigError(f"batch_size (--batch-size) {batch_size!r:.20} must be a positive multiple of the "
                          f"number of processes, {world_size}")
    if len(dataset) == 0:
        raise ConfigError(f"{_where(dataset)}: no images to load (the split is empty, or --classes / "
                          "--max-per-class kept none)")
    if drop_last and samples_per_epoch(len(dataset), augment) < batch_size:
        raise ConfigError(f"batch_size (--batch-size) {batch_size} is more than the {len(dataset)} images of "
                          f"the split{' (twice, mirrored)' if augment == 'paper' else ''}: with drop_last an "
                          "epoch would have no batch")


def check_pad(pad: int, size: int) -> None:
    """ConfigError unless ``pad`` is a padding for ``size`` px images: 0..size (a wider one would crop nothing
    but border)."""
    if not _is_int(pad) or not 0 <= pad <= size:
        raise ConfigError(f"pad (--pad) must be an integer in 0..{size} (the image size), not {pad!r:.20}")


class Loader:
    """Batches of ``(x, y)``: x ``dtype`` (B, 3, S, S) on ``device``, y int64 (B,). See the module docstring.

    ``resident``: keep the whole split on the device as planar uint8 (N, 3, S, S), one copy made at start
    (None: ``decide_residency``); otherwise each batch is gathered from the (memory-mapped) array and copied
    through pinned memory. ``stats``: normalise with these (a training split's, for val) instead of this
    split's own ``compute_stats(dataset, normalize)``. ``rank``/``world_size``: this process's share of every
    global batch of ``batch_size`` (DDP); without ``drop_last`` a final global batch smaller than
    ``world_size`` leaves some ranks an empty share. ``pad``: the shifts' padding (at most the image size);
    ``pad_fill``: what the padding holds ("mean": 0 after normalisation; "black": 0 before, see ``border``).
    """

    def __init__(self, dataset, batch_size: int = 128, device: str | torch.device = "cpu", augment: str = "paper",
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, normalize: str | None = "mean", stats: Stats | None = None,
                 resident: bool | None = None, rank: int = 0, world_size: int = 1, pad: int = PAD,
                 pad_fill: str = "mean"):
        check_loader_arguments(dataset, batch_size, augment, drop_last, rank, world_size)
        check_pad(pad, dataset.data.shape[1])
        self.pad = pad
        self.dataset, self.batch_size, self.device = dataset, batch_size, torch.device(device)
        self.augment, self.shuffle, self.seed, self.drop_last = augment, shuffle, seed, drop_last
        self.dtype, self.channels_last, self.rank, self.world_size = dtype, channels_last, rank, world_size
        self.stats = stats if stats is not None else compute_stats(dataset, normalize)
        check_stats(self.stats, dataset)
        self.n, self.size = len(dataset), dataset.data.shape[1]
        self.targets = np.asarray(dataset.targets, np.int64)
        self.resident = decide_residency(dataset.data, self.device) if resident is None else resident
        self.images = make_resident(dataset.data, self.device) if self.resident else None
        self._norm = normalisation(self.stats, self.size, self.device)
        self._fill = border(self.stats, pad_fill) if augment != "none" else None
        self._buf: BatchBuffers | None = None
        self.epoch_index = 0

    @property
    def samples_per_epoch(self) -> int:
        return samples_per_epoch(self.n, self.augment)

    def __len__(self) -> int:
        return steps_per_epoch(self.samples_per_epoch, self.batch_size, self.drop_last)

    def plan(self, epoch: int) -> EpochPlan:
        return epoch_plan(self.n, epoch, self.seed, self.augment, self.shuffle, self.pad)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch`` from ``start_step`` on: what a resumed run would have seen."""
        p = rank_plan(self.plan(epoch), self.batch_size, self.rank, self.world_size, self.drop_last, self.size,
                      self.pad)
        dev = self.device  # the plan moves to the device in one copy each, once an epoch
        if self.resident:
            images, read = self.images, torch.from_numpy(p.read).to(dev)
        else:
            images, read = self.dataset.data, p.read  # streamed: the memory map is read with the host array
        base = torch.from_numpy(p.base).to(dev) if p.base is not None else None
        targets = torch.from_numpy(self.targets[p.index]).to(dev)
        bounds, mirrored = p.bounds.tolist(), p.mirrored.tolist()
        for step in range(start_step, len(self)):
            lo, hi = bounds[step], bounds[step + 1]
            if base is not None and (self._buf is None or len(self._buf.rows) < hi - lo):
                self._buf = batch_buffers(hi - lo, self.size, dev, self.pad, self._fill)
            x = gather_batch(images, read[lo:hi], hi - lo - mirrored[step], None if base is None else base[lo:hi],
                             self._norm, self._buf)
            if self.dtype != torch.float32 or self.channels_last:
                x = x.to(dtype=self.dtype,
                         memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
            yield x, targets[lo:hi]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from self.epoch(self.epoch_index)
        self.epoch_index += 1
