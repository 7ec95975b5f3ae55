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
