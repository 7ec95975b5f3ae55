"""A run directory holds everything needed to reproduce and report one training run.

    RUN/config.json       the format version, the TrainConfig, package versions, git commit, dataset
                          fingerprint, and what the data decided (image size, depth, classes, method), the
                          head's classes (class_wnids, in label order) and the splits (names, images, holdout)
    RUN/metrics.jsonl     one JSON line per epoch: lr, train loss/error, val loss, top-1/top-5 error, seconds
    RUN/per_class.csv     final per-class top-1/top-5 accuracy on val
    RUN/result.json       "status": "finished" with the final and epoch-31 errors (percent, to the decimals the
                          number of val images justifies: ``percent``), val images, params, epochs, train
                          seconds, images/s; or "status": "diverged" with the epoch, step and message
    RUN/checkpoint.pt     the latest checkpoint (written atomically; loaded with weights_only=True)
    RUN/.run.lock         held (flock) by the one process that trains the run; the kernel frees it when that
                          process ends, however it ends

    >>> runs = load_runs(["sweep/"])          # every finished run under these folders
    >>> runs[0].result["top1_error"], runs[0].train_config.lr
    >>> runs[0].model()                        # the trained WideResNet, from its checkpoint
    >>> [r.path for r in load_runs(["sweep/"], finished_only=False) if r.diverged]
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dsimagenet.errors import DSImageNetError
from dsimagenet.formats.atomic import atomic_write
from dsimagenet.versions import versions  # noqa: F401

CONFIG, METRICS, RESULT, PER_CLASS, CHECKPOINT = "config.json", "metrics.jsonl", "result.json", "per_class.csv", \
    "checkpoint.pt"
LOCK = ".run.lock"
STATUSES = ("finished", "diverged", "unfinished")
# The layout of a run directory, stored in config.json as "format" and checked on read: raise it when a file
# changes meaning, so that an older dsimagenet refuses a run it would misread.
FORMAT = 1


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
        after = result.get("epochs")
        problems.append(f"it is a result after {after!r} epoch{'' if after == 1 else 's'}, {METRICS} holds epochs "
                        f"{[m['epoch'] for m in metrics][-3:]!r}{' (the last three)' if len(metrics) > 3 else ''} "
                        f"and the run has {epochs}")
    if problems:
        raise RunError(f"{run / RESULT}: not this run's result: {'; '.join(problems)}; remove it and --resume to "
                       "derive it again from the checkpoint")


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


def exists(path: str | Path) -> bool:
    """Whether ``path`` is a run directory: it has a config.json (written first, when the run starts)."""
    return (Path(path) / CONFIG).exists()


def config_record(config, **facts) -> dict:
    """What config.json holds, versioned: the format, the TrainConfig, the versions of what ran it, the git
    commit, and ``facts`` (dataset fingerprint, device, depth, image size, ...). Written by the trainer."""
    import dataclasses

    return {"format": FORMAT, "config": dataclasses.asdict(config), "versions": versions(),
            "git_commit": git_commit(), **facts}


def check_format(path: Path, stored: dict) -> None:
    """RunError unless config.json at ``path`` is of a format this dsimagenet reads (one without "format" is
    from before it was written: format 1)."""
    fmt = stored.get("format", 1)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise RunError(f"{path / CONFIG}: format is {fmt!r}, not a format number")
    if fmt > FORMAT:
        raise RunError(f"{path / CONFIG}: a run directory of format {fmt}, made by a newer dsimagenet (this one "
                       f"reads formats up to {FORMAT}): upgrade dsimagenet to read it")


@dataclass
class Run:
    """One run directory as read: ``config`` is config.json as stored (see ``train_config`` for the typed
    TrainConfig), ``result`` result.json (None until the run ends), ``metrics`` the epoch lines."""

    path: Path
    config: dict
    result: dict | None
    metrics: list[dict] = field(default_factory=list)

    def __repr__(self) -> str:
        """One line: where, what state, what was trained and its result (read leniently: a damaged config.json
        still has a repr)."""
        stored = self.config.get("config") if isinstance(self.config.get("config"), dict) else {}
        try:
            status = self.status
        except RunError:
            status = "damaged"
        parts = [f"{self.path}: {status}"]
        depth, width = self.config.get("depth"), stored.get("width")
        if depth is not None and isinstance(width, (int, float)):
            parts.append(f"WRN-{depth}-{width:g}")
        size = self.config.get("image_size")
        data = " ".join(str(x) for x in (f"{size} px" if size else None, self.config.get("method"),
                                         f"{self.config['num_classes']} classes" if self.config.get("num_classes")
                                         else None) if x)
        if data:
            parts.append(data)
        if "epochs" in stored:
            parts.append(plural(stored["epochs"], "epoch"))
        if isinstance(stored.get("lr"), (int, float)):
            parts.append(f"lr {stored['lr']:g}")
        res = self.result or {}
        if status == "finished" and isinstance(res.get("top1_error"), (int, float)):
            parts.append(f"top-1 error {res['top1_error']:.10g}%")  # as measured (runs.percent), older runs' noise cut
        return f"Run({', '.join(parts)})"

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

    @property
    def train_config(self):
        """The run's TrainConfig (fields added since the run was made take their defaults); RunError naming
        config.json if what it stores is not one."""
        import dataclasses

        from dsimagenet.recipe import TrainConfig

        stored = self.config.get("config")
        if not isinstance(stored, dict):
            raise RunError(f"{self.path / CONFIG}: lacks its 'config' (the TrainConfig)")
        unknown = sorted(set(stored) - {f.name for f in dataclasses.fields(TrainConfig)})
        if unknown:
            raise RunError(f"{self.path / CONFIG}: config holds fields this dsimagenet does not know: {unknown}")
        try:
            return TrainConfig(**stored)
        except (DSImageNetError, TypeError) as e:  # TypeError: a required field missing
            raise RunError(f"{self.path / CONFIG}: config is not a valid TrainConfig ({e})") from None

    def _fact(self, name: str) -> int:
        v = self.config.get(name)
        if not isinstance(v, int) or isinstance(v, bool):
            raise RunError(f"{self.path / CONFIG}: {name} is {v!r}, not an integer")
        return v

    @property
    def image_size(self) -> int:
        return self._fact("image_size")

    @property
    def depth(self) -> int:
        return self._fact("depth")

    @property
    def num_classes(self) -> int:
        return self._fact("num_classes")

    @property
    def class_wnids(self) -> list[str] | None:
        """The classes of the run's head in label order (output k is class_wnids[k]), as config.json records them;
        None for a run made before they were recorded."""
        v = self.config.get("class_wnids")
        if v is None:
            return None
        if not isinstance(v, list) or not all(isinstance(w, str) and w for w in v) or len(set(v)) != len(v) or (
                isinstance(self.config.get("num_classes"), int) and len(v) != self.config["num_classes"]):
            raise RunError(f"{self.path / CONFIG}: class_wnids must be the run's num_classes distinct class names, "
                           f"found {v!r:.80}")
        return list(v)

    @property
    def method(self) -> str | None:
        """The resize method of the run's data (native data records it), or None."""
        return self.config.get("method")

    def errors_at(self, epoch: int) -> tuple[float | None, float | None]:
        """(top-1, top-5) error in percent after ``epoch`` as result.json records it (only the run's
        ``report_epoch`` is), or (None, None)."""
        res = self.result or {}
        return res.get(f"top1_error_ep{epoch}"), res.get(f"top5_error_ep{epoch}")

    def model(self):
        """The trained WideResNet in eval mode, on the CPU: built with the stored depth, width, classes and image
        size, holding the checkpoint's weights. RunError naming the file if there is none or it does not fit."""
        from dsimagenet.model import WideResNet

        c = self.train_config
        net = WideResNet(self.depth, c.width, self.num_classes, self.image_size, dropout=c.dropout)
        path = self.path / CHECKPOINT
        state = load_checkpoint(path)
        if not isinstance(state.get("model"), dict):
            raise RunError(f"{path}: holds no model weights")
        try:
            net.load_state_dict(state["model"])
        except RuntimeError as e:  # torch's error for missing, unexpected or misshapen tensors
            raise RunError(f"{path}: does not fit the run's WRN-{self.depth}-{c.width:g} "
                           f"({str(e).splitlines()[0]})") from None
        return net.eval()


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's state on the CPU (``weights_only``: a checkpoint never runs code); RunError naming the file
    if it is missing, damaged or not a checkpoint."""
    import pickle
    import zipfile

    import torch

    check_regular(path)
    if not path.exists():
        raise RunError(f"{path}: no checkpoint: the run has not saved one")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as e:
        raise RunError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0] if str(e) else e!r})") from None
    if not isinstance(state, dict):
        raise RunError(f"{path}: not a checkpoint (a {type(state).__name__}, not a dict)")
    return state


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not exists(path):
        raise FileNotFoundError(f"{path}: no {CONFIG}: not a run directory")
    config = read_json(path / CONFIG)
    check_format(path, config)
    result_path = path / RESULT
    result = read_json(result_path) if result_path.exists() else None
    return Run(path, config, result, read_metrics(path))


def find_runs(paths) -> list[Path]:
    """The run directories at ``paths`` (run directories, or folders searched for them), sorted;
    FileNotFoundError for a path that is neither."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: set[Path] = set()
    for p in map(Path, paths):
        if exists(p):
            found.add(p)
        elif p.is_dir():
            found.update(c.parent for c in p.rglob(CONFIG))
        else:
            raise FileNotFoundError(f"{p}: no such run directory")
    return sorted(found)


def percent(k: float, n: float) -> float:
    """``100 * k / n`` (an error of k wrong of n images, in percent) to the decimals n justifies: the fewest
    (at least 1) with a step of at most 100 / n, so that ``round(value * n / 100)`` gives k back, and no
    ``8.999999999999996`` is written. ``n`` 0: NaN."""
    if not n:
        return math.nan
    return round(100 * k / n, max(1, math.ceil(math.log10(n / 100))))


def measured(x: float, digits: int = 6) -> float:
    """A measured float (a loss, a rate) to ``digits`` significant digits: what it can claim, and readable."""
    return float(f"{x:.{digits}g}")


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 epoch``, ``2 epochs``: a count and its noun, agreed."""
    return f"{n:,} {word if n == 1 else words or word + 's'}"


def runs_table(runs: list[Run]) -> list[dict]:
    """``load_runs(...)`` as a table: one flat dict per run, every dict with the same keys (None where a run has
    no value), ready for ``csv.DictWriter`` or ``pandas.DataFrame``: run (its path), status, every TrainConfig
    field (a list as space-separated values: ``milestones`` "10 20 30"), what the data decided (image_size, depth,
    num_classes, method, params, device, world_size), and result.json's values (errors, epochs, seconds...).

        >>> import pandas as pd
        >>> pd.DataFrame(dsimagenet.runs_table(dsimagenet.load_runs(["sweep/"])))
    """
    def flat(v):
        if isinstance(v, (list, tuple)):
            return " ".join(str(x) for x in v)
        return json.dumps(v, sort_keys=True) if isinstance(v, dict) else v

    from dsimagenet.recipe import stored_defaults

    defaults = stored_defaults()
    rows = []
    for r in runs:
        try:
            status = r.status
        except RunError:
            status = "damaged"
        row = {"run": str(r.path), "status": status}
        stored = r.config.get("config")
        if isinstance(stored, dict):  # a run made before a field existed ran as its old default (not None)
            stored = {**{k: v for k, v in defaults.items() if k not in ("data", "out")}, **stored}
        row.update({k: flat(v) for k, v in (stored if isinstance(stored, dict) else {}).items()})
        row.update({k: flat(r.config.get(k)) for k in ("image_size", "depth", "num_classes", "method", "params",
                                                        "device", "world_size") if k in r.config})
        row.update({k: flat(v) for k, v in (r.result or {}).items() if k != "status"})
        rows.append(row)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return [{k: row.get(k) for k in keys} for row in rows]


def load_runs(paths, finished_only: bool = True) -> list[Run]:
    """Runs at ``paths`` (run directories, or folders searched for them), sorted by path: the finished ones, or
    with ``finished_only=False`` all (see ``Run.status``)."""
    runs = [load_run(p) for p in find_runs(paths)]
    return [r for r in runs if r.finished or not finished_only]
