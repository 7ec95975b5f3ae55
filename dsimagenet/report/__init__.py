"""``dsimagenet report RUNS... --out DIR``: the paper's tables and figures from whatever runs exist, and one
self-contained HTML page with all of them.

    dsimagenet report sweeps/ runs/ --out report/      # then open report/index.html

Writes table1.md / table1.csv / table1.tex (our errors after epoch 31 beside the paper's Table 1),
lr_rank_correlations.csv (Spearman correlation of learning-rate rankings between resolutions and between widths),
fig1..fig7 PNGs as the runs allow, and index.html with everything embedded.
"""

from __future__ import annotations

import csv
from pathlib import Path

from dsimagenet.report import figures, page, tables


def report(paths, out: str | Path) -> dict:
    """Write the report for the finished runs under ``paths``; returns {name: path} of what was written."""
    from dsimagenet.runs import load_runs

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(paths)
    if not runs:
        raise FileNotFoundError(f"no finished runs (result.json) under {', '.join(map(str, paths))}")
    rows = tables.rows_of(runs)
    written: dict[str, Path] = {}
    head, body = tables.table_cells(tables.table1(rows))
    (out / "table1.md").write_text(tables.markdown(head, body))
    (out / "table1.tex").write_text(tables.latex(head, body))
    with open(out / "table1.csv", "w", newline="") as f:
        csv.writer(f).writerows([head, *body])
    written.update({k: out / k for k in ("table1.md", "table1.tex", "table1.csv")})
    corr = tables.lr_rank_correlations(rows)
    with open(out / "lr_rank_correlations.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["between", "a", "b", "learning_rates", "spearman"])
        w.writeheader()
        w.writerows(corr)
    written["lr_rank_correlations.csv"] = out / "lr_rank_correlations.csv"
    best = min(runs, key=lambda r: r.result["top1_error"])
    for name, make in (("fig1", lambda: figures.fig1_methods(runs, out)),
                       ("fig2", lambda: figures.fig2_methods_lr(rows, out)),
                       ("fig3", lambda: figures.fig3_lr(rows, out)),
                       ("fig4", lambda: figures.fig4_heatmaps(rows, out)),
                       ("fig5", lambda: figures.fig5_time(runs, out)),
                       ("fig6", lambda: figures.fig6_per_class(best, out)),
                       ("fig7", lambda: figures.fig7_ranked_classes(best, out))):
        path = make()
        if path is not None:
            written[name] = path
    written["index.html"] = page.write_index(out, head, body, corr, written, len(runs))
    return written
