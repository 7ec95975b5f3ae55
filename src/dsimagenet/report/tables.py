"""Tables from runs: our Table 1 (and the paper's, beside ours only where the runs compare with it), and the rank
correlations of learning-rate rankings between resolutions and between widths (the paper's claim, as a number).

Runs are grouped by their *setting*: every recipe field, the data and what the data decided, all but the seed.
Only runs of one setting are seeds of each other (a 1-epoch and a 2-epoch run are two settings, never "2 seeds").
Missing cells are shown as missing (``-``), never invented; top-5 error is left out where a run has 10 classes or
fewer (it is then nearly always 0).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources

PAPER_EPOCH = 31  # the paper's Table 1 gives the errors after epoch 31
PAPER_CLASSES = 1000
TOP5_MIN_CLASSES = 11  # with 10 classes or fewer, the true class is in the top 5 of half of them or more
# Recipe fields that are free to differ from the paper's defaults in a comparable run: what Table 1 varies (size,
# depth, width, and the best lr), the seed, how long after epoch 31 it went on, and how the hardware computes;
# the classes, images per class and the reported epoch are checked on their own (``why_not_comparable``).
FREE = frozenset({"size", "depth", "width", "lr", "seed", "epochs", "device", "bf16", "channels_last", "order",
                  "classes", "max_per_class", "report_epoch"})


@dataclass(frozen=True)
class RunRow:
    """What the report needs of one finished run. ``setting``: (name, value) pairs of everything that decides
    the result but the seed; ``comparable``: why not comparable with the paper's Table 1 ("" when it is)."""

    path: str
    size: int
    depth: int
    width: float
    lr: float
    seed: int
    method: str
    params: int
    top1: float
    top5: float
    top1_ep31: float | None
    top5_ep31: float | None
    seconds: float
    classes: int = PAPER_CLASSES
    epochs: int = 0
    setting: tuple = ()
    not_comparable: str = field(default="", compare=False)

    @property
    def top5_means_something(self) -> bool:
        return self.classes >= TOP5_MIN_CLASSES

    def facts(self) -> dict:
        return dict(self.setting)


def setting_of(run) -> tuple:
    """Everything that decides a run's result but its seed, as sorted (name, value) pairs: the recipe fields
    (those a resume compares), the data's fingerprint and what the data decided (size, depth, classes, method)."""
    from dsimagenet.recipe import OPERATIONAL

    c = dataclasses.asdict(run.train_config)
    s = {k: v for k, v in c.items() if k not in OPERATIONAL and k != "seed"}
    s.update(size=run.image_size, depth=run.depth, classes=run.num_classes, method=run.method or "?",
             data=run.config.get("dataset_fingerprint") or c["data"])
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in s.items()))


def why_not_comparable(run) -> str:
    """"" if the run compares with the paper's Table 1 (all 1000 classes, the paper's recipe, errors after epoch
    31), else what differs, in words."""
    from dsimagenet.recipe import OPERATIONAL, TrainConfig

    c, paper = run.train_config, TrainConfig(data="-", out="-")  # the defaults are the paper's
    why = []
    if run.num_classes != PAPER_CLASSES or c.max_per_class is not None:
        why.append(f"{run.num_classes} classes" + (f", at most {c.max_per_class} images each"
                                                   if c.max_per_class is not None else ""))
    if run.errors_at(PAPER_EPOCH)[0] is None:
        why.append(f"{c.epochs} epochs" if c.epochs < PAPER_EPOCH else f"no errors after epoch {PAPER_EPOCH}")
    for f in dataclasses.fields(TrainConfig):
        if f.name not in OPERATIONAL and f.name not in FREE and getattr(c, f.name) != getattr(paper, f.name):
            v = getattr(c, f.name)
            why.append(f"{f.name} {', '.join(map(str, v)) if isinstance(v, tuple) else v}")
    return "; ".join(why)


def rows_of(runs) -> list[RunRow]:
    out = []
    for r in runs:
        c, res = r.train_config, r.result
        top1_ep31, top5_ep31 = r.errors_at(PAPER_EPOCH)
        out.append(RunRow(str(r.path), r.image_size, r.depth, float(c.width), float(c.lr), c.seed,
                          r.method or "?", int(res["params"]), res["top1_error"], res["top5_error"], top1_ep31,
                          top5_ep31, res["train_seconds"], r.num_classes, c.epochs, setting_of(r),
                          why_not_comparable(r)))
    return out


def without(setting: tuple, *names: str) -> tuple:
    return tuple((k, v) for k, v in setting if k not in names)


def paper_table() -> list[dict]:
    text = resources.files("dsimagenet.resources").joinpath("paper_table1.csv").read_text()
    return list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))


def _mean_std(xs: list) -> tuple[float, float | None] | None:
    """(mean, sample standard deviation), the deviation None for a single value; None for none."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def score(rs: list[RunRow]) -> float:
    """The mean top-1 error of runs of one setting: after epoch 31 where they all have it, else the final."""
    if all(r.top1_ep31 is not None for r in rs):
        return statistics.fmean(r.top1_ep31 for r in rs)
    return statistics.fmean(r.top1 for r in rs)


def table1(rows: list[RunRow]) -> list[dict]:
    """Our Table 1: one line per (size, depth, width, classes, method), showing the setting (learning rate,
    epochs...) with the lowest mean top-1 error, its seeds (runs of that setting alone) and their mean ± standard
    deviation. The paper's numbers join a line only where its runs compare with the paper (``why_not_comparable``)."""
    groups: dict[tuple, dict[tuple, list[RunRow]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r.size, r.depth, r.width, r.classes, r.method)][r.setting].append(r)
    paper = {(int(p["size"]), int(p["depth"]), float(p["width"])): p for p in paper_table()}
    out = []
    for k in sorted(groups):
        rs = min(groups[k].values(), key=score)
        top5 = rs[0].top5_means_something
        line = {"size": k[0], "model": f"WRN-{k[1]}-{k[2]:g}", "classes": k[3], "epochs": rs[0].epochs,
                "params": rs[0].params, "lr": rs[0].lr, "method": rs[0].method, "seeds": len({r.seed for r in rs}),
                "top1_ep31": _mean_std([r.top1_ep31 for r in rs]),
                "top5_ep31": _mean_std([r.top5_ep31 for r in rs]) if top5 else None,
                "top1_final": _mean_std([r.top1 for r in rs]),
                "top5_final": _mean_std([r.top5 for r in rs]) if top5 else None,
                "hours": statistics.fmean(r.seconds for r in rs) / 3600, "not_comparable": rs[0].not_comparable}
        p = paper.get(k[:3])
        if p and not rs[0].not_comparable and rs[0].method == "box":  # the paper's Table 1 is of box
            line.update(paper_top1=float(p["top1_error_pct"]), paper_top5=float(p["top5_error_pct"]))
        out.append(line)
    return out


def _duration(hours: float) -> str:
    s = hours * 3600
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{hours:.1f} h"


def _fmt(v, nd=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, tuple):
        m, s = v
        return f"{m:.{nd}f}" + (f" ± {s:.{nd}f}" if s is not None else "")
    if isinstance(v, float):
        return f"{v:.{nd}f}" if not math.isnan(v) else "-"
    return str(v)


COLUMNS = [("size", "size"), ("model", "model"), ("classes", "classes"), ("epochs", "epochs"), ("params", "params"),
           ("lr", "lr"), ("method", "method"), ("seeds", "seeds"), ("top1_ep31", f"top-1 ep{PAPER_EPOCH} (%)"),
           ("top5_ep31", f"top-5 ep{PAPER_EPOCH} (%)"), ("top1_final", "top-1 final (%)"),
           ("top5_final", "top-5 final (%)"), ("hours", "train time"), ("paper_top1", "paper top-1 (%)"),
           ("paper_top5", "paper top-5 (%)")]
PAPER_COLUMNS = [("size", "size"), ("model", "model"), ("paper_params_m", "params (M)"),
                 ("paper_top1", f"top-1 ep{PAPER_EPOCH} (%)"), ("paper_top5", f"top-5 ep{PAPER_EPOCH} (%)"),
                 ("paper_titan_x_days", "Titan X days (40 epochs)")]


def _cell(line: dict, k: str) -> str:
    v = line.get(k)
    if v is not None and k == "params":
        return f"{v:,}"
    if v is not None and k == "hours":
        return _duration(v)
    if v is not None and k == "lr":
        return f"{v:g}"
    return _fmt(v)


def table_cells(lines: list[dict], columns=None) -> tuple[list[str], list[list[str]]]:
    """Header and cells of ``lines``; a column no line fills (top-5 for 10 classes, epoch 31 of a short run, the
    paper's where nothing compares) is left out."""
    columns = [(k, h) for k, h in (columns or COLUMNS) if any(line.get(k) is not None for line in lines)]
    return [h for _, h in columns], [[_cell(line, k) for k, _ in columns] for line in lines]


def paper_lines() -> list[dict]:
    """The paper's Table 1 (full ImageNet, 1000 classes, errors after epoch 31 of 40)."""
    return [{"size": int(p["size"]), "model": f"WRN-{p['depth']}-{float(p['width']):g}",
             "paper_params_m": float(p["params_millions"]), "paper_top1": float(p["top1_error_pct"]),
             "paper_top5": float(p["top5_error_pct"]), "paper_titan_x_days": float(p["titan_x_days"])}
            for p in paper_table()]


def markdown(head: list[str], body: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(out) + "\n"


def latex(head: list[str], body: list[list[str]]) -> str:
    esc = lambda s: s.replace("%", r"\%").replace("±", r"$\pm$").replace("_", r"\_")  # noqa: E731
    out = [r"\begin{tabular}{" + "l" * len(head) + "}", r"\hline", " & ".join(map(esc, head)) + r" \\", r"\hline"]
    out += [" & ".join(map(esc, r)) + r" \\" for r in body]
    out += [r"\hline", r"\end{tabular}"]
    return "\n".join(out) + "\n"


# --- do the best learning rates carry over? -------------------------------------------------------------------

MIN_SHARED_LRS = 3


def label(key: tuple) -> str:
    size, width, family = key
    return f"{size} px, k={width:g}" + (f", {family}" if family else "")


def _families(rows: list[RunRow]) -> dict[tuple, str]:
    """Each family (a setting without lr, size, depth, width and data) named by what tells it from the others:
    the method, the epochs, the classes, or its number."""
    fams = sorted({without(r.setting, "lr", "size", "depth", "width", "data") for r in rows}, key=repr)
    if len(fams) == 1:
        return {fams[0]: ""}
    varying = [k for k in ("method", "epochs", "classes") if len({dict(f).get(k) for f in fams}) > 1]
    names = {}
    for i, f in enumerate(fams):
        d = dict(f)
        parts = [str(d["method"]) if k == "method" else f"{d[k]} {k}" for k in varying]
        names[f] = ", ".join(parts) or f"setting {i + 1}"
    if len(set(names.values())) < len(names):  # they differ in something else too
        names = {f: (n + ", " if n else "") + f"setting {i + 1}" for i, (f, n) in enumerate(names.items())}
    return names


def lr_rankings(rows: list[RunRow]) -> dict[tuple, dict[float, float]]:
    """{(size, width, family name): {lr: mean top-1 error}} (after epoch 31 where a run has it, else final)."""
    fams = _families(rows)
    err: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        fam = fams[without(r.setting, "lr", "size", "depth", "width", "data")]
        err[(r.size, r.width, fam)][r.lr].append(r.top1_ep31 if r.top1_ep31 is not None else r.top1)
    return {k: {lr: statistics.fmean(v) for lr, v in d.items()} for k, d in err.items()}


def ranking(errors: dict[float, float], lrs=None) -> str:
    """The learning rates from best (lowest error) to worst: "0.05 < 0.2 < 0.01"."""
    lrs = sorted(errors if lrs is None else lrs, key=lambda x: (errors[x], x))
    return " < ".join(f"{x:g}" for x in lrs)


def lr_rank_correlations(rows: list[RunRow]) -> list[dict]:
    """Spearman correlation of the learning-rate rankings (mean top-1 error per lr) between pairs of sizes at the
    same width, and between pairs of widths at the same size, within one family of settings, over the learning
    rates both have (at least 3); with the two rankings compared."""
    from scipy.stats import spearmanr

    means = lr_rankings(rows)
    out = []
    keys = sorted(means)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            same_width, same_size = a[1] == b[1], a[0] == b[0]
            if a[2] != b[2] or not (same_width or same_size):
                continue
            common = sorted(set(means[a]) & set(means[b]))
            if len(common) < MIN_SHARED_LRS:
                continue
            rho = spearmanr([means[a][x] for x in common], [means[b][x] for x in common]).statistic
            out.append({"between": "sizes" if same_width else "widths", "a": label(a), "b": label(b),
                        "learning_rates": len(common), "spearman": float(rho),
                        "ranking_a": ranking(means[a], common), "ranking_b": ranking(means[b], common)})
    return out


def correlation_needs(rows: list[RunRow]) -> str:
    """What runs the correlations need, said when there are none: the sizes, widths and learning rates the runs
    have, and what to add."""
    means = lr_rankings(rows)
    sizes, widths = sorted({k[0] for k in means}), sorted({k[1] for k in means})
    have = (f"these runs have {len(sizes)} size{'s' * (len(sizes) > 1)} ({', '.join(f'{s} px' for s in sizes)}) "
            f"and {len(widths)} width{'s' * (len(widths) > 1)} ({', '.join(f'k={w:g}' for w in widths)})")
    return (f"It needs runs of two sizes at the same width, or two widths at the same size, at the same "
            f"{MIN_SHARED_LRS} or more learning rates, all else equal; {have}. For example, a sweep with "
            f"--grid \"lr=0.01,0.03,0.1 width=1,2\".")
