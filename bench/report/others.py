"""Results of the other job kinds (request-level and third-party stages) as simple tables.

The paper's tables show evaluate results; every other kind of job that has a record (a plugin's
kNN accuracy, an analysis) gets one table here: a row per job, a column per scalar metric (a
Metric shows its value in percent with its n), and the stage's own one-line summary. Kinds with
richer output (figures, their own tables) add those elsewhere; this keeps every result visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.record import Record
from bench.report import paper
from bench.report.collect import Results

SKIP = {"pseudo_labels", "pretrain", "lpaft"}  # inputs of the cells, shown through them


@dataclass
class OtherTable:
    kind: str
    columns: list[str]
    rows: list[list[str]]


def _cell(value: Any) -> str | None:
    if isinstance(value, dict) and isinstance(value.get("value"), (int, float)) and "n" in value:
        return f"{100 * value['value']:.2f} (n={value['n']})"
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return None


def other_tables(results: Results) -> list[OtherTable]:
    from bench.errors import BenchError
    from bench.stages.base import get_stage

    out = []
    for kind in sorted(k for k in results.others if k not in SKIP):
        records: list[Record] = sorted(results.others[kind], key=lambda r: (r.method or "", r.target or "", r.seed))
        metrics = list(dict.fromkeys(name for r in records for name, v in r.metrics.items() if _cell(v) is not None))
        rows = []
        for r in records:
            try:
                summary = get_stage(kind).summary(r)
            except BenchError:  # a kind whose plugin is not installed where the report runs
                summary = ""
            rows.append([paper.method_label(r.method) if r.method else "", paper.finetuner_label(r.finetuner)
                         if r.finetuner else "", paper.pair_label(r.source, r.target), str(r.seed),
                         *[_cell(r.metrics.get(m)) or "" for m in metrics], summary])
        out.append(OtherTable(kind, ["method", "finetuning", "data", "seed", *metrics, "summary"], rows))
    return out


def others_markdown(results: Results, escape) -> str:
    parts = []
    for t in other_tables(results):
        parts += [f"### Other results: {escape(t.kind)}", "", "| " + " | ".join(escape(c) for c in t.columns) + " |",
                  "|" + "|".join("---" for _ in t.columns) + "|"]
        parts += ["| " + " | ".join(escape(c) for c in row) + " |" for row in t.rows]
        parts.append("")
    return "\n".join(parts)


def others_html(results: Results) -> str:
    from html import escape

    parts = []
    for t in other_tables(results):
        head = "".join(f"<th>{escape(c)}</th>" for c in t.columns)
        body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in t.rows)
        parts.append(f'<section id="other-{escape(t.kind)}"><h2>Other results: {escape(t.kind)}</h2>'
                     f'<table class="report"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></section>')
    return "\n".join(parts)
