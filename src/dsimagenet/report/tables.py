"""Tables from runs: the paper's Table 1 with our numbers beside its own, and the rank correlations of
learning-rate rankings between resolutions and between widths (the paper's claim, as a number).

Missing cells are shown as missing (``-``), never invented.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources

PAPER_EPOCH = 31  # the paper's Table 1 gives the errors after epoch 31


@dataclass(frozen=True)
class RunRow:
    """What the report needs of one finished run."""

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


def rows_of(runs) -> list[RunRow]:
    out = []
    for r in runs:
        c, res = r.train_config, r.result
        top1_ep31, top5_ep31 = r.errors_at(PAPER_EPOCH)
        out.append(RunRow(str(r.path), r.image_size, r.depth, float(c.width), float(c.lr), c.seed,
                          r.method or "?", int(res["params"]), res["top1_error"], res["top5_error"], top1_ep31,
                          top5_ep31, res["train_seconds"]))
    return out


def paper_table() -> list[dict]:
    text = resources.files("dsimagenet.resources").joinpath("paper_table1.csv").read_text()
    return list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))


def _mean_std(xs: list[float]) -> tuple[float, float] | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table1(rows: list[RunRow]) -> list[dict]:
    """One line per (size, depth, width), the paper's rows first. Where several learning rates or methods were
    run, the line shows the one with the lowest mean top-1 error after epoch 31 (else final), and says which."""
    groups: dict[tuple, dict[tuple, list[RunRow]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r.size, r.depth, r.width)][(r.lr, r.method)].append(r)
    keys = [(int(p["size"]), int(p["depth"]), float(p["width"])) for p in paper_table()]
    keys += sorted(k for k in groups if k not in keys)
    paper = {(int(p["size"]), int(p["depth"]), float(p["width"])): p for p in paper_table()}
    out = []
    for k in keys:
        line = {"size": k[0], "model": f"WRN-{k[1]}-{k[2]:g}"}
        p = paper.get(k)
        line.update(paper_params_m=float(p["params_millions"]) if p else None,
                    paper_top1=float(p["top1_error_pct"]) if p else None,
                    paper_top5=float(p["top5_error_pct"]) if p else None,
                    paper_titan_x_days=float(p["titan_x_days"]) if p else None)
        if k in groups:
            def score(item):
                rs = item[1]
                vals = [r.top1_ep31 if r.top1_ep31 is not None else r.top1 for r in rs]
                return statistics.fmean(vals)
            (lr, method), rs = min(groups[k].items(), key=score)
            t1, t5 = _mean_std([r.top1_ep31 for r in rs]), _mean_std([r.top5_ep31 for r in rs])
            f1, f5 = _mean_std([r.top1 for r in rs]), _mean_std([r.top5 for r in rs])
            line.update(params=rs[0].params, lr=lr, method=method, seeds=len(rs), top1_ep31=t1, top5_ep31=t5,
                        top1_final=f1, top5_final=f5, hours=statistics.fmean(r.seconds for r in rs) / 3600)
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
        return f"{m:.{nd}f} ± {s:.{nd}f}"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if not math.isnan(v) else "-"
    return str(v)


COLUMNS = [("size", "size"), ("model", "model"), ("params", "params"), ("lr", "lr"), ("method", "method"),
           ("seeds", "seeds"), ("top1_ep31", "top-1 ep31 (%)"), ("top5_ep31", "top-5 ep31 (%)"),
           ("top1_final", "top-1 final (%)"), ("top5_final", "top-5 final (%)"), ("hours", "train time"),
           ("paper_params_m", "paper params (M)"), ("paper_top1", "paper top-1 (%)"),
           ("paper_top5", "paper top-5 (%)"), ("paper_titan_x_days", "paper Titan X days")]


def table_cells(lines: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = [h for _, h in COLUMNS]
    def cell(line: dict, k: str) -> str:
        v = line.get(k)
        if v is not None and k == "params":
            return f"{v:,}"
        if v is not None and k == "hours":
            return _duration(v)
        if v is not None and k == "lr":
            return f"{v:g}"
        return _fmt(v)

    body = [[cell(line, k) for k, _ in COLUMNS] for line in lines]
    return head, body


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


def lr_rank_correlations(rows: list[RunRow]) -> list[dict]:
    """Spearman correlation of the learning-rate rankings (mean top-1 error per lr) between pairs of sizes at the
    same width, and between pairs of widths at the same size, over the learning rates both have (at least 3)."""
    from scipy.stats import spearmanr

    err: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        err[(r.size, r.width)][r.lr].append(r.top1_ep31 if r.top1_ep31 is not None else r.top1)
    means = {k: {lr: statistics.fmean(v) for lr, v in d.items()} for k, d in err.items()}
    out = []
    keys = sorted(means)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            same_width, same_size = a[1] == b[1], a[0] == b[0]
            if not (same_width or same_size):
                continue
            common = sorted(set(means[a]) & set(means[b]))
            if len(common) < 3:
                continue
            rho = spearmanr([means[a][x] for x in common], [means[b][x] for x in common]).statistic
            out.append({"between": "sizes" if same_width else "widths", "a": f"{a[0]} px, k={a[1]:g}",
                        "b": f"{b[0]} px, k={b[1]:g}", "learning_rates": len(common), "spearman": float(rho)})
    return out
