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
from dsimagenet.runs import load_runs
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
    assert result["params"] == sum(p.numel() for p in WideResNet(6, 1, 1000, 8).parameters())
    for key in ("top5_error", "epochs", "train_seconds", "train_images_per_s"):
        assert key in result
    assert "top1_error_ep31" not in result  # the run did not reach epoch 31
    per_class = (tmp_path / "run" / "per_class.csv").read_text().splitlines()
    assert per_class[0].startswith("index,wnid") and len(per_class) == 1001
    assert per_class[1].split(",")[3] == "8"  # kit fox: 8 val images
    run = load_runs([tmp_path])[0]
    assert run.config["config"]["epochs"] == 12 and run.result["top1_error"] == result["top1_error"]


def test_report_epoch(learnable, tmp_path):
    result = train(TrainConfig(data=str(learnable), out=str(tmp_path / "run"), epochs=3, report_epoch=2, **FAST))
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result["top1_error_ep2"] == metrics[1]["top1_error"]


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
    with pytest.raises(FileExistsError, match="--resume"):
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
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
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
