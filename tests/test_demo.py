"""The demo, shortened: every step runs, and the above-chance check fails loudly when it should."""

import dataclasses

import pytest

import dsimagenet.train
from dsimagenet.demo import DemoConfig, demo, write_release
from dsimagenet.errors import ConfigError

SMALL = dict(classes=10, train_per_class=80, val_per_class=10, epochs=4, lrs=(0.05, 0.2), methods=("box",))


def test_release_is_in_the_real_layout(tmp_path):
    import tarfile

    paths = write_release(tmp_path, DemoConfig(**SMALL))
    with tarfile.open(paths["train"]) as t:
        assert t.getnames()[:2] == ["n02119789.tar", "n02100735.tar"] and len(t.getnames()) == 10
    with tarfile.open(paths["val"]) as t:
        assert t.getnames()[0] == "ILSVRC2012_val_00000001.JPEG" and len(t.getnames()) == 100
    from dsimagenet.sources.imagenet import parse_devkit

    truth = parse_devkit(paths["devkit"])
    assert len(truth) == 50_000 and set(truth[:100].tolist()) == set(range(1, 11))


def test_short_demo_learns(tmp_path, capsys):
    result = demo(DemoConfig(out=str(tmp_path / "d"), **SMALL))
    assert result["top1_error"] < 70  # chance is 90%
    captured = capsys.readouterr()
    out = captured.out
    assert "[4/4]" in out and "checksums ok" in out
    assert "images: 900/900 image (100%)" in captured.err  # 10 x (80 + 10), as plain lines off a tty
    assert out.count("epoch 4/4") == 2  # a line per epoch of each run: the longest step is never silent
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert all("val top-1" in line and "top-5" not in line for line in epochs), epochs  # 10 classes: no top-5
    assert (tmp_path / "d" / "report" / "index.html").exists()
    assert len(list((tmp_path / "d" / "runs").glob("*/result.json"))) == 2
    # the classes are said to be synthetic wherever they are named: the runs' per-class results and the report
    import csv

    from dsimagenet.labels import IMAGENET

    run = next((tmp_path / "d" / "runs").glob("*/per_class.csv"))
    names = [row["name"] for row in csv.DictReader(open(run))]
    assert names == [f"synthetic {c} {s}" for c, s in (("red", "disk"), ("red", "square"), ("green", "triangle"),
                                                       ("green", "cross"), ("blue", "ring"), ("blue", "diamond"),
                                                       ("yellow", "star"), ("yellow", "bars"),
                                                       ("magenta", "checks"), ("magenta", "dots"))]
    page = (tmp_path / "d" / "report" / "index.html").read_text()
    assert "synthetic red disk" in page and IMAGENET.names[0] not in page  # not "kit fox"


def test_demo_fails_loudly_at_chance(tmp_path, monkeypatch):
    real = dsimagenet.train.train

    def barely_learns(config, *a, **k):  # a real run whose network stays near chance: lr far too small
        return real(dataclasses.replace(config, lr=1e-7), *a, **k)

    monkeypatch.setattr(dsimagenet.train, "train", barely_learns)
    with pytest.raises(RuntimeError, match="less than 3x chance"):
        demo(DemoConfig(out=str(tmp_path / "d"), **{**SMALL, "lrs": (0.1,)}))


def test_demo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a demo folder"):
        demo(DemoConfig(out=str(tmp_path), **SMALL))
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"]


def test_demo_settings_are_checked_before_anything_is_made(tmp_path):
    for kw, match in (({"epochs": 0}, "--epochs must be an integer >= 1"), ({"classes": 1}, "--classes must be"),
                      ({"lrs": ()}, "at least one learning rate")):
        with pytest.raises(ConfigError, match=match):
            DemoConfig(out=str(tmp_path / "d"), **{**SMALL, **kw})
    with pytest.raises(ConfigError, match="grid: lr=-0.1: --lr must be"):
        demo(DemoConfig(out=str(tmp_path / "d"), **{**SMALL, "lrs": (0.05, -0.1)}))
    assert not (tmp_path / "d").exists()


def test_demo_fails_loudly_when_a_run_diverges(tmp_path):
    with pytest.raises(RuntimeError, match="runs did not finish: method=box_lr=1000000.0: diverged: "):
        demo(DemoConfig(out=str(tmp_path / "d"), **{**SMALL, "lrs": (1e6,), "epochs": 1}))


def test_demo_images_of_different_classes_differ():
    """A nearest-class-mean classifier on a few plain features (colour means and spreads, contrast by distance
    from the centre) tells the ten classes apart far above chance (10%), on images it was not fitted on: the
    pictures differ in colour and, within a colour, in shape."""
    import numpy as np

    from dsimagenet.demo import class_images

    rng = np.random.default_rng(0)
    x = np.concatenate([class_images(k, 40, 32, rng) for k in range(1, 11)]).astype(float)
    y = np.repeat(np.arange(10), 40)
    grey = x.mean(3)
    contrast = np.abs(grey - np.median(grey, axis=(1, 2))[:, None, None])
    r = np.hypot(*(np.mgrid[0:32, 0:32] - 15.5))
    rings = [contrast[:, (r >= a) & (r < a + 3)].mean(1) for a in range(0, 16, 3)]
    f = np.concatenate([x.mean((1, 2)), x.std((1, 2)), np.stack(rings, 1)], 1)
    fit = np.arange(len(y)) % 2 == 0
    means = np.stack([f[fit & (y == k)].mean(0) for k in range(10)])
    scale = f[fit].std(0)
    guess = (((f[~fit][:, None] - means[None]) / scale) ** 2).sum(2).argmin(1)
    # two classes share each colour (disk and square are both red): colour alone tells at most half of them
    assert np.abs(f[y == 0, :3].mean(0) - f[y == 1, :3].mean(0)).max() < 15
    assert (guess == y[~fit]).mean() > 0.6  # so the shapes tell the rest
