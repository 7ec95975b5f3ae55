"""The report from a small sweep: every table and figure the runs allow, numbers that match the runs, the
paper's numbers beside ours, an HTML page that embeds them (rendered in headless Chromium where it exists)."""

import base64
import csv
import html
import json
import shutil
import subprocess
import sys

import pytest
from conftest import learnable_native

from dsimagenet.errors import DSImageNetError
from dsimagenet.report import report
from dsimagenet.report.page import captions
from dsimagenet.report.tables import lr_rank_correlations, rows_of
from dsimagenet.runs import load_runs
from dsimagenet.sweep import SweepConfig, parse_grid, sweep


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rep")
    data = learnable_native(tmp / "data", classes=5, per_class=12, val_per_class=6)
    sweep(SweepConfig(out=str(tmp / "sw"), grid=parse_grid("lr=0.01,0.03,0.1 width=1,2"),
                      base={"data": str(data), "depth": 6, "epochs": 2, "batch_size": 32, "device": "cpu",
                            "quiet": True, "report_epoch": 1, "classes": 5}))
    return tmp / "sw"


def test_report_writes_what_the_runs_allow(runs_dir, tmp_path):
    written = report([runs_dir], tmp_path / "r")
    for name in ("table1.md", "table1.csv", "table1.tex", "paper_table1.csv", "lr_rank_correlations.csv",
                 "index.html", "fig1", "fig3", "fig4", "fig5", "fig6", "fig7"):
        assert name in written and written[name].stat().st_size > 0, name
    rows = list(csv.reader(open(tmp_path / "r" / "table1.csv")))
    head, body = rows[0], rows[1:]
    ours = [r for r in body if r[1] in ("WRN-6-1", "WRN-6-2")]
    assert len(ours) == 2 == len(body)
    paper = list(csv.reader(open(tmp_path / "r" / "paper_table1.csv")))
    assert [r for r in paper if r[1] == "WRN-28-10"][0][paper[0].index("top-1 ep31 (%)")] == "40.96"
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

    def best_first(width):  # the learning rates sorted by their mean error, by hand
        errs = {lr: np.mean([r.top1 for r in rows if r.width == width and r.lr == lr]) for lr in (0.01, 0.03, 0.1)}
        return " < ".join(f"{lr:g}" for lr in sorted(errs, key=lambda lr: (errs[lr], lr)))

    assert (corr[0]["ranking_a"], corr[0]["ranking_b"]) == (best_first(1.0), best_first(2.0))
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
    for key, caption in captions(False, 1).items():  # each figure's title said once: the caption, not the PNG too
        assert page.count(html.escape(caption)) == (2 if key in written else 0), key  # caption and alt text


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
    assert "lr=0.03_width=1.0: <b>diverged</b>" in page and "1 finished, 5 left out" in page


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


# --- what the report says, and what it does not claim ------------------------------------------------------------

def _row(seed=0, epochs=2, top1=50.0, top5=20.0, classes=5, method="box", lr=0.1, size=16, depth=20, width=1.0,
         ep31=None, why="5 classes"):
    from dsimagenet.report.tables import RunRow

    setting = tuple(sorted({"epochs": epochs, "classes": classes, "method": method, "lr": lr, "size": size,
                            "depth": depth, "width": width, "data": "d"}.items()))
    return RunRow(f"r{seed}_{epochs}", size, depth, width, lr, seed, method, 1000, top1, top5,
                  ep31, None if ep31 is None else top5, 10.0, classes, epochs, setting, why)


def _line(lines, **kw):
    return [line for line in lines if all(line[k] == v for k, v in kw.items())]


def test_seeds_are_counted_only_over_runs_identical_but_for_the_seed():
    from dsimagenet.report.tables import table1

    # two seeds of a 1-epoch setting and one 2-epoch run: never "seeds 3", never a mean across epochs
    one_a, one_b, two = _row(0, 1, 50.0), _row(1, 1, 60.0), _row(0, 2, 40.0)
    [line] = table1([one_a, one_b, two])
    assert (line["epochs"], line["seeds"], line["top1_final"]) == (2, 1, (40.0, None))
    [line] = table1([one_a, one_b, _row(0, 2, 70.0)])
    m, s = line["top1_final"]
    assert (line["epochs"], line["seeds"]) == (1, 2) and m == 55.0 and s == pytest.approx(50 ** 0.5)  # stdev by hand
    head, body = __import__("dsimagenet.report.tables", fromlist=["x"]).table_cells([line])
    assert body[0][head.index("top-1 final (%)")] == "55.00 ± 7.07"
    # the same seed twice (a copied run) is one seed
    assert table1([_row(0, 1, 50.0), _row(0, 1, 52.0)])[0]["seeds"] == 1


def test_seeds_from_real_runs_of_two_epoch_counts(runs_dir, tmp_path):
    """A sweep over epochs=1,2 and seed=0,1: two settings of two seeds each (by config.json, compared by hand)."""
    data = json.loads((next(runs_dir.glob("*/config.json"))).read_text())["config"]["data"]
    sweep(SweepConfig(out=str(tmp_path / "sw"), grid=parse_grid("epochs=1,2 seed=0,1"),
                      base={"data": data, "depth": 6, "batch_size": 32, "device": "cpu", "quiet": True,
                            "lr": 0.03, "milestones": ()}))
    rows = rows_of(load_runs([tmp_path / "sw"]))
    by_hand = {}
    for r in load_runs([tmp_path / "sw"]):
        by_hand.setdefault(r.config["config"]["epochs"], set()).add(r.config["config"]["seed"])
    assert len({r.setting for r in rows}) == 2 and by_hand == {1: {0, 1}, 2: {0, 1}}
    from dsimagenet.report.tables import table1

    [line] = table1(rows)
    assert line["seeds"] == 2 and line["epochs"] in (1, 2)
    mean = sum(r.top1 for r in rows if r.epochs == line["epochs"]) / 2
    assert line["top1_final"][0] == pytest.approx(mean)


def test_top5_is_hidden_for_ten_classes_or_fewer(runs_dir, tmp_path):
    from dsimagenet.report.tables import table1, table_cells

    written = report([runs_dir], tmp_path / "r")  # 5 classes
    head = next(csv.reader(open(written["table1.csv"])))
    assert not [h for h in head if "top-5" in h] and "top-1 final (%)" in head
    page = written["index.html"].read_text()
    ours = page[page.index('class="ours"'):page.index("</table>", page.index('class="ours"'))]
    assert "top-5" not in ours and "top-1 prediction" in page
    # with 11 classes top-5 comes back, beside top-1
    head, _ = table_cells(table1([_row(classes=11)]))
    assert "top-5 final (%)" in head and "top-1 final (%)" in head
    head, _ = table_cells(table1([_row(classes=10)]))
    assert "top-5 final (%)" not in head


def test_paper_numbers_only_beside_runs_that_compare(runs_dir, tmp_path):
    from dsimagenet.report.tables import table1, table_cells, why_not_comparable

    run = load_runs([runs_dir])[0]
    assert why_not_comparable(run).startswith("5 classes; 2 epochs")  # the fixture: 5 classes, 2 epochs
    written = report([runs_dir], tmp_path / "r")
    head = next(csv.reader(open(written["table1.csv"])))
    assert not [h for h in head if h.startswith("paper")]
    page = written["index.html"].read_text()
    assert "None of these runs compares with the paper" in page and "5 classes" in page
    assert "full ImageNet, 1000 classes" in page
    # a comparable line (1000 classes, errors after epoch 31, the paper's recipe) carries the paper's numbers
    lines = table1([_row(classes=1000, size=32, depth=28, width=10.0, ep31=41.5, why=""),
                    _row(classes=1000, size=32, depth=28, width=2.0, ep31=58.0, why="weight_decay 0.001")])
    head, body = table_cells(lines)
    paper_col = head.index("paper top-1 (%)")
    assert {r[1]: r[paper_col] for r in body} == {"WRN-28-10": "40.96", "WRN-28-2": "-"}


def test_header_says_what_produced_the_report(runs_dir, tmp_path):
    import datetime as dt

    import dsimagenet
    from dsimagenet.report.header import facts

    runs = load_runs([runs_dir])
    f = dict(facts(runs))
    data = runs[0].config["config"]["data"]
    assert f["data"] == f"{data}: 8 px; synthetic; 5 classes; 60 train / 30 val images"  # conftest: 12 + 6 a class
    assert f["runs"] == "6 finished: WRN-6-1, WRN-6-2; epochs 2; learning rates 0.01, 0.03, 0.1; 1 seed"
    assert f["devices"].startswith("cpu; ")
    first = min((r.path / "config.json").stat().st_mtime for r in runs)  # written when a run starts
    assert f["dates"].startswith("runs from " + dt.datetime.fromtimestamp(first, dt.UTC).strftime("%Y-%m-%d %H:%M"))
    assert f["versions"].endswith(f"report by dsimagenet {dsimagenet.__version__}")
    assert "classes" in f  # five names, said once for both widths' runs
    page = report([runs_dir], tmp_path / "r")["index.html"].read_text()
    assert html.escape(f["data"]) in page and "report by dsimagenet" in page
    assert (tmp_path / "r" / "table1.md").read_text().startswith(f"- data: {f['data']}\n")


def test_fig7_frames_wrong_predictions_red(runs_dir, tmp_path):
    """The best run's head made to answer class 0 for every image: class 0's images are right (green), all
    others wrong (red), four classes of six images each against one."""
    import numpy as np
    import torch
    from PIL import Image

    from dsimagenet.report.figures import RIGHT, WRONG, fig7_ranked_classes

    run_dir = tmp_path / "run"
    shutil.copytree(runs_dir / "lr=0.1_width=1.0", run_dir)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["model"]["fc.weight"].zero_()
    state["model"]["fc.bias"].copy_(torch.tensor([10.0, 0, 0, 0, 0]))
    torch.save(state, run_dir / "checkpoint.pt")
    from dsimagenet.runs import load_run

    png = fig7_ranked_classes(load_run(run_dir), tmp_path)
    img = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)

    def count(hex_colour):
        rgb = [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]
        return int((img == rgb).all(1).sum())

    red, green = count(WRONG), count(RIGHT)
    assert red > 0 and green > 0 and 3 * green < red < 5 * green


def test_legends_and_log_axes_are_plain(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsimagenet.report.figures import labels, log_axis

    fig, ax = plt.subplots()
    xs = [0.003, 0.01, 0.06, 0.2]
    ax.plot(xs, [1, 2, 3, 4], "o")
    log_axis(ax, "x", xs, ticks=xs)
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.003", "0.01", "0.06", "0.2"]
    lo, hi = ax.get_xlim()
    assert lo < 0.003 and hi > 0.2  # no end point on the frame
    log_axis(ax, "x", [1.5, 80])  # times: 1, 2, 5 times powers of ten, plain
    fig.canvas.draw()
    assert {t.get_text() for t in ax.get_xticklabels() if t.get_text()} >= {"2", "5", "10", "20", "50"}
    plt.close(fig)
    a = {"method": "box", "size": 16, "depth": 20, "width": 1.0, "lr": 0.1, "epochs": 6, "data": "x"}
    assert labels([a, {**a, "method": "nearest"}]) == ["box", "nearest"]
    assert labels([a, {**a, "width": 2.0, "lr": 0.05}]) == ["WRN-20-1, lr 0.1", "WRN-20-2, lr 0.05"]
    assert labels([a]) == ["WRN-20-1"]


def test_rank_correlations_say_what_they_need(runs_dir, tmp_path):
    sw = tmp_path / "sw"
    for name in ("lr=0.01_width=1.0", "lr=0.03_width=1.0", "lr=0.1_width=1.0"):
        shutil.copytree(runs_dir / name, sw / name)
    page = report([sw], tmp_path / "r")["index.html"].read_text()
    assert "Not computed. It needs runs of two sizes at the same width, or two widths at the same size" in page
    assert "1 size (8 px) and 1 width (k=1)" in page
    errs = {r.config["config"]["lr"]: r.result["top1_error"] for r in load_runs([sw])}
    by_hand = " &lt; ".join(f"{lr:g}" for lr in sorted(errs, key=lambda lr: (errs[lr], lr)))
    assert f"<td>8 px, k=1</td><td>{by_hand}</td>" in page


def test_data_gone_since_the_runs_leaves_its_figures_out_and_says_so(runs_dir, tmp_path):
    sw = tmp_path / "sw"
    shutil.copytree(runs_dir / "lr=0.1_width=1.0", sw / "a")
    config = json.loads((sw / "a" / "config.json").read_text())
    config["config"]["data"] = str(tmp_path / "moved")
    (sw / "a" / "config.json").write_text(json.dumps(config))
    written = report([sw], tmp_path / "r")
    assert "fig1" not in written and "fig7" not in written and "fig6" in written
    page = written["index.html"].read_text()
    assert "image counts unknown (not native data, or no longer at this path)" in page
    assert "Fig. 1 (needs the runs&#x27; data at its path)" in page
