"""On a GPU: ``dsimagenet evaluate`` on CUDA (bf16, channels_last) reproduces a run's last metrics line, and the
objective on CUDA reuses finished work and continues a lower-epoch run. About a minute on one H100.

    python bench/evaluate_cuda.py          # from the repository root; writes $OUT/gpu_eval.json (default: .)
    python bench/evaluate_cuda.py cpu      # the same on the CPU, smaller (a smoke test of the script)

Prints, for the run's own val on cuda and on cpu, the errors and loss beside the metrics line and whether they
are equal exactly (cuda: expected exact; cpu: expected close, the run trained in bf16), then the objective's
three calls (1 epoch, 2 epochs continued, 2 epochs reused) beside a 2-epoch run from scratch.
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = ["src", "tests"]
import torch  # noqa: E402

print("torch", torch.__version__, "cuda", torch.cuda.is_available(), flush=True)
from conftest import learnable_native  # noqa: E402

from dsimagenet import benchmark, runs  # noqa: E402
from dsimagenet.evaluation import evaluate  # noqa: E402
from dsimagenet.train import TrainConfig, train  # noqa: E402

DEV = sys.argv[1] if len(sys.argv) > 1 else "cuda"
d = Path(tempfile.mkdtemp())
n = 200 if DEV == "cuda" else 10
data = learnable_native(d / "data", classes=10, per_class=n, val_per_class=n // 4, size=16)
out = d / "run"
t = time.time()
train(TrainConfig(data=str(data), out=str(out), epochs=2, device=DEV, quiet=True, depth=None if DEV == "cuda" else 8))
print("train s", round(time.time() - t, 1), flush=True)
last = runs.read_metrics(out)[-1]
res = {"last": {k: last[k] for k in ("top1_error", "top5_error", "val_loss")}}
for dev in dict.fromkeys((DEV, "cpu")):
    r = evaluate(out, data, device=dev, name=dev, quiet=True)
    res[dev] = {k: r[k] for k in ("top1_error", "top5_error", "loss")}
    res[dev]["exact"] = (r["top1_error"], r["top5_error"], r["loss"]) == (last["top1_error"], last["top5_error"],
                                                                         last["val_loss"])
    own = (out / "per_class.csv").read_bytes()
    res[dev]["per_class_same"] = (out / "eval" / dev / "per_class.csv").read_bytes() == own
print(json.dumps(res, indent=1), flush=True)
cfg = {"lr": 0.05, "milestones": [1]}
a = benchmark.objective(cfg, {"epochs": 1}, data=str(data), out=d / "hpo", device=DEV)
b = benchmark.objective(cfg, {"epochs": 2}, data=str(data), out=d / "hpo", device=DEV)
c = benchmark.objective(cfg, {"epochs": 2}, data=str(data), out=d / "hpo", device=DEV)
s = train(TrainConfig(data=str(data), out=str(d / "scratch"), epochs=2, lr=0.05, milestones=(1,), device=DEV,
                      quiet=True))
res["objective"] = {"a": [a["function_value"], a["cost"], a["info"]["reused"]],
                    "b": [b["function_value"], b["cost"], b["info"]["continued_from"]],
                    "c": [c["function_value"], c["cost"], c["info"]["reused"]], "scratch": s["top1_error"]}
print(json.dumps(res["objective"]), flush=True)
Path(os.environ.get("OUT", ".")).joinpath("gpu_eval.json").write_text(json.dumps(res, indent=1))
