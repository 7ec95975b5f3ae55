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
