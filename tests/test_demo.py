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
    out = capsys.readouterr().out
    assert "[4/4]" in out and "checksums ok" in out
    assert (tmp_path / "d" / "report" / "index.html").exists()
    assert len(list((tmp_path / "d" / "runs").glob("*/result.json"))) == 2


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
