"""Common-corruption results in the report (records of the `corruptions` stage).

- `corruption_cells(results)`: one cell per (method, finetuner, source, target), its records over
  seeds aggregated per metric: "mca" (mean corruption accuracy), "sev1".."sev5" (over the
  corruptions), and one per corruption (over the severities);
- `corruption_tables(results)`: the mean and per-severity accuracy per cell, and a per-corruption
  table (the `Table` objects of bench.report.tables, rendered in every format);
- `corruption_figures(results, folder)`: accuracy against severity, one line per cell and a
  figure per dataset pair;
- `corruption_csv_rows(results)`: the same numbers for the long CSV.

Generated corruptions (imagecorruptions, ImageNet-C parameters) are not the CIFAR-10-C benchmark:
such cells are marked § and say "generated" in their footnote, their CSV rows and the figure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import paper
from bench.report.collect import Aggregate, Results, aggregate, pct
from bench.report.tables import DASH, Entry, Footnote, Group, Row, Table

KIND = "corruptions"
GENERATED_FLAG = "corruptions_generated"
SEVERITIES = (1, 2, 3, 4, 5)
CellKey = tuple[str, str, str, str]


@dataclass
class CorruptionCell:
    method: str
    finetuner: str
    source: str
    target: str
    records: list[Any]
    metrics: dict[str, Aggregate | None] = field(default_factory=dict)

    @property
    def key(self) -> CellKey:
        return (self.method, self.finetuner, self.source, self.target)

    @property
    def sources(self) -> list[str]:
        return sorted({str(r.metrics.get("source")) for r in self.records})

    @property
    def generated(self) -> bool:
        return "generated" in self.sources

    @property
    def corruptions(self) -> list[str]:
        names: list[str] = []
        for r in self.records:
            names += [c for c in (r.metrics.get("per_corruption") or {}) if c not in names]
        return names


def _finished(record: Any) -> float:
    value = (record.provenance or {}).get("finished")
    return float(value) if isinstance(value, (int, float)) else 0.0


def corruption_cells(results: Results) -> dict[CellKey, CorruptionCell]:
    """The corruption results per cell (one configuration per cell: the one with most seeds, latest)."""
    groups: dict[CellKey, dict[str, list[Any]]] = {}
    for r in (results.others or {}).get(KIND, []):
        key = (r.method or "?", r.finetuner or "none", r.source or r.target or "?", r.target or r.source or "?")
        groups.setdefault(key, {}).setdefault(json.dumps(r.config, sort_keys=True, default=str), []).append(r)
    out: dict[CellKey, CorruptionCell] = {}
    for key, variants in groups.items():
        chosen = max(variants.values(), key=lambda rs: (len(rs), max(_finished(r) for r in rs)))
        by_seed = {r.seed: r for r in sorted(chosen, key=_finished)}
        records = [by_seed[s] for s in sorted(by_seed)]
        cell = CorruptionCell(*key, records=records)
        cell.metrics["mca"] = aggregate((r.seed, r.metrics.get("mean")) for r in records)
        for s in SEVERITIES:
            cell.metrics[f"sev{s}"] = aggregate((r.seed, (r.metrics.get("per_severity") or {}).get(str(s)))
                                                for r in records)
        for name in cell.corruptions:
            cell.metrics[name] = aggregate((r.seed, (r.metrics.get("per_corruption") or {}).get(name))
                                           for r in records)
        out[key] = cell
    return out


def _label(results: Results, cell: CorruptionCell) -> str:
    return (f"{results.method_label(cell.method)} / {paper.finetuner_label(cell.finetuner)} / "
            f"{paper.pair_label(cell.source, cell.target)}")


def _source_text(cell: CorruptionCell) -> str:
    """"official CIFAR-10-C" or "generated (imagecorruptions-imaug 1.1.5, ImageNet-C parameters)"."""
    record = cell.records[0]
    protocol = (record.metrics.get("mean") or {}).get("protocol") or {}
    return str(protocol.get("corrupted_by") or record.metrics.get("source"))


def _n_text(cell: CorruptionCell) -> str:
    """"n = 4 images per cell, 4 (corruption, severity) cells"."""
    grid = cell.records[0].metrics.get("cells") or {}
    counts = sorted({int(m["n"]) for row in grid.values() for m in row.values()})
    cells = sum(len(row) for row in grid.values())
    per = "/".join(map(str, counts)) or "?"
    return f"n = {per} images per (corruption, severity) cell, {cells} cell(s) per seed"


def _table(results: Results, cells: dict[CellKey, CorruptionCell], id: str, title: str, caption: str,
           metrics_of) -> Table:
    pairs = paper.order_pairs((c.source, c.target) for c in cells.values())
    groups = [Group(paper.pair_label(*p), p, metrics_of(p)) for p in pairs]
    table = Table(id, title, caption, ["Model", "Finetuning"], groups, ref_name="")
    notes: dict[CellKey, int] = {}
    order_f = paper.order_finetuners(c.finetuner for c in cells.values())
    for ft in order_f:
        for method in paper.order_methods(c.method for c in cells.values() if c.finetuner == ft):
            entries, labels = [], []
            for g in groups:
                cell = cells.get((method, ft, *g.pair))
                label = (f"{results.method_label(method)} / {paper.finetuner_label(ft)} / "
                         f"{paper.pair_label(*g.pair)}")
                labels.append(label)
                number = None
                if cell is not None:
                    if cell.key not in notes:
                        notes[cell.key] = len(table.footnotes) + 1
                        seeds = ", ".join(str(r.seed) for r in cell.records)
                        table.footnotes.append(Footnote(notes[cell.key], label, [
                            f"seed{'s' if len(cell.records) > 1 else ''} {seeds}", f"source: {_source_text(cell)}",
                            _n_text(cell)]))
                        if cell.generated:
                            table.flagged.append(("§", label, "generated corruptions (imagecorruptions, ImageNet-C "
                                                              "parameters): not the CIFAR-10-C benchmark"))
                    number = notes[cell.key]
                marks = "§" if cell is not None and cell.generated else ""
                entries.append([Entry(m, cell.metrics.get(m) if cell is not None else None, note=number,
                                      marks=marks) for m in g.metrics])
            table.rows.append(Row([results.method_label(method), paper.finetuner_label(ft)], method, ft, entries,
                                  labels))
    return table


def corruption_tables(results: Results) -> list[Table]:
    cells = corruption_cells(results)
    if not cells:
        return []
    severities = [f"sev{s}" for s in SEVERITIES if any(c.metrics.get(f"sev{s}") for c in cells.values())]
    names = []
    for c in cells.values():
        names += [n for n in c.corruptions if n not in names]
    legend = (f"Accuracy (%) under common corruptions, mean over seeds with ± the std over seeds (one seed: its 95% "
              f"Wilson interval); {DASH} = not measured. mCA: mean over every (corruption, severity) cell, as "
              f"RobustBench's corruptions_acc. § = generated corruptions, not the official CIFAR-10-C / CIFAR-100-C "
              f"files (not comparable with published numbers).")
    mean = _table(results, cells, "corruptions", "Common corruptions: mean corruption accuracy and per severity (%)",
                  legend, lambda p: ["mca", *severities])
    per = _table(results, cells, "corruptions_per_kind", "Common corruptions: accuracy per corruption (%), "
                 "over the severities", legend, lambda p: names)
    return [mean, per]


def corruption_csv_rows(results: Results) -> list[dict[str, Any]]:
    rows = []
    for cell in corruption_cells(results).values():
        base = {"results": results.label, "status": "ok", "method": cell.method,
                "method_label": results.method_label(cell.method), "finetuner": cell.finetuner,
                "finetuner_label": paper.finetuner_label(cell.finetuner), "source": cell.source,
                "target": cell.target, "dataset_label": paper.pair_label(cell.source, cell.target),
                "cross_dataset": cell.source != cell.target, "marks": "§" if cell.generated else "",
                "flags": GENERATED_FLAG if cell.generated else "", "record_keys": ";".join(r.key for r in cell.records),
                "threat_model": "corruptions:" + "/".join(cell.sources)}
        for metric, a in cell.metrics.items():
            if a is None:
                continue
            axis, x = ("severity", int(metric[3:])) if metric.startswith("sev") else \
                ("", "") if metric == "mca" else ("corruption", metric)
            lo, hi = a.ci95
            rows.append(dict(base, metric="corruption_accuracy" if metric != "mca" else "mean_corruption_accuracy",
                             axis=axis, x=x, n_seeds=a.k, seeds=";".join(map(str, a.seeds)),
                             value_pct=round(pct(a.mean), 4), std_pct="" if a.std is None else round(pct(a.std), 4),
                             n=min(a.n), n_total=a.n_total, correct_total=a.correct_total,
                             ci95_low_pct=round(pct(lo), 4), ci95_high_pct=round(pct(hi), 4), ci_kind=a.ci_kind,
                             protocol=json.dumps(a.protocol, sort_keys=True, default=str)))
    return rows


def corruption_figures(results: Results, folder: Path) -> list[Any]:
    """Accuracy against severity: one figure per dataset pair, a line per cell (bands: 95% intervals)."""
    from bench.report.figures import method_palette, plt_setup, save, slug

    cells = corruption_cells(results)
    if not cells:
        return []
    plt, sns = plt_setup()
    palette = method_palette(sns, paper.order_methods(c.method for c in cells.values()))
    out = []
    for source, target in paper.order_pairs((c.source, c.target) for c in cells.values()):
        chosen = [c for c in cells.values() if (c.source, c.target) == (source, target)]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        styles = ["-", "--", ":", "-."]
        finetuners = paper.order_finetuners(c.finetuner for c in chosen)
        for cell in sorted(chosen, key=lambda c: (finetuners.index(c.finetuner), c.method)):
            points = [(s, cell.metrics.get(f"sev{s}")) for s in SEVERITIES]
            points = [(s, a) for s, a in points if a is not None]
            if not points:
                continue
            xs = [s for s, _ in points]
            label = f"{results.method_label(cell.method)} / {paper.finetuner_label(cell.finetuner)}" + \
                    (" (generated)" if cell.generated else "")
            color = palette[cell.method]
            ax.plot(xs, [pct(a.mean) for _, a in points], marker="o", color=color, label=label,
                    linestyle=styles[finetuners.index(cell.finetuner) % len(styles)])
            ax.fill_between(xs, [pct(a.ci95[0]) for _, a in points], [pct(a.ci95[1]) for _, a in points],
                            color=color, alpha=0.12, linewidth=0)
        ax.set_xticks(list(SEVERITIES))
        ax.set_xlabel("corruption severity (mean over the corruptions measured)")
        ax.set_ylabel("accuracy (%)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize="small", frameon=False)
        pair = paper.pair_label(source, target)
        title = f"Accuracy against corruption severity — {pair}"
        ax.set_title(title)
        fig.tight_layout()
        generated = any(c.generated for c in chosen)
        caption = (f"Accuracy of each classifier under common corruptions on {pair}, by severity (1-5), averaged over "
                   f"the corruptions measured. Bands: 95% intervals."
                   + (" Lines marked 'generated' use corruptions generated with imagecorruptions (ImageNet-C "
                      "parameters), not the official files." if generated else ""))
        out.append(save(fig, folder, slug("corruptions_by_severity", source, target), title, caption))
    return out
