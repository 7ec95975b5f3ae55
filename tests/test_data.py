"""The Loader against a per-sample float64 reference; determinism, resumption, DDP shares, streaming."""

import numpy as np
import pytest
import torch

from dsimagenet import open_dataset
from dsimagenet.data import Loader, epoch_plan


@pytest.fixture
def ds(tiny):
    return open_dataset(tiny.official())


def reference_sample(img, mean, flip, shift):
    """One sample the paper's way, in float64: subtract the mean image, /255, mirror, zero-pad 4, crop."""
    x = (img.astype(np.float64) - mean) / 255.0
    if flip:
        x = x[:, ::-1]
    if shift is not None:
        s = x.shape[0]
        p = np.zeros((s + 8, s + 8, 3))
        p[4:4 + s, 4:4 + s] = x
        x = p[shift[0]:shift[0] + s, shift[1]:shift[1] + s]
    return x.transpose(2, 0, 1)


@pytest.mark.parametrize("augment", ["paper", "flip", "none"])
@pytest.mark.parametrize("resident", [True, False])
def test_batches_match_per_sample_reference(ds, augment, resident):
    loader = Loader(ds, batch_size=32, augment=augment, seed=3, resident=resident)
    plan = loader.plan(1)
    seen = 0
    for step, (x, y) in enumerate(loader.epoch(1)):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 8, 8)
        for j in range(len(x)):
            k = step * 32 + j
            i = plan.index[k]
            ref = reference_sample(ds.data[i], ds.mean, plan.flip[k], None if plan.shift is None else plan.shift[k])
            np.testing.assert_allclose(x[j].numpy(), ref, atol=1e-6)
            assert y[j] == ds.targets[i]
        seen += len(x)
    assert seen == (2 * len(ds) if augment == "paper" else len(ds))


def test_paper_plan_shows_every_image_twice_once_mirrored():
    p = epoch_plan(50, 0, 0, "paper", True)
    assert len(p.index) == 100
    for i in range(50):
        assert sorted(p.flip[p.index == i].tolist()) == [False, True]
    assert p.shift.min() == 0 and p.shift.max() == 8
    assert set(np.unique(p.shift).tolist()) == set(range(9))


def test_flip_and_none_plans():
    p = epoch_plan(1000, 0, 0, "flip", True)
    assert sorted(p.index.tolist()) == list(range(1000)) and 400 < p.flip.sum() < 600
    p = epoch_plan(10, 0, 0, "none", False)
    assert p.index.tolist() == list(range(10)) and not p.flip.any() and p.shift is None


def test_determinism_and_resume(ds):
    a = Loader(ds, 16, seed=7)
    b = Loader(ds, 16, seed=7)
    full = list(a.epoch(2))
    resumed = list(b.epoch(2, start_step=5))
    assert len(resumed) == len(full) - 5
    for (x1, y1), (x2, y2) in zip(full[5:], resumed, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = next(iter(Loader(ds, 16, seed=8).epoch(2)))[1]
    assert not torch.equal(full[0][1], other)
    # __iter__ walks epochs 0, 1, ...
    it0 = [y for _, y in Loader(ds, 16, seed=7)]
    assert all(torch.equal(u, v) for u, v in zip(it0, [y for _, y in a.epoch(0)], strict=True))


def test_ddp_shares_make_the_global_batch(ds):
    full = Loader(ds, 32, seed=1, augment="paper")
    ranks = [Loader(ds, 32, seed=1, augment="paper", rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(full)
    for (x, y), (x0, y0), (x1, y1) in zip(full.epoch(0), ranks[0].epoch(0), ranks[1].epoch(0), strict=True):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_drop_last_and_len(ds):
    assert len(Loader(ds, 100, augment="none", drop_last=True)) == 2
    assert len(Loader(ds, 100, augment="none")) == 3
    assert len(Loader(ds, 100, augment="paper")) == 5  # 406 samples


def test_normalizations_and_options(ds, tiny):
    x, _ = next(iter(Loader(ds, 8, augment="none", shuffle=False, normalize=None).epoch(0)))
    np.testing.assert_allclose(x.numpy(), tiny.images[:8].transpose(0, 3, 1, 2) / 255.0, atol=1e-6)
    ms = Loader(ds, 8, augment="none", shuffle=False, normalize="meanstd")
    flat = tiny.images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(ms.stats.mean, flat.mean(0))
    np.testing.assert_allclose(ms.stats.scale, flat.std(0))
    x, _ = next(iter(ms.epoch(0)))
    ref = (tiny.images[:8].astype(np.float64) / 255 - flat.mean(0) / 255) / (flat.std(0) / 255)
    np.testing.assert_allclose(x.numpy(), ref.transpose(0, 3, 1, 2), atol=1e-5)
    x, _ = next(iter(Loader(ds, 8, dtype=torch.bfloat16, channels_last=True).epoch(0)))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)


def test_val_needs_train_stats(tiny):
    folder = tiny.official()
    val = open_dataset(folder, "val")
    with pytest.raises(ValueError, match="stats="):
        Loader(val, 8, augment="none")
    train = Loader(open_dataset(folder), 8)
    x, _ = next(iter(Loader(val, 8, augment="none", shuffle=False, stats=train.stats).epoch(0)))
    ref = (tiny.val_images[:8].astype(np.float64) - train.stats.mean) / 255
    np.testing.assert_allclose(x.numpy(), ref.transpose(0, 3, 1, 2), atol=1e-6)


def test_bad_arguments_are_config_errors_naming_the_flag(ds, tiny):
    from dsimagenet.errors import ConfigError

    for kwargs, flag in [({"augment": "mixup"}, "--augment"), ({"normalize": "zca"}, "--normalize"),
                         ({"batch_size": 0}, "--batch-size"), ({"batch_size": 9, "world_size": 2}, "--batch-size")]:
        with pytest.raises(ConfigError, match=flag):
            Loader(ds, **{"batch_size": 8, **kwargs})
    with pytest.raises(ConfigError, match="--augment"):
        epoch_plan(10, 0, 0, "mixup", True)
    empty = open_dataset(tiny.official(), max_per_class=1, classes=["n01440764"])
    empty.data, empty.targets = empty.data[:0], empty.targets[:0]
    with pytest.raises(ConfigError, match="no images to load"):
        Loader(empty, 8)


def test_rank_world_size_and_batch_size_must_be_integers_in_range(ds):
    from dsimagenet.errors import ConfigError

    for kwargs in ({"world_size": 0}, {"rank": 2, "world_size": 2}, {"rank": -1, "world_size": 2},
                   {"world_size": 1.0}):
        with pytest.raises(ConfigError, match="world_size must be an integer of at least 1 and rank"):
            Loader(ds, 8, **kwargs)
    for batch_size in (True, 2.5):
        with pytest.raises(ConfigError, match="--batch-size"):
            Loader(ds, batch_size)


def test_a_batch_larger_than_the_split(ds, tiny):
    """Without drop_last the one batch is the whole split; with it an epoch would be empty: refused."""
    from dsimagenet.errors import ConfigError

    val = Loader(open_dataset(tiny.official(), "val"), 1000, augment="none", shuffle=False, stats=Loader(ds).stats)
    (x, y), = list(val.epoch(0))
    assert x.shape == (37, 3, 8, 8) and y.tolist() == (tiny.val_labels - 1).tolist()
    assert [len(y) for _, y in Loader(ds, 1000).epoch(0)] == [2 * 203]  # "paper": every image twice
    with pytest.raises(ConfigError, match="with drop_last an epoch would have no batch"):
        Loader(ds, 407, drop_last=True)
    assert len(Loader(ds, 406, drop_last=True)) == 1
    one = open_dataset(tiny.official(), classes=["n01440764"], max_per_class=1)
    assert [tuple(x.shape) for x, _ in Loader(one, 128).epoch(0)] == [(2, 3, 8, 8)]


def test_stats_from_another_dataset_or_label_order_are_refused(ds, tiny, tmp_path):
    from conftest import learnable_native

    from dsimagenet.errors import ConfigError

    stats = Loader(ds, 8).stats
    with pytest.raises(ConfigError, match="same label order: open both with the same order= and classes="):
        Loader(open_dataset(tiny.official(), "val", order="sorted"), 8, augment="none", stats=stats)
    with pytest.raises(ConfigError, match="same label order"):
        Loader(open_dataset(tiny.official(), "val", classes=5), 8, augment="none", stats=stats)
    big = learnable_native(tmp_path / "s16", size=16)
    with pytest.raises(ConfigError, match="they come from another dataset"):
        Loader(open_dataset(big, "val"), 8, augment="none", stats=stats)
    Loader(open_dataset(tiny.official(), "val"), 8, augment="none", stats=stats)  # the same classes: fine


# --- the pure functions the Loader composes, each against an independent reference


class Split:
    """A split as the functions take it: NHWC uint8 data, labels, the mean image."""

    def __init__(self, data, targets=None, mean=None, wnids=None):
        self.data, self.targets, self.mean, self.wnids = data, targets, mean, wnids

    def __len__(self):
        return len(self.data)


def global_positions(samples, batch_size, world):
    """Each rank's plan positions for every step, cut the long way: np.array_split of each global batch."""
    steps = [np.arange(a, min(a + batch_size, samples)) for a in range(0, samples, batch_size)]
    return [[np.array_split(s, world)[r] for s in steps] for r in range(world)]


@pytest.mark.parametrize("samples,batch_size,world", [(37, 8, 1), (37, 8, 2), (37, 9, 3), (5, 8, 4), (406, 32, 4)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_shares_cut_each_global_batch_as_array_split(samples, batch_size, world, drop_last):
    from dsimagenet.data import rank_shares

    ref = global_positions(samples, batch_size, world)
    for rank in range(world):
        shares = rank_shares(samples, batch_size, rank, world, drop_last)
        want = ref[rank][:samples // batch_size] if drop_last else ref[rank]
        assert len(shares) == len(want)
        for (lo, hi), pos in zip(shares.tolist(), want, strict=True):
            assert list(range(lo, hi)) == pos.tolist()


def test_crop_offsets_address_the_crop_in_the_zero_bordered_buffer():
    from dsimagenet.data import batch_buffers, crop_offsets

    s, b = 8, 5
    buf = batch_buffers(b, s, "cpu")
    assert buf.middle.shape == (b, 3, s, s) and buf.rows.shape == (b, 3, s, s) and buf.rows.dtype == torch.uint8
    values = torch.rand(b, 3, s, s)
    buf.middle.copy_(values)
    padded = np.zeros((b, 3, s + 8, s + 8), np.float32)  # built here, apart from the buffer
    padded[:, :, 4:4 + s, 4:4 + s] = values.numpy()
    rng = np.random.default_rng(0)
    slot, shift = rng.integers(0, b, 200), rng.integers(0, 9, (200, 2))
    shift[:4] = [[0, 0], [8, 8], [0, 8], [8, 0]]  # the corners
    slot[:4] = b - 1  # the last sample's corners: the view must reach them
    for o, k, (dy, dx) in zip(crop_offsets(slot, shift, s).tolist(), slot, shift, strict=True):
        np.testing.assert_array_equal(buf.crops[o].numpy(), padded[k, :, dy:dy + s, dx:dx + s])
    unshifted = crop_offsets(np.arange(b), None, s).tolist()
    for k, o in enumerate(unshifted):
        np.testing.assert_array_equal(buf.crops[o].numpy(), values[k].numpy())


@pytest.mark.parametrize("augment", ["paper", "flip", "none"])
@pytest.mark.parametrize("normalize", ["mean", "meanstd"])
@pytest.mark.parametrize("resident", [True, False])
def test_plan_and_gather_batch_match_a_float64_per_sample_loop(augment, normalize, resident):
    """epoch_plan -> rank_plan -> gather_batch, composed by hand, for every rank of a 3-process world, against
    the paper's per-sample recipe in float64 with its stats computed here by numpy."""
    from dsimagenet.data import batch_buffers, compute_stats, gather_batch, make_resident, normalisation, rank_plan

    n, s, bs, world = 23, 8, 9, 3
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8)
    flat = images.reshape(-1, 3).astype(np.float64)
    mean, scale = ((images.astype(np.float64).mean(0), 255.0) if normalize == "mean"
                   else (flat.mean(0), flat.std(0)))
    stats = compute_stats(Split(images, mean=images.astype(np.float64).mean(0)), normalize)
    norm = normalisation(stats, s, "cpu")
    plan = epoch_plan(n, 2, 5, augment, True)
    src = make_resident(images, "cpu") if resident else images
    if resident:
        np.testing.assert_array_equal(src.numpy(), images.transpose(0, 3, 1, 2))
    for rank, positions in enumerate(global_positions(len(plan.index), bs, world)):
        p = rank_plan(plan, bs, rank, world, False, s)
        assert (p.base is None) == (augment == "none")
        buffers = batch_buffers(bs // world + 1, s, "cpu")
        for step, pos in enumerate(positions):
            lo, hi = int(p.bounds[step]), int(p.bounds[step + 1])
            assert hi - lo == len(pos) and p.mirrored[step] == plan.flip[pos].sum()
            read = torch.from_numpy(p.read[lo:hi]) if resident else p.read[lo:hi]
            base = None if p.base is None else torch.from_numpy(p.base[lo:hi])
            x = gather_batch(src, read, hi - lo - int(p.mirrored[step]), base, norm, buffers)
            assert x.dtype == torch.float32 and x.shape == (len(pos), 3, s, s)
            np.testing.assert_array_equal(p.index[lo:hi], plan.index[pos])
            for j, q in enumerate(pos):
                ref = (images[plan.index[q]].astype(np.float64) - mean) / scale
                if plan.flip[q]:
                    ref = ref[:, ::-1]
                if plan.shift is not None:
                    padded = np.zeros((s + 8, s + 8, 3))
                    padded[4:4 + s, 4:4 + s] = ref
                    dy, dx = plan.shift[q]
                    ref = padded[dy:dy + s, dx:dx + s]
                np.testing.assert_allclose(x[j].numpy(), ref.transpose(2, 0, 1), atol=2e-6)


def test_compute_stats_needs_no_loader_and_reads_no_image_for_the_mean(ds, tiny):
    """What report/figures.py needs: a training split's stats without building a Loader (which would copy
    the split into memory); "mean" must not touch the images at all."""
    from dsimagenet.data import compute_stats

    class NoImages(Split):
        @property
        def data(self):
            raise AssertionError("the images were read")

        @data.setter
        def data(self, value):
            pass

    mean = tiny.images.astype(np.float64).mean(0)
    st = compute_stats(NoImages(None, mean=mean, wnids=["a", "b"]), "mean")
    assert st.kind == "mean" and st.wnids == ("a", "b") and float(st.scale) == 255.0
    np.testing.assert_array_equal(st.mean, mean)
    assert compute_stats(NoImages(None), None).mean.tolist() == 0.0
    flat = tiny.images.reshape(-1, 3).astype(np.float64)
    ms = compute_stats(ds, "meanstd")
    np.testing.assert_allclose(ms.mean, flat.mean(0))
    np.testing.assert_allclose(ms.scale, flat.std(0))
    for normalize in ("mean", "meanstd", None):  # the same as a Loader's, which it replaces in the report
        a, b = compute_stats(ds, normalize), Loader(ds, 1, augment="none", normalize=normalize).stats
        assert a.kind == b.kind and a.wnids == b.wnids == tuple(ds.wnids)
        assert np.array_equal(a.mean, b.mean) and np.array_equal(a.scale, b.scale)


def test_compute_stats_of_an_empty_split_is_refused():
    from dsimagenet.data import compute_stats
    from dsimagenet.errors import ConfigError

    with pytest.raises(ConfigError, match="no images to compute a mean and std from"):
        compute_stats(Split(np.zeros((0, 8, 8, 3), np.uint8)), "meanstd")


def test_decide_residency(tmp_path):
    """Resident when the split fits in half the free memory; where that is unknown, only an in-memory array."""
    from dsimagenet.data import decide_residency

    data = np.zeros((10, 8, 8, 3), np.uint8)  # 1,920 bytes
    assert decide_residency(data, "cpu", free=3840) and not decide_residency(data, "cpu", free=3839)
    mapped = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", np.uint8, data.shape)
    assert decide_residency(data, "cpu", free=0) and not decide_residency(mapped, "cpu", free=0)
    assert decide_residency(mapped, "cpu", free=1 << 20)
    assert decide_residency(data, "cpu")  # measured: 1,920 bytes fit (or, RAM unknown, an in-memory array)


# --- NAS-Bench-201's augmentation and normalisation (--recipe nasbench201)

NB201_MEAN = [122.68, 116.66, 104.01]  # its Normalize(mean=[x / 255 ...], std=[x / 255 ...]), typed here
NB201_STD = [63.22, 61.26, 65.09]


def torchvision_style(img, flip, dy, dx, pad=2):
    """One sample as NAS-Bench-201's transforms make it, per sample, in numpy: RandomHorizontalFlip,
    RandomCrop(S, padding=pad) (zeros around the uint8 image, the crop's origin (dy, dx) in the padded image),
    ToTensor (float32 CHW / 255), Normalize (channel by channel, (x - mean) / std)."""
    s = img.shape[0]
    x = img[:, ::-1] if flip else img
    padded = np.zeros((s + 2 * pad, s + 2 * pad, 3), np.uint8)
    padded[pad:pad + s, pad:pad + s] = x
    x = padded[dy:dy + s, dx:dx + s].transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.array(NB201_MEAN, np.float32) / np.float32(255)
    std = np.array(NB201_STD, np.float32) / np.float32(255)
    return (x - mean[:, None, None]) / std[:, None, None]


@pytest.fixture
def split16():
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (45, 16, 16, 3), dtype=np.uint8)
    images[0] = 0  # an image as black as the padding: the border must not stand out from it
    images[1] = 255
    return Split(images, rng.integers(0, 120, 45), images.astype(np.float64).mean(0))


@pytest.mark.parametrize("resident", [True, False])
def test_nasbench201_augmentation_equals_random_crop_padding_2_and_flip_per_sample(split16, resident):
    loader = Loader(split16, batch_size=16, augment="flip", normalize="nasbench201", pad=2, pad_fill="black",
                    seed=11, resident=resident)
    plan = loader.plan(3)
    assert plan.shift.min() == 0 and plan.shift.max() == 4  # RandomCrop draws each origin from 0..2 * padding
    seen = 0
    for step, (x, y) in enumerate(loader.epoch(3)):
        for j in range(len(x)):
            k = step * 16 + j
            i = plan.index[k]
            ref = torchvision_style(split16.data[i], plan.flip[k], *plan.shift[k])
            np.testing.assert_allclose(x[j].numpy(), ref, rtol=0, atol=2e-6)  # float32 in another order
            assert y[j] == split16.targets[i]
        seen += len(x)
    assert seen == 45 and sorted(plan.index.tolist()) == list(range(45))
    # every corner shift and both flips occurred, so the reference was met at the borders, mirrored or not
    corners = {(int(a), int(b)) for a, b in plan.shift} & {(0, 0), (0, 4), (4, 0), (4, 4)}
    assert len(corners) >= 2 and plan.flip.any() and not plan.flip.all()


def test_nasbench201_normalisation_is_its_constants_by_hand(split16):
    from dsimagenet.data import compute_stats

    stats = compute_stats(Split(None, mean=None), "nasbench201")  # reads no image and needs no mean image
    assert stats.kind == "nasbench201"
    x, _ = next(Loader(split16, batch_size=3, augment="none", shuffle=False, normalize="nasbench201").epoch(0))
    # pixel 0 (image 0) and 255 (image 1), by hand: (0 - 122.68) / 63.22 = -1.940525..., (255 - 122.68) / 63.22
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), [-1.9405252, -1.9043421, -1.5979413], atol=1e-6)
    np.testing.assert_allclose(x[1, :, 0, 0].numpy(), [2.0930085, 2.2582436, 2.3197112], atol=1e-6)
    for c in range(3):
        want = (split16.data[2, :, :, c] / 255 - NB201_MEAN[c] / 255) / (NB201_STD[c] / 255)
        np.testing.assert_allclose(x[2, c].numpy(), want, atol=2e-6)


def test_pad_sets_the_shift_range_and_the_paper_plan_is_unchanged():
    default, four = epoch_plan(60, 2, 9, "paper"), epoch_plan(60, 2, 9, "paper", pad=4)
    assert all(np.array_equal(a, b) for a, b in zip(
        (default.index, default.flip, default.shift), (four.index, four.flip, four.shift), strict=True))
    p = epoch_plan(1000, 0, 0, "flip", pad=2)
    assert set(np.unique(p.shift).tolist()) == {0, 1, 2, 3, 4}
    assert epoch_plan(50, 0, 0, "flip", pad=0).shift.max() == 0


@pytest.mark.parametrize("pad", [0, 2, 5])
def test_buffers_with_any_padding_and_a_fill_address_every_crop(pad):
    from dsimagenet.data import batch_buffers, crop_offsets

    s, b, fill = 6, 4, np.array([-1.5, 0.25, 3.0], np.float32)
    buf = batch_buffers(b, s, "cpu", pad, fill)
    values = torch.rand(b, 3, s, s)
    buf.middle.copy_(values)
    padded = np.broadcast_to(fill[None, :, None, None], (b, 3, s + 2 * pad, s + 2 * pad)).copy()
    padded[:, :, pad:pad + s, pad:pad + s] = values.numpy()
    for slot in range(b):
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                o = int(crop_offsets(np.array([slot]), np.array([[dy, dx]]), s, pad)[0])
                np.testing.assert_array_equal(buf.crops[o].numpy(), padded[slot, :, dy:dy + s, dx:dx + s])


def test_a_bad_pad_or_a_black_pad_around_a_mean_image_is_refused(ds):
    from dsimagenet.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--pad\) must be an integer in 0\.\.8 \(the image size\), not 9"):
        Loader(ds, 32, pad=9)
    with pytest.raises(ConfigError, match="--pad"):
        Loader(ds, 32, pad=2.0)
    with pytest.raises(ConfigError, match="black needs per-channel normalisation"):
        Loader(ds, 32, augment="flip", normalize="mean", pad_fill="black")
    with pytest.raises(ConfigError, match="--pad-fill"):
        Loader(ds, 32, augment="flip", normalize="meanstd", pad_fill="white")
    Loader(ds, 32, augment="none", normalize="mean", pad_fill="black")  # nothing is padded: nothing to refuse
