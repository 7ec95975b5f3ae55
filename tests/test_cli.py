"""The command line as a user runs it: the console script and ``python -m dsimagenet``."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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


# --- every flag from its field's declaration (dsimagenet.fields) ----------------------------------------------

def _configs():
    from dsimagenet.build import BuildConfig
    from dsimagenet.recipe import TrainConfig
    from dsimagenet.tune import TuneConfig

    return TrainConfig, BuildConfig, TuneConfig


def test_every_field_declares_its_help_its_role_and_its_values():
    import dataclasses

    from dsimagenet.fields import OPTION, RECIPE, rules

    for cls in _configs():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("role") in (RECIPE, OPTION), f"{cls.__name__}.{f.name}: recipe or option?"
            assert isinstance(f.metadata.get("help"), str) and len(f.metadata["help"]) > 5, f"{cls.__name__}.{f.name}"
        assert sorted(rules(cls)) == sorted(f.name for f in dataclasses.fields(cls))


def test_a_field_declared_without_its_role_or_help_is_refused():
    """Forgetting the mark cannot silently make a field part of what a resume compares (or not)."""
    import dataclasses

    import pytest

    from dsimagenet.fields import operational, option, recipe, rules

    unmarked = dataclasses.make_dataclass("Unmarked", [("lr", float, recipe(0.1, help="the learning rate")),
                                                       ("log_every", int, 100)])
    with pytest.raises(TypeError, match="Unmarked: declare log_every with"):
        operational(unmarked)
    no_help = dataclasses.make_dataclass("NoHelp", [("quiet", bool, option(False, help=""))])
    with pytest.raises(TypeError, match="NoHelp: declare quiet with"):
        rules(no_help)
    no_check = dataclasses.make_dataclass("NoCheck", [("lr", float, recipe(0.1, help="the learning rate"))])
    with pytest.raises(TypeError, match="NoCheck.lr: give its check"):
        rules(no_check)
    marked = dataclasses.make_dataclass("Marked", [("lr", float, recipe(0.1, help="lr", check=(bool, "x"))),
                                                   ("quiet", bool, option(False, help="say nothing"))])
    assert operational(marked) == {"quiet"}


def test_what_a_resume_may_change_is_the_options():
    from dsimagenet.fields import operational
    from dsimagenet.recipe import OPERATIONAL

    train, build, tune = _configs()
    # the hand-kept sets these replace (recipe.OPERATIONAL, build._plan_digest's), written out
    assert OPERATIONAL == operational(train) == {
        "out", "data", "log_every", "checkpoint_minutes", "checkpoint_every_steps", "compile", "compile_mode",
        "quiet", "eval_batch_size", "cuda_graph"}
    assert operational(build) == {"workers", "quiet", "verify", "chunk_rows", "out", "skip_bad", "allow_partial"}
    assert operational(tune) == {"out", "trials", "storage", "study", "workers", "quiet", "gpus", "runs_per_gpu"}


def test_flags_take_their_type_choices_and_help_from_the_fields():
    import argparse
    import dataclasses

    from dsimagenet.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command, cls in zip(("train", "build", "tune"), _configs(), strict=True):
        actions = {a.dest: a for a in subs[command]._actions}
        for f in dataclasses.fields(cls):
            if f.name == "base":  # tune's base is the train flags themselves
                continue
            assert actions[f.name].help.startswith(f.metadata["help"]), (command, f.name)
    train = {a.dest: a for a in subs["train"]._actions}
    assert list(train["schedule"].choices) == ["step", "cosine", "sgdr", "cosine-epoch"]
    assert list(train["compile_mode"].choices) == ["default", "reduce-overhead", "max-autotune"]
    assert train["lr"].type is float and train["epochs"].type is int and train["milestones"].nargs == "*"
    assert list({a.dest: a for a in subs["build"]._actions}["aspect"].choices) == ["squash", "center-crop"]


def test_a_choice_not_declared_is_refused_by_the_parser(tmp_path, capsys):
    import pytest

    for argv in (["train", "--data", "d", "--out", str(tmp_path / "o"), "--schedule", "linear"],
                 ["build", "--train", "t", "--out", str(tmp_path / "o"), "--aspect", "pad"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_config_errors_from_the_declared_ranges(tmp_path):
    import pytest

    from dsimagenet.errors import ConfigError

    train, build, _ = _configs()
    with pytest.raises(ConfigError, match=r"^--checkpoint-minutes must be a number in \[0, 1e\+09\], not -1$"):
        train(data="d", out="o", checkpoint_minutes=-1)
    with pytest.raises(ConfigError, match=r"^--fast must be true or false, not 1$"):
        build(out=str(tmp_path / "o"), train="t", fast=1)
    assert not (tmp_path / "o").exists()


def _subcommands():
    import argparse

    from dsimagenet.cli import build_parser

    parser = build_parser()
    return parser, next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_subcommand_help_says_each_option_once_with_its_default_and_ends_with_examples():
    """Walks build_parser()'s subcommands (those added later included): every option and positional has a
    sentence of help; its default is said at most once, never as None or as a Python tuple; each help ends with
    examples that the parser itself accepts."""
    import re
    import shlex

    parser, subs = _subcommands()
    assert set(subs) >= {"classes", "convert", "info", "build", "train", "sweep", "report", "tune", "demo"}
    for command, p in [("", parser), *subs.items()]:
        formatter = p._get_formatter()
        for a in p._actions:
            if a.help == "==SUPPRESS==" or a.dest == "command":
                continue
            text = formatter._get_help_string(a) % {**vars(a), "prog": p.prog}
            where = f"{command} {'/'.join(a.option_strings) or a.dest}"
            assert a.help and len(a.help.split()) >= 2, f"{where}: no help"
            # the value of a choice named "default" (--compile-mode) is not the word said twice
            said = re.findall(r"(?<!default: )\bdefault\b", text)
            assert len(said) <= 1, f"{where}: default said {len(said)} times: {text}"
            assert "None" not in text, f"{where}: {text}"
            assert not re.search(r"\((?:'[^']*'|[-\d.e]+),", text), f"{where}: a tuple repr: {text}"
        help_text = p.format_help()
        assert " ".join(help_text.split()).count("(default: ") == sum(1 for a in p._actions if "(default: " in
                                                     formatter._get_help_string(a)), command  # none added twice
        epilog = p.epilog or ""
        assert epilog.startswith("examples:\n") and help_text.rstrip().endswith(epilog.splitlines()[-1].strip()), \
            f"{command}: no examples at the end of its help"
        lines = [line.strip() for line in epilog.splitlines()[1:]]
        assert 1 <= len(lines) <= 2, command
        for line in lines:
            argv = shlex.split(line)
            assert argv[0] == "dsimagenet" and (not command or argv[1] == command), line
            parser.parse_args(argv[1:])  # exits (SystemExit 2) if the example does not parse


def test_help_shows_defaults_as_typed_and_once(capsys):
    """The formatter, on values a user types: a tuple as its items, a switch as on/off, a float as written; a help
    that says its default keeps its own words; a sweep's flags show the field's default though not given."""
    import pytest

    for argv in (["build", "--help"], ["sweep", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    out = " ".join(capsys.readouterr().out.split())  # the wrapping undone
    assert "output sizes S (S x S) (default: 32)" in out
    assert "webdataset (tar shards: webdataset, timm) (default: pickle native)" in out
    assert "check the official archives' MD5s first (default: off)" in out
    assert "LOC_val_solution.csv (default: bundled val labels) --sizes" in out
    assert "epochs after which the step schedule multiplies lr by --gamma (default: 10 20 30)" in out
    assert "the weight decay, as --decay says (default: 0.0005)" in out
    assert "channels_last memory format on CUDA (default: on)" in out
    assert "output folder (default: demo-out)" in out and "epochs of each training run (default: 6)" in out


def test_info_is_one_json_document_and_a_readable_table(tmp_path, capsys):
    import json

    from dsimagenet.formats import native

    w = native.NativeWriter(tmp_path / "ds", 4, ["n01", "n02"], ["a", "b"], method="box",
                            source=json.dumps({"train": "t.tar", "val": "v.tar"}))
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        sw = w.split(split)
        sw.append(rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), np.arange(n) % 2 + 1)
    w.close()
    assert main(["info", str(tmp_path / "ds"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)  # one document: the source is an object in it, not a string
    assert doc["source"] == {"train": "t.tar", "val": "v.tar"} and doc["splits"] == {"train": 3, "val": 2}
    assert main(["info", str(tmp_path / "ds")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "source            train: t.tar, val: v.tar" in lines
    assert lines[-3:] == ["split  images", "train       3", "val         2"]
    assert not any("{" in line for line in lines)


def test_grid_given_twice_sweeps_both_never_only_the_last(tmp_path, capsys):
    """`--grid "decay=all" --grid "seed=0,1"` once swept seed alone (argparse kept the last --grid), decay left
    at its default without a word; each --grid now adds its names, and a name in two of them is an error."""
    import csv
    import json

    from conftest import learnable_native

    data = learnable_native(tmp_path / "data", classes=2, per_class=4, val_per_class=2)
    out = tmp_path / "sw"
    assert main(["sweep", "--grid", "decay=all", "--grid", "seed=0,1", "--out", str(out), "--data", str(data),
                 "--depth", "6", "--width", "0.25", "--epochs", "1", "--batch-size", "4", "--device", "cpu",
                 "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted((r["decay"], r["seed"]) for r in rows) == [("all", "0"), ("all", "1")]
    assert {json.loads((out / r["run"] / "config.json").read_text())["config"]["decay"] for r in rows} == {"all"}
    capsys.readouterr()
    err = _one_line_error(capsys, ["sweep", "--grid", "lr=0.1", "--grid", "lr=0.2", "--out", str(tmp_path / "o"),
                                   "--data", "d"])
    assert "--grid: lr is given twice" in err


def test_quiet_says_what_it_prints_and_prints_only_that(tmp_path, capsys):
    """train, sweep and tune --quiet print their outcome line(s) on stdout (what scripts read); their help
    said "print nothing but errors". Now the help says so, and --quiet prints the one result line, nothing on
    stderr."""
    from conftest import learnable_native

    for command in ("train", "sweep", "tune"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        flat = " ".join(capsys.readouterr().out.split())
        assert "print nothing but errors" not in flat and "only the outcome" in flat, command
    data = learnable_native(tmp_path / "data", classes=2, per_class=4, val_per_class=2)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--depth", "6", "--width", "0.25",
                 "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.count("\n") == 1 and out.startswith(f"{tmp_path / 'run'}: top-1 error ")


def test_the_lazy_public_names_are_what_they_name():
    """``from dsimagenet import TrainConfig, train``: loading dsimagenet.train for TrainConfig set the package's
    attribute "train" to the module, so ``train`` was the module, not the function (in a fresh interpreter)."""
    code = ("from dsimagenet import TrainConfig, train, evaluate, load_runs, runs_table\n"
            "import dsimagenet, types\n"
            "assert callable(train) and not isinstance(train, types.ModuleType), train\n"
            "assert dsimagenet.train is train and dsimagenet.train is dsimagenet.train\n"
            "assert not isinstance(evaluate, types.ModuleType)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
