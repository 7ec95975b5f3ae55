"""The paper's figures from runs, as PNG files (matplotlib, no display needed). Each function draws what its
runs allow and returns None when they allow nothing (e.g. Fig. 2 needs more than one learning rate).

Fig. 1 images by downsampling method; Fig. 2 top-5 error per method and learning rate; Fig. 3 error vs learning
rate per size and width; Fig. 4 heatmaps width x learning rate per size; Fig. 5 error vs training time with
convergence curves; Fig. 6 per-class accuracy, sorted; Fig. 7 validation images of classes ranked from best to
worst, framed green where the top-5 prediction is right and red where it is wrong.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsimagenet.report.tables import RunRow
from dsimagenet.runs import CHECKPOINT, PER_CLASS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _err(r: RunRow, which: str = "top1") -> float:
    ep31 = r.top1_ep31 if which == "top1" else r.top5_ep31
    return ep31 if ep31 is not None else (r.top1 if which == "top1" else r.top5)


def fig1_methods(runs, out: Path, n: int = 8) -> Path | None:
    """The first validation images of each dataset the runs used, one row per (size, method)."""
    from dsimagenet.dataset import open_dataset

    datasets = {}
    for r in runs:
        datasets.setdefault((r.image_size, r.method or "?"), r.train_config.data)
    if not datasets:
        return None
    plt = _plt()
    keys = sorted(datasets)
    fig, axes = plt.subplots(len(keys), n, figsize=(n * 1.1, len(keys) * 1.2), squeeze=False)
    for i, key in enumerate(keys):
        try:
            imgs = open_dataset(datasets[key], "val").data[:n]
        except (OSError, ValueError):
            imgs = []
        for j in range(n):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(imgs):
                ax.imshow(np.asarray(imgs[j]), interpolation="nearest")
        axes[i][0].set_title(f"{key[0]} px, {key[1]}", fontsize=8, loc="left")
    return _save(fig, out / "fig1_methods.png")


def fig2_methods_lr(rows: list[RunRow], out: Path) -> Path | None:
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[r.method][r.lr].append(_err(r, "top5"))
    if len(by) < 2 and all(len(v) < 2 for v in by.values()):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, d in sorted(by.items()):
        lrs = sorted(d)
        ax.plot(lrs, [statistics.fmean(d[x]) for x in lrs], "o-", label=method)
    ax.set(xscale="log", xlabel="learning rate", ylabel="top-5 error (%), mean over seeds",
           title="Fig. 2: downsampling methods")
    ax.legend()
    return _save(fig, out / "fig2_methods_lr.png")


def one_method(rows: list[RunRow]) -> tuple[list[RunRow], str]:
    """The rows of the paper's box filter if any, else of the most common method: Figs. 3 and 4 compare sizes,
    widths and learning rates, not methods (Fig. 2 does that)."""
    methods = [r.method for r in rows]
    m = "box" if "box" in methods else max(set(methods), key=methods.count)
    return [r for r in rows if r.method == m], m


def fig3_lr(rows: list[RunRow], out: Path) -> Path | None:
    rows, method = one_method(rows)
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[(r.size, r.width)][r.lr].append(_err(r))
    if all(len(v) < 2 for v in by.values()):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for (size, width), d in sorted(by.items()):
        lrs = sorted(d)
        ax.plot(lrs, [statistics.fmean(d[x]) for x in lrs], "o-", label=f"{size} px, k={width:g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="top-1 error (%)",
           title=f"Fig. 3: error vs learning rate ({method})")
    ax.legend(fontsize=7)
    return _save(fig, out / "fig3_lr.png")


def fig4_heatmaps(rows: list[RunRow], out: Path) -> Path | None:
    rows, method = one_method(rows)
    sizes = sorted({r.size for r in rows})
    cells = defaultdict(list)
    for r in rows:
        cells[(r.size, r.width, r.lr)].append(_err(r))
    if not any(len({r.width for r in rows if r.size == s}) > 1 or len({r.lr for r in rows if r.size == s}) > 1
               for s in sizes):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 3.2), squeeze=False)
    for ax, s in zip(axes[0], sizes, strict=True):
        widths = sorted({r.width for r in rows if r.size == s})
        lrs = sorted({r.lr for r in rows if r.size == s})
        m = np.full((len(widths), len(lrs)), np.nan)
        for i, w in enumerate(widths):
            for j, lr in enumerate(lrs):
                if cells.get((s, w, lr)):
                    m[i, j] = statistics.fmean(cells[(s, w, lr)])
        im = ax.imshow(m, cmap="viridis_r", aspect="auto")
        ax.set(xticks=range(len(lrs)), xticklabels=[f"{x:g}" for x in lrs], yticks=range(len(widths)),
               yticklabels=[f"{w:g}" for w in widths], xlabel="learning rate", ylabel="width k", title=f"{s} px")
        for i in range(len(widths)):
            for j in range(len(lrs)):
                dark = not np.isnan(m[i, j]) and m[i, j] > np.nanmean(m)  # viridis_r: high error is dark
                ax.text(j, i, "-" if np.isnan(m[i, j]) else f"{m[i, j]:.1f}", ha="center", va="center",
                        fontsize=7, color="w" if dark else "k")
        fig.colorbar(im, ax=ax, label="top-1 error (%)")
    fig.suptitle(f"Fig. 4: width x learning rate ({method})")
    return _save(fig, out / "fig4_heatmaps.png")


def fig5_time(runs, out: Path) -> Path | None:
    curves = [(r, r.metrics) for r in runs if r.metrics]
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r, m in curves:
        c = r.train_config
        t = [max(x["train_seconds"], 1e-3) for x in m]
        ax.plot(t, [x["top1_error"] for x in m], "-", lw=1, alpha=0.8,
                label=f"{r.image_size} px WRN-{r.depth}-{c.width:g} lr {c.lr:g}")
        ax.plot(t[-1:], [m[-1]["top1_error"]], "o", ms=4, color=ax.lines[-1].get_color())
    ax.set(xscale="log", yscale="log", xlabel="training time (s)", ylabel="top-1 error (%)",
           title="Fig. 5: error vs training time")
    if len(curves) <= 12:
        ax.legend(fontsize=6)
    return _save(fig, out / "fig5_time.png")


def per_class(run) -> list[tuple[str, str, float, float]] | None:
    path = Path(run.path) / PER_CLASS
    if not path.exists():
        return None
    rows = []
    for line in csv.DictReader(open(path)):
        if line["top1_accuracy"]:
            rows.append((line["wnid"], line["name"], float(line["top1_accuracy"]), float(line["top5_accuracy"])))
    return rows


def fig6_per_class(run, out: Path) -> Path | None:
    rows = per_class(run)
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, label in ((3, "top-5"), (2, "top-1")):
        ax.plot(sorted((r[k] for r in rows), reverse=True), label=label)
    ax.set(xlabel="classes, sorted", ylabel="accuracy (%)", ylim=(0, 101),
           title=f"Fig. 6: per-class accuracy ({Path(run.path).name})")
    ax.legend()
    return _save(fig, out / "fig6_per_class.png")


@dataclass
class _Rows:
    """Some rows of a split, as the Loader takes them."""

    data: np.ndarray
    targets: np.ndarray
    mean: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.data)


def fig7_ranked_classes(run, out: Path, per_class_images: int = 6) -> Path | None:
    """Validation images of the classes ranked 1st, 1/4, 1/2, 3/4 and last by top-1 accuracy, framed green
    where the run's checkpoint has the true class in its top 5, red where not."""
    import torch

    from dsimagenet.data import Loader, compute_stats
    from dsimagenet.dataset import open_dataset

    rows = per_class(run)
    if not rows or not (Path(run.path) / CHECKPOINT).exists():
        return None
    c = run.train_config
    classes = run.class_wnids if run.class_wnids is not None else c.classes  # the head's classes (C-way heads)
    try:
        train_ds = open_dataset(c.data, "train", c.order, classes)
        val = open_dataset(c.data, "val", c.order, classes)
    except (OSError, ValueError):
        return None
    model = run.model()
    ranked = sorted(range(len(rows)), key=lambda i: -rows[i][2])
    picks = list(dict.fromkeys(ranked[round(q * (len(ranked) - 1))] for q in (0, 0.25, 0.5, 0.75, 1)))  # best first
    idx_of = {w: i for i, w in enumerate(val.wnids)}
    stats = compute_stats(train_ds, c.normalize)  # the mean image from the files: no copy of the split
    plt = _plt()
    fig, axes = plt.subplots(len(picks), per_class_images, figsize=(per_class_images * 1.1, len(picks) * 1.3),
                             squeeze=False)
    for row, p in enumerate(picks):
        label = idx_of[rows[p][0]]
        where = np.flatnonzero(val.targets == label)[:per_class_images]
        if len(where) == 0:
            continue
        loader = Loader(_Rows(val.data[where], val.targets[where]), len(where), "cpu", augment="none",
                        shuffle=False, stats=stats)
        x, y = next(iter(loader.epoch(0)))
        with torch.no_grad():
            top5 = model(x).topk(min(5, model.num_classes), 1).indices
        ok = (top5 == y[:, None]).any(1).tolist()
        for j in range(per_class_images):
            ax = axes[row][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(where):
                ax.imshow(np.asarray(val.data[where[j]]), interpolation="nearest")
                for spine in ax.spines.values():
                    spine.set(color="green" if ok[j] else "red", linewidth=3)
            else:
                ax.axis("off")
        axes[row][0].set_title(f"#{ranked.index(p) + 1}: {rows[p][1]} ({rows[p][2]:.0f}%)", fontsize=7, loc="left")
    return _save(fig, out / "fig7_ranked_classes.png")
