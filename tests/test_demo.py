"""The demo, shortened: every step runs, and the above-chance check fails loudly when it should."""

import pytest

import dsimagenet.train
from dsimagenet.demo import DemoConfig, demo, write_release

SMALL = dict(train_per_class=30, val_per_class=10, epochs=3)


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
    assert "[3/3]" in out and "checksums ok" in out


def test_demo_fails_loudly_at_chance(tmp_path, monkeypatch):
    monkeypatch.setattr(dsimagenet.train, "train", lambda *a, **k: {"top1_error": 85.0, "top5_error": 50.0})
    with pytest.raises(RuntimeError, match="less than 3x chance"):
        demo(DemoConfig(out=str(tmp_path / "d"), **SMALL))


def test_demo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a demo folder"):
        demo(DemoConfig(out=str(tmp_path), **SMALL))
