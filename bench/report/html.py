"""The report as one self-contained HTML page: inline CSS, figures embedded as base64 PNG.

Every number's cell has a hover title with its seeds, n and 95% interval (the same text as the
footnote it links to); flagged cells carry their marks and a tinted background.
"""

from __future__ import annotations

import base64
import datetime as _dt
from html import escape
from typing import Any

from bench.report import paper
from bench.report.collect import Results
from bench.report.others import others_html
from bench.report.tables import (FIDELITY_DOC, FIDELITY_NOTE, MARKS, PUBLISHED_HEAD, Entry, Table, cells_text,
                                 fmt_diff, no_results_text, published_text, shared_flag_text, source_text,
                                 spread_text)

CSS = """
:root { --fg: #1f2328; --muted: #656d76; --line: #d0d7de; --bg-alt: #f6f8fa; --good: #1a7f37; --bad: #cf222e; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--fg);
       margin: 0 auto; padding: 24px 32px 64px; max-width: 1600px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 36px 0 6px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
p.meta, p.caption, ul.meta { color: var(--muted); margin: 4px 0 10px; max-width: 1100px; }
nav a { margin-right: 14px; }
code { background: var(--bg-alt); padding: 1px 4px; border-radius: 4px; font-size: 12.5px; }
table.report { border-collapse: collapse; margin: 8px 0 6px; font-variant-numeric: tabular-nums; }
table.report th, table.report td { padding: 5px 10px; border-bottom: 1px solid var(--line); white-space: nowrap; }
table.report thead th { background: var(--bg-alt); text-align: center; font-weight: 600; }
table.report thead tr.groups th.group { border-left: 2px solid var(--line); }
table.report td.first { border-left: 2px solid var(--line); }
table.report th.rowlabel { text-align: left; font-weight: 600; background: #fff; }
table.report td.num { text-align: right; cursor: help; }
table.report td.num .v { font-weight: 600; }
table.report td.num .pm { color: var(--muted); }
table.report td.num .ref { font-size: 11.5px; color: var(--muted); }
table.report td.num .pos { color: var(--good); }
table.report td.num .neg { color: var(--bad); }
table.report td.missing { color: var(--muted); text-align: center; }
table.report td.flagged { background: #fff8c5; }
table.report tbody tr:nth-child(even) td, table.report tbody tr:nth-child(even) th { background-color: #fbfcfd; }
table.report tbody tr:nth-child(even) td.flagged { background: #fff8c5; }
table.report tr.block td, table.report tr.block th { border-top: 2px solid #8c959f; }
sup a { text-decoration: none; }
.mark { color: #9a6700; font-weight: 700; margin-left: 1px; }
ol.notes, ul.flags, ul.missing, ul.notes, ul.published { color: var(--muted); font-size: 12.5px; margin: 4px 0 0; }
p.shared { margin: 4px 0 8px; max-width: 1100px; }
ul.sources { font-size: 11.5px; }
ul.flags li .mark { margin-right: 4px; }
.state { font-weight: 600; color: var(--bad); }
figure { margin: 18px 0 28px; }
figure img { max-width: 100%; border: 1px solid var(--line); border-radius: 6px; background: #fff; }
figcaption { color: var(--muted); max-width: 1100px; margin-top: 4px; }
"""


def _entry_html(e: Entry, table_id: str, cell_label: str, first: bool, ref_name: str) -> str:
    classes = ["num"] + (["first"] if first else [])
    title = escape(e.hover(cell_label), quote=True)
    if e.agg is None:
        classes.append("missing")
        body = "—"
        if e.status:
            body += f' <span class="state">{escape(e.status)}</span>'
    else:
        if e.marks:
            classes.append("flagged")
        body = f'<span class="v">{e.value:.2f}</span><span class="pm">{escape(spread_text(e.agg))}</span>'
        if e.marks:
            body += f'<span class="mark">{escape(e.marks)}</span>'
    if e.note:
        body += f'<sup><a href="#{table_id}-fn{e.note}">{e.note}</a></sup>'
    ref = e.ref_value_text()
    if ref is not None:
        diff = ""
        if e.diff is not None:
            sign = "pos" if e.diff > 0 else "neg" if e.diff < 0 else ""
            diff = f' <span class="{sign}">{fmt_diff(e.diff)}</span>'
        body += f'<div class="ref">{escape(ref_name)} {escape(ref)}{diff}</div>'
        title += escape(f"\n{ref_name}: {ref}" + (f" (difference {fmt_diff(e.diff)})" if e.diff is not None else ""),
                        quote=True)
    return f'<td class="{" ".join(classes)}" title="{title}">{body}</td>'


def table_html(t: Table) -> str:
    ref_name = "paper" if t.ref_name == "paper" else "vs"
    nrow = len(t.row_header)
    parts = [f'<section id="{escape(t.id)}"><h2>{escape(t.title)}</h2>', f'<p class="caption">{escape(t.caption)}</p>']
    parts += [f'<p class="shared">{escape(line)}</p>' for line in t.shared]
    if t.shared_flags:
        parts.append(f'<p class="shared">{escape(shared_flag_text(t))}</p>')
    parts.append('<table class="report"><thead><tr class="groups">')
    parts.append("".join(f'<th rowspan="2">{escape(h)}</th>' for h in t.row_header))
    parts.append("".join(f'<th class="group" colspan="{len(g.metrics)}">{escape(g.full_label)}</th>'
                         for g in t.groups))
    parts.append("</tr><tr>")
    parts.append("".join(f"<th>{paper.METRIC_LABELS[m]} (%)</th>" for g in t.groups for m in g.metrics))
    parts.append("</tr></thead><tbody>")
    previous = None
    for row in t.rows:
        block = ' class="block"' if previous is not None and row.finetuner != previous else ""
        previous = row.finetuner
        parts.append(f"<tr{block}>")
        parts.append("".join(f'<th class="rowlabel">{escape(x)}</th>' for x in row.labels[:nrow]))
        for group, label in zip(row.entries, row.cells):
            for i, e in enumerate(group):
                parts.append(_entry_html(e, t.id, label, i == 0, ref_name))
        parts.append("</tr>")
    parts.append("</tbody></table>")
    if t.footnotes:
        parts.append('<ol class="notes">')
        parts += [f'<li id="{t.id}-fn{f.number}" value="{f.number}"><b>{escape(f.label)}</b>: '
                  f'{escape("; ".join(f.lines))}</li>' for f in t.footnotes]
        parts.append("</ol>")
    if t.flagged:
        parts.append('<p class="caption">Flagged cells: '
                     + "; ".join(f'<span class="mark">{m}</span> {escape(MARKS[m])}' for m in t.marks_used()) + "</p>")
        parts.append('<ul class="flags">')
        parts += [f'<li><span class="mark">{m}</span>{escape(text)} (<b>{escape(cells_text(labels))}</b>)</li>'
                  for m, text, labels in t.flag_groups()]
        parts.append("</ul>")
    if t.published:
        parts.append(f'<p class="caption">{escape(PUBLISHED_HEAD)}:</p><ul class="published">')
        parts += [f"<li>{escape(published_text(t, item))}</li>" for item in t.published]
        parts.append('</ul><ul class="published sources">')
        parts += [f"<li>{escape(source_text(letter, ref))}</li>" for letter, ref in t.sources()]
        parts.append("</ul>")
    parts.append("</section>")
    return "\n".join(parts)


def _missing_html(results: Results) -> str:
    parts = []
    if results.missing:
        parts.append(f'<section id="missing"><h2>Missing: {len(results.missing)} job(s) of '
                     f'{escape(results.label)} without a usable record</h2><ul class="missing">')
        for m in sorted(results.missing, key=lambda m: (m.kind, m.key)):
            what = f" ({escape(m.what)})" if m.what else ""
            detail = f": {escape(m.detail)}" if m.detail else ""
            parts.append(f'<li>{escape(m.kind)} <code>{escape(m.key)}</code>{what}: '
                         f'<span class="state">{escape(m.state)}</span>{detail}</li>')
        parts.append("</ul></section>")
    if results.notes:
        parts.append('<section id="notes"><h2>Notes</h2><ul class="notes">')
        parts += [f"<li>{escape(n)}</li>" for n in results.notes]
        parts.append("</ul></section>")
    return "\n".join(parts)


def _figure_html(fig: Any) -> str:
    data = base64.b64encode(fig.png.read_bytes()).decode("ascii")
    return (f'<figure id="{escape(fig.name)}"><img alt="{escape(fig.title, quote=True)}" '
            f'src="data:image/png;base64,{data}"><figcaption><b>{escape(fig.title)}</b>. {escape(fig.caption)} '
            f'(<code>figures/{escape(fig.pdf.name)}</code>)</figcaption></figure>')


def report_html(results: Results, tables: list[Table], figures: list[Any], other: Results | None = None,
                ablations: list[Any] = ()) -> str:
    """The page; `ablations`: Tables 4 and 5 (bench.report.ablations), after Tables 1-3."""
    from bench.report.ablations import ablation_html

    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    title = f"bench report — {results.label}" + (f" vs {other.label}" if other is not None else "")
    nav = [f'<a href="#{t.id}">{escape(t.title.split(":")[0])}</a>' for t in [*tables, *ablations]]
    if figures:
        nav.append('<a href="#figures">Figures</a>')
    if results.missing:
        nav.append('<a href="#missing">Missing</a>')
    protocols = results.protocols()
    head = [f"<h1>{escape(title)}</h1>",
            f'<p class="meta">{len(results.cells)} cell(s) from {results.shown_records} evaluate record(s)'
            + (f" (of {results.evaluate_records})" if results.shown_records != results.evaluate_records else "")
            + " in "
            f"<code>{escape(results.label)}</code>"
            + (f"; compared with <code>{escape(other.label)}</code> ({len(other.cells)} cell(s))" if other else "")
            + f". Generated {now}.</p>"]
    if not results.cells:
        head.append(f'<p class="state">{escape(no_results_text(results))}.</p>')
    if protocols:
        head.append('<p class="meta">Evaluation protocol' + ("s" if len(protocols) > 1 else "") + ':</p>'
                    '<ul class="meta">' + "".join(f"<li>{escape(p)}</li>" for p in protocols) + "</ul>")
    head.append('<p class="meta">' + escape(FIDELITY_NOTE).replace(
        escape(FIDELITY_DOC), f'<a href="{escape(FIDELITY_DOC)}"><code>{escape(FIDELITY_DOC)}</code></a>') + "</p>")
    if other is None:
        head.append('<p class="meta">Paper: Fan et al., <i>When Does Contrastive Learning Preserve Adversarial '
                    "Robustness from Pretraining to Finetuning?</i> (NeurIPS 2021), ResNet-18, full test sets.</p>")
    head.append("<nav>" + "".join(nav) + "</nav>")
    body = head + [table_html(t) for t in tables] + [ablation_html(t) for t in ablations] + [others_html(results)]
    if figures:
        body.append('<section id="figures"><h2>Figures</h2>')
        body += [_figure_html(f) for f in figures]
        body.append("</section>")
    body.append(_missing_html(results))
    if other is not None:
        body.append(_missing_html(other))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
