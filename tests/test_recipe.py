"""The named recipes (``--recipe paper | nasbench201``): what they resolve to, flags over them, the cosine that
NAS-Bench-201 steps once an epoch against torch's scheduler, weight decay on which parameters, config.json, and
runs made before the recipe's fields existed."""

import dataclasses
import json
import math

import pytest
import torch

from dsimagenet.model import WideResNet
from dsimagenet.train import TrainConfig, learning_rate, make_optimizer, train

# NAS-Bench-201's ImageNet-16.config and its ImageNet16 transforms, written out (not read from recipe.RECIPES)
NASBENCH201 = {"epochs": 200, "lr": 0.1, "schedule": "cosine-epoch", "batch_size": 256, "momentum": 0.9,
               "nesterov": True, "weight_decay": 5e-4, "decay": "all", "augment": "flip", "pad": 2,
               "pad_fill": "black", "normalize": "nasbench201", "label_smoothing": 0.0}
PAPER = {"epochs": 40, "lr": 0.01, "schedule": "step", "milestones": (10, 20, 30), "gamma": 0.2, "batch_size": 128,
         "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4, "decay": "paper", "augment": "paper", "pad": 4,
         "pad_fill": "mean", "normalize": "mean", "label_smoothing": 0.0}


def values(c, keys):
    return {k: getattr(c, k) for k in keys}


def test_each_recipe_resolves_to_its_values_and_paper_is_the_default():
    assert values(TrainConfig(data="d", out="o"), PAPER) == PAPER
    assert TrainConfig(data="d", out="o").recipe == "paper"
    nb = TrainConfig(recipe="nasbench201", data="d", out="o")
    assert values(nb, NASBENCH201) == NASBENCH201 and nb.recipe == "nasbench201"


def test_values_given_beside_the_recipe_override_it_in_python_and_on_the_command_line(tmp_path):
    from dsimagenet.cli import build_parser, config_from_args

    c = TrainConfig(recipe="nasbench201", data="d", out="o", epochs=12, nesterov=False, pad=4, lr=0.05)
    assert (c.epochs, c.nesterov, c.pad, c.lr) == (12, False, 4, 0.05)
    assert values(c, ["batch_size", "schedule", "decay", "pad_fill", "normalize"]) == {
        "batch_size": 256, "schedule": "cosine-epoch", "decay": "all", "pad_fill": "black", "normalize": "nasbench201"}
    args = build_parser().parse_args(["train", "--recipe", "nasbench201", "--data", "d", "--out", "o",
                                      "--epochs", "12", "--no-nesterov", "--batch-size", "64", "--decay", "paper"])
    c = config_from_args(TrainConfig, args)
    assert (c.recipe, c.epochs, c.nesterov, c.batch_size, c.decay, c.lr, c.pad) == (
        "nasbench201", 12, False, 64, "paper", 0.1, 2)
    paper = config_from_args(TrainConfig, build_parser().parse_args(["train", "--data", "d", "--out", "o"]))
    assert values(paper, PAPER) == PAPER  # the flags' defaults leave today's recipe as it was


def test_a_value_given_against_the_recipe_is_checked_as_any_other():
    from dsimagenet.errors import ConfigError

    with pytest.raises(ConfigError, match="--pad-fill black needs a per-channel --normalize"):
        TrainConfig(recipe="nasbench201", data="d", out="o", normalize="mean")
    with pytest.raises(ConfigError, match="--nesterov needs a --momentum above 0"):
        TrainConfig(recipe="nasbench201", data="d", out="o", momentum=0.0)
    with pytest.raises(ConfigError, match=r"--recipe must be one of paper, nasbench201, not 'nb201'"):
        TrainConfig(recipe="nb201", data="d", out="o")


def test_cosine_epoch_is_torchs_cosine_annealing_stepped_once_an_epoch():
    """NAS-Bench-201's scheduler sets lr = eta_min + (lr0 - eta_min) * (1 + cos(pi * epoch / T_max)) / 2 at each
    epoch and ignores the iteration: torch's CosineAnnealingLR(T_max=200) stepped per epoch. Our "cosine" is the
    same curve stepped per iteration: CosineAnnealingLR(T_max=epochs * steps) stepped per step."""
    steps = 7
    nb = TrainConfig(recipe="nasbench201", data="d", out="o")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=200, eta_min=0.0)
    for epoch in range(200):
        want = opt.param_groups[0]["lr"]
        for step in (0, 3, steps - 1):
            assert learning_rate(nb, epoch, step, steps) == pytest.approx(want, rel=1e-9, abs=1e-15)
        opt.step()
        sched.step()
    assert learning_rate(nb, 199, steps - 1, steps) == pytest.approx(0.05 * (1 + math.cos(math.pi * 199 / 200)))
    per_step = dataclasses.replace(nb, schedule="cosine", epochs=3)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3 * steps, eta_min=0.0)
    for epoch in range(3):
        for step in range(steps):
            assert learning_rate(per_step, epoch, step, steps) == pytest.approx(opt.param_groups[0]["lr"],
                                                                               rel=1e-9, abs=1e-15)
            opt.step()
            sched.step()


@pytest.mark.parametrize("recipe", ["paper", "nasbench201"])
def test_weight_decay_reaches_every_parameter_under_nasbench201_and_only_conv_linear_weights_under_paper(recipe):
    torch.manual_seed(0)
    m = WideResNet(6, 1, 10, 8)
    for p in m.parameters():  # nonzero everywhere, so that decay would show wherever it applies
        p.data.uniform_(0.5, 1.0)
    kinds = {}  # each parameter's kind, from the modules here, apart from model.decayed_parameters
    for mod_name, mod in m.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            weight = isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and p_name == "weight"
            kinds[f"{mod_name}.{p_name}" if mod_name else p_name] = "weight" if weight else "other"
    assert "other" in kinds.values() and len(kinds) == len(list(m.parameters()))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    c = TrainConfig(recipe=recipe, data="d", out="o", lr=0.1, momentum=0.0, nesterov=False)
    opt = make_optimizer(m, c)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # with a zero gradient, one step of plain SGD moves each parameter by -lr * (its decay) * p
    for name, p in m.named_parameters():
        if recipe == "nasbench201":  # SGD(weight_decay=5e-4) on everything: BN and biases too
            expect = before[name] * (1 - 0.1 * 5e-4)
        else:  # the penalty 5e-4 * sum(w^2) on conv and linear weights: gradient 1e-3 * w; nothing elsewhere
            expect = before[name] * (1 - 0.1 * 1e-3) if kinds[name] == "weight" else before[name]
        torch.testing.assert_close(p.detach(), expect, rtol=0, atol=1e-7)


def test_a_nasbench201_run_records_its_recipe_and_resolved_values(learnable, tmp_path):
    from dsimagenet.cli import main
    from dsimagenet.runs import load_run

    out = tmp_path / "run"
    assert main(["train", "--recipe", "nasbench201", "--data", str(learnable), "--out", str(out), "--epochs", "2",
                 "--depth", "6", "--batch-size", "16", "--device", "cpu", "--quiet"]) == 0
    stored = json.loads((out / "config.json").read_text())["config"]
    want = {**NASBENCH201, "epochs": 2, "batch_size": 16, "recipe": "nasbench201"}
    assert {k: stored[k] for k in want} == want
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["lr"] for x in lines] == pytest.approx([0.1, 0.05 * (1 + math.cos(math.pi / 2))])
    run = load_run(out)
    assert run.train_config == TrainConfig(**{**stored, "milestones": tuple(stored["milestones"])})
    assert values(run.train_config, want) == want


def test_a_run_made_before_the_recipe_fields_reads_and_resumes_as_the_paper_recipe(learnable, tmp_path):
    """config.json and the checkpoint of a run from before recipe, decay, pad and pad_fill: read as the paper's,
    resumed (not refused as another configuration), and it ends where a run trained straight through ends."""
    from dsimagenet.runs import load_run

    new = ("recipe", "decay", "pad", "pad_fill")
    fast = dict(data=str(learnable), epochs=2, depth=6, batch_size=16, lr=0.05, device="cpu", quiet=True)
    train(TrainConfig(**fast, out=str(tmp_path / "straight")))
    c = TrainConfig(**fast, out=str(tmp_path / "old"))

    def stop(line):
        raise KeyboardInterrupt  # after epoch 1 and its checkpoint

    with pytest.raises(KeyboardInterrupt):
        train(c, on_epoch=stop)
    old = tmp_path / "old"
    record = json.loads((old / "config.json").read_text())
    record["config"] = {k: v for k, v in record["config"].items() if k not in new}
    (old / "config.json").write_text(json.dumps(record))
    state = torch.load(old / "checkpoint.pt", weights_only=True)
    state["config"] = json.dumps({k: v for k, v in json.loads(state["config"]).items() if k not in new})
    torch.save(state, old / "checkpoint.pt")

    assert values(load_run(old).train_config, new) == {"recipe": "paper", "decay": "paper", "pad": 4,
                                                        "pad_fill": "mean"}
    assert train(c, resume=True)["status"] == "finished"
    a, b = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=True)["model"] for r in ("straight", "old"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_pad_wider_than_the_image_is_one_line_and_creates_nothing(learnable, tmp_path, capsys):
    from dsimagenet.cli import main

    out = tmp_path / "run"
    assert main(["train", "--recipe", "nasbench201", "--data", str(learnable), "--out", str(out), "--pad", "9",
                 "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "dsimagenet train: error: pad (--pad) must be an integer in 0..8 (the image size), not 9"
    assert not out.exists()


def test_a_switch_the_recipe_sets_shows_its_default_as_on_or_off():
    """--nesterov's help once read "(paper False, nasbench201 True)": Python's words, where every other switch
    shows on/off."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "dsimagenet", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    flat = " ".join(out.split())
    assert "--no-nesterov Nesterov momentum; default: the --recipe's (paper off, nasbench201 on)" in flat, flat[-300:]
    assert "True" not in out and "False" not in out
