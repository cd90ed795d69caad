"""The paper's AdvCL ablation tables in its layout: Table 4 (contrastive views) and Table 5 (f_pre and K).

Input: a list of `VariantResult`, one per AdvCL variant cell (its settings, its RA and SA
aggregated over seeds, the variant's label, finetuner and dataset pair). `variant_results(results)`
makes them from a results folder's AdvCL rows (`bench.report.variants`), and `build_ablations`
gives Table 4 and/or Table 5 when those rows differ in the settings the table is about.

- Table 4: a row per view set of the paper (`paper_numbers.json` "table4"); a variant's row is
  found from `settings["views"]` (a tuple of methods/advcl.py view names, in any order, or a row
  number 1-7).
- Table 5: a row per (f_pre setup, K); a variant's row comes from `settings["pseudo_labels"]`
  (none -> "w/o ClusterFit"; simclr -> (CIFAR-10, SimCLR), the SimCLR model the harness pretrains
  on the same unlabeled data; imagenet -> (ImageNet, supervised); file:PATH -> (ImageNet, SimCLR),
  the official label file's setup, unless `VariantResult.f_pre` names another) and
  `settings["cluster_ks"]` (one K -> that row; {2, 10, 50, 100, 500} -> "Ensemble").
  `ce_weight = 0` is the run without ClusterFit too.

Every paper row is shown (the paper's layout), with our value(s) where a variant matches it: each
matching variant gets its own line. Variants that match no row are listed under the table. The
paper's values stand beside ours always; the difference (ours − paper, points) only where the
cell has the paper's setting (CIFAR-10, SLF): a synthetic smoke run shows the layout, not a
comparison. One table per (finetuner, dataset pair) among the inputs.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from bench.report import paper
from bench.report.collect import Aggregate, pct
from bench.report.tables import (DASH, VALUE_LEGEND, fmt_diff, md_escape, metric_lines, sup, tex_escape,
                                 value_text)

METRICS = ("ra", "sa")
DEFAULT_PSEUDO_LABELS = "simclr"  # methods/advcl.py's defaults, for settings that leave them out
PSEUDO_LABEL_F_PRE = {"none": "none", "simclr": "cifar10_simclr", "imagenet": "imagenet_supervised",
                      "file": "imagenet_simclr"}


@dataclass
class VariantResult:
    """One AdvCL variant cell. `settings`: its advcl settings (at least the ones that differ between
    variants: views, pseudo_labels, cluster_ks, ce_weight); `ra`, `sa`: aggregates over seeds."""

    settings: Mapping[str, Any]
    ra: Aggregate | None
    sa: Aggregate | None
    label: str = ""
    f_pre: str | None = None  # Table 5: an explicit f_pre key (e.g. a label file of another model's features)
    finetuner: str = "slf"
    source: str = "cifar10"
    target: str = "cifar10"

    def metric(self, name: str) -> Aggregate | None:
        return {"ra": self.ra, "sa": self.sa}[name]

    @property
    def paper_setting(self) -> bool:
        """Whether the cell has the paper's setting for these tables (CIFAR-10, SLF)."""
        return (self.finetuner, self.source, self.target) == ("slf", "cifar10", "cifar10")


# ---------------------------------------------------------------- which row


def table4_key(settings: Mapping[str, Any]) -> int | None:
    """The paper's Table 4 row number of a variant's view set, or None."""
    views = settings.get("views")
    if views is None:
        return None
    row = paper.table4_row(views if isinstance(views, int) else tuple(views))
    return row["row"] if row else None


def _ks(settings: Mapping[str, Any]) -> tuple[int, ...]:
    ks = settings.get("cluster_ks", paper.table5()["ensemble"])
    return tuple(sorted(int(k) for k in ([ks] if isinstance(ks, int) else ks)))


def table5_key(settings: Mapping[str, Any], f_pre: str | None = None) -> tuple[str, int | str | None] | None:
    """The paper's Table 5 row, as (f_pre key, K), of a variant's pseudo-label settings, or None."""
    source = str(settings.get("pseudo_labels", DEFAULT_PSEUDO_LABELS))
    if source == "none" or float(settings.get("ce_weight", 1.0)) == 0:
        key: tuple[str, int | str | None] = ("none", None)
    else:
        kind = "file" if source.startswith("file:") or source == "file" else source
        f_pre = f_pre or PSEUDO_LABEL_F_PRE.get(kind)
        ks = _ks(settings)
        if f_pre is None or not ks:
            return None
        k: int | str | None = ks[0] if len(ks) == 1 else ("ensemble" if list(ks) == paper.table5()["ensemble"] else None)
        if k is None:
            return None
        key = (f_pre, k)
    return key if paper.table5_row(*key) is not None else None


def k_label(k: int | str | None) -> str:
    return "w/o ClusterFit" if k is None else ("Ensemble" if k == "ensemble" else str(k))


def describe(settings: Mapping[str, Any], table: str) -> str:
    """A variant without a label, in the few settings that tell it apart in this table."""
    parts = []
    if table == "table4":
        if "pseudo_labels" in settings:
            parts.append(f"pseudo_labels={settings['pseudo_labels']}")
        if "cluster_ks" in settings:
            parts.append("K=" + ",".join(map(str, _ks(settings))))
    else:
        row = table4_key(settings)
        if "views" in settings:
            parts.append(f"views: Table 4 row {row}" if row else "views=" + ",".join(settings["views"]))
    if "ce_weight" in settings:
        parts.append(f"ce_weight={settings['ce_weight']}")
    return "; ".join(parts) or "default"


# ---------------------------------------------------------------- the table model


@dataclass
class AblationRow:
    labels: list[str]       # the paper's row labels (Markdown / CSV text)
    tex_labels: list[str]
    key: Any                # Table 4: the row number; Table 5: (f_pre, K)
    paper: dict[str, float]
    result: VariantResult | None = None
    variant: str = ""
    note: int | None = None
    first_of_block: bool = True  # Table 5: the first row of an f_pre block shows its label

    def diff(self, metric: str) -> float | None:
        agg = self.result.metric(metric) if self.result is not None else None
        if agg is None or not self.result.paper_setting or metric not in self.paper:
            return None
        return round(pct(agg.mean), 2) - round(self.paper[metric], 2)


@dataclass
class AblationTable:
    id: str
    title: str
    caption: str
    row_header: list[str]
    finetuner: str
    pair: tuple[str, str]
    rows: list[AblationRow] = field(default_factory=list)
    unmatched: list[VariantResult] = field(default_factory=list)
    footnotes: list[tuple[int, str]] = field(default_factory=list)

    @property
    def comparable(self) -> bool:
        return (self.finetuner, *self.pair) == ("slf", "cifar10", "cifar10")


def _groups(entries: list[VariantResult]) -> list[tuple[tuple[str, str, str], list[VariantResult]]]:
    out: dict[tuple[str, str, str], list[VariantResult]] = {}
    for e in entries:
        out.setdefault((e.finetuner, e.source, e.target), []).append(e)
    pairs = paper.order_pairs({(s, t) for _, s, t in out})
    fts = paper.order_finetuners({f for f, _, _ in out})
    return sorted(out.items(), key=lambda kv: (pairs.index(kv[0][1:]), fts.index(kv[0][0])))


def _variant(e: VariantResult, table: str) -> str:
    return e.label or describe(e.settings, table)


def _footnote(e: VariantResult, variant: str) -> str:
    a = e.ra or e.sa
    seeds = ", ".join(map(str, a.seeds)) if a is not None else "none"
    parts = [f"{variant}: seeds {seeds}"]
    for metric in METRICS:
        agg = e.metric(metric)
        name = paper.METRIC_LABELS[metric]
        parts.append(f"{name} not measured" if agg is None else f"{name} " + ", ".join(metric_lines(agg)[1:3]))
    return "; ".join(parts)


def _legend(table: AblationTable, extra: str) -> str:
    comparison = ("in parentheses the paper's published value and our difference (ours − paper, points)"
                  if table.comparable else
                  "in parentheses the paper's published value (CIFAR-10, SLF); no difference is shown, these cells "
                  f"are {paper.pair_label(*table.pair)}, {paper.finetuner_label(table.finetuner)}")
    return (f"Each cell: our {VALUE_LEGEND}; the superscript numbers a footnote with the seeds, n and 95% intervals; "
            f"{comparison}. {DASH} = no variant of ours has this row's setting. {extra}").strip()


def _build(entries: list[VariantResult], table: str) -> list[AblationTable]:
    spec = paper.table4() if table == "table4" else paper.table5()
    out = []
    for (ft, source, target), group in _groups(entries):
        pair = (source, target)
        suffix = "" if (ft, source, target) == ("slf", "cifar10", "cifar10") else \
            f" — ours: {paper.pair_label(*pair)}, {paper.finetuner_label(ft)}"
        header = (["Row", "Contrastive views", "Variant"] if table == "table4"
                  else ["f_pre setup: (dataset, training)", "Cluster number K", "Variant"])
        t = AblationTable(table if not suffix else f"{table}-{source}-{target}-{ft}", spec["title"] + suffix, "",
                          header, ft, pair)
        keyed: dict[Any, list[VariantResult]] = {}
        for e in group:
            key = table4_key(e.settings) if table == "table4" else table5_key(e.settings, e.f_pre)
            if key is None:
                t.unmatched.append(e)
            else:
                keyed.setdefault(key, []).append(e)
        previous_f_pre = None
        for prow in spec["rows"]:
            if table == "table4":
                key = prow["row"]
                labels, tex = [str(prow["row"]), prow["label"]], [str(prow["row"]), prow["tex"]]
            else:
                key = (prow["f_pre"], prow["k"])
                labels = [paper.f_pre_label(prow["f_pre"]), k_label(prow["k"])]
                tex = [paper.f_pre_label(prow["f_pre"], tex=True), k_label(prow["k"])]
            values = {m: float(prow[m]) for m in METRICS if m in prow}
            matches = sorted(keyed.get(key, []), key=lambda e: _variant(e, table))
            for j, e in enumerate(matches or [None]):
                row = AblationRow(labels, tex, key, values, e)
                if table == "table5":
                    row.first_of_block = prow["f_pre"] != previous_f_pre
                    previous_f_pre = prow["f_pre"]
                if e is not None:
                    row.variant = _variant(e, table)
                    row.note = len(t.footnotes) + 1
                    t.footnotes.append((row.note, _footnote(e, row.variant)))
                t.rows.append(row)
        extra = spec.get("note", "")
        if table == "table4":
            extra += (" Every paper row uses ClusterFit with f_pre = ImageNet SimCLR and the K ensemble (Table 5's "
                      "last row); the Variant column names our setting.")
        t.caption = _legend(t, extra)
        out.append(t)
    return out


def build_table4(entries: list[VariantResult]) -> list[AblationTable]:
    """Table 4 (contrastive views) for these variants, one table per (finetuner, dataset pair)."""
    return _build(list(entries), "table4")


def build_table5(entries: list[VariantResult]) -> list[AblationTable]:
    """Table 5 (f_pre setup and K) for these variants, one table per (finetuner, dataset pair)."""
    return _build(list(entries), "table5")


# ---------------------------------------------------------------- text of a cell


def _cell(row: AblationRow, metric: str) -> tuple[str, str]:
    """(ours with its footnote mark, the reference in parentheses or "")."""
    agg = row.result.metric(metric) if row.result is not None else None
    ours = (value_text(agg) if agg is not None else DASH)
    ref = row.paper.get(metric)
    if ref is None:
        return ours, ""
    d = row.diff(metric)
    return ours, (f"{ref:.2f}; {fmt_diff(d)}" if d is not None else f"{ref:.2f}")


def _unmatched_lines(t: AblationTable, table: str) -> list[str]:
    out = []
    for e in t.unmatched:
        values = ", ".join(f"{paper.METRIC_LABELS[m]} {value_text(e.metric(m)) if e.metric(m) else DASH}"
                           for m in METRICS)
        settings = ", ".join(f"{k}={v}" for k, v in sorted(e.settings.items())
                             if k in ("views", "pseudo_labels", "cluster_ks", "ce_weight"))
        out.append(f"{_variant(e, table)} ({settings}): {values}")
    return out


def _which(t: AblationTable) -> str:
    return "table4" if t.id.startswith("table4") else "table5"


# ---------------------------------------------------------------- Markdown


def ablation_markdown(t: AblationTable) -> str:
    header = t.row_header + [f"{paper.METRIC_LABELS[m]} (%)" for m in METRICS]
    lines = [f"### {t.title}", "", t.caption, "", "| " + " | ".join(md_escape(h) for h in header) + " |",
             "|" + "|".join(["---"] * len(t.row_header) + ["--:"] * len(METRICS)) + "|"]
    for row in t.rows:
        labels = list(row.labels)
        if not row.first_of_block:
            labels[0] = ""
        cells = [md_escape(x) for x in labels] + [md_escape(row.variant) if row.variant else DASH]
        for m in METRICS:
            ours, ref = _cell(row, m)
            cells.append(ours + (sup(row.note) if row.result is not None and row.result.metric(m) else "")
                         + (f" ({md_escape(ref)})" if ref else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {sup(n)} {md_escape(text)}" for n, text in t.footnotes]
    if t.footnotes:
        lines.append("")
    unmatched = _unmatched_lines(t, _which(t))
    if unmatched:
        lines += [f"Variants without a row in the paper's {t.title.split(':', 1)[0]}:", ""]
        lines += [f"- {md_escape(u)}" for u in unmatched] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------- LaTeX (booktabs)


def ablation_tex(t: AblationTable) -> str:
    spec = "l" * len(t.row_header) + " " + "r" * len(METRICS)
    caption = t.title.split(": ", 1)[-1] + f" (layout of the paper's {t.title.split(':', 1)[0]})"
    lines = [f"% {tex_escape(t.title)}", r"\begin{table}[!htbp]", r"\centering", f"\\caption{{{tex_escape(caption)}}}",
             f"\\label{{tab:bench-{t.id}}}", f"\\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join([tex_escape(h) for h in t.row_header] + [f"{paper.METRIC_LABELS[m]} (\\%)" for m in METRICS])
             + r" \\", r"\midrule"]
    for i, row in enumerate(t.rows):
        if _which(t) == "table5" and row.first_of_block and i > 0:
            lines.append(r"\midrule")
        if _which(t) == "table4":  # the view set is LaTeX math already
            labels = [tex_escape(row.tex_labels[0]), row.tex_labels[1]]
        else:
            labels = [tex_escape(row.tex_labels[0]) if row.first_of_block else "", tex_escape(row.tex_labels[1])]
        cells = labels + [tex_escape(row.variant) if row.variant else "---"]
        for m in METRICS:
            ours, ref = _cell(row, m)
            text = tex_escape(ours)
            if row.result is not None and row.result.metric(m) is not None:
                text += f"$^{{{row.note}}}$"
            if ref:
                text += f" {{\\scriptsize({tex_escape(ref)})}}"
            cells.append(text)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    notes = [tex_escape(t.caption)] + [f"$^{{{n}}}$ {tex_escape(text)}" for n, text in t.footnotes]
    unmatched = _unmatched_lines(t, _which(t))
    if unmatched:
        notes.append(tex_escape("Variants without a row in the paper's table: " + "; ".join(unmatched)))
    lines += [r"\par\smallskip\begin{minipage}{\textwidth}\scriptsize\raggedright", "\n\n".join(notes),
              r"\end{minipage}", r"\end{table}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- CSV (long / tidy)

CSV_FIELDS = ["table", "finetuner", "source", "target", "paper_row", "paper_f_pre", "paper_k", "paper_label",
              "variant", "settings", "matched", "metric", "n_seeds", "seeds", "value_pct", "std_pct", "n",
              "ci95_low_pct", "ci95_high_pct", "paper_pct", "diff_paper_pct", "paper_setting"]


def _r(x: float | None) -> Any:
    return "" if x is None else round(x, 4)


def ablation_csv_rows(tables: list[AblationTable]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for t in tables:
        which = _which(t)
        base = {"table": which, "finetuner": t.finetuner, "source": t.pair[0], "target": t.pair[1],
                "paper_setting": t.comparable}
        items = [(r, r.result) for r in t.rows] + [(None, e) for e in t.unmatched]
        for row, e in items:
            for m in METRICS:
                out = dict(base, metric=m, matched=row is not None)
                if row is not None:
                    out["paper_label"] = " ".join(row.labels[1:] if which == "table4" else row.labels)
                    if which == "table4":
                        out["paper_row"] = row.key
                    else:
                        out["paper_f_pre"], out["paper_k"] = row.key[0], "" if row.key[1] is None else row.key[1]
                    out["paper_pct"] = _r(row.paper.get(m))
                    out["diff_paper_pct"] = _r(row.diff(m))
                if e is not None:
                    out["variant"] = _variant(e, which)
                    out["settings"] = json.dumps(dict(e.settings), sort_keys=True, default=str)
                    a = e.metric(m)
                    if a is not None:
                        lo, hi = a.ci95
                        out.update({"n_seeds": a.k, "seeds": ";".join(map(str, a.seeds)), "value_pct": _r(pct(a.mean)),
                                    "std_pct": _r(pct(a.std)), "n": min(a.n), "ci95_low_pct": _r(pct(lo)),
                                    "ci95_high_pct": _r(pct(hi))})
                rows.append(out)
    return rows


def ablation_csv(tables: list[AblationTable]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in ablation_csv_rows(tables):
        writer.writerow({k: row.get(k, "") for k in CSV_FIELDS})
    return buf.getvalue()


# ---------------------------------------------------------------- HTML


def ablation_html(t: AblationTable) -> str:
    from html import escape

    header = t.row_header + [f"{paper.METRIC_LABELS[m]} (%)" for m in METRICS]
    parts = [f'<section id="{escape(t.id)}"><h2>{escape(t.title)}</h2>', f'<p class="caption">{escape(t.caption)}</p>',
             '<table class="report"><thead><tr>' + "".join(f"<th>{escape(h)}</th>" for h in header)
             + "</tr></thead><tbody>"]
    for i, row in enumerate(t.rows):
        block = ' class="block"' if _which(t) == "table5" and row.first_of_block and i > 0 else ""
        labels = list(row.labels)
        if not row.first_of_block:
            labels[0] = ""
        cells = [f'<th class="rowlabel">{escape(x)}</th>' for x in labels]
        cells.append(f'<td>{escape(row.variant) if row.variant else DASH}</td>')
        for m in METRICS:
            ours, ref = _cell(row, m)
            body = f'<span class="v">{escape(ours)}</span>'
            if row.result is not None and row.result.metric(m) is not None:
                body += f'<sup><a href="#{escape(t.id)}-fn{row.note}">{row.note}</a></sup>'
            if ref:
                body += f'<div class="ref">paper {escape(ref)}</div>'
            cells.append(f'<td class="num">{body}</td>')
        parts.append(f"<tr{block}>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    if t.footnotes:
        parts.append('<ol class="notes">' + "".join(f'<li id="{escape(t.id)}-fn{n}" value="{n}">{escape(text)}</li>'
                                                    for n, text in t.footnotes) + "</ol>")
    unmatched = _unmatched_lines(t, _which(t))
    if unmatched:
        which = escape(t.title.split(":", 1)[0])
        parts.append(f'<p class="caption">Variants without a row in the paper\'s {which}:</p>'
                     '<ul class="notes">' + "".join(f"<li>{escape(u)}</li>" for u in unmatched) + "</ul>")
    parts.append("</section>")
    return "\n".join(parts)


# ---------------------------------------------------------------- from a results folder

TABLE5_SETTINGS = ("pseudo_labels", "cluster_ks", "ce_weight")


def variant_results(results: Any) -> list[VariantResult]:
    """The AdvCL cells of a `bench.report.collect.Results` (one per configuration row) as VariantResults.

    A label-file variant is (ImageNet, SimCLR), the setup of the official release's label file,
    unless its variant label starts with another f_pre key (the table5 preset's
    `imagenet_supervised_k10`, ...)."""
    out = []
    for cell in results.cells.values():
        if cell.base_method != "advcl":
            continue
        f_pre = None
        if str(cell.settings.get("pseudo_labels", "")).startswith("file:") and cell.variant:
            f_pre = next((k for k in paper.table5()["f_pre"] if k != "none" and cell.variant.startswith(k)), None)
        out.append(VariantResult(cell.settings, cell.metrics["ra"], cell.metrics["sa"], label=cell.variant or "",
                                 f_pre=f_pre, finetuner=cell.finetuner, source=cell.source, target=cell.target))
    return out


def build_ablations(results: Any) -> list[AblationTable]:
    """Table 4 when the AdvCL cells have two or more view sets, Table 5 when they have two or more
    ClusterFit setups (pseudo-label source, K, ce_weight)."""
    entries = variant_results(results)
    views = {frozenset(e.settings.get("views") or ()) for e in entries}
    clusterfit = {json.dumps([e.settings.get(k) for k in TABLE5_SETTINGS], default=str) for e in entries}
    tables: list[AblationTable] = []
    if len(views) > 1:
        tables += build_table4(entries)
    if len(clusterfit) > 1:
        tables += build_table5(entries)
    return tables
