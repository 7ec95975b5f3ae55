"""A run directory as runs.py reads it: found under folders, its config as a TrainConfig, its trained model from
the checkpoint, its format version checked; damaged files are errors naming the file."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from dsimagenet.model import WideResNet
from dsimagenet.recipe import TrainConfig
from dsimagenet.runs import FORMAT, RunError, config_record, exists, find_runs, load_run, load_runs

SIZE, DEPTH, CLASSES = 16, 8, 7  # WRN-8 at 16 px: 2 stacks of one block each


def make_run(path: Path, config: TrainConfig | None = None, result: dict | None = None, **stored) -> Path:
    """A run directory as the trainer writes it, without training: config.json, metrics, result.json."""
    config = config or TrainConfig(data="data/16_box", out=str(path), depth=DEPTH, width=0.5, lr=0.05,
                                   milestones=(2, 3), epochs=3, report_epoch=2)
    path.mkdir(parents=True, exist_ok=True)
    record = {**config_record(config, dataset_fingerprint="f" * 64, depth=DEPTH, image_size=SIZE,
                              num_classes=CLASSES, method="box"), **stored}
    (path / "config.json").write_text(json.dumps(record))
    (path / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "top1_error": 90.0 - e}) + "\n"
                                                for e in range(1, 4)))
    if result is not None:
        (path / "result.json").write_text(json.dumps(result))
    return path


def test_find_runs_takes_run_directories_and_searches_folders(tmp_path):
    a = make_run(tmp_path / "sw" / "b=2")
    b = make_run(tmp_path / "sw" / "a=1")
    c = make_run(tmp_path / "sw" / "deeper" / "c")
    single = make_run(tmp_path / "single")
    (tmp_path / "sw" / "not-a-run").mkdir()
    (tmp_path / "sw" / "not-a-run" / "x.json").write_text("{}")
    assert find_runs(tmp_path / "sw") == [b, a, c]  # sorted, whatever the order of creation
    assert find_runs([str(single), tmp_path / "sw", b]) == [single, b, a, c]  # each once
    assert find_runs([]) == []
    with pytest.raises(FileNotFoundError, match="nope: no such run directory"):
        find_runs([tmp_path / "sw", tmp_path / "nope"])
    assert exists(a) and not exists(tmp_path / "sw") and not exists(tmp_path / "nope")
    assert [r.path for r in load_runs(tmp_path / "sw", finished_only=False)] == [b, a, c]


def test_the_report_and_load_runs_find_the_same_runs(tmp_path):
    from dsimagenet.report import load

    done = {"status": "finished", "top1_error": 87.0, "top5_error": 50.0, "params": 10, "train_seconds": 1.0,
            "epochs": 3}
    make_run(tmp_path / "x" / "one", result=done)
    make_run(tmp_path / "x" / "two")
    make_run(tmp_path / "y", result=done)
    finished, other = load([tmp_path / "x", tmp_path / "y"])
    assert [r.path for r in finished] == [r.path for r in load_runs([tmp_path / "x", tmp_path / "y"])]
    assert [(Path(p).name, s) for p, s, _ in other] == [("two", "unfinished")]
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        load([tmp_path / "missing"])


def test_train_config_is_the_stored_trainconfig(tmp_path):
    config = TrainConfig(data="data/16_box", out=str(tmp_path / "r"), depth=DEPTH, width=0.5, lr=0.05,
                         milestones=(2, 3), epochs=3, schedule="sgdr", sgdr_t0=2, report_epoch=2)
    run = load_run(make_run(tmp_path / "r", config))
    assert run.train_config == config  # milestones stored as a JSON list come back a tuple
    assert (run.image_size, run.depth, run.num_classes, run.method) == (SIZE, DEPTH, CLASSES, "box")
    # a run made before a field existed: the field takes its default
    stored = json.loads((tmp_path / "r" / "config.json").read_text())
    del stored["config"]["report_epoch"]
    (tmp_path / "r" / "config.json").write_text(json.dumps(stored))
    assert load_run(tmp_path / "r").train_config == dataclasses.replace(config, report_epoch=31)


@pytest.mark.parametrize("change, match", [
    (lambda c: c.pop("config"), "lacks its 'config'"),
    (lambda c: c.update(config=[1, 2]), "lacks its 'config'"),
    (lambda c: c["config"].update(lr=-1.0), r"not a valid TrainConfig \(--lr must be"),
    (lambda c: c["config"].update(speed="fast"), r"fields this dsimagenet does not know: \['speed'\]"),
    (lambda c: c["config"].pop("data"), "not a valid TrainConfig"),
])
def test_a_config_that_is_no_trainconfig_is_an_error_naming_the_file(tmp_path, change, match):
    path = make_run(tmp_path / "r")
    stored = json.loads((path / "config.json").read_text())
    change(stored)
    (path / "config.json").write_text(json.dumps(stored))
    run = load_run(path)  # reading works: the report lists it as damaged
    with pytest.raises(RunError, match=f"r/config.json: .*{match}"):
        run.train_config  # noqa: B018


def test_errors_at_the_report_epoch(tmp_path):
    run = load_run(make_run(tmp_path / "r", result={"status": "finished", "top1_error": 80.0, "top5_error": 40.0,
                                                    "top1_error_ep2": 85.5, "top5_error_ep2": 45.5}))
    assert run.errors_at(run.train_config.report_epoch) == (85.5, 45.5)
    assert run.errors_at(31) == (None, None)
    assert load_run(make_run(tmp_path / "u")).errors_at(2) == (None, None)  # unfinished: no result


def test_model_is_the_checkpoints_wideresnet(tmp_path):
    path = make_run(tmp_path / "r")
    torch.manual_seed(1)
    trained = WideResNet(DEPTH, 0.5, CLASSES, SIZE)
    with torch.no_grad():  # weights no fresh model has, so that loading them is seen
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    trained.eval()
    torch.save({"model": trained.state_dict(), "epoch": 3}, path / "checkpoint.pt")
    model = load_run(path).model()
    assert not model.training and (model.depth, model.width, model.num_classes) == (DEPTH, 0.5, CLASSES)
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))


def test_model_from_a_missing_damaged_or_foreign_checkpoint_is_an_error_naming_it(tmp_path):
    path = make_run(tmp_path / "r")
    run = load_run(path)
    with pytest.raises(RunError, match="r/checkpoint.pt: no checkpoint"):
        run.model()
    (path / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a zip at all")
    with pytest.raises(RunError, match="r/checkpoint.pt: not a readable checkpoint"):
        run.model()
    torch.save({"model": WideResNet(DEPTH, 1.0, CLASSES, SIZE).state_dict()}, path / "checkpoint.pt")
    with pytest.raises(RunError, match=r"r/checkpoint.pt: does not fit the run's WRN-8-0.5"):
        run.model()
    torch.save([1, 2], path / "checkpoint.pt")
    with pytest.raises(RunError, match="r/checkpoint.pt: not a checkpoint"):
        run.model()
    torch.save({"epoch": 3}, path / "checkpoint.pt")
    with pytest.raises(RunError, match="r/checkpoint.pt: holds no model weights"):
        run.model()


def test_the_format_version_is_written_and_checked_on_read(tmp_path):
    path = make_run(tmp_path / "r")
    assert json.loads((path / "config.json").read_text())["format"] == FORMAT == 1
    assert load_run(path).train_config.depth == DEPTH
    stored = json.loads((path / "config.json").read_text())
    del stored["format"]  # every run made before the format was written: format 1
    (path / "config.json").write_text(json.dumps(stored))
    assert load_run(path).config["depth"] == DEPTH
    for fmt, match in ((FORMAT + 1, f"format {FORMAT + 1}, made by a newer dsimagenet"),
                       ("1", "format is '1', not a format number"), (True, "not a format number"),
                       (0, "format is 0")):
        (path / "config.json").write_text(json.dumps({**stored, "format": fmt}))
        with pytest.raises(RunError, match=f"r/config.json: .*{match}"):
            load_run(path)
        with pytest.raises(RunError, match="r/config.json"):
            load_runs([tmp_path], finished_only=False)


def test_percent_rounds_to_what_n_images_measure_and_gives_k_back():
    from dsimagenet.runs import percent

    assert 100 * (1 - 91 / 100) == 8.999999999999996  # what result.json held for 9 wrong of 100
    assert percent(9, 100) == 9.0 and percent(1, 3) == 33.3  # 1 decimal at least
    assert percent(1, 50_000) == 0.002 and percent(12_345, 50_000) == 24.69  # steps of 0.002: 3 decimals
    assert percent(1, 10_000) == 0.01 and percent(3, 7_000) == 0.04  # steps of 100/7000 = 0.0143: 2 decimals
    for n in (7, 13, 100, 999, 1_000, 1_001, 10_000, 49_999, 50_000, 123_457):  # k comes back from the value
        for k in {0, 1, 2, n // 3, n // 2, n - 1, n}:
            assert round(percent(k, n) * n / 100) == k, (k, n)
            assert len(repr(percent(k, n)).split(".")[1]) <= max(1, len(str(n)) - 2), (k, n)


def test_a_run_repr_is_one_line_and_runs_table_is_flat_rows(tmp_path):
    import csv
    import io

    from dsimagenet import runs_table

    done = {"status": "finished", "top1_error": 41.25, "top5_error": 12.5, "params": 1234, "epochs": 3,
            "train_seconds": 1.5, "val_images": 400}
    make_run(tmp_path / "a", result=done)
    make_run(tmp_path / "b")  # unfinished: no result values
    a, b = load_runs(tmp_path, finished_only=False)
    assert repr(a) == (f"Run({tmp_path / 'a'}: finished, WRN-8-0.5, 16 px box 7 classes, 3 epochs, lr 0.05, "
                       "top-1 error 41.25%)")
    assert repr(b) == f"Run({tmp_path / 'b'}: unfinished, WRN-8-0.5, 16 px box 7 classes, 3 epochs, lr 0.05)"
    (b.path / "result.json").write_text(json.dumps({"status": "lost"}))  # damaged: still a one-line repr
    assert repr(load_run(b.path)) == f"Run({b.path}: damaged, WRN-8-0.5, 16 px box 7 classes, 3 epochs, lr 0.05)"
    assert runs_table([load_run(b.path)])[0]["status"] == "damaged"
    rows = runs_table([a, b])
    assert [r["run"] for r in rows] == [str(a.path), str(b.path)] and [r["status"] for r in rows] == \
        ["finished", "unfinished"]
    assert rows[0].keys() == rows[1].keys()  # one set of columns
    assert rows[0]["lr"] == 0.05 and rows[0]["milestones"] == "2 3" and rows[0]["num_classes"] == CLASSES
    assert rows[0]["top1_error"] == 41.25 and rows[1]["top1_error"] is None and rows[0]["val_images"] == 400
    assert all(not isinstance(v, (list, tuple, dict)) for r in rows for v in r.values())
    f = io.StringIO()
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    assert list(csv.DictReader(io.StringIO(f.getvalue())))[0]["top1_error"] == "41.25"
    assert runs_table([]) == []


def test_counts_agree_with_their_nouns():
    from dsimagenet.runs import plural
    from dsimagenet.sweep import summary

    assert (plural(1, "epoch"), plural(2, "epoch"), plural(0, "run"), plural(1_000, "class", "classes")) == \
        ("1 epoch", "2 epochs", "0 runs", "1,000 classes")
    assert summary({"a": "ran"}) == "1 run: 1 finished (here or before)"
    assert summary({"a": "ran", "b": "failed: x"}) == "2 runs: 1 finished (here or before), 1 failed"


def test_runs_table_gives_a_run_made_before_a_field_the_value_it_ran_with(tmp_path):
    """A config.json from before --recipe, --pad, --decay, --val-split... existed: those columns were None, so
    its row did not equal a new paper run's on the settings it shares (a grouping by pad or recipe split them),
    while its train_config says what it ran with. Both now agree: the paper recipe's values."""
    from dsimagenet import runs_table

    new = make_run(tmp_path / "new")
    old = make_run(tmp_path / "old")
    record = json.loads((old / "config.json").read_text())
    for name in ("recipe", "pad", "pad_fill", "decay", "augment", "normalize", "nesterov", "val_split",
                 "val_fraction", "cuda_graph"):
        del record["config"][name]
    (old / "config.json").write_text(json.dumps(record))
    a, b = load_runs([new, old], finished_only=False)
    rows = runs_table([a, b])
    columns = ("recipe", "pad", "pad_fill", "decay", "augment", "normalize", "nesterov", "val_split")
    assert [rows[1][k] for k in columns] == ["paper", 4, "mean", "paper", "paper", "mean", False, "val"]
    assert [rows[1][k] for k in columns] == [rows[0][k] for k in columns]
    assert [rows[1][k] for k in columns] == [getattr(b.train_config, k) for k in columns]
    assert rows[1]["val_fraction"] is None and rows[1]["cuda_graph"] is False
