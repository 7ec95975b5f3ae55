"""A run directory holds everything needed to reproduce and report one training run.

    RUN/config.json       the TrainConfig, package versions, git commit, dataset fingerprint
    RUN/metrics.jsonl     one JSON line per epoch: lr, train loss/error, val loss, top-1/top-5 error, seconds
    RUN/per_class.csv     final per-class top-1/top-5 accuracy on val
    RUN/result.json       final and epoch-31 errors (percent), params, epochs, train seconds, images/s
    RUN/checkpoint.pt     the latest checkpoint (written atomically; loaded with weights_only=True)

    >>> runs = load_runs(["sweep/"])          # every finished run under these folders
    >>> runs[0].result["top1_error"], runs[0].config["lr"]
"""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from dsimagenet.formats.atomic import atomic_write

CONFIG, METRICS, RESULT, PER_CLASS, CHECKPOINT = "config.json", "metrics.jsonl", "result.json", "per_class.csv", \
    "checkpoint.pt"


def versions(with_torch: bool = True) -> dict:
    import numpy
    import PIL

    from dsimagenet import __version__

    out = {"dsimagenet": __version__, "python": platform.python_version(), "numpy": numpy.__version__,
           "pillow": PIL.__version__}
    if with_torch:  # importing torch takes seconds: the builder does without
        import torch

        out.update(torch=torch.__version__, cuda=torch.version.cuda)
    return out


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_json(path: Path, obj: dict) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def append_metrics(run: Path, line: dict) -> None:
    with open(run / METRICS, "a") as f:
        f.write(json.dumps(line) + "\n")


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run: Path, epochs_done: int) -> None:
    """On a resume after ``epochs_done`` complete epochs: drop the lines of epochs that will be run again
    (lines count epochs from 1, so epoch ``epochs_done`` itself is kept)."""
    lines = [m for m in read_metrics(run) if m["epoch"] <= epochs_done]
    with atomic_write(run / METRICS, "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in lines)


@dataclass
class Run:
    path: Path
    config: dict
    result: dict | None
    metrics: list[dict] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.result is not None


def load_run(path: str | Path) -> Run:
    path = Path(path)
    try:
        config = json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no {CONFIG}: not a run directory") from None
    result_path = path / RESULT
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    return Run(path, config, result, read_metrics(path))


def load_runs(paths, finished_only: bool = True) -> list[Run]:
    """Runs at ``paths`` (run directories, or folders searched for them), sorted by path."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: set[Path] = set()
    for p in map(Path, paths):
        if (p / CONFIG).exists():
            found.add(p)
        elif p.is_dir():
            found.update(c.parent for c in p.rglob(CONFIG))
        else:
            raise FileNotFoundError(f"{p}: no such run directory")
    runs = [load_run(p) for p in sorted(found)]
    return [r for r in runs if r.finished or not finished_only]
