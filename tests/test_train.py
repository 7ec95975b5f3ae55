"""The trainer: schedule, weight decay, top-k, learning, exact resume after SIGKILL, refusals, DDP (gloo)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dsimagenet.model import WideResNet
from dsimagenet.runs import RunError, load_runs
from dsimagenet.train import TrainConfig, learning_rate, make_optimizer, topk_correct, train

FAST = dict(depth=6, width=1, batch_size=32, lr=0.05, log_every=1000, quiet=True, device="cpu")


def test_paper_step_schedule():
    c = TrainConfig(data="x", out="y")
    got = [learning_rate(c, e, 0, 100) for e in (0, 9, 10, 19, 20, 29, 30, 39)]
    want = [0.01, 0.01, 0.002, 0.002, 0.0004, 0.0004, 0.00008, 0.00008]
    assert got == pytest.approx(want, rel=1e-12)
    assert learning_rate(c, 10, 99, 100) == learning_rate(c, 10, 0, 100)  # constant within an epoch


def test_cosine_and_sgdr():
    c = TrainConfig(data="x", out="y", schedule="cosine", epochs=40, lr=0.1)
    assert learning_rate(c, 0, 0, 10) == pytest.approx(0.1)
    assert learning_rate(c, 20, 0, 10) == pytest.approx(0.05)
    assert learning_rate(c, 39, 5, 10) == pytest.approx(0.05 * (1 + math.cos(math.pi * 39.5 / 40)))
    s = TrainConfig(data="x", out="y", schedule="sgdr", lr=0.1, sgdr_t0=10, sgdr_mult=2)
    assert learning_rate(s, 10, 0, 10) == pytest.approx(0.1)  # restart after 10 epochs
    assert learning_rate(s, 20, 0, 10) == pytest.approx(0.05)  # half-way through the 20-epoch period
    assert learning_rate(s, 30, 0, 10) == pytest.approx(0.1)  # restart after 10 + 20


def test_weight_decay_on_exactly_conv_and_linear_weights():
    torch.manual_seed(0)
    m = WideResNet(6, 1, 10, 8)
    for p in m.parameters():  # make every parameter nonzero so that decay would show everywhere
        p.data.uniform_(0.5, 1.0)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = make_optimizer(m, TrainConfig(data="x", out="y", lr=0.1, momentum=0.0))
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in m.named_parameters():
        decayed = name.endswith("weight") and p.dim() in (2, 4)
        # the paper's 5e-4 * sum(w^2) has gradient 1e-3 * w: one step moves w by -lr * 1e-3 * w
        expect = before[name] * (1 - 0.1 * 1e-3) if decayed else before[name]
        torch.testing.assert_close(p.detach(), expect, rtol=0, atol=1e-7)


def test_topk_against_hand_computation():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.2, 0.3, 0.4, 0.5],   # top-1 = 1, top-5 = {1,6,5,4,3}
                           [0.9, 0.1, 0.8, 0.7, 0.6, 0.5, 0.0],   # top-1 = 0, top-5 = {0,2,3,4,5}
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])  # top-1 = 6, top-5 = {6,5,4,3,2}
    y = torch.tensor([1, 6, 3])
    c1, c5 = topk_correct(logits, y, 5)
    assert c1.tolist() == [True, False, False] and c5.tolist() == [True, False, True]


def test_tiny_model_learns(learnable, tmp_path):
    result = train(TrainConfig(data=str(learnable), out=str(tmp_path / "run"), epochs=12, **FAST))
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 12 and metrics[-1]["train_error"] < 5
    assert result["top1_error"] < 10  # 4 classes: chance is 75% error
    # a 4-way head: the data's table is ImageNet's 1000 classes, its labels cover 4 (see tests/test_splits.py)
    assert result["params"] == sum(p.numel() for p in WideResNet(6, 1, 4, 8).parameters())
    for key in ("top5_error", "epochs", "train_seconds", "train_images_per_s"):
        assert key in result
    assert "top1_error_ep31" not in result  # the run did not reach epoch 31
    per_class = (tmp_path / "run" / "per_class.csv").read_text().splitlines()
    assert per_class[0].startswith("index,wnid") and len(per_class) == 5
    assert per_class[1].split(",")[3] == "8"  # kit fox: 8 val images
    run = load_runs([tmp_path])[0]
    assert run.config["config"]["epochs"] == 12 and run.result["top1_error"] == result["top1_error"]


def test_report_epoch(learnable, tmp_path):
    result = train(TrainConfig(data=str(learnable), out=str(tmp_path / "run"), epochs=3, report_epoch=2, **FAST))
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result["top1_error_ep2"] == metrics[1]["top1_error"]
    # errors are k wrong of the 32 val images, to the decimals 32 images justify (1): k from per_class.csv
    rows = [r.split(",") for r in (tmp_path / "run" / "per_class.csv").read_text().splitlines()[1:]]
    wrong = sum(int(r[3]) - round(float(r[4]) * int(r[3]) / 100) for r in rows if int(r[3]))
    assert result["val_images"] == 32 and result["top1_error"] == round(100 * wrong / 32, 1)
    for m in (*metrics, result):
        for key in ("top1_error", "top5_error", "train_error"):
            if key in m:
                assert m[key] == round(m[key], 1), (key, m[key])  # 128 train samples (each mirrored): 1 too


def _cli(learnable, out, *extra):
    args = ["--data", str(learnable), "--out", str(out), "--epochs", "3", "--depth", "6", "--batch-size", "16",
            "--lr", "0.05", "--device", "cpu", "--quiet", *extra]
    return [sys.executable, "-m", "dsimagenet", "train", *args]


def _weights(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def test_sigkill_and_resume_is_bitwise_exact(learnable, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    drop = ("--dropout", "0.1")  # dropout draws random numbers: the RNG state must be restored too
    subprocess.run(_cli(learnable, tmp_path / "whole", *drop), check=True, env=env)
    killed = tmp_path / "killed"
    p = subprocess.Popen(_cli(learnable, killed, *drop, "--checkpoint-every-steps", "3"), env=env)
    deadline = time.time() + 60
    while not (killed / "checkpoint.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    state = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"]) != (3, 0), "the run finished before it could be killed"
    subprocess.run(_cli(learnable, killed, *drop, "--checkpoint-every-steps", "3", "--resume"), check=True, env=env)
    a, b = _weights(tmp_path / "whole"), _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda m: {k: v for k, v in m.items() if "seconds" not in k and "per_s" not in k}  # noqa: E731
    lines = lambda r: [strip(json.loads(x)) for x in (r / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert lines(tmp_path / "whole") == lines(killed)


def test_resume_refuses_other_config_or_data(learnable, tmp_path):
    from conftest import learnable_native

    c = TrainConfig(data=str(learnable), out=str(tmp_path / "run"), epochs=1, **FAST)
    train(c)
    with pytest.raises(RunError, match="already a run directory: pass --resume"):
        train(c)
    with pytest.raises(ValueError, match="lr was 0.05, now 0.1"):
        train(TrainConfig(**{**c.__dict__, "lr": 0.1}), resume=True)
    other = learnable_native(tmp_path / "other", seed=5)
    with pytest.raises(ValueError, match="different data"):
        train(TrainConfig(**{**c.__dict__, "data": str(other)}), resume=True)
    assert train(c, resume=True)["top1_error"] == json.loads((tmp_path / "run" / "result.json").read_text())[
        "top1_error"]


def test_ddp_two_gloo_processes_match_one_process(learnable, tmp_path):
    # 4 classes x 16 = 64 images -> 128 samples an epoch = 4 global batches of 32: no partial batch
    common = ["--epochs", "2", "--batch-size", "32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = _cli(learnable, tmp_path / "one", *common)
    subprocess.run(one, check=True, env=env)
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",  # a free port
           "-m", "dsimagenet", *_cli(learnable, tmp_path / "two", *common)[3:]]
    subprocess.run(two, check=True, env=env)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in a:
        if a[k].dtype.is_floating_point:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(a[k], b[k]), k
    ra = json.loads((tmp_path / "one" / "result.json").read_text())
    rb = json.loads((tmp_path / "two" / "result.json").read_text())
    assert rb["world_size"] == 2 and abs(ra["top1_error"] - rb["top1_error"]) < 1e-6
    assert np.isclose(ra["top5_error"], rb["top5_error"])


def test_resume_at_an_epoch_boundary_keeps_every_epoch_once(learnable, tmp_path):
    c = TrainConfig(data=str(learnable), out=str(tmp_path / "run"), epochs=3, **FAST)
    whole = TrainConfig(**{**c.__dict__, "out": str(tmp_path / "whole")})
    train(whole)
    # as if killed right after the checkpoint that ends epoch 2: run 2 epochs, then resume the 3-epoch run
    train(TrainConfig(**{**c.__dict__, "epochs": 2}))
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    cfg["config"]["epochs"] = 3
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "run" / "result.json").unlink()
    train(c, resume=True)
    strip = lambda m: {k: v for k, v in m.items() if "seconds" not in k and "per_s" not in k}  # noqa: E731
    lines = lambda r: [strip(json.loads(x)) for x in (r / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [m["epoch"] for m in lines(tmp_path / "run")] == [1, 2, 3]
    assert lines(tmp_path / "run") == lines(tmp_path / "whole")


def test_extend_run_makes_a_finished_run_the_first_epochs_of_a_longer_one(learnable, tmp_path):
    """A finished 2-epoch run of a step schedule, extended to 3 epochs and resumed, is the 3-epoch run: the same
    weights bit for bit and the same metrics (its checkpoint, stored with 2 epochs, is taken as it is)."""
    from dsimagenet.train import extend_run

    kw = dict(data=str(learnable), milestones=(1, 2), **FAST)
    whole = train(TrainConfig(out=str(tmp_path / "whole"), epochs=3, **kw))
    short = TrainConfig(out=str(tmp_path / "run"), epochs=2, **kw)
    train(short)
    longer = TrainConfig(**{**short.__dict__, "epochs": 3})
    assert extend_run(tmp_path / "run", longer) == 2
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["config"]["epochs"] == 3 and stored["continued"] == [{"from_epochs": 2, "to_epochs": 3}]
    assert not (tmp_path / "run" / "result.json").exists()
    assert train(longer, resume=True)["top1_error"] == whole["top1_error"]
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda m: {k: v for k, v in m.items() if "seconds" not in k and "per_s" not in k}  # noqa: E731
    lines = lambda r: [strip(json.loads(x)) for x in (r / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert lines(tmp_path / "run") == lines(tmp_path / "whole")


def test_extend_run_refuses_what_would_not_be_the_same_run_and_changes_nothing(learnable, tmp_path):
    from dsimagenet.errors import ConfigError, Diverged
    from dsimagenet.train import LENGTH_FREE_SCHEDULES, extend_run

    assert LENGTH_FREE_SCHEDULES == ("step", "sgdr")
    c = TrainConfig(data=str(learnable), out=str(tmp_path / "run"), epochs=2, **FAST)
    train(c)
    files = {f: f.read_bytes() for f in (tmp_path / "run").iterdir()}
    more = {**c.__dict__, "epochs": 3}
    refused = [(ConfigError, "--schedule cosine: its learning rate depends on --epochs",
                TrainConfig(**{**more, "schedule": "cosine"})),
               (RunError, "lr was 0.05, now 0.1", TrainConfig(**{**more, "lr": 0.1})),
               (ConfigError, "never shortened", TrainConfig(**{**c.__dict__, "epochs": 1}))]
    for error, message, config in refused:
        with pytest.raises(error, match=message):
            extend_run(tmp_path / "run", config)
        assert {f: f.read_bytes() for f in (tmp_path / "run").iterdir()} == files
    json.dump({"status": "diverged", "message": "x"}, (tmp_path / "run" / "result.json").open("w"))
    with pytest.raises(Diverged, match="diverged in its first 2 epochs"):
        extend_run(tmp_path / "run", TrainConfig(**more))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["epochs"] == 2


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_step_matches_eager(learnable, tmp_path):
    """--compile puts the loss and the running sums into the network's graph and compiles the optimizer step:
    the same metrics as eager."""
    kw = dict(data=str(learnable), epochs=2, depth=6, batch_size=32, lr=0.05, device="cpu", quiet=True)
    eager = train(TrainConfig(out=str(tmp_path / "eager"), **kw))
    compiled = train(TrainConfig(out=str(tmp_path / "compiled"), compile=True, **kw))
    a, b = ([json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
            for r in ("eager", "compiled"))
    for m, n in zip(a, b, strict=True):
        for key in ("train_loss", "train_error", "val_loss", "top1_error"):
            assert m[key] == pytest.approx(n[key], rel=1e-3, abs=1e-3), key
    assert compiled["top1_error"] == pytest.approx(eager["top1_error"], abs=1e-6)

    # an eager run stopped after its first epoch, resumed compiled: the learning rate changes kind (float ->
    # tensor) with the checkpoint, and the run ends where the eager one did
    def stop(line):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "mixed"), **kw), on_epoch=stop)
    mixed = train(TrainConfig(out=str(tmp_path / "mixed"), compile=True, **kw), resume=True)
    assert mixed["top1_error"] == pytest.approx(eager["top1_error"], abs=1e-6)
    last = json.loads((tmp_path / "mixed" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["epoch"] == 2 and last["train_loss"] == pytest.approx(a[-1]["train_loss"], rel=1e-3)


# --- every value checked before anything is written -------------------------------------------------------

# one value out of range for every field of TrainConfig, and the words of the allowed range the error must give
BAD = {
    "data": ("", "a path"), "out": ("", "a path"), "size": (0, ">= 1"), "depth": (4, ">= 6"),
    "width": (0.0, "[0.0625, 65536]"), "dropout": (1.0, "[0, 1)"), "epochs": (0, ">= 1"),
    "lr": (float("nan"), "(0, 1e+38]"), "schedule": ("linear", "step, cosine, sgdr"),
    "milestones": ((10, 0), "increasing epochs, each in 1..2147483647"), "gamma": (0, "(0, 1e+38]"),
    "sgdr_t0": (0, ">= 1"), "sgdr_mult": (0, ">= 1"), "batch_size": (0, ">= 1"),
    "momentum": (-0.1, "[0, 1)"), "nesterov": ("yes", "true or false"), "weight_decay": (-1e-4, "[0, 1e+38]"),
    "label_smoothing": (5, "[0, 1]"), "augment": ("mixup", "paper, flip, none"),
    "normalize": ("std", "mean, meanstd"), "classes": (1001, "1..1000"), "max_per_class": (0, ">= 1"),
    "order": ("random", "devkit, sorted"), "seed": (-1, "0..9223372036854775807"),
    "val_split": ("test", "val, validation, x-valid, x-test, search-valid"), "val_fraction": (1.0, "(0, 1)"),
    "device": ("tpu", "auto, cpu, cuda"), "bf16": (1, "true or false"), "channels_last": (None, "true or false"),
    "compile": ("no", "true or false"), "compile_mode": ("fast", "default, reduce-overhead"),
    "cuda_graph": (1, "true or false"), "log_every": (0, ">= 1"), "checkpoint_minutes": (float("inf"), "[0, 1e+09]"),
    "checkpoint_every_steps": (0, ">= 1"), "eval_batch_size": (0, ">= 1"),
    "report_epoch": (0, ">= 1"), "quiet": ("false", "true or false"),
    "recipe": ("nasbench", "paper, nasbench201"), "decay": ("l2", "paper, all"), "pad": (-1, "0..1024"),
    "pad_fill": ("white", "mean, black"),
}


def test_every_field_has_a_rule_and_a_bad_value():
    import dataclasses

    from dsimagenet.recipe import RULES

    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(RULES) == sorted(names) == sorted(BAD)


@pytest.mark.parametrize("field", sorted(BAD))
def test_a_bad_value_of_any_field_is_refused_naming_its_flag(field, tmp_path):
    from dsimagenet.errors import ConfigError

    value, allowed = BAD[field]
    out = tmp_path / "run"
    kw = {**FAST, "data": str(tmp_path / "data"), "out": str(out), field: value}
    with pytest.raises(ConfigError) as e:
        train(TrainConfig(**kw))
    flag = "--" + field.replace("_", "-")
    assert str(e.value).startswith(f"{flag} must be ") and allowed in str(e.value) and repr(value) in str(e.value)
    assert not out.exists()


def test_fields_in_range_pass_and_cross_field_rules():
    from dsimagenet.errors import ConfigError

    ok = TrainConfig(data="x", out="y", size=8, depth=6, width=0.0625, dropout=0.0, lr=1e6, milestones=[],
                     label_smoothing=1.0, seed=2**63 - 1, checkpoint_minutes=0, classes=1000, momentum=0.0)
    assert ok.milestones == ()
    with pytest.raises(ConfigError, match="--depth must be 4 \\+ 2 \\* n \\* stacks"):
        TrainConfig(data="x", out="y", depth=7)
    with pytest.raises(ConfigError, match="--nesterov needs a --momentum above 0"):
        TrainConfig(data="x", out="y", nesterov=True, momentum=0.0)
    from pathlib import Path

    assert TrainConfig(data=Path("a/b"), out=Path("c")).data == "a/b"  # paths become the strings config.json keeps


@pytest.mark.parametrize("t0, mult", [(0, 2), (10, 0), (1, -1)])
def test_the_sgdr_learning_rate_cannot_loop_forever(t0, mult):
    """A config that slipped past the checks (built around __post_init__) still ends in an error, not a hang."""
    from dsimagenet.errors import ConfigError

    c = TrainConfig(data="x", out="y", schedule="sgdr")
    object.__setattr__(c, "sgdr_t0", t0)
    object.__setattr__(c, "sgdr_mult", mult)
    with pytest.raises(ConfigError, match="--sgdr-t0 and --sgdr-mult must be integers >= 1"):
        learning_rate(c, 25, 0, 10)


@pytest.mark.parametrize("flags, message", [
    (["--schedule", "sgdr", "--sgdr-t0", "0"], "--sgdr-t0 must be an integer >= 1, not 0"),
    (["--schedule", "sgdr", "--sgdr-mult", "0"], "--sgdr-mult must be an integer >= 1, not 0"),
    (["--log-every", "0"], "--log-every must be an integer >= 1, not 0"),
    (["--label-smoothing", "5"], "--label-smoothing must be a number in [0, 1], not 5.0"),
    (["--seed", "-1"], "--seed must be an integer in 0..9223372036854775807, not -1"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be an integer >= 1, not 0"),
    (["--batch-size", str(10**30)], f"--batch-size must be an integer >= 1 and at most 2147483647, not {10**30}"),
    (["--lr", "1e308"], "--lr must be a number in (0, 1e+38], not 1e+308"),
    (["--milestones", "5", "3"], "--milestones must be increasing epochs, each in 1..2147483647, not (5, 3)"),
    (["--width", "60000"], "--depth 6 --width 60000: WRN-6-60000 has "),
    (["--size", "16"], "--size 16: the data "),
])
def test_bad_values_on_the_command_line_are_one_line_and_create_nothing(learnable, tmp_path, capsys, flags,
                                                                         message):
    from dsimagenet.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--data", str(learnable), "--out", str(out), "--depth", "6", "--device", "cpu", "--quiet",
               *flags])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith(f"dsimagenet train: error: {message}") and err.count("\n") == 1
    assert not out.exists()


def test_values_beyond_what_numpy_and_the_optimizer_hold_are_refused():
    """Before, each of these made a TrainConfig, created the run directory and ended in a traceback (int64
    overflow in the loader, a float32 overflow in SGD, gamma ** k overflowing a float) or trained on a typo."""
    from dsimagenet.errors import ConfigError

    for field, value in [("batch_size", 10**30), ("eval_batch_size", 2**31), ("epochs", 10**30), ("lr", 1e308),
                         ("weight_decay", 1e39), ("gamma", 1e308), ("log_every", 10**23), ("width", 1e308),
                         ("milestones", (5, 3)), ("milestones", (3, 3)), ("checkpoint_minutes", 1e308)]:
        with pytest.raises(ConfigError, match=f"^--{field.replace('_', '-')} must be "):
            TrainConfig(data="x", out="y", **{field: value})
    with pytest.raises(ConfigError, match=r"--lr 1 times --gamma 1e\+30 after each of the 2 --milestones exceeds"):
        TrainConfig(data="x", out="y", lr=1, gamma=1e30, milestones=(1, 2))
    # the largest values are still taken, and the schedule stays within them
    c = TrainConfig(data="x", out="y", lr=1e38, gamma=1.0, batch_size=2**31 - 1, epochs=2**31 - 1,
                    milestones=(5, 2**31 - 1), weight_decay=1e38)
    assert learning_rate(c, 2**31 - 2, 0, 10) == 1e38


@pytest.mark.parametrize("depth, width", [(6, 60000.0), (10**9, 1.0)])
def test_a_model_beyond_the_machine_is_refused_before_it_is_built(learnable, tmp_path, depth, width):
    """Before: width 60000 failed deep in torch's allocator (RuntimeError) after the run directory was made;
    depth 10**9 spent hours building blocks."""
    from dsimagenet.errors import ConfigError

    out = tmp_path / "run"
    c = TrainConfig(data=str(learnable), out=str(out), **{**FAST, "depth": depth, "width": width})
    with pytest.raises(ConfigError, match=rf"^--depth {depth} --width {width:g}: WRN-{depth}-{width:g} has "
                                          r"[\d,]+ parameters; .* needs at least [\d,.]+ GiB, more than"):
        train(c)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch without a usable GPU")
def test_device_cuda_without_a_gpu_is_refused_before_anything_is_written(learnable, tmp_path):
    from dsimagenet.errors import ConfigError

    c = TrainConfig(data=str(learnable), out=str(tmp_path / "run"), epochs=1, **{**FAST, "device": "cuda"})
    with pytest.raises(ConfigError, match=r"--device cuda: no CUDA GPU is available to torch .*: use --device cpu"):
        train(c)
    assert not (tmp_path / "run").exists()


def test_data_too_small_for_the_processes_is_refused_before_anything_is_written(tmp_path):
    """torchrun with 2 processes on 8 images (16 samples with their mirrors) and a batch of 32: no whole global
    batch, which several processes need (they drop the last partial one)."""
    from conftest import learnable_native

    from dsimagenet.errors import ConfigError
    from dsimagenet.train import check_environment

    data = learnable_native(tmp_path / "small", per_class=2)
    c = TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=1, **FAST)
    device, tr, va = check_environment(c, world=1)  # one process trains on the partial batch
    assert device == "cpu" and len(tr) == 8 and len(va) == 32
    with pytest.raises(ConfigError, match=r"--batch-size 32: .* gives 16 samples an epoch \(8 images, each also "
                                          r"mirrored\), less than one batch, and 2 processes .* at most 16"):
        check_environment(c, world=2)
    with pytest.raises(ConfigError, match="--batch-size 32 must be a multiple of the 3 processes"):
        check_environment(c, world=3)
    assert not (tmp_path / "run").exists()


def test_classes_beyond_the_data_and_classes_without_images(tmp_path):
    from dsimagenet.errors import ConfigError
    from dsimagenet.formats.native import NativeWriter
    from dsimagenet.labels import IMAGENET
    from dsimagenet.train import check_environment

    rng = np.random.default_rng(0)
    with NativeWriter(tmp_path / "four", 8, list(IMAGENET.wnids[:4]), method="synthetic") as w:
        for split, labels in (("train", [1, 2]), ("val", [3, 4])):
            w.split(split).append(rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8), np.repeat(labels, 4))
    c = TrainConfig(data=str(tmp_path / "four"), out=str(tmp_path / "run"), classes=5, epochs=1, **FAST)
    with pytest.raises(ConfigError, match="--classes 5: .*four has 4 classes"):
        train(c)
    c = TrainConfig(**{**c.__dict__, "classes": 4, "max_per_class": 1})  # classes without training images: fine
    assert train(c)["status"] == "finished"
    with pytest.raises(ConfigError, match="--data .*: no val images of the first 2 classes"):
        check_environment(TrainConfig(**{**c.__dict__, "classes": 2, "out": str(tmp_path / "r2")}))

    from conftest import learnable_native

    sixteen = learnable_native(tmp_path / "sixteen", size=16, per_class=2)
    with pytest.raises(ConfigError, match=r"--depth 6 is not 4 \+ 2 \* n \* 2 \(2 stacks for 16 px images\): try 20"):
        train(TrainConfig(**{**c.__dict__, "data": str(sixteen), "out": str(tmp_path / "r3")}))
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


def test_run_status_finished_diverged_unfinished(tmp_path):
    from dsimagenet.runs import load_run

    def make(name, result, metrics=({"epoch": 1, "top1_error": 50.0},)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"config": {"lr": 0.1}}))
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        if result is not None:
            (tmp_path / name / "result.json").write_text(json.dumps(result))

    make("a_finished", {"status": "finished", "top1_error": 50.0})
    make("b_old", {"top1_error": 50.0})  # written before "status" existed
    make("c_diverged", {"status": "diverged", "epoch": 1, "step": 4, "message": "m"})
    make("d_unfinished", None)
    make("e_old_nan", {"top1_error": 81.0}, [{"epoch": 1, "train_loss": float("nan")}])  # an old diverged run
    got = {r.path.name: (r.status, r.finished, r.diverged) for r in load_runs(tmp_path, finished_only=False)}
    assert got == {"a_finished": ("finished", True, False), "b_old": ("finished", True, False),
                   "c_diverged": ("diverged", False, True), "d_unfinished": ("unfinished", False, False),
                   "e_old_nan": ("diverged", False, True)}
    assert [r.path.name for r in load_runs(tmp_path)] == ["a_finished", "b_old"]
    (tmp_path / "a_finished" / "result.json").write_text('{"status": "finished", "top1')
    with pytest.raises(RunError, match="a_finished/result.json: not valid JSON"):
        load_run(tmp_path / "a_finished")
