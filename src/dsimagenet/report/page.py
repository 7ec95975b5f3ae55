"""One self-contained HTML page: what produced the report, the tables as HTML, the figures embedded as data URIs
(it opens anywhere, also from an e-mail attachment), laid out for a 1400 px screen and for print (A4/Letter)."""

from __future__ import annotations

import base64
import html
from pathlib import Path


def captions(top5: bool, fig7_top: int) -> dict[str, str]:
    """Each figure's title, said once (the PNGs carry none). ``top5``: whether the runs' classes make top-5 error
    mean something (more than 10 classes); ``fig7_top``: 1 or 5, what Fig. 7 counts as right."""
    err = "top-5" if top5 else "top-1"
    return {
        "fig1": "Fig. 1: one validation image per class, by size and downsampling method.",
        "fig2": f"Fig. 2: {err} error per downsampling method and learning rate (mean over seeds).",
        "fig3": "Fig. 3: top-1 error vs learning rate per size and width (mean over seeds).",
        "fig4": "Fig. 4: top-1 error over width x learning rate, per size.",
        "fig5": "Fig. 5: top-1 error vs training time: each run's error after each epoch; a dot at its end.",
        "fig6": "Fig. 6: per-class accuracy of the best run, best class first.",
        "fig7": f"Fig. 7: classes ranked best to worst by the best run; green frame: the true class is its "
                f"top-{fig7_top} prediction{'s' if fig7_top > 1 else ''}, red: it is not"
                + (" (the prediction named below)." if fig7_top == 1 else "."),
    }


def table(head: list[str], body: list[list[str]], cls: str = "") -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return (f'<div class="scroll"><table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{rows}</tbody>'
            "</table></div>")


CSS = """
:root { --ink: #1d1d1f; --muted: #5b5b66; --rule: #c9c9d3; --head: #eef0f7; --warn: #9b2c2c; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: #fff; margin: 0 auto; padding: 28px 36px 60px; max-width: 1320px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 30px 0 8px; padding-bottom: 3px; border-bottom: 1px solid var(--rule); }
p { margin: 6px 0; }
.sub { color: var(--muted); margin-bottom: 14px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 3px 16px; margin: 10px 0 0;
           padding: 10px 14px; background: #f7f8fb; border: 1px solid var(--rule); border-radius: 4px; }
dl.facts dt { font-weight: 600; color: var(--muted); }
dl.facts dd { margin: 0; overflow-wrap: anywhere; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--rule); padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: var(--head); font-weight: 600; }
td:nth-child(2), th:nth-child(2) { text-align: left; }
.note { color: var(--muted); font-size: 13px; }
.missing { color: var(--warn); }
.figs { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 18px 28px; align-items: start; }
figure { margin: 0; break-inside: avoid; page-break-inside: avoid; }
figure.wide { grid-column: 1 / -1; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { font-size: 13px; color: var(--muted); margin-top: 4px; }
ul { margin: 4px 0; padding-left: 22px; }
a { color: #1f4fa8; }
@media (max-width: 900px) { .figs { grid-template-columns: 1fr; } }
@media print {
  @page { size: A4; margin: 14mm 12mm; }
  body { font-size: 10.5pt; padding: 0; max-width: none; }
  h2 { break-after: avoid; page-break-after: avoid; }
  table { font-size: 8pt; } th, td { padding: 2px 5px; }
  .scroll { overflow: visible; }
  .figs { grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 10px 16px; }
  figure img { max-height: 120mm; width: auto; }
  a { color: inherit; text-decoration: none; }
  .files { display: none; }
}
"""

NEEDS = {"fig1": "needs the runs' data at its path", "fig2": "needs runs of two downsampling methods",
         "fig3": "needs runs at two learning rates", "fig4": "needs two widths and two learning rates at one size",
         "fig5": "needs a run's metrics.jsonl", "fig6": "needs the best run's per_class.csv",
         "fig7": "needs the best run's per_class.csv, checkpoint and data"}
WIDE = {"fig1"}  # a row of images per dataset: the full width


def write_index(out: Path, header: list[tuple[str, str]], ours: tuple[list, list], paper: tuple[list, list],
                comparable: bool, not_comparable: list[str], corr: list[dict], corr_needs: str,
                rankings: list[tuple[str, str]], written: dict, caps: dict[str, str],
                excluded: list[tuple[str, str, str]] = ()) -> Path:
    """``ours``/``paper``: (head, body) of our Table 1 and the paper's; ``comparable``: whether any of our lines
    carries the paper's numbers; ``not_comparable``: why the others do not; ``excluded``: (run, status, why) of
    each run left out of the tables: diverged, unfinished, damaged."""
    facts = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in header)
    figs = ""
    for key, caption in caps.items():
        if key in written:
            data = base64.b64encode(Path(written[key]).read_bytes()).decode()
            figs += (f'<figure class="{"wide" if key in WIDE else ""}"><img src="data:image/png;base64,{data}" '
                     f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)} '
                     f'<a class="files" href="{Path(written[key]).name}">PNG</a></figcaption></figure>')
    missing = [f"{caps[k].split(':')[0]} ({NEEDS[k]})" for k in caps if k not in written]
    figs_note = (f'<p class="note">Not drawn, as the runs do not allow them: {html.escape("; ".join(missing))}.</p>'
                 if missing else "")
    if corr:
        corr_html = table(["between", "a", "b", "learning rates", "Spearman", "ranking a (best first)",
                           "ranking b (best first)"],
                          [[c["between"], c["a"], c["b"], str(c["learning_rates"]), f"{c['spearman']:.3f}",
                            c["ranking_a"], c["ranking_b"]] for c in corr])
    else:
        corr_html = f'<p class="missing">Not computed. {html.escape(corr_needs)}</p>'
    if rankings:
        corr_html += ('<p class="note">The learning rates of each size and width, best (lowest top-1 error) '
                      "first:</p>" + table(["runs", "learning rates, best first"], [list(r) for r in rankings]))
    left_out = ""
    if excluded:
        left_out = ('<p class="missing">Not in the tables or figures (their errors are no result):</p><ul>'
                    + "".join(f"<li>{html.escape(Path(p).name)}: <b>{html.escape(state)}</b>: {html.escape(why)}</li>"
                              for p, state, why in excluded) + "</ul>")
    if comparable:
        paper_intro = ("<p>Lines whose runs compare with the paper (all 1000 classes, its recipe, errors after "
                       "epoch 31) carry its numbers beside ours in Table 1. The paper's whole table, for reference:"
                       "</p>")
    else:
        why = "; ".join(dict.fromkeys(not_comparable))
        paper_intro = (f'<p>None of these runs compares with the paper\'s numbers ({html.escape(why)}; the paper: '
                       "all 1000 classes, 40 epochs, errors after epoch 31), so they are shown apart, for "
                       "reference only.</p>")
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>dsimagenet report</title>
<style>{CSS}</style></head><body>
<h1>dsimagenet report</h1>
<p class="sub">Wide ResNets on downsampled ImageNet (Chrabaszcz, Loshchilov &amp; Hutter, 2017), from the runs below.
Errors in percent on the validation split.</p>
<dl class="facts">{facts}</dl>
<h2>Table 1: our runs</h2>
<p class="note">One line per size, model, classes and method: the setting (learning rate, epochs) with the lowest
mean top-1 error; "seeds" counts runs identical but for the seed, shown as mean ± standard deviation when more than one;
"ep31", where shown, is after epoch 31, the paper's reporting point; "-" is a cell no run fills.</p>
{table(*ours, cls="ours")}
{left_out}
<h2>The paper's Table 1: full ImageNet, 1000 classes</h2>
{paper_intro}
{table(*paper, cls="paper")}
<h2>Do the best learning rates carry over?</h2>
<p class="note">The paper finds the best learning rate the same across sizes and widths; here, Spearman's rank
correlation of the learning rates' top-1 errors between two sizes (same width) or two widths (same size).</p>
{corr_html}
<h2>Figures</h2>
{figs_note}
<div class="figs">{figs}</div>
<p class="note files">Files: <a href="table1.md">table1.md</a>, <a href="table1.csv">table1.csv</a>,
<a href="table1.tex">table1.tex</a>, <a href="paper_table1.csv">paper_table1.csv</a>,
<a href="lr_rank_correlations.csv">lr_rank_correlations.csv</a>.</p>
</body></html>
"""
    path = out / "index.html"
    path.write_text(doc)
    return path
