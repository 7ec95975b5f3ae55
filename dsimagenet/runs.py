"""A run directory holds everything needed to reproduce and report one training run.

    RUN/config.json       the TrainConfig, package versions, git commit, dataset fingerprint
    RUN/metrics.jsonl     one JSON line per epoch: lr, train loss/error, val loss, top-1/top-5 error, seconds
    RUN/per_class.csv     final per-class top-1/top-5 accuracy on val
    RUN/result.json       "status": "finished" with the final and epoch-31 errors (percent), params, epochs, train
                          seconds, images/s; or "status": "diverged" with the epoch, step and message
    RUN/checkpoint.pt     the latest checkpoint (written atomically; loaded with weights_only=True)
    RUN/.run.lock         held (flock) by the one process that trains the run; the kernel frees it when that
                          process ends, however it ends

    >>> runs = load_runs(["sweep/"])          # every finished run under these folders
    >>> runs[0].result["top1_error"], runs[0].config["lr"]
    >>> [r.path for r in load_runs(["sweep/"], finished_only=False) if r.diverged]
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import platform
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dsimagenet.errors import DSImageNetError
from dsimagenet.formats.atomic import atomic_write

CONFIG, METRICS, RESULT, PER_CLASS, CHECKPOINT = "config.json", "metrics.jsonl", "result.json", "per_class.csv", \
    "checkpoint.pt"
LOCK = ".run.lock"
STATUSES = ("finished", "diverged", "unfinished")


class RunError(DSImageNetError, ValueError):
    """A run directory that cannot be used as asked: held by another process, not a run, damaged files, a
    checkpoint that belongs elsewhere. The message names the file and what is wrong."""


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT (Ctrl-C) or SIGTERM (a cluster's preemption) after saving a checkpoint at the
    step it had reached: ``--resume`` continues exactly there. A KeyboardInterrupt, so that a sweep or a study
    stops as well rather than going on to its next run; ``exit_code`` is 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def check_result(run: Path, result: dict, metrics: list[dict], epochs: int) -> None:
    """A finished run's result.json must be the one its metrics.jsonl gives (a result.json copied from another
    run, or left from a longer one, would otherwise be reported as this run's): an error naming the file."""
    if result.get("status", "finished") != "finished":
        return
    last = metrics[-1] if metrics else {}
    problems = [f"{k} is {result.get(k)!r}, the last epoch of {METRICS} says {last.get(k)!r}"
                for k in ("top1_error", "top5_error") if result.get(k) != last.get(k)]
    if result.get("epochs") != epochs or [m["epoch"] for m in metrics] != list(range(1, epochs + 1)):
        problems.append(f"it is a result after {result.get('epochs')!r} epochs, {METRICS} holds epochs "
                        f"{[m['epoch'] for m in metrics][-3:]!r}{' (the last three)' if len(metrics) > 3 else ''} "
                        f"and the run has {epochs}")
    if problems:
        raise RunError(f"{run / RESULT}: not this run's result: {'; '.join(problems)}; remove it and --resume to "
                       "derive it again from the checkpoint")


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


@contextlib.contextmanager
def naming(path: Path, note: str = "") -> Iterator[None]:
    """An OSError while writing ``path`` (a full disk fails in write or fsync, which name no file, or names a
    temp file) goes on naming ``path`` itself, with ``note`` after the system's words."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, (e.strerror or str(e)) + note, str(path)) from e


def check_regular(path: Path) -> None:
    """An error naming ``path`` if it exists and is not a regular file (a link to one is fine): reading a FIFO
    waits forever for a writer, a device such as /dev/zero never ends, a folder fails in a way that names
    nothing about the run."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise RunError(f"{path}: is {kind}, not a file: a run directory holds only files it wrote; remove it")


def write_json(path: Path, obj: dict) -> None:
    with naming(path), atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=False)  # NaN is not JSON: writing one is a bug of ours
        f.write("\n")


def append_metrics(run: Path, line: dict) -> None:
    text = json.dumps(line, allow_nan=False) + "\n"
    with naming(run / METRICS), open(run / METRICS, "a") as f:
        f.write(text)


def read_metrics(run: Path) -> list[dict]:
    """The epoch lines. A last line cut short (a kill or a full disk while appending it) is left out: its epoch
    is run again on resume; a damaged line before it is an error naming the file and the line."""
    path = Path(run) / METRICS
    check_regular(path)
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            m = json.loads(line)
            if not isinstance(m, dict) or not isinstance(m.get("epoch"), int):
                raise ValueError("not an epoch line")
        except ValueError as e:
            if i == len(lines) - 1:  # no newline after it: it was never completed
                break
            raise RunError(f"{path}: line {i + 1} is damaged ({e}); remove it and the lines after it, then "
                           "--resume to run those epochs again") from None
        out.append(m)
    return out


def truncate_metrics(run: Path, epochs_done: int) -> None:
    """On a resume after ``epochs_done`` complete epochs: drop the lines of epochs that will be run again
    (lines count epochs from 1, so epoch ``epochs_done`` itself is kept), and a last line cut short."""
    lines = [m for m in read_metrics(run) if m["epoch"] <= epochs_done]
    if [m["epoch"] for m in lines] != list(range(1, epochs_done + 1)):
        raise RunError(f"{run / METRICS}: holds epochs {[m['epoch'] for m in lines]}, but the checkpoint is after "
                       f"epoch {epochs_done}: the file was changed; the run cannot be continued")
    with naming(run / METRICS), atomic_write(run / METRICS, "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in lines)


# --- one process per run ------------------------------------------------------------------------------------

def check_out(run: Path) -> bool:
    """Whether ``run`` is a run directory (it has config.json); an error if it is a file, or a folder of
    something else (it holds files other than hidden ones, such as the lock and temp files)."""
    if run.exists() and not run.is_dir():
        raise RunError(f"{run}: --out exists and is not a folder: choose another --out")
    if (run / CONFIG).exists():
        return True
    if run.is_dir():
        other = sorted(p.name for p in run.iterdir() if not p.name.startswith("."))
        if other:
            raise RunError(f"{run}: not a run directory (no {CONFIG}) and not empty ({', '.join(other[:3])}"
                           f"{', ...' if len(other) > 3 else ''}): choose another --out")
    return False


@contextlib.contextmanager
def hold(run: Path) -> Iterator[None]:
    """Hold the run directory (made if missing) for this process: an flock on RUN/.run.lock, which the kernel
    releases when the process ends, also by SIGKILL. Another holder is an error naming its pid."""
    check_out(run)
    with naming(run):
        run.mkdir(parents=True, exist_ok=True)
    fd = os.open(run / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunError(f"{run}: another process (pid {pid}) is training this run: wait for it to end, or stop "
                           "it and --resume") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


# --- reading runs -------------------------------------------------------------------------------------------

def read_json(path: Path) -> dict:
    check_regular(path)
    try:
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise RunError(f"{path}: not a JSON object")
    return obj


@dataclass
class Run:
    path: Path
    config: dict
    result: dict | None
    metrics: list[dict] = field(default_factory=list)

    @property
    def status(self) -> str:
        """"finished", "diverged" or "unfinished", from result.json (one without "status" is from before it
        existed: finished, unless its metrics hold a NaN, which only a diverged run wrote then)."""
        if self.result is None:
            return "unfinished"
        status = self.result.get("status", "finished")
        if status == "finished" and "status" not in self.result and any(
                isinstance(v, float) and not math.isfinite(v) for m in self.metrics for v in m.values()):
            return "diverged"
        if status not in STATUSES[:2]:
            raise RunError(f"{self.path / RESULT}: unknown status {status!r}")
        return status

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def diverged(self) -> bool:
        return self.status == "diverged"


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not (path / CONFIG).exists():
        raise FileNotFoundError(f"{path}: no {CONFIG}: not a run directory")
    config = read_json(path / CONFIG)
    result_path = path / RESULT
    result = read_json(result_path) if result_path.exists() else None
    return Run(path, config, result, read_metrics(path))


def load_runs(paths, finished_only: bool = True) -> list[Run]:
    """Runs at ``paths`` (run directories, or folders searched for them), sorted by path: the finished ones, or
    with ``finished_only=False`` all (see ``Run.status``)."""
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
