"""The demo, shortened: every step runs, and the above-chance check fails loudly when it should."""

import pickle

import pytest

import dsimagenet.train
from dsimagenet.demo import DemoConfig, demo, write_example

SMALL = dict(train_per_class=30, val_per_class=10, epochs=3)


def test_example_is_in_the_official_format(tmp_path):
    write_example(tmp_path, DemoConfig(**SMALL))
    with open(tmp_path / "train_data_batch_10", "rb") as f:
        d = pickle.load(f, encoding="latin1")  # as users load the official files
    assert d["data"].shape == (300 - 9 * 30, 3 * 16 * 16) and d["mean"].shape == (768,)
    assert set(d["labels"]) <= set(range(1, 11))


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
