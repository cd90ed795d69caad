"""Results under threat models other than the paper's L-inf (eval.norm = L2), as their own tables.

`bench.report.collect` keeps them apart (`Results.threat_cells`): an L2 and an L-inf evaluation
of one classifier are two results. Here each threat model gets a table in the layout of Tables
1-2 (rows method x finetuner, columns dataset x AA / RA / SA), without published values beside
them (the paper evaluates L-inf only), and rows for the long CSV.
"""

from __future__ import annotations

import json
from typing import Any

from bench.report import paper
from bench.report.collect import Cell, Results, pct
from bench.report.tables import DASH, Entry, Footnote, Group, Row, Table, _cell_lines

THREAT_LABELS = {"L2": "L2"}


def _radius(cells: list[Cell]) -> str:
    """The radii of the cells' attacks, as their protocols give them ("eps 0.5")."""
    found = []
    for cell in cells:
        for metric in ("aa", "ra"):
            a = cell.metrics.get(metric)
            if a is not None and isinstance(a.protocol.get("eps"), (int, float)):
                text = f"eps {a.protocol['eps']:g}"
                if text not in found:
                    found.append(text)
    return " / ".join(found) or "eps ?"


def threat_tables(results: Results) -> list[Table]:
    out = []
    for norm, cells in sorted(results.threat_cells.items()):
        if not cells:
            continue
        label = THREAT_LABELS.get(norm, norm)
        caption = (f"Evaluations under the {label} threat model (eval.norm={norm}): mean over seeds in %, ± the std "
                   f"over seeds (one seed: its 95% Wilson interval); the superscript numbers a footnote with n and "
                   f"intervals. No published values beside them: the paper evaluates L-inf only. {DASH} = no result.")
        pairs = paper.order_pairs(c.pair for c in cells.values())
        groups = [Group(paper.pair_label(*p), p, list(paper.METRICS)) for p in pairs]
        title = f"{label} threat model, {_radius(list(cells.values()))}: AA / RA / SA (%)"
        table = Table(f"threat_{norm.lower()}", title, caption, ["Pretraining", "Finetuning"], groups, ref_name="")
        notes: dict[tuple[str, str, str, str], int] = {}
        for ft in paper.order_finetuners(k[1] for k in cells):
            for method in paper.order_methods(k[0] for k in cells if k[1] == ft):
                entries, labels = [], []
                for g in groups:
                    cell = cells.get((method, ft, *g.pair))
                    cell_label = (f"{results.method_label(method)} / {paper.finetuner_label(ft)} / "
                                  f"{paper.pair_label(*g.pair)}")
                    labels.append(cell_label)
                    number = None
                    if cell is not None:
                        if cell.key not in notes:
                            notes[cell.key] = len(table.footnotes) + 1
                            table.footnotes.append(Footnote(notes[cell.key], cell_label, _cell_lines(cell)))
                            for w in cell.sanity_warnings:
                                table.flagged.append(("‡", cell_label, w))
                            if cell.other_flags:
                                table.flagged.append(("§", cell_label, "flags: " + ", ".join(cell.other_flags)))
                        number = notes[cell.key]
                    entries.append([Entry(m, cell.metrics.get(m) if cell is not None else None, note=number,
                                          marks=cell.marks if cell is not None else "") for m in g.metrics])
                table.rows.append(Row([results.method_label(method), paper.finetuner_label(ft)], method, ft,
                                      entries, labels))
        out.append(table)
    return out


def threat_csv_rows(results: Results) -> list[dict[str, Any]]:
    rows = []
    for norm, cells in sorted(results.threat_cells.items()):
        for (method, ft, source, target), cell in cells.items():
            base = {"results": results.label, "status": "ok", "method": method,
                    "method_label": results.method_label(method), "finetuner": ft,
                    "finetuner_label": paper.finetuner_label(ft), "source": source, "target": target,
                    "dataset_label": paper.pair_label(source, target), "cross_dataset": source != target,
                    "threat_model": norm, "marks": cell.marks, "warnings": " | ".join(cell.sanity_warnings),
                    "flags": ";".join(sorted({f for r in cell.records for f in r.flags})),
                    "record_keys": ";".join(r.key for r in cell.records)}
            for metric in paper.METRICS:
                a = cell.metrics.get(metric)
                if a is None:
                    continue
                lo, hi = a.ci95
                rows.append(dict(base, metric=metric, n_seeds=a.k, seeds=";".join(map(str, a.seeds)),
                                 value_pct=round(pct(a.mean), 4), std_pct="" if a.std is None else round(pct(a.std), 4),
                                 n=min(a.n), n_total=a.n_total, correct_total=a.correct_total,
                                 ci95_low_pct=round(pct(lo), 4), ci95_high_pct=round(pct(hi), 4), ci_kind=a.ci_kind,
                                 protocol=json.dumps(a.protocol, sort_keys=True, default=str)))
            for axis in ("eps", "steps"):
                for x, a in cell.sweeps.get(axis, []):
                    # the eps axis of an L2 sweep: the radius itself (sweep_x gives eps in 1/255 units)
                    x_shown = round(float(a.protocol.get("eps", x)), 6) if axis == "eps" else x
                    rows.append(dict(base, metric="ra", axis=axis, x=x_shown, n_seeds=a.k, value_pct=round(pct(a.mean), 4),
                                     n=min(a.n), protocol=json.dumps(a.protocol, sort_keys=True, default=str)))
    return rows
