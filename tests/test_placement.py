"""Placing sweep and search workers on GPUs: the assignment as a pure function (fake device counts), the worker
pool's pinning, the sweep and tune CLI over fake GPUs (DSIMAGENET_FAKE_GPUS, runs on the CPU), the messages on a
machine without CUDA; and the static step that --cuda-graph captures, against the eager step, on the CPU."""

import json
import multiprocessing
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import learnable_native
from placement_probe import where_am_i

from dsimagenet import open_dataset
from dsimagenet.data import Loader, batch_buffers, gather_batch, gather_fixed, rank_plan
from dsimagenet.errors import ConfigError
from dsimagenet.placement import FAKE, assign, parse_gpus, pool, resolve


@pytest.fixture
def fake(monkeypatch):
    def set_gpus(n, parent=None):
        monkeypatch.setenv(FAKE, str(n))
        if parent is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", parent)
    return set_gpus


# --- the assignment: a pure function

def test_assign_round_robin_by_hand():
    assert assign((0, 1, 2, 3), None, None) == [0, 1, 2, 3]  # one run a GPU
    assert assign((0, 1, 2, 3), 2, None) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert assign((0, 1), None, 3) == [0, 1, 0]  # --jobs alone: spread, no GPU more than one above another
    assert assign((2, 5), 3, 5) == [2, 5, 2, 5, 2]
    assert assign((7,), 8, None) == [7] * 8
    with pytest.raises(ConfigError, match=r"--jobs 5 is more than 2 GPU\(s\) x --runs-per-gpu 2 = 4"):
        assign((0, 1), 2, 5)
    with pytest.raises(ConfigError, match="--workers must be an integer >= 1"):
        assign((0,), None, 0, "--workers")


@pytest.mark.parametrize("gpus,k,jobs", [((0,), 1, None), ((0, 1, 2), 4, None), ((0, 1, 2, 3), None, 7),
                                         ((3, 1), 5, 9), ((0, 1, 2, 3, 4, 5, 6, 7), 2, 16)])
def test_assign_never_overfills_a_gpu(gpus, k, jobs):
    workers = assign(gpus, k, jobs)
    counts = Counter(workers)
    assert len(workers) == (jobs if jobs is not None else len(gpus) * (k or 1))
    assert set(counts) <= set(gpus) and max(counts.values()) - min(counts[g] for g in gpus) <= 1
    assert max(counts.values()) <= (k or -(-len(workers) // len(gpus)))


def test_parse_gpus():
    assert parse_gpus("0,1,2,3") == (0, 1, 2, 3) and parse_gpus("3 1") == (3, 1) and parse_gpus([2]) == (2,)
    assert parse_gpus(None) is None
    for bad in ("", "a", "0,-1", "1.5", [True], []):
        with pytest.raises(ConfigError, match="--gpus takes different GPU indices"):
            parse_gpus(bad)
    with pytest.raises(ConfigError, match="names a GPU twice: .*--runs-per-gpu"):
        parse_gpus("0,0")


def test_resolve_against_fake_counts(fake):
    fake(4)
    p = resolve(None, 2, None, "cuda")
    assert p.visible == ("0", "1", "2", "3") * 2 and p.pinned
    assert resolve("1,3", None, None, "auto").visible == ("1", "3")
    with pytest.raises(ConfigError, match=r"GPU 4 is not visible here \(4 visible: 0..3\)"):
        resolve("0,4", None, None, "cuda")
    fake(2, parent="5,7")  # a scheduler's CUDA_VISIBLE_DEVICES: the workers get the node's own indices
    assert resolve(None, 2, None, "cuda").visible == ("5", "7", "5", "7")
    assert resolve("1", None, 3, "cuda").visible == ("7", "7", "7")
    fake(0)
    assert resolve(None, None, 3, "auto").visible == (None, None, None)  # auto without GPUs: CPU workers
    with pytest.raises(ConfigError, match="--gpus: no CUDA GPU is visible here"):
        resolve("0", None, None, "auto")
    with pytest.raises(ConfigError, match="--device cuda: no CUDA GPU is visible"):
        resolve(None, None, None, "cuda")


def test_resolve_cpu_runs(monkeypatch):
    monkeypatch.delenv(FAKE, raising=False)
    assert resolve(None, None, None, "cpu").visible == (None,)
    assert resolve(None, None, 3, {"cpu"}).workers == 3
    with pytest.raises(ConfigError, match="--runs-per-gpu places runs on GPUs, but they train on the CPU"):
        resolve(None, 2, None, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_resolve_without_cuda_names_why(monkeypatch):
    monkeypatch.delenv(FAKE, raising=False)
    with pytest.raises(ConfigError, match=r"--gpus: no CUDA GPU is visible here \(.*\)"):
        resolve("0,1", None, None, "auto")
    assert resolve(None, None, None, "auto").visible == (None,)


# --- the pool: every worker its own CUDA_VISIBLE_DEVICES

def test_pool_pins_each_worker_to_its_gpu(fake):
    fake(2, parent="5,7")
    p = resolve(None, 2, None, "cuda")
    with multiprocessing.get_context("spawn").Manager() as m, pool(p) as ex:
        barrier = m.Barrier(p.workers)
        seen = [f.result() for f in [ex.submit(where_am_i, barrier) for _ in range(p.workers)]]
    assert len({pid for pid, _ in seen}) == 4
    assert Counter(v for _, v in seen) == {"5": 2, "7": 2}


# --- sweep and tune over fake GPUs, end to end (runs on the CPU)

def _env(**extra):
    src = str(Path(__file__).resolve().parent.parent / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def test_sweep_spreads_runs_over_fake_gpus(tmp_path):
    data = learnable_native(tmp_path / "data")
    out = tmp_path / "sw"
    r = subprocess.run([sys.executable, "-m", "dsimagenet", "sweep", "--grid", "lr=0.01,0.02,0.03",
                        "--data", str(data), "--out", str(out), "--gpus", "0,2", "--runs-per-gpu", "1",
                        "--device", "cpu", "--depth", "6", "--batch-size", "32", "--epochs", "1", "--quiet"],
                       env=_env(**{FAKE: "3"}), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    configs = [json.loads((out / f"lr={lr}" / "config.json").read_text()) for lr in (0.01, 0.02, 0.03)]
    results = [json.loads((out / f"lr={lr}" / "result.json").read_text()) for lr in (0.01, 0.02, 0.03)]
    assert {c["cuda_visible_devices"] for c in configs} <= {"0", "2"}  # never the GPU left out, never unpinned
    assert [c["cuda_visible_devices"] for c in configs] == [r["cuda_visible_devices"] for r in results]
    assert all(c["gpu_index"] is None and c["device"] == "cpu" for c in configs)  # they trained on the CPU


def test_sweep_and_tune_refuse_gpus_without_cuda(tmp_path):
    data = learnable_native(tmp_path / "data")
    for cmd in (["sweep", "--grid", "lr=0.01", "--out", str(tmp_path / "sw"), "--gpus", "0,1"],
                ["tune", "--out", str(tmp_path / "tu"), "--gpus", "0,1"]):
        r = subprocess.run([sys.executable, "-m", "dsimagenet", *cmd, "--data", str(data)],
                           env=_env(**{FAKE: "0"}), capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert "error: --gpus: no CUDA GPU is visible here" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "sw").exists() and not (tmp_path / "tu").exists()
    r = subprocess.run([sys.executable, "-m", "dsimagenet", "sweep", "--grid", "lr=0.01", "--out",
                        str(tmp_path / "sw"), "--data", str(data), "--gpus", "0,3"],
                       env=_env(**{FAKE: "2"}), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "GPU 3 is not visible here (2 visible: 0..1)" in r.stderr


def test_tune_workers_over_fake_gpus(tmp_path):
    data = learnable_native(tmp_path / "data")
    r = subprocess.run([sys.executable, "-m", "dsimagenet", "tune", "--data", str(data), "--out", str(tmp_path / "t"),
                        "--trials", "2", "--max-epochs", "1", "--gpus", "1", "--device", "cpu",
                        "--depth", "6", "--batch-size", "32"],
                       env=_env(**{FAKE: "2"}), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    trials = (tmp_path / "t" / "trials").glob("*/config.json")
    seen = {json.loads(p.read_text())["cuda_visible_devices"] for p in trials}
    assert seen == {"1"}


# --- the static step of --cuda-graph, on the CPU

def test_gather_fixed_equals_gather_batch(tiny):
    ds = open_dataset(tiny.official())
    ld = Loader(ds, 32, "cpu", seed=3, resident=True)
    for augment in ("paper", "flip", "none"):
        ld.augment = augment
        p = rank_plan(ld.plan(2), 32, size=ld.size)
        for step in range(len(p.bounds) - 1):
            lo, hi = p.bounds[step], p.bounds[step + 1]
            read = torch.from_numpy(p.read[lo:hi])
            base = None if p.base is None else torch.from_numpy(p.base[lo:hi])
            k = hi - lo - p.mirrored[step]
            want = gather_batch(ld.images, read, k, base, ld._norm, batch_buffers(32, ld.size, "cpu"))
            got = gather_fixed(ld.images, read, torch.arange(hi - lo) >= k, base, ld._norm,
                               batch_buffers(hi - lo, ld.size, "cpu"))
            assert torch.equal(want, got), (augment, step)


def test_static_step_trains_as_the_eager_step(tmp_path):
    """Two epochs (the last batch of each partial) through GraphStep's static path against train's eager step,
    same seed: the same losses and weights within float rounding."""
    from dsimagenet.graphstep import GraphStep, graph_forward
    from dsimagenet.model import WideResNet
    from dsimagenet.recipe import TrainConfig
    from dsimagenet.train import _make_forward, make_optimizer

    ds = open_dataset(learnable_native(tmp_path / "data", per_class=10))  # 40 images: 80 samples, batches 32+32+16
    c = TrainConfig(data="x", out="y", depth=10, width=0.5, lr=0.05)
    losses, weights = [], []
    for static in (False, True):
        torch.manual_seed(0)
        model = WideResNet(10, 0.5, 4, 8)
        opt = make_optimizer(model, c)
        ld = Loader(ds, 32, "cpu", seed=1, resident=True)
        crit = torch.nn.CrossEntropyLoss()
        g = GraphStep(ld, model, opt, graph_forward(model, crit, "cpu", False), capture=False) if static else None
        eager = _make_forward(model, crit, "cpu", False)
        seen = []
        for epoch in range(2):
            for x, y in (g.epoch(epoch) if static else ld.epoch(epoch)):
                if static:
                    loss, sums = g.step(x, y)
                else:
                    loss, sums = eager(x, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                seen.append((loss.item(), *sums.tolist()))
        losses.append(np.array(seen))
        weights.append(torch.cat([t.flatten().float() for t in model.state_dict().values()]))
    assert losses[0].shape == (6, 4) and losses[0][2, 3] == 16  # the partial batch went through the eager path
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-5, atol=1e-6)


def test_cuda_graph_option(learnable, tmp_path, capsys):
    from dsimagenet.recipe import TrainConfig
    from dsimagenet.train import train

    with pytest.raises(ConfigError, match="--cuda-graph captures the whole step itself: use it with --compile-mode "
                                          "default"):
        TrainConfig(data="x", out="y", cuda_graph=True, compile=True, compile_mode="reduce-overhead")
    if not torch.cuda.is_available():  # no graph on a CPU: the run goes on as usual, and says so
        train(TrainConfig(data=str(learnable), out=str(tmp_path / "r"), depth=6, epochs=1, batch_size=32,
                          device="cpu", cuda_graph=True, log_every=1000))
        assert "--cuda-graph: no CUDA device here" in capsys.readouterr().out
