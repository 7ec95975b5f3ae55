"""The report from a small sweep: every table and figure the runs allow, numbers that match the runs, the
paper's numbers beside ours, an HTML page that embeds them (rendered in headless Chromium where it exists)."""

import base64
import csv
import json
import shutil
import subprocess
import sys

import pytest
from conftest import learnable_native

from dsimagenet.errors import DSImageNetError
from dsimagenet.report import report
from dsimagenet.report.tables import lr_rank_correlations, rows_of
from dsimagenet.runs import load_runs
from dsimagenet.sweep import SweepConfig, parse_grid, sweep


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rep")
    data = learnable_native(tmp / "data", classes=5, per_class=12, val_per_class=6)
    sweep(SweepConfig(out=str(tmp / "sw"), grid=parse_grid("lr=0.01,0.03,0.1 width=1,2"),
                      base={"data": str(data), "depth": 6, "epochs": 2, "batch_size": 32, "device": "cpu",
                            "quiet": True, "report_epoch": 1}))
    return tmp / "sw"


def test_report_writes_what_the_runs_allow(runs_dir, tmp_path):
    written = report([runs_dir], tmp_path / "r")
    for name in ("table1.md", "table1.csv", "table1.tex", "lr_rank_correlations.csv", "index.html",
                 "fig1", "fig3", "fig4", "fig5", "fig6", "fig7"):
        assert name in written and written[name].stat().st_size > 0, name
    rows = list(csv.reader(open(tmp_path / "r" / "table1.csv")))
    head, body = rows[0], rows[1:]
    ours = [r for r in body if r[1] in ("WRN-6-1", "WRN-6-2")]
    assert len(ours) == 2
    paper = [r for r in body if r[1] == "WRN-28-10"][0]
    assert paper[head.index("paper top-1 (%)")] == "40.96" and paper[head.index("top-1 final (%)")] == "-"
    # the line shows the best learning rate by the runs' own errors
    runs = load_runs([runs_dir])
    best = min((r for r in runs if r.config["config"]["width"] == 1.0), key=lambda r: r.result["top1_error_ep1"])
    line = [r for r in ours if r[1] == "WRN-6-1"][0]
    assert float(line[head.index("lr")]) == best.config["config"]["lr"]


def test_rank_correlation_by_hand(runs_dir):
    rows = rows_of(load_runs([runs_dir]))
    corr = lr_rank_correlations(rows)
    assert len(corr) == 1 and corr[0]["between"] == "widths" and corr[0]["learning_rates"] == 3
    import numpy as np
    from scipy.stats import rankdata

    def ranks(width):
        return rankdata([np.mean([r.top1 for r in rows if r.width == width and r.lr == lr])
                         for lr in (0.01, 0.03, 0.1)])

    a, b = ranks(1.0), ranks(2.0)
    d = a - b
    n = 3
    if len(set(a)) == n and len(set(b)) == n:  # no ties: 1 - 6 sum d^2 / (n (n^2 - 1))
        assert corr[0]["spearman"] == pytest.approx(1 - 6 * (d * d).sum() / (n * (n * n - 1)))


def test_html_embeds_every_figure(runs_dir, tmp_path):
    written = report([runs_dir], tmp_path / "r")
    page = written["index.html"].read_text()
    for key in ("fig1", "fig3", "fig4", "fig5", "fig6", "fig7"):
        png = base64.b64encode(written[key].read_bytes()).decode()
        assert png[:200] in page, key
    assert "Table 1" in page and "WRN-28-10" in page and "Spearman" in page


def test_html_renders_in_chromium(runs_dir, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    written = report([runs_dir], tmp_path / "r")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000",
                    f"--screenshot={shot}", written["index.html"].as_uri()], check=True, capture_output=True,
                   timeout=120)
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"))
    assert img.std() > 10 and (img < 128).mean() > 0.01  # not blank: text, tables and figures drawn


def test_no_runs_is_an_error(tmp_path):
    with pytest.raises(DSImageNetError, match="no finished runs"):
        report([tmp_path], tmp_path / "r")
    assert not (tmp_path / "r").exists()


def _mark(run, kind):
    """Make a finished run diverged (as train now writes it; or as it was written before divergence was detected:
    a NaN loss in metrics.jsonl and an "error" better than any real one), unfinished or damaged."""
    if kind == "diverged":
        (run / "result.json").write_text(json.dumps({"status": "diverged", "epoch": 2, "step": 3,
                                                     "message": f"{run}: diverged in epoch 2 by step 3"}))
    elif kind == "diverged-old":
        res = json.loads((run / "result.json").read_text())
        res.pop("status", None)
        (run / "result.json").write_text(json.dumps({**res, "top1_error": 0.5, "top1_error_ep1": 0.5}))
        lines = (run / "metrics.jsonl").read_text().splitlines()
        m = json.loads(lines[-1])
        lines[-1] = json.dumps({**m, "train_loss": float("nan"), "top1_error": 0.5})
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    elif kind == "unfinished":
        (run / "result.json").unlink()
    elif kind == "damaged":
        (run / "result.json").write_text('{"status": "finished", "top1')
    elif kind == "lacking":
        (run / "result.json").write_text('{"status": "finished"}')


def test_diverged_unfinished_and_damaged_runs_are_listed_never_tabled(runs_dir, tmp_path):
    sw = tmp_path / "sw"
    shutil.copytree(runs_dir, sw)
    marks = {"lr=0.01_width=1.0": "diverged", "lr=0.03_width=1.0": "diverged-old", "lr=0.1_width=2.0": "unfinished",
             "lr=0.03_width=2.0": "damaged", "lr=0.01_width=2.0": "lacking"}
    for name, kind in marks.items():
        _mark(sw / name, kind)
    written = report([sw], tmp_path / "r")
    rows = list(csv.reader(open(tmp_path / "r" / "table1.csv")))
    head, body = rows[0], rows[1:]
    ours = {r[1]: r for r in body if r[1] in ("WRN-6-1", "WRN-6-2")}
    assert ours["WRN-6-1"][head.index("lr")] == "0.1"  # the only finished width-1 run, not the "0.50" diverged one
    assert ours["WRN-6-1"][head.index("seeds")] == "1" and "WRN-6-2" not in ours  # no finished width-2 run
    excluded = {r["run"].rsplit("/", 1)[-1]: r for r in csv.DictReader(open(written["excluded.csv"]))}
    assert {k: v["status"] for k, v in excluded.items()} == {
        "lr=0.01_width=1.0": "diverged", "lr=0.03_width=1.0": "diverged", "lr=0.1_width=2.0": "unfinished",
        "lr=0.03_width=2.0": "damaged", "lr=0.01_width=2.0": "damaged"}
    assert "diverged in epoch 2" in excluded["lr=0.01_width=1.0"]["why"]
    assert "result.json" in excluded["lr=0.03_width=2.0"]["why"]
    assert "lacks top1_error" in excluded["lr=0.01_width=2.0"]["why"]
    md = (tmp_path / "r" / "table1.md").read_text()
    assert "Not in the table: lr=0.01_width=1.0 diverged: " in md
    assert "Not in the table: lr=0.1_width=2.0 unfinished" in md
    assert "0.50 ± 0.00" not in md  # the diverged run's "error" is never shown
    page = written["index.html"].read_text()
    assert "lr=0.03_width=1.0: <b>diverged</b>" in page and "1 finished runs" in page


def test_only_diverged_runs_is_an_error_naming_them(runs_dir, tmp_path):
    sw = tmp_path / "sw"
    shutil.copytree(runs_dir / "lr=0.01_width=1.0", sw / "a")
    shutil.copytree(runs_dir / "lr=0.1_width=1.0", sw / "b")
    _mark(sw / "a", "diverged")
    _mark(sw / "b", "diverged-old")
    r = subprocess.run([sys.executable, "-m", "dsimagenet", "report", str(sw), "--out", str(tmp_path / "r")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("dsimagenet report: error: no finished runs") and "runs found: 2 diverged" in r.stderr
    assert not (tmp_path / "r").exists()


def test_the_command_says_which_runs_are_left_out(runs_dir, tmp_path):
    sw = tmp_path / "sw"
    shutil.copytree(runs_dir, sw)
    _mark(sw / "lr=0.01_width=1.0", "diverged")
    r = subprocess.run([sys.executable, "-m", "dsimagenet", "report", str(sw), "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, check=True)
    assert "not in the report: " in r.stdout and "lr=0.01_width=1.0: diverged: " in r.stdout
