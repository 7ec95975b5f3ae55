"""The paper's figures from runs, as PNG files (matplotlib, no display needed). Each function draws what its
runs allow and returns None when they allow nothing (e.g. Fig. 2 needs more than one method).

Fig. 1 validation images by size and downsampling method, one per class; Fig. 2 error per method and learning rate;
Fig. 3 error vs learning rate per size and width; Fig. 4 heatmaps width x learning rate per size; Fig. 5 error vs
training time with convergence curves; Fig. 6 per-class accuracy, sorted; Fig. 7 validation images of classes
ranked from best to worst, framed green where the prediction is right and red where it is wrong.

Conventions: the titles are the page's captions (``page.CAPTIONS``), not drawn again here; ticks are plain
numbers ("0.05", "20"), never "5x10^-2"; a log axis leaves room past its end points; a legend names what tells its
lines apart (method, size, width, learning rate...), nothing that all lines share; top-5 error is used only with
more than 10 classes (``RunRow.top5_means_something``).
"""

from __future__ import annotations

import csv
import statistics
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsimagenet.report.tables import RunRow, without
from dsimagenet.runs import CHECKPOINT, PER_CLASS

RIGHT, WRONG = "#2ca02c", "#d62728"  # Fig. 7's frames (tests look for these exact colours)


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


def _plain(x, _pos=None) -> str:
    return f"{x:g}"


def log_axis(ax, which: str, values, ticks=None) -> None:
    """A log axis over ``values`` with plain tick labels (at ``ticks``, else 1, 2, 5 times powers of ten) and a
    margin of a quarter of a decade past the smallest and largest value, so that no end point sits on the frame."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis.set_major_locator(FixedLocator(sorted(set(ticks))) if ticks is not None else
                           LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(_plain))
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())
    lo, hi = min(values), max(values)
    (ax.set_xlim if which == "x" else ax.set_ylim)(lo / 10 ** 0.25, hi * 10 ** 0.25)


def _err(r: RunRow, which: str = "top1") -> float:
    ep31 = r.top1_ep31 if which == "top1" else r.top5_ep31
    return ep31 if ep31 is not None else (r.top1 if which == "top1" else r.top5)


def _metric(rows: list[RunRow]) -> tuple[str, str]:
    """("top5", label) where every run has more than 10 classes, else ("top1", label)."""
    return ("top5", "top-5 error (%)") if rows and all(r.top5_means_something for r in rows) else \
        ("top1", "top-1 error (%)")


FIRST = ("method", "size", "model", "lr", "epochs", "classes")


def labels(settings: list[dict]) -> list[str]:
    """A label for each setting from what differs between them (method, size, WRN-d-k, lr, epochs, classes,
    then any other field as name=value, the seed last); the model where nothing differs."""
    def value(s: dict, k: str):
        return f"WRN-{s['depth']}-{s['width']:g}" if k == "model" else s.get(k)

    keys = [k for k in dict.fromkeys([*FIRST, *(k for s in settings for k in s)])
            if k not in ("depth", "width", "data") and len({repr(value(s, k)) for s in settings}) > 1]
    if "data" in {k for s in settings for k in s} and len({s.get("data") for s in settings}) > 1 and not \
            {"size", "method", "classes"} & set(keys):
        keys.append("data")  # other data of the same size and method: say so rather than draw twins

    def word(s: dict, k: str) -> str:
        v = value(s, k)
        if k in ("method", "model"):
            return str(v)
        if k == "lr":
            return f"lr {v:g}"
        if k == "data":
            return f"data {str(v)[:8]}"
        unit = {"size": " px", "epochs": " epochs", "classes": " classes"}.get(k)
        return f"{v}{unit}" if unit else f"seed {v}" if k == "seed" else f"{k}={v}"

    return [", ".join(word(s, k) for k in keys) or value(s, "model") for s in settings]


def _lines(rows: list[RunRow], x: str = "lr") -> dict[tuple, dict[float, list[RunRow]]]:
    """{setting without ``x``: {x value: [runs]}}: one line of a plot per setting, its points over ``x``."""
    out: dict[tuple, dict[float, list[RunRow]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        out[without(r.setting, x)][getattr(r, x)].append(r)
    return out


def fig1_methods(runs, out: Path, n: int = 10) -> Path | None:
    """One validation image of each of the first ``n`` classes, the same images in each dataset the runs used,
    one row per (size, method), the class names above the columns."""
    from dsimagenet.dataset import open_dataset
    from dsimagenet.errors import DSImageNetError

    datasets = {}
    for r in runs:
        c = r.train_config
        datasets.setdefault((r.image_size, r.method or "?"), (c.data, c.order, c.classes))
    shown = []
    for key in sorted(datasets):
        data, order, classes = datasets[key]
        try:
            val = open_dataset(data, "val", order, classes)
        except (OSError, ValueError, DSImageNetError):  # data moved or removed since: a row less, not a failure
            continue
        firsts = [int(np.flatnonzero(val.targets == k)[0]) for k in range(len(val.classes))
                  if (val.targets == k).any()][:n]
        shown.append((key, [np.asarray(val.data[i]) for i in firsts], [val.classes[val.targets[i]] for i in firsts]))
    if not shown:
        return None
    plt = _plt()
    cols = max(len(s[1]) for s in shown)
    fig, axes = plt.subplots(len(shown), cols, figsize=(cols * 1.15, len(shown) * 1.25 + 0.3), squeeze=False)
    for i, (key, imgs, names) in enumerate(shown):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(imgs):
                ax.imshow(imgs[j], interpolation="nearest")
                if i == 0:  # two short lines rather than one that runs into its neighbours
                    ax.set_title(textwrap.fill(names[j], 16, max_lines=2, placeholder="..."), fontsize=6)
        axes[i][0].set_ylabel(f"{key[0]} px\n{key[1]}", fontsize=8, rotation=0, ha="right", va="center")
    return _save(fig, out / "fig1_methods.png")


def fig2_methods_lr(rows: list[RunRow], out: Path) -> Path | None:
    """Error over the learning rate, a line per method (and whatever else differs), mean over seeds."""
    if len({r.method for r in rows}) < 2:
        return None
    which, ylabel = _metric(rows)
    lines = _lines(rows)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = labels([dict(k) for k in lines])
    for (_key, d), name in sorted(zip(lines.items(), names, strict=True), key=lambda t: t[1]):
        lrs = sorted(d)
        ax.plot(lrs, [statistics.fmean(_err(r, which) for r in d[x]) for x in lrs], "o-", label=name)
    log_axis(ax, "x", [r.lr for r in rows], ticks=[r.lr for r in rows])
    ax.set(xlabel="learning rate", ylabel=ylabel + ", mean over seeds")
    ax.legend(fontsize=8)
    return _save(fig, out / "fig2_methods_lr.png")


def one_method(rows: list[RunRow]) -> tuple[list[RunRow], str]:
    """The rows of the paper's box filter if any, else of the most common method: Figs. 3 and 4 compare sizes,
    widths and learning rates, not methods (Fig. 2 does that)."""
    methods = [r.method for r in rows]
    m = "box" if "box" in methods else max(set(methods), key=methods.count)
    return [r for r in rows if r.method == m], m


def fig3_lr(rows: list[RunRow], out: Path) -> Path | None:
    rows, method = one_method(rows)
    lines = _lines(rows)
    if all(len(v) < 2 for v in lines.values()):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = labels([dict(k) for k in lines])
    for (_key, d), name in sorted(zip(lines.items(), names, strict=True), key=lambda t: t[1]):
        lrs = sorted(d)
        ax.plot(lrs, [statistics.fmean(_err(r) for r in d[x]) for x in lrs], "o-", label=name)
    log_axis(ax, "x", [r.lr for r in rows], ticks=[r.lr for r in rows])
    ax.set(xlabel="learning rate", ylabel=f"top-1 error (%), {method}, mean over seeds")
    if len(lines) > 1:  # one line needs no legend: the caption and the axes say what it is
        ax.legend(fontsize=8)
    return _save(fig, out / "fig3_lr.png")


def fig4_heatmaps(rows: list[RunRow], out: Path) -> Path | None:
    rows, method = one_method(rows)
    families = defaultdict(list)  # the most common setting but for size, depth, width and lr: one grid of cells
    for r in rows:
        families[without(r.setting, "lr", "size", "depth", "width", "data")].append(r)
    rows = max(families.values(), key=len)
    sizes = sorted({r.size for r in rows})
    cells = defaultdict(list)
    for r in rows:
        cells[(r.size, r.width, r.lr)].append(_err(r))
    if not any(len({r.width for r in rows if r.size == s}) > 1 and len({r.lr for r in rows if r.size == s}) > 1
               for s in sizes):  # one width is Fig. 3's line again, one learning rate a column of numbers
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.2), squeeze=False)
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
               yticklabels=[f"{w:g}" for w in widths], xlabel="learning rate", ylabel="width k",
               title=f"{s} px, {method}")
        for i in range(len(widths)):
            for j in range(len(lrs)):
                dark = not np.isnan(m[i, j]) and m[i, j] > np.nanmean(m)  # viridis_r: high error is dark
                ax.text(j, i, "-" if np.isnan(m[i, j]) else f"{m[i, j]:.1f}", ha="center", va="center",
                        fontsize=8, color="w" if dark else "k")
        fig.colorbar(im, ax=ax, label="top-1 error (%)")
    return _save(fig, out / "fig4_heatmaps.png")


MAX_LEGEND = 16


def fig5_time(runs, rows: list[RunRow], out: Path) -> Path | None:
    """Each run's top-1 error after each epoch over its training time; the seeds of a setting share a colour and
    a legend entry."""
    curves = [(r, row, r.metrics) for r, row in zip(runs, rows, strict=True) if r.metrics]
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    settings = list(dict.fromkeys(row.setting for _, row, _ in curves))
    names = dict(zip(settings, labels([dict(s) for s in settings]), strict=True))
    colours = {s: plt.cm.tab10(i % 10) if len(settings) <= 10 else plt.cm.viridis(i / (len(settings) - 1))
               for i, s in enumerate(sorted(settings, key=lambda s: names[s]))}
    ts, labelled = [], set()
    for _, row, m in curves:
        t = [max(x["train_seconds"], 1e-3) for x in m]
        ts += t
        first = row.setting not in labelled
        labelled.add(row.setting)
        ax.plot(t, [x["top1_error"] for x in m], "-", lw=1.2, alpha=0.85, color=colours[row.setting],
                label=names[row.setting] if first else None)
        ax.plot(t[-1:], [m[-1]["top1_error"]], "o", ms=4, color=colours[row.setting])
    log_axis(ax, "x", ts)
    ax.set(xlabel="training time (s)", ylabel="top-1 error (%)")
    ax.margins(y=0.08)
    if len(settings) <= MAX_LEGEND:
        ax.legend(fontsize=7, ncol=2 if len(settings) > 6 else 1)
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


MAX_BARS = 30


def fig6_per_class(run, out: Path) -> Path | None:
    """Per-class top-1 (and, with more than 10 classes, top-5) accuracy, best class first: bars named by class
    for up to 30 classes, else a curve over the class rank."""
    from matplotlib.ticker import MaxNLocator

    rows = per_class(run)
    if not rows:
        return None
    top5 = run.num_classes > 10
    plt = _plt()
    rows = sorted(rows, key=lambda r: (-r[2], r[1]))
    if len(rows) <= MAX_BARS:
        fig, ax = plt.subplots(figsize=(max(5.0, 0.38 * len(rows) + 1.5), 3.8))
        x = np.arange(len(rows))
        w = 0.4 if top5 else 0.7
        ax.bar(x - (w / 2 if top5 else 0), [r[2] for r in rows], w, label="top-1", color="#1f77b4")
        if top5:
            ax.bar(x + w / 2, [r[3] for r in rows], w, label="top-5", color="#ff7f0e")
        ax.set_xticks(x, [r[1] for r in rows], rotation=40, ha="right", fontsize=7)
        ax.set(ylabel="accuracy (%)", ylim=(0, 101))
    else:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ranks = np.arange(1, len(rows) + 1)
        if top5:
            ax.plot(ranks, sorted((r[3] for r in rows), reverse=True), label="top-5")
        ax.plot(ranks, [r[2] for r in rows], label="top-1")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="class rank (best first)", ylabel="accuracy (%)", ylim=(0, 101), xlim=(1, len(rows)))
    if top5:
        ax.legend(fontsize=8)
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
    """Validation images of the classes ranked 1st, 1/4, 1/2, 3/4 and last by top-1 accuracy, framed green where
    the run's checkpoint predicts the true class (in its top 5 with more than 10 classes, else its top 1) and red
    where not, the wrong prediction named under the image."""
    import torch

    from dsimagenet.data import Loader, compute_stats
    from dsimagenet.dataset import open_dataset
    from dsimagenet.errors import DSImageNetError

    rows = per_class(run)
    if not rows or not (Path(run.path) / CHECKPOINT).exists():
        return None
    c = run.train_config
    classes = run.class_wnids if run.class_wnids is not None else c.classes  # the head's classes (C-way heads)
    try:
        train_ds = open_dataset(c.data, "train", c.order, classes)
        val = open_dataset(c.data, "val", c.order, classes)
    except (OSError, ValueError, DSImageNetError):
        return None
    model = run.model()
    k = 5 if model.num_classes > 10 else 1
    ranked = sorted(range(len(rows)), key=lambda i: -rows[i][2])
    picks = list(dict.fromkeys(ranked[round(q * (len(ranked) - 1))] for q in (0, 0.25, 0.5, 0.75, 1)))  # best first
    idx_of = {w: i for i, w in enumerate(val.wnids)}
    stats = compute_stats(train_ds, c.normalize)  # the mean image from the files: no copy of the split
    plt = _plt()
    fig, axes = plt.subplots(len(picks), per_class_images, figsize=(per_class_images * 1.15, len(picks) * 1.45),
                             squeeze=False)
    for row, p in enumerate(picks):
        label = idx_of[rows[p][0]]
        where = np.flatnonzero(val.targets == label)[:per_class_images]
        for j in range(per_class_images):
            axes[row][j].axis("off")
        if len(where) == 0:
            continue
        loader = Loader(_Rows(val.data[where], val.targets[where]), len(where), "cpu", augment="none",
                        shuffle=False, stats=stats)
        x, y = next(iter(loader.epoch(0)))
        with torch.no_grad():
            top = model(x).topk(min(k, model.num_classes), 1).indices
        ok = (top == y[:, None]).any(1).tolist()
        for j in range(len(where)):
            ax = axes[row][j]
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(np.asarray(val.data[where[j]]), interpolation="nearest")
            for spine in ax.spines.values():
                spine.set(color=RIGHT if ok[j] else WRONG, linewidth=3)
            if not ok[j] and k == 1:
                ax.set_xlabel(val.classes[int(top[j, 0])], fontsize=6, color=WRONG)
        axes[row][0].set_title(f"#{ranked.index(p) + 1}: {rows[p][1]} ({rows[p][2]:.0f}% top-1)", fontsize=7,
                               loc="left")
    return _save(fig, out / "fig7_ranked_classes.png")
