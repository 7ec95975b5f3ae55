"""The multi-fidelity objective: HPOBench's shape, finished work reused, lower-epoch runs continued (and equal
to a run trained from scratch), fidelities resolved, the README's random-search example run as written."""

import json
import math

import numpy as np
import pytest
from conftest import learnable_native

import dsimagenet.train
from dsimagenet import benchmark, runs
from dsimagenet.errors import ConfigError
from dsimagenet.train import TrainConfig, train

TINY = {"depth": 6, "batch_size": 16, "log_every": 1000}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return learnable_native(tmp_path_factory.mktemp("b") / "data", classes=4, per_class=12, val_per_class=6)


@pytest.fixture
def trainings(monkeypatch):
    """The calls of train (the objective imports it from dsimagenet.train at each call)."""
    calls = []
    real = dsimagenet.train.train

    def counted(config, *a, **kw):
        calls.append(config.epochs)
        return real(config, *a, **kw)

    monkeypatch.setattr(dsimagenet.train, "train", counted)
    return calls


def test_a_finished_evaluation_is_reused_not_trained_again(data, tmp_path, trainings):
    config = {"lr": 0.05, **TINY}
    r = benchmark.objective(config, {"epochs": 1}, data=str(data), out=tmp_path, device="cpu")
    assert set(r) == {"function_value", "cost", "info"} and r["cost"] > 0 and trainings == [1]
    run = r["info"]["run"]
    last = runs.read_metrics(run)[-1]
    assert r["function_value"] == last["top1_error"] and r["info"]["status"] == "finished"
    assert not r["info"]["reused"] and r["info"]["val_loss"] == last["val_loss"]
    stamp = (tmp_path / run / "metrics.jsonl").stat().st_mtime_ns
    again = benchmark.objective(dict(config), {"epochs": 1}, data=str(data), out=tmp_path, device="cpu")
    assert trainings == [1] and again["info"]["reused"] and again["info"]["run"] == run
    assert again["function_value"] == r["function_value"] and again["cost"] < r["cost"]
    assert (tmp_path / run / "metrics.jsonl").stat().st_mtime_ns == stamp
    other = benchmark.objective({**config, "lr": 0.02}, {"epochs": 1}, data=str(data), out=tmp_path, device="cpu")
    assert other["info"]["run"] != run and trainings == [1, 1]


def test_a_finished_evaluation_is_not_reused_once_its_data_changed_in_place(tmp_path, trainings):
    """The run's key names the data's path: data rebuilt at the same path (other images) must not be answered
    from the old run's metrics, a number of other data; RunError naming the run and the fingerprints."""
    import shutil

    data = learnable_native(tmp_path / "data", classes=4, per_class=12, val_per_class=6)
    config = {"lr": 0.05, **TINY}
    r = benchmark.objective(config, {"epochs": 1}, data=str(data), out=tmp_path / "hpo", device="cpu")
    shutil.rmtree(data)
    learnable_native(data, classes=4, per_class=12, val_per_class=6, seed=7)
    with pytest.raises(runs.RunError, match=r"other data .*the data changed since"):
        benchmark.objective(config, {"epochs": 1}, data=str(data), out=tmp_path / "hpo", device="cpu")
    assert trainings == [1] and runs.read_metrics(tmp_path / "hpo" / r["info"]["run"])[-1]["epoch"] == 1


def test_a_lower_epoch_run_is_continued_and_equals_one_trained_from_scratch(data, tmp_path, trainings):
    config = {"lr": 0.05, "milestones": (1,), **TINY}  # the step schedule: its lr at an epoch ignores --epochs
    one = benchmark.objective(config, {"epochs": 1}, data=str(data), out=tmp_path / "hpo", device="cpu")
    first = (tmp_path / "hpo" / one["info"]["run"] / "metrics.jsonl").read_text()
    seen = []
    two = benchmark.objective(config, {"epochs": 2}, data=str(data), out=tmp_path / "hpo", device="cpu",
                              on_epoch=lambda line: seen.append(line["epoch"]))
    assert two["info"]["run"] == one["info"]["run"] and two["info"]["continued_from"] == 1
    assert trainings == [1, 2] and seen == [1, 2]
    lines = runs.read_metrics(two["info"]["run"])
    assert [m["epoch"] for m in lines] == [1, 2] and lines[1]["lr"] == pytest.approx(0.01)
    assert json.dumps(lines[0]) + "\n" == first  # epoch 1 kept as it was, not trained again
    scratch = train(TrainConfig(data=str(data), out=str(tmp_path / "scratch"), epochs=2, lr=0.05, milestones=(1,),
                                device="cpu", quiet=True, **TINY))
    assert two["function_value"] == scratch["top1_error"]
    assert two["info"]["val_loss"] == runs.read_metrics(tmp_path / "scratch")[-1]["val_loss"]
    again = benchmark.objective(config, {"epochs": 1}, data=str(data), out=tmp_path / "hpo", device="cpu")
    assert trainings == [1, 2] and again["info"]["reused"] and again["function_value"] == lines[0]["top1_error"]


def test_a_cosine_schedule_is_its_own_run_at_each_length(data, tmp_path, trainings):
    config = {"lr": 0.05, "schedule": "cosine", **TINY}
    a = benchmark.objective(config, {"epochs": 1}, data=str(data), out=tmp_path, device="cpu")
    b = benchmark.objective(config, {"epochs": 2}, data=str(data), out=tmp_path, device="cpu")
    assert a["info"]["run"] != b["info"]["run"] and b["info"]["continued_from"] is None and trainings == [1, 2]


def test_a_diverged_run_answers_the_worst_error_and_is_not_trained_again(data, tmp_path, trainings):
    r = benchmark.objective({"lr": 1e6, **TINY}, {"epochs": 2}, data=str(data), out=tmp_path, device="cpu")
    assert r["function_value"] == 100.0 and r["info"]["status"] == "diverged" and "--lr" in r["info"]["message"]
    again = benchmark.objective({"lr": 1e6, **TINY}, {"epochs": 3}, data=str(data), out=tmp_path, device="cpu")
    assert again["function_value"] == 100.0 and again["info"]["status"] == "diverged" and trainings == [2]


def test_fidelities_resolve_into_the_training_configuration(data, tmp_path):
    tc, fid = benchmark.trial_config({"lr": 0.1, "blocks": 2}, {"epochs": 3, "classes": 2, "fraction": 0.25,
                                                               "width": 0.5}, data=str(data), out=str(tmp_path))
    # 12 images in each class: a quarter is 3; blocks 2 at 8 px (one stack) is depth 4 + 2 * 2 * 1
    assert (tc.epochs, tc.classes, tc.max_per_class, tc.width, tc.depth) == (3, 2, 3, 0.5, 8)
    assert fid == {"epochs": 3, "size": None, "width": 0.5, "classes": 2, "fraction": 0.25, "max_per_class": 3}
    tc16, _ = benchmark.trial_config({}, {"size": 16}, data="built/{size}_box", out="o")
    assert tc16.data == "built/16_box" and tc16.epochs == 40
    for config, fidelity, match in (({"epochs": 3}, {}, r"\['epochs'\] are set by the objective's arguments"),
                                    ({"learning_rate": 1}, {}, "not TrainConfig fields"),
                                    ({}, {"budget": 1}, r"\['budget'\] are not fidelities"),
                                    ({"width": 2}, {"width": 1}, r"\['width'\] given as a fidelity and in config"),
                                    ({}, {"fraction": 0}, r"fraction must be a number in \(0, 1\]"),
                                    ({"lr": -1}, {}, "--lr must be")):
        with pytest.raises(ConfigError, match=match):
            benchmark.trial_config(config, fidelity, data=str(data), out="o")
    with pytest.raises(ConfigError, match="holds {size}: give the fidelity size"):
        benchmark.trial_config({}, {}, data="built/{size}_box", out="o")


def test_the_search_space_is_plain_data_and_sample_keeps_to_it():
    space, fidelities = benchmark.search_space(), benchmark.fidelity_space()
    assert json.loads(json.dumps(space)) == space and json.loads(json.dumps(fidelities)) == fidelities
    assert space["lr"]["log"] and space["lr"]["default"] == 0.01 and space["blocks"]["default"] == 4
    rng = np.random.default_rng(0)
    draws = [benchmark.sample(space, rng) for _ in range(300)]
    for name, s in space.items():
        values = [d[name] for d in draws]
        if s["type"] == "categorical":
            assert set(values) == set(s["choices"])
        else:
            assert s["low"] <= min(values) and max(values) <= s["high"]
    logs = np.log10([d["lr"] for d in draws])  # log-uniform: as many draws in each decade
    assert abs(np.mean(logs < -2) - 1 / math.log10(500)) < 0.1
    assert {d["blocks"] for d in draws} == set(range(1, 7))


RANDOM_SEARCH = '''
import numpy as np
from dsimagenet import benchmark

space = benchmark.search_space()
searched = {k: space[k] for k in ("lr", "weight_decay", "width")}
rng = np.random.default_rng(0)
results = []
for i in range(20):
    config = benchmark.sample(searched, rng)
    r = benchmark.objective(config, {"epochs": 10, "size": 16}, data="out/{size}_box", out="hpo/random")
    results.append((r["function_value"], config))
    print(f"{i}: top-1 error {r['function_value']:.2f}% in {r['cost']:.0f} s  {config}")
print("best:", min(results, key=lambda x: x[0]))
'''


def test_the_readme_random_search_example_runs(data, tmp_path, capsys):
    """The README's example as written, but for 2 samples of 1 epoch on the tiny data."""
    code = RANDOM_SEARCH
    for old, new in (("range(20)", "range(2)"), ('{"epochs": 10, "size": 16}', '{"epochs": 1}'),
                     ('"out/{size}_box"', repr(str(data))), ('"hpo/random"', repr(str(tmp_path / "hpo")))):
        assert code.count(old) == 1
        code = code.replace(old, new)
    exec(compile(code, "README random search", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("0: top-1 error ") and out[2].startswith("best: (")
    assert len(list((tmp_path / "hpo").iterdir())) == 2


OPTUNA = '''
import optuna
from dsimagenet import benchmark

def trial_objective(trial):
    config = {"lr": trial.suggest_float("lr", 1e-3, 0.5, log=True),
              "weight_decay": trial.suggest_float("weight_decay", 1e-5, 1e-3, log=True),
              "width": trial.suggest_categorical("width", [1.0, 2.0])}

    def report(line):  # each epoch's top-1 error: Hyperband stops the unpromising trials early
        trial.report(line["top1_error"], line["epoch"])
        if line["epoch"] < 40 and trial.should_prune():
            raise optuna.TrialPruned()

    r = benchmark.objective(config, {"epochs": 40, "size": 16}, data="out/{size}_box", out="hpo/optuna",
                            on_epoch=report)
    return r["function_value"]

study = optuna.create_study(direction="minimize",
                            pruner=optuna.pruners.HyperbandPruner(min_resource=1, max_resource=40))
study.optimize(trial_objective, n_trials=50)
print(study.best_params, study.best_value)
'''


def test_the_readme_optuna_example_runs(data, tmp_path, capsys):
    code = OPTUNA
    for old, new in (("n_trials=50", "n_trials=2"), ('{"epochs": 40, "size": 16}', '{"epochs": 2}'),
                     ('line["epoch"] < 40', 'line["epoch"] < 2'), ("max_resource=40", "max_resource=2"),
                     ('"out/{size}_box"', repr(str(data))), ('"hpo/optuna"', repr(str(tmp_path / "hpo")))):
        assert code.count(old) == 1
        code = code.replace(old, new)
    exec(compile(code, "README Optuna", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("{'lr': ")
