"""``dsimagenet report RUNS... --out DIR``: the paper's tables and figures from whatever runs exist, and one
self-contained HTML page with all of them.

    dsimagenet report sweeps/ runs/ --out report/      # then open report/index.html

Writes table1.md / table1.csv / table1.tex (our runs, the paper's numbers beside them only where the runs compare
with it; table1.md and the page say what produced them), paper_table1.csv (the paper's Table 1, full ImageNet),
lr_rank_correlations.csv (Spearman correlation of learning-rate rankings between resolutions and between widths,
with the rankings compared), fig1..fig7 PNGs as the runs allow, and index.html with everything embedded.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from dsimagenet.errors import DSImageNetError
from dsimagenet.report import figures, header, page, tables
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
    facts = header.facts(runs, excluded)
    notes = [f"Not in the table: {Path(p).name} {state}: {why}" for p, state, why in excluded]
    lines = tables.table1(rows)
    head, body = tables.table_cells(lines)
    paper = tables.table_cells(tables.paper_lines(), tables.PAPER_COLUMNS)
    comparable = any(line.get("paper_top1") is not None for line in lines)
    not_comparable = [line["not_comparable"] for line in lines if line["not_comparable"]]
    paper_note = ("The paper's Table 1 (full ImageNet, 1000 classes, errors after epoch 31 of 40)"
                  + ("" if comparable else f", apart from ours: our runs do not compare with it "
                                           f"({'; '.join(dict.fromkeys(not_comparable))})"))
    (out / "table1.md").write_text(
        "".join(f"- {k}: {v}\n" for k, v in facts) + "\n" + tables.markdown(head, body)
        + "".join(f"\n{n}\n" for n in notes) + f"\n{paper_note}:\n\n" + tables.markdown(*paper))
    (out / "table1.tex").write_text("".join(f"% {k}: {v}\n" for k, v in facts) + tables.latex(head, body)
                                    + "".join(f"% {n}\n" for n in notes))
    with open(out / "table1.csv", "w", newline="") as f:
        csv.writer(f).writerows([head, *body])
    with open(out / "paper_table1.csv", "w", newline="") as f:
        csv.writer(f).writerows([paper[0], *paper[1]])
    written.update({k: out / k for k in ("table1.md", "table1.tex", "table1.csv", "paper_table1.csv")})
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
        w = csv.DictWriter(f, fieldnames=["between", "a", "b", "learning_rates", "spearman", "ranking_a",
                                          "ranking_b"])
        w.writeheader()
        w.writerows(corr)
    written["lr_rank_correlations.csv"] = out / "lr_rank_correlations.csv"
    rankings = [(tables.label(k), tables.ranking(v)) for k, v in sorted(tables.lr_rankings(rows).items())
                if len(v) > 1]
    best = min(runs, key=lambda r: r.result["top1_error"])
    for name, make in (("fig1", lambda: figures.fig1_methods(runs, out)),
                       ("fig2", lambda: figures.fig2_methods_lr(rows, out)),
                       ("fig3", lambda: figures.fig3_lr(rows, out)),
                       ("fig4", lambda: figures.fig4_heatmaps(rows, out)),
                       ("fig5", lambda: figures.fig5_time(runs, rows, out)),
                       ("fig6", lambda: figures.fig6_per_class(best, out)),
                       ("fig7", lambda: figures.fig7_ranked_classes(best, out))):
        path = make()
        if path is not None:
            written[name] = path
    caps = page.captions(all(r.top5_means_something for r in rows), 5 if best.num_classes > 10 else 1)
    written["index.html"] = page.write_index(
        out, facts, (head, body), paper, comparable, not_comparable, corr, tables.correlation_needs(rows),
        rankings, written, caps, excluded)
    return written
