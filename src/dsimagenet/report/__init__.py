"""``dsimagenet report RUNS... --out DIR``: the paper's tables and figures from whatever runs exist, and one
self-contained HTML page with all of them.

    dsimagenet report sweeps/ runs/ --out report/      # then open report/index.html

Writes table1.md / table1.csv / table1.tex (our errors after epoch 31 beside the paper's Table 1),
lr_rank_correlations.csv (Spearman correlation of learning-rate rankings between resolutions and between widths),
fig1..fig7 PNGs as the runs allow, and index.html with everything embedded.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from dsimagenet.errors import DSImageNetError
from dsimagenet.report import figures, page, tables
from dsimagenet.runs import RESULT, RunError, find_runs, load_run

NEEDED = ("top1_error", "top5_error", "params", "train_seconds")  # of result.json


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def status_of(run) -> tuple[str, str]:
    """(finished | diverged | unfinished | damaged, why) of a loaded run: a finished one must hold the numbers
    the tables need."""
    if run.status == "diverged":  # Run.status also knows runs from before "status": their metrics hold a NaN
        res = run.result or {}
        return "diverged", res.get("message") or (
            f"diverged at epoch {res['epoch']} step {res.get('step')}" if "epoch" in res else
            "its losses are not finite (a run made before divergence was detected)")
    if run.status != "finished":
        return run.status, f"no {RESULT}: interrupted or still running"
    try:
        run.train_config, run.image_size, run.depth  # noqa: B018 - each a RunError naming config.json if damaged
    except RunError as e:
        return "damaged", str(e)
    missing = [k for k in NEEDED if k not in run.result]
    if missing:
        return "damaged", f"{RESULT} lacks {', '.join(missing)}"
    for k in ("params", "train_seconds"):
        if not _finite(run.result[k]):
            return "damaged", f"{RESULT}: {k} is {run.result[k]!r}, not a number"
    if not all(_finite(run.result[k]) for k in ("top1_error", "top5_error")):
        return "diverged", f"a non-finite error in {RESULT}"
    return "finished", ""


def load(paths) -> tuple[list, list[tuple[str, str, str]]]:
    """(finished runs, [(path, status, why) of every other run]) under ``paths``. A damaged run is listed with
    what is wrong, never a reason to stop (nor silently left out)."""
    finished, other = [], []
    for p in find_runs(paths):
        try:
            run = load_run(p)
            state, why = status_of(run)
        except (DSImageNetError, ValueError, TypeError, AttributeError) as e:  # json's errors, a list for a dict
            state, why = "damaged", f"{type(e).__name__}: {e}" if not isinstance(e, DSImageNetError) else str(e)
        if state == "finished":
            finished.append(run)
        else:
            other.append((str(p), state, why))
    return finished, other


def report(paths, out: str | Path) -> dict:
    """Write the report for the finished runs under ``paths``; returns {name: path} of what was written.
    Runs that diverged, are unfinished or damaged are left out of the tables and figures and listed, with why,
    in excluded.csv, under Table 1 and on the page."""
    out = Path(out)
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    runs, excluded = load(paths)
    if not runs:
        counts = ", ".join(f"{sum(e[1] == s for e in excluded)} {s}" for s in ("diverged", "unfinished", "damaged")
                           if any(e[1] == s for e in excluded))
        raise DSImageNetError(f"no finished runs ({RESULT}) under {', '.join(map(str, paths))}"
                              + (f"; runs found: {counts}" if counts else ""))
    out.mkdir(parents=True, exist_ok=True)
    rows = tables.rows_of(runs)
    written: dict[str, Path] = {}
    notes = [f"Not in the table: {Path(p).name} {state}: {why}" for p, state, why in excluded]
    head, body = tables.table_cells(tables.table1(rows))
    (out / "table1.md").write_text(tables.markdown(head, body) + "".join(f"\n{n}\n" for n in notes))
    (out / "table1.tex").write_text(tables.latex(head, body) + "".join(f"% {n}\n" for n in notes))
    with open(out / "table1.csv", "w", newline="") as f:
        csv.writer(f).writerows([head, *body])
    written.update({k: out / k for k in ("table1.md", "table1.tex", "table1.csv")})
    if excluded:
        with open(out / "excluded.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["run", "status", "why"])
            w.writerows(excluded)
        written["excluded.csv"] = out / "excluded.csv"
    else:
        (out / "excluded.csv").unlink(missing_ok=True)  # from an earlier report into this folder
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
    written["index.html"] = page.write_index(out, head, body, corr, written, len(runs), excluded)
    return written

