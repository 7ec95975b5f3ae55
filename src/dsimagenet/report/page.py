"""One self-contained HTML page: the tables as HTML, the figures embedded as data URIs (it opens anywhere,
also from an e-mail attachment)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

CAPTIONS = {
    "fig1": "Fig. 1: validation images by size and downsampling method.",
    "fig2": "Fig. 2: top-5 error per downsampling method and learning rate (mean over seeds).",
    "fig3": "Fig. 3: top-1 error vs learning rate per size and width.",
    "fig4": "Fig. 4: top-1 error over width x learning rate, per size.",
    "fig5": "Fig. 5: top-1 error vs training time, with each run's convergence curve.",
    "fig6": "Fig. 6: per-class accuracy of the best run, sorted.",
    "fig7": "Fig. 7: classes ranked best to worst by the best run; green frames: true class in the top 5.",
}


def _table(head: list[str], body: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{rows}</tbody></table>"


def write_index(out: Path, head, body, corr: list[dict], written: dict, n_runs: int,
                excluded: list[tuple[str, str, str]] = ()) -> Path:
    """``excluded``: (run, status, why) of each run left out of the tables: diverged, unfinished, damaged."""
    figs = ""
    for key, caption in CAPTIONS.items():
        if key in written:
            data = base64.b64encode(Path(written[key]).read_bytes()).decode()
            figs += (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                     f"<figcaption>{html.escape(caption)} <a href=\"{Path(written[key]).name}\">PNG</a>"
                     "</figcaption></figure>")
        else:
            figs += f'<p class="missing">{html.escape(caption)} Not drawn: the runs do not allow it.</p>'
    corr_html = _table(["between", "a", "b", "learning rates", "Spearman"],
                       [[c["between"], c["a"], c["b"], str(c["learning_rates"]), f"{c['spearman']:.3f}"]
                        for c in corr]) if corr else \
        '<p class="missing">No pair of sizes or widths shares three learning rates yet.</p>'
    left_out = ""
    if excluded:
        left_out = ('<p class="missing">Not in the tables or figures (their errors are no result):</p><ul>'
                    + "".join(f"<li>{html.escape(Path(p).name)}: <b>{html.escape(state)}</b>: {html.escape(why)}</li>"
                              for p, state, why in excluded) + "</ul>")
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dsimagenet report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; background: #fff; }}
table {{ border-collapse: collapse; font-size: 12px; margin: 1em 0; }}
th, td {{ border: 1px solid #bbb; padding: 3px 6px; text-align: right; }}
th {{ background: #eef; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; border: 1px solid #ddd; }}
.missing {{ color: #a33; }}
</style></head><body>
<h1>dsimagenet report</h1>
<p>{n_runs} finished runs. Errors in percent; "ep31" is after epoch 31, the paper's reporting point; "-" is a
cell no run fills. Files: <a href="table1.md">table1.md</a>, <a href="table1.csv">table1.csv</a>,
<a href="table1.tex">table1.tex</a>, <a href="lr_rank_correlations.csv">lr_rank_correlations.csv</a>.</p>
<h2>Table 1: our runs beside the paper's</h2>
{_table(head, body)}
{left_out}
<h2>Do the best learning rates carry over?</h2>
{corr_html}
<h2>Figures</h2>
{figs}
</body></html>
"""
    path = out / "index.html"
    path.write_text(doc)
    return path
