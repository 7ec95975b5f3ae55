"""CUDA paths, checked against the CPU ones; skipped where there is no GPU (CI has none)."""

import json

import numpy as np
import pytest
import torch

from dsimagenet import open_dataset
from dsimagenet.data import Loader
from dsimagenet.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("resident", [True, False])
def test_loader_on_cuda_matches_cpu(tiny, resident):
    ds = open_dataset(tiny.official())
    cpu = Loader(ds, 32, "cpu", seed=4)
    gpu = Loader(ds, 32, "cuda", seed=4, resident=resident)
    for (x1, y1), (x2, y2) in zip(cpu.epoch(1), gpu.epoch(1), strict=True):
        assert x2.is_cuda and torch.equal(y1, y2.cpu())
        torch.testing.assert_close(x1, x2.cpu(), rtol=0, atol=1e-6)


def test_train_on_cuda_learns(learnable, tmp_path):
    result = train(TrainConfig(data=str(learnable), out=str(tmp_path / "run"), epochs=12, depth=6, batch_size=32,
                               lr=0.05, device="cuda", quiet=True))
    assert result["top1_error"] < 10 and result["device"].startswith("cuda")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert np.isfinite(json.loads(lines[-1])["train_loss"])


def test_compiled_train_on_cuda_learns(learnable, tmp_path):
    """The loss and running sums inside the CUDA graph, with the fused optimizer step: it still learns, and
    its training metrics follow the eager run's (bf16 arithmetic differs a little between the two)."""
    kw = dict(data=str(learnable), epochs=12, depth=6, batch_size=32, lr=0.05, device="cuda", quiet=True)
    eager = train(TrainConfig(out=str(tmp_path / "eager"), **kw))
    compiled = train(TrainConfig(out=str(tmp_path / "compiled"), compile=True, compile_mode="reduce-overhead",
                                 **kw))
    assert compiled["top1_error"] < 10 and eager["top1_error"] < 10
    first = [json.loads((tmp_path / r / "metrics.jsonl").read_text().splitlines()[0]) for r in ("eager", "compiled")]
    assert abs(first[0]["train_loss"] - first[1]["train_loss"]) < 0.05 * first[0]["train_loss"]


def test_cuda_graph_step_matches_the_static_step_and_reads_the_lr(learnable):
    """The captured step against the same step without a graph (fp32, same start): the same losses within
    rounding; then a learning rate of 0 set the way train sets it leaves the weights as they were (the graph
    reads the lr from device memory, it did not capture the old float)."""
    from dsimagenet.graphstep import GraphStep, graph_forward
    from dsimagenet.model import WideResNet
    from dsimagenet.train import _set_lr, make_optimizer

    ds = open_dataset(learnable)
    c = TrainConfig(data="x", out="y", depth=10, lr=0.05)
    losses = []
    for capture in (False, True):
        torch.manual_seed(0)
        model = WideResNet(10, 1, 4, 8).cuda()
        opt = make_optimizer(model, c, fused=True)
        ld = Loader(ds, 32, "cuda", seed=2, resident=True)
        g = GraphStep(ld, model, opt, graph_forward(model, torch.nn.CrossEntropyLoss(), "cuda", False), capture)
        it = g.epoch(0)
        losses.append([g.step(*next(it))[0].item() for _ in range(3)])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    assert g.graph is not None
    _set_lr(opt, 0.0, False)
    weights = [p.detach().clone() for p in model.parameters()]
    g.step(*next(it))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_graph_train_learns_like_eager(learnable, tmp_path, compiled):
    kw = dict(data=str(learnable), epochs=12, depth=6, batch_size=32, lr=0.05, device="cuda", quiet=True)
    eager = train(TrainConfig(out=str(tmp_path / "eager"), **kw))
    graph = train(TrainConfig(out=str(tmp_path / "graph"), cuda_graph=True, compile=compiled, **kw))
    assert graph["top1_error"] < 10 and eager["top1_error"] < 10 and graph["gpu_name"]
    first = [json.loads((tmp_path / r / "metrics.jsonl").read_text().splitlines()[0]) for r in ("eager", "graph")]
    assert abs(first[0]["train_loss"] - first[1]["train_loss"]) < 0.05 * first[0]["train_loss"]
