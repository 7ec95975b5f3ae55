"""A trained run's checkpoint scored on any dataset of its image size: ``dsimagenet evaluate``.

    dsimagenet evaluate runs/wrn-28-2 --data out/32_box                      # its own val, again
    dsimagenet evaluate runs/wrn-28-2 --data v2/32_box --split train         # ImageNetV2 (a flat tree: train)
    >>> from dsimagenet import evaluate
    >>> evaluate("runs/wrn-28-2", "out/32_lanczos")["top1_error"]           # another method's build

The run's last checkpoint (or ``checkpoint=``) is scored with the trainer's own ``train.evaluate`` over a
``Loader`` normalised with the run's training statistics, so that the run's own val gives its last metrics
line exactly. What it writes, atomically, into ``RUN/eval/<name>/`` (``name``: the data folder's name and the
split, e.g. ``32_box_val``): ``result.json`` (top-1/top-5 error in percent, the mean loss, images, classes, the
checkpoint's epoch, how classes were mapped) and ``per_class.csv`` (as the run's own).

Classes are matched by WNID: the run's classes are config.json's ``class_wnids`` when it has them, else those its
data and ``--classes``/``--order`` give. The data may hold fewer of them (a class subset), in any label order.
Images of a class the run never learned are refused, naming the classes, unless ``known_classes_only``: then
they are left out and counted in result.json (``left_out``), never silently. Predictions always range over all of
the run's classes (an image of class A predicted as a class missing from the data is an error, as in training).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from dsimagenet import runs
from dsimagenet.errors import ConfigError, DSImageNetError
from dsimagenet.fields import check, integer, option, text

__all__ = ["EvalConfig", "evaluate", "evaluate_run", "run_classes", "EVAL"]

EVAL = "eval"  # RUN/eval/<name>/


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation; each field declares its help and allowed values once (dsimagenet.fields)."""

    run: str = option(check=text(), help="the run directory whose checkpoint is scored")
    data: str = option(check=text(), help="the dataset to score it on (any format open_dataset reads), of the "
                                          "run's image size")
    split: str = option("val", check=text(), help="the split of --data: val, or train (a flat class-folder tree "
                                                  "such as ImageNetV2 builds as train)")
    checkpoint: str | None = option(None, check=text(optional=True),
                                    help="a checkpoint file of this run to score instead of RUN/checkpoint.pt")
    name: str | None = option(None, check=text(optional=True),
                              help="the folder under RUN/eval/ to write into; by default the data's folder name "
                                   "and the split")
    device: Literal["auto", "cpu", "cuda"] = option("auto", help="auto, cpu or cuda")
    batch_size: int | None = option(None, check=integer(1, optional=True),
                                    help="images per batch; by default the run's --eval-batch-size")
    known_classes_only: bool = option(False, help="score only the images of classes the run learned, counting "
                                                  "the others as left out (without it they are an error)")
    quiet: bool = option(False, help="print nothing but errors")

    def __post_init__(self):
        for name in ("run", "data", "checkpoint"):  # a pathlib.Path is welcome; result.json stores the string
            if isinstance(getattr(self, name), os.PathLike):
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        check(self)


def evaluate(run, data, split: str = "val", **options) -> dict:
    """Score the run at ``run`` on the ``split`` of ``data``; ``options`` are EvalConfig's other fields. Returns
    what it writes to ``RUN/eval/<name>/result.json``."""
    return evaluate_run(EvalConfig(run=run, data=data, split=split, **options))


def run_classes(run: runs.Run) -> tuple[list[str], list[str]]:
    """The run's classes in label order (WNIDs) and their names: config.json's ``class_wnids`` when it has them,
    else what the run's data, --classes and --order give. RunError naming the file when neither is usable."""
    from dsimagenet.dataset import class_table, detect_format
    from dsimagenet.labels import IMAGENET, subset

    stored = run.config.get("class_wnids")
    if stored is not None:
        if not (isinstance(stored, list) and len(stored) == run.num_classes and all(
                isinstance(w, str) and w for w in stored) and len(set(stored)) == len(stored)):
            raise runs.RunError(f"{run.path / runs.CONFIG}: class_wnids is not a list of {run.num_classes} "
                                "different class names")
        return list(stored), [IMAGENET.name(w) if w in IMAGENET else w for w in stored]
    c = run.train_config
    try:
        table, _ = class_table(c.data, detect_format(c.data))
        wnids = list(subset(c.classes, c.order, table).wnids)
    except (DSImageNetError, OSError) as e:
        raise runs.RunError(f"{run.path / runs.CONFIG}: records no class_wnids, and the run's data {c.data} cannot "
                            f"tell its classes ({e})") from None
    if len(wnids) != run.num_classes:
        raise runs.RunError(f"{run.path / runs.CONFIG}: the run has {run.num_classes} classes, its data {c.data} "
                            f"with --classes {c.classes} gives {len(wnids)}: the data changed since")
    return wnids, [table.name(w) for w in wnids]


def _checkpoint(run: runs.Run, path: Path) -> dict:
    """The checkpoint's state, checked to be of this run (its data and configuration) and finite."""
    from dsimagenet.checkpoint import non_finite

    state = runs.load_checkpoint(path)
    if not isinstance(state.get("model"), dict):
        raise runs.RunError(f"{path}: holds no model weights")
    mine, theirs = run.config.get("dataset_fingerprint"), state.get("fingerprint")
    if mine and theirs and mine != theirs:
        raise runs.RunError(f"{path}: a checkpoint of a run on other data (fingerprint {str(theirs)[:12]}, the run "
                            f"{run.path} is {str(mine)[:12]})")
    _check_same_run(run, state, path)
    bad = non_finite(state["model"])
    if bad:  # NaN weights score a NaN loss: result.json cannot hold it, and no number of them means anything
        raise runs.RunError(f"{path}: {bad} holds NaN or infinite values: the run that saved it had diverged")
    return state


def _check_same_run(run: runs.Run, state: dict, path: Path) -> None:
    """RunError unless the checkpoint was saved by a run of this run's configuration (up to what does not change
    its weights so far, as on resume): a --checkpoint of another run of the same shape and data (another seed,
    lr, recipe) would load and be scored silently, its numbers written as this run's."""
    import json

    from dsimagenet.checkpoint import _differences, _weights_depend_on
    from dsimagenet.recipe import OPERATIONAL, stored_defaults

    was, stored = state.get("config"), run.config.get("config")
    if not (isinstance(was, str) and isinstance(stored, dict)):  # checkpoints before it was stored: by tensors
        return
    try:
        theirs = json.loads(was)
    except ValueError:
        theirs = None
    if not isinstance(theirs, dict):
        raise runs.RunError(f"{path}: its stored configuration is not a JSON object")
    # a run made before a field existed ran as its old default, in config.json as in its checkpoints
    ours = {**{k: v for k, v in stored_defaults().items() if k in theirs}, **stored}
    ours, theirs = _weights_depend_on(ours), _weights_depend_on(theirs)
    diff = _differences(theirs, ours, OPERATIONAL)
    if diff:
        raise runs.RunError(f"{path}: a checkpoint of another run than {run.path}: " + ", ".join(
            f"{k} is {theirs.get(k)!r} there, {ours.get(k)!r} in the run" for k in diff[:4])
            + (" ..." if len(diff) > 4 else ""))


def _model(run: runs.Run, state: dict, path: Path):
    from dsimagenet.model import WideResNet

    c = run.train_config
    net = WideResNet(run.depth, c.width, run.num_classes, run.image_size, dropout=c.dropout)
    ours, theirs = net.state_dict(), state["model"]
    # named one by one: torch's own message starts with a line that names none of them
    problems = ([f"{k} is missing" for k in ours if k not in theirs]
                + [f"{k} is not in this model" for k in theirs if k not in ours]
                + [f"{k} is {tuple(getattr(theirs[k], 'shape', ()))} there, {tuple(ours[k].shape)} here"
                   for k in ours if k in theirs and getattr(theirs[k], "shape", None) != ours[k].shape])
    try:
        if not problems:
            net.load_state_dict(theirs)
    except (RuntimeError, TypeError, ValueError, AttributeError) as e:  # torch's error for tensors it cannot take
        problems = [(str(e).splitlines() or [repr(e)])[-1].strip()]
    if problems:
        raise runs.RunError(f"{path}: does not fit the run's WRN-{run.depth}-{c.width:g} with {run.num_classes} "
                            f"classes: {'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''}")
    return net


def _default_name(data: str, split: str) -> str:
    p = Path(data.rstrip("/"))
    stem = p.name[:-4] if p.name.lower().endswith(".zip") else p.name
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{stem or 'data'}_{split}")


def _map_classes(ds, wnids: list[str], c: EvalConfig) -> dict:
    """Relabel ``ds`` (opened with its own classes) into the run's labels by WNID, in place; leave out the
    images of classes the run never learned if asked (else refuse them). Returns how it was mapped."""
    index = {w: i for i, w in enumerate(wnids)}
    present = np.unique(ds.targets)
    own = [ds.wnids[k] for k in present]
    unknown = [w for w in own if w not in index]
    where = f"--data {c.data} ({c.split})"
    left = {"images": 0, "classes": []}
    if unknown and len(unknown) == len(own):
        raise ConfigError(f"{where}: none of its {len(own)} classes is among the run's {len(wnids)} "
                          f"({', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} are not): the class names "
                          "cannot be mapped to the run's (ImageNet's WNIDs, or the class folders it was built from)")
    if unknown:
        if not c.known_classes_only:
            n = int(np.isin(ds.targets, [ds.class_to_idx[w] for w in unknown]).sum())
            raise ConfigError(f"{where}: {n} images of {len(unknown)} classes the run never learned "
                              f"({', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}): pass "
                              "--known-classes-only to score only the images of the run's classes")
        keep = np.flatnonzero(np.isin(ds.targets, [ds.class_to_idx[w] for w in own if w in index]))
        left = {"images": len(ds.targets) - len(keep), "classes": unknown}
        ds.data, ds.targets = ds.data[keep], ds.targets[keep]
    lut = np.array([index.get(w, -1) for w in ds.wnids], np.int64)
    same = all(ds.class_to_idx[w] == index[w] for w in own if w in index)  # each image keeps its label
    ds.targets = lut[ds.targets]
    ds.wnids, ds.class_to_idx = list(wnids), dict(index)
    return {"class_mapping": "same labels" if same else "by WNID", "left_out": left,
            "classes": int(len(present) - len(unknown))}


def _check_free(dest: Path, data_path: str, split: str) -> None:
    """ConfigError if ``dest`` holds the evaluation of other data or another split (one of the same is redone)."""
    if (dest / runs.RESULT).exists():
        before = runs.read_json(dest / runs.RESULT)
        if (before.get("data_resolved"), before.get("split")) != (data_path, split):
            raise ConfigError(f"{dest}: holds the evaluation on {before.get('data')} ({before.get('split')}): "
                              "choose another --name")


@contextlib.contextmanager
def _writing(dest: Path, data_path: str, split: str):
    """``dest`` made and held (an flock on RUN/eval/.lock) while its two files are written, and checked again
    under it: another evaluation under the same name (other data whose folder has the same name, scored at the
    same time) may have ended since the first check, and would be overwritten, or its per_class.csv paired with
    this result.json."""
    with runs.naming(dest):
        dest.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest.parent / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for two small writes: wait for the other one
        _check_free(dest, data_path, split)
        yield
    finally:
        os.close(fd)


class _Counted:
    """The Loader as ``train.evaluate`` reads it (``device``, ``epoch``), counting images into a progress bar."""

    def __init__(self, loader, bar):
        self.loader, self.bar, self.device = loader, bar, loader.device

    def epoch(self, epoch: int):
        for x, y in self.loader.epoch(epoch):
            yield x, y
            self.bar.update(len(y))


def evaluate_run(c: EvalConfig) -> dict:
    """``evaluate`` from an EvalConfig (what the command line makes)."""
    import torch

    from dsimagenet.data import Loader, compute_stats
    from dsimagenet.dataset import ImageNetDS
    from dsimagenet.distributed import Dist
    from dsimagenet.preflight import check_environment
    from dsimagenet.progress import bar
    from dsimagenet.train import _write_per_class
    from dsimagenet.train import evaluate as score

    start = time.perf_counter()
    run_path = Path(c.run)
    if not runs.exists(run_path):
        raise runs.RunError(f"{run_path}: not a run directory (no {runs.CONFIG})")
    run = runs.load_run(run_path)
    tc = run.train_config
    wnids, names = run_classes(run)
    ckpt = Path(c.checkpoint) if c.checkpoint else run_path / runs.CHECKPOINT
    if run.diverged and not ckpt.exists():  # "has not saved one" would send the user waiting for it
        raise runs.RunError(f"{run_path}: diverged before it saved a checkpoint: there are no weights to score "
                            f"({(run.result or {}).get('message') or 'see its result.json'})")
    state = _checkpoint(run, ckpt)
    name = c.name or _default_name(c.data, c.split)
    if "/" in name or name in ("", ".", ".."):
        raise ConfigError(f"--name {name!r}: a folder name under {run_path / EVAL}, without '/'")
    dest = run_path / EVAL / name
    data_path = str(Path(c.data).resolve())
    _check_free(dest, data_path, c.split)  # early, before any work; again when writing (_writing)
    device = c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available to torch: use --device cpu or auto")

    ds = ImageNetDS(c.data, c.split)
    if ds.image_size != run.image_size:
        raise ConfigError(f"--data {c.data}: its images are {ds.image_size} px, the run {run_path} was trained on "
                          f"{run.image_size} px")
    if len(ds) == 0:
        raise ConfigError(f"--data {c.data}: no {c.split} images")
    mapping = _map_classes(ds, wnids, c)
    ds.classes = names
    try:  # the run's normalisation: the statistics of its training split, opened as the trainer opens it
        _, train_ds, _ = check_environment(dataclasses.replace(tc, device="cpu", compile=False))
        stats = dataclasses.replace(compute_stats(train_ds, tc.normalize), wnids=tuple(wnids))
    except (DSImageNetError, OSError) as e:
        raise runs.RunError(f"{run_path}: its training data {tc.data} normalises the images it is scored on, and "
                            f"cannot be read ({e})") from None

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    net = _model(run, state, ckpt).to(dev)
    if tc.channels_last and cuda:
        net = net.to(memory_format=torch.channels_last)
    loader = Loader(ds, c.batch_size or tc.eval_batch_size, dev, "none", shuffle=False, stats=stats,
                    channels_last=tc.channels_last and cuda)
    with bar(len(ds), "evaluate", unit="img", quiet=c.quiet) as b:
        ev = score(net, _Counted(loader, b), run.num_classes, cuda and tc.bf16, Dist())
    result = {"run": str(run_path), "checkpoint": str(ckpt), "epoch": state.get("epoch"), "step": state.get("step"),
              "data": c.data, "data_resolved": data_path, "split": c.split, "name": name, "images": len(ds),
              **mapping, "top1_error": ev["top1_error"], "top5_error": ev["top5_error"], "loss": ev["val_loss"],
              "device": str(dev), "seconds": round(time.perf_counter() - start, 3)}
    with _writing(dest, data_path, c.split):
        _write_per_class(dest / runs.PER_CLASS, ev["per_class"], ds)
        runs.write_json(dest / runs.RESULT, result)
    if not c.quiet:
        print(f"{run_path} on {c.data} ({c.split}, {len(ds):,} images): top-1 error {ev['top1_error']:.2f}%, "
              f"top-5 error {ev['top5_error']:.2f}%, loss {ev['val_loss']:.4f}; written to {dest}", flush=True)
    return result
