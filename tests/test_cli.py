"""The command line as a user runs it: the console script and ``python -m dsimagenet``."""

import subprocess
import sys
from pathlib import Path

from dsimagenet.cli import main

BIN = Path(sys.executable).parent


def run(*args):
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def test_classes_sorted_console_script():
    out = run(str(BIN / "dsimagenet"), "classes", "--order", "sorted").splitlines()
    assert len(out) == 1001
    assert out[1].split()[:3] == ["0", "n01440764", "449"] and out[1].endswith("tench")


def test_classes_devkit_module():
    out = run(sys.executable, "-m", "dsimagenet", "classes", "--order", "devkit").splitlines()
    assert out[1].split() == ["0", "n02119789", "1", "kit", "fox"]


def test_classes_csv(capsys):
    assert main(["classes", "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "index,wnid,devkit_id,name"
    assert lines[449] == "448,n01440764,449,tench"


def test_bad_order_exits_nonzero():
    r = subprocess.run([sys.executable, "-m", "dsimagenet", "classes", "--order", "x"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_build_errors_are_one_line_and_exit_1(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dsimagenet", "build", "--train", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("dsimagenet build: error: --train") and "expected ILSVRC2012_img_train.tar" in r.stderr


def _one_line_error(capsys, argv, code=1):
    """Run the command in-process; it must exit ``code`` with one line on stderr and no traceback."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_sweep_tune_report_demo_config_errors_are_one_line(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("grid:\n  lr: [0.1, 0.2\nbase:\n  epochs: 2\n")
    out = tmp_path / "o"
    err = _one_line_error(capsys, ["sweep", str(spec), "--out", str(out)])
    assert err.startswith(f"dsimagenet sweep: error: {spec}: line 3, column 5: ") and "expected ',' or ']'" in err
    err = _one_line_error(capsys, ["sweep", "--grid", "lr=0.1 width=1 lr=0.2", "--out", str(out), "--data", "d"])
    assert "--grid: lr is given twice" in err
    err = _one_line_error(capsys, ["sweep", "--grid", "lr=0.1,abc", "--out", str(out), "--data", "d"])
    assert "--grid: lr=abc: expected a number" in err
    spec.write_text("grid:\n  lr: [0.1, 0.2]\n")
    err = _one_line_error(capsys, ["sweep", str(spec), "--grid", "lr=0.3", "--out", str(out), "--data", "d"])
    assert f"lr: in the grid of {spec} and in --grid" in err
    err = _one_line_error(capsys, ["sweep", str(spec), "--lr", "0.3", "--out", str(out), "--data", "d"])
    assert "lr: given both in the grid and as a fixed value" in err
    for flags, text in ((["--jobs", "0"], "--jobs must be an integer >= 1, not 0"),
                        (["--index", "3", "--of", "2"], "--index must be in 0..1 (--of 2), not 3"),
                        (["--epochs", "0"], "base: --epochs must be an integer >= 1, not 0"),
                        (["--storage", "sqlite//x.db"], "--storage sqlite//x.db: not an RDB URL")):
        err = _one_line_error(capsys, ["sweep", str(spec), "--out", str(out), "--data", "d", *flags])
        assert text in err, err
    tune = ["tune", "--data", "d", "--out", str(out)]
    for flags, text in ((["--trials", "0"], "--trials must be an integer >= 1, not 0"),
                        (["--lr", "0.1"], "--lr takes two numbers, the low and the high end"),
                        (["--lr", "0.1", "0.01"], "--lr: the low end 0.1 is above the high end 0.01"),
                        (["--min-epochs", "3", "--max-epochs", "2"], "--min-epochs 3 must be at most --max-epochs 2"),
                        (["--storage", "postgres//h/db"], "--storage postgres//h/db: not an RDB URL"),
                        (["--batch-size", "0"], "--batch-size must be an integer >= 1")):
        err = _one_line_error(capsys, tune + flags)
        assert err.startswith("dsimagenet tune: error: ") and text in err, err
    err = _one_line_error(capsys, tune + ["--storage", f"sqlite:///{tmp_path}/no/such/dir/s.db"])
    assert "cannot open it" in err and "no/such/dir/s.db" in err
    assert not out.exists()  # nothing was made by any of them
    err = _one_line_error(capsys, ["report", str(tmp_path), "--out", str(out)])
    assert err.startswith("dsimagenet report: error: no finished runs")
    err = _one_line_error(capsys, ["demo", "--out", str(out), "--epochs", "0"])
    assert "--epochs must be an integer >= 1, not 0" in err
    assert not out.exists()


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    from dsimagenet import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_classes", interrupted)
    assert main(["classes"]) == 130
    assert capsys.readouterr().err == "dsimagenet classes: interrupted\n"


def test_an_error_of_ours_is_one_line_and_anything_else_keeps_its_traceback(monkeypatch, capsys):
    import pytest

    from dsimagenet import cli
    from dsimagenet.errors import Diverged, FormatError

    def raising(exc):
        def f(args):
            raise exc
        return f

    monkeypatch.setattr(cli, "_classes", raising(FormatError("data/val_data: truncated")))
    assert main(["classes"]) == 1
    assert capsys.readouterr().err == "dsimagenet classes: error: data/val_data: truncated\n"
    monkeypatch.setattr(cli, "_classes", raising(Diverged("run: loss nan at epoch 1")))
    assert main(["classes"]) == 3
    monkeypatch.setattr(cli, "_classes", raising(OSError(28, "No space left on device", "out/checkpoint.pt")))
    assert main(["classes"]) == 1
    assert capsys.readouterr().err.endswith("error: out/checkpoint.pt: No space left on device\n")
    monkeypatch.setattr(cli, "_classes", raising(KeyError("splits")))  # a bug of ours: never a bare "'splits'"
    with pytest.raises(KeyError):
        main(["classes"])
