"""progress.bar: plain lines where stderr is not a terminal, nothing with quiet."""

import io

from dsimagenet.progress import Lines, bar


def test_plain_lines_at_each_tenth_and_the_end():
    f = io.StringIO()
    with bar(20, "sweep", unit="run", file=f) as b:
        assert isinstance(b, Lines)  # a StringIO is not a terminal
        for _ in range(20):
            b.update(1)
            b.set_postfix_str("ok")
    lines = f.getvalue().splitlines()
    # 10 steps of 10% (runs 2, 4, ..., 20); the end was one of them, so close() adds nothing
    assert len(lines) == 10, lines
    assert lines[0].startswith("sweep: 2/20 run (10%)") and lines[-1].startswith("sweep: 20/20 run (100%)")
    assert "ETA" not in lines[-1] and lines[-1].endswith("ok")


def test_unknown_total_prints_at_close_and_quiet_prints_nothing():
    f = io.StringIO()
    b = bar(None, "tune", unit="trial", file=f, every=1e9)
    b.update(3)
    assert f.getvalue() == ""
    b.close()
    assert f.getvalue().startswith("tune: 3 trial,")
    q = io.StringIO()
    with bar(5, "x", quiet=True, file=q) as b:
        b.update(5)
    assert q.getvalue() == ""


def test_a_sweep_in_a_log_shows_plain_progress_lines_and_quiet_none(tmp_path):
    """stderr to a file, as in a job's log: the sweep's runs done of total and each run's steps, as plain lines
    (no carriage returns, no bar); with --quiet, nothing on stderr."""
    import os
    import subprocess
    import sys

    from conftest import learnable_native

    data = learnable_native(tmp_path / "data", per_class=8, val_per_class=2)  # 32 images: 2 steps of 16
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def sweep(out, grid, *extra):
        log = tmp_path / f"{out}.log"
        with open(log, "w") as f:
            r = subprocess.run([sys.executable, "-m", "dsimagenet", "sweep", "--grid", grid, "--out",
                                str(tmp_path / out), "--data", str(data), "--depth", "6", "--batch-size", "16",
                                "--epochs", "1", "--augment", "flip", "--device", "cpu", "--log-every", "1",
                                *extra],
                               stdout=subprocess.PIPE, stderr=f, text=True, env=env)
        assert r.returncode == 0, log.read_text()
        return r.stdout, log.read_text()

    out, err = sweep("loud", "lr=0.01,0.02")
    lines = err.splitlines()
    assert "\r" not in err and lines, err
    assert [x.split(",")[0] for x in lines if x.startswith("sweep: ")] == ["sweep: 1/2 run (50%)",
                                                                            "sweep: 2/2 run (100%)"], err
    trains = [x for x in lines if x.startswith("train: ")]
    ends = [x for x in trains if x.startswith("train: 2/2 step (100%)")]  # each run's last step
    assert len(ends) == 2 and all(", epoch 1/1, loss " in x and x.endswith(" img/s") for x in ends), err
    assert all(x.startswith(("sweep: ", "train: ")) for x in lines), err  # nothing else on stderr
    assert "lr=0.01: ran" in out and "lr=0.02: ran" in out
    out, err = sweep("quiet", "lr=0.01", "--quiet")
    assert err == "" and "lr=0.01: ran" in out


def test_convert_shows_its_images_as_plain_lines(tmp_path, capsys):
    from conftest import learnable_native

    from dsimagenet.convert import convert

    data = learnable_native(tmp_path / "data", per_class=4, val_per_class=2)  # 16 + 8 images
    convert(data, tmp_path / "npz", ["npz"])
    assert capsys.readouterr().err.splitlines()[-1].startswith("convert: 24/24 img (100%)")
    convert(data, tmp_path / "pickle", ["pickle"], quiet=True)
    assert capsys.readouterr().err == ""


def _first_line_then_close(args, cwd):
    """Run the command line with stdout and stderr into one pipe, read its first line and close the pipe, as
    ``| head -1`` does; its exit status once it ends."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "dsimagenet", *args], cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    first = p.stdout.readline()
    p.stdout.close()
    return first, p.wait(timeout=300)


def test_a_reader_that_leaves_does_not_stop_a_run_or_a_sweep(tmp_path):
    """`train ... | head -1` once ended the run at its next line, half done, with exit status 0 and no word
    (and `sweep --jobs 2 | head -1` its workers' runs): now the work goes on to its end, its output dropped."""
    import csv

    from conftest import learnable_native

    data = learnable_native(tmp_path / "data", classes=2, per_class=8, val_per_class=4)
    tiny = ["--data", str(data), "--depth", "6", "--width", "0.25", "--epochs", "2", "--batch-size", "4",
            "--device", "cpu"]
    first, rc = _first_line_then_close(["train", *tiny, "--out", str(tmp_path / "run")], tmp_path)
    assert first and rc == 0
    assert (tmp_path / "run" / "result.json").exists() and len((tmp_path / "run" / "metrics.jsonl").read_text()
                                                                .splitlines()) == 2
    first, rc = _first_line_then_close(["sweep", *tiny, "--out", str(tmp_path / "sweep"), "--grid",
                                        "lr=0.01,0.02", "--jobs", "2"], tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "results.csv")))
    assert first and rc == 0 and [r["status"] for r in rows] == ["finished", "finished"]


def test_rates_read_as_plain_numbers_never_e_notation(monkeypatch):
    """A rate of thousands once printed as "2.1e+03 img/s" (``:.3g``)."""
    import dsimagenet.progress as progress

    clock = iter([0.0, 2.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    lines = Lines(10_000, "evaluate", unit="img")
    lines.n = 4280
    assert lines.line().startswith("evaluate: 4280/10000 img (43%), 0:02 elapsed, 2,140 img/s, ETA 0:03")
    assert [progress._rate(r) for r in (0.5, 12.34, 99.94, 123.4, 2137.0, 1234567.0)] == \
        ["0.5", "12.3", "99.9", "123", "2,140", "1,230,000"]
