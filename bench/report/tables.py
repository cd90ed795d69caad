"""Report tables in the layouts of the paper's Tables 1-3, and their Markdown, LaTeX and CSV forms.

- Table 1: rows pretraining method x finetuner, columns dataset x (AA, RA, SA), in-domain cells
  (pretrain and finetune/test on the same dataset).
- Table 2: the same for cross-dataset cells (source -> target).
- Table 3: rows methods, columns dataset x (SLF, ALF) x (RA, SA), when ALF results exist.

Every shown number is an `Entry`: our mean over seeds (with its std over seeds when there are
several), the reference value beside it (the paper's, or another results folder's with `--compare`)
and our difference, and the marks of flagged cells (see `MARKS`). What every cell of a table shares
(seeds, n, the interval's width, flags and warnings common to all) is said once, in the table's
`shared` lines; a cell gets a footnote only for what differs (other seeds or n, a missing result,
the other folder's numbers when comparing), and a warning that several cells share is listed once
with the cells it applies to. Each number's own 95% interval is in the CSV and the HTML hover. The
numbers others published for the table's cells (`paper.references_for`) follow each table, labelled
by source and protocol.

Every text that comes from a record or a failure (warnings, flags, error messages, labels) is
escaped for each format (`md_escape`, `tex_escape`, `csv_text`; the HTML page uses `html.escape`).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

from bench.record import COLLAPSE_FLAG
from bench.report import paper
from bench.report.collect import Aggregate, Cell, Missing, Results, missing_summary, pct
from bench.report.others import others_markdown
from bench.report.paper import Reference

DASH = "—"
MARKS = {
    "†": "model selected on the test set (selection=test): optimistic, not comparable with validation-selected numbers",
    "‡": "sanity warnings from the evaluation",
    "§": "other flags",
}
SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


# ---------------------------------------------------------------- the model


def spread_text(a: Aggregate) -> str:
    """" ± std" over two or more seeds; a single seed has no spread over seeds: " [95% interval]"."""
    if a.k > 1:
        return f" ± {pct(a.std):.2f}"
    lo, hi = a.ci95
    return f" [{pct(lo):.2f}, {pct(hi):.2f}]"


def value_text(a: Aggregate) -> str:
    return f"{pct(a.mean):.2f}{spread_text(a)}"


def compact_text(a: Aggregate) -> str:
    """The value as a table cell shows it: the mean, with " ± std" over two or more seeds (a single
    seed's interval is in the table's shared note, the CSV and the HTML hover)."""
    return f"{pct(a.mean):.2f}" + (f" ± {pct(a.std):.2f}" if a.k > 1 else "")


def interval_text(a: Aggregate) -> str:
    lo, hi = a.ci95
    return f"95% CI [{pct(lo):.2f}, {pct(hi):.2f}]"


@dataclass
class Entry:
    """One shown number: ours (an Aggregate or nothing), the reference beside it, marks, footnote."""

    metric: str
    agg: Aggregate | None
    ref: float | None = None              # reference value, %
    ref_agg: Aggregate | None = None      # compare mode: the other folder's aggregate
    note: int | None = None               # footnote number
    marks: str = ""
    status: str = ""                      # "failed", "blocked: pretrain failed", ... for a missing cell
    compare: bool = False                 # the reference is another results folder
    ref_status: str = ""                  # compare mode: why the other folder has no result

    @property
    def value(self) -> float | None:
        return pct(self.agg.mean) if self.agg is not None else None

    @property
    def diff(self) -> float | None:
        if self.value is None or self.ref is None:
            return None
        return round(self.value, 2) - round(self.ref, 2)

    def ours_text(self) -> str:
        return DASH if self.agg is None else compact_text(self.agg)

    def ref_value_text(self) -> str | None:
        """The reference as shown: the paper's value, the other folder's (— when it has none), or None."""
        if self.compare:
            if self.ref_agg is None:
                return DASH + (f" {self.ref_status}" if self.ref_status else "")
            return compact_text(self.ref_agg)
        return f"{self.ref:.2f}" if self.ref is not None else None

    def ref_text(self) -> str:
        ref = self.ref_value_text()
        if ref is None:
            return ""
        return ref if self.diff is None else f"{ref}; {fmt_diff(self.diff)}"

    def hover(self, cell_label: str) -> str:
        """Plain-text description (HTML title)."""
        lines = [f"{cell_label}, {paper.METRIC_LABELS[self.metric]}"]
        if self.agg is None:
            lines.append(f"no result{f' ({self.status})' if self.status else ''}")
        else:
            lines += metric_lines(self.agg)
        return "\n".join(lines)


def fmt_diff(d: float) -> str:
    return f"{d:+.2f}".replace("-", "−")


def metric_lines(a: Aggregate) -> list[str]:
    lo, hi = a.ci95
    plo, phi = a.pooled_ci95
    seeds = ", ".join(map(str, a.seeds))
    out = [f"{pct(a.mean):.2f}% over {a.k} seed{'s' if a.k > 1 else ''} ({seeds})",
           f"n = {a.n_label} per seed",
           f"95% CI [{pct(lo):.2f}, {pct(hi):.2f}] ({a.ci_kind})"]
    if a.k > 1:
        out.append(f"std over seeds {pct(a.std):.2f}; per seed "
                   + ", ".join(f"{pct(v):.2f}" for v in a.values))
        out.append(f"pooled {a.correct_total}/{a.n_total}: Wilson 95% CI [{pct(plo):.2f}, {pct(phi):.2f}]")
    else:
        out.append(f"{a.correct_total}/{a.n_total} correct")
    return out


@dataclass
class Group:
    label: str
    pair: tuple[str, str]
    metrics: list[str]
    finetuner: str | None = None  # Table 3: SLF / ALF column groups

    @property
    def full_label(self) -> str:
        return f"{self.label} {paper.finetuner_label(self.finetuner)}" if self.finetuner else self.label


@dataclass
class Row:
    labels: list[str]
    method: str
    finetuner: str | None
    entries: list[list[Entry]]  # per group, per metric
    cells: list[str]            # per group: the cell's label (for hovers)


@dataclass
class Footnote:
    number: int
    label: str
    lines: list[str]

    @property
    def text(self) -> str:
        return f"{self.label}: " + "; ".join(self.lines)


@dataclass
class Table:
    id: str
    title: str
    caption: str
    row_header: list[str]
    groups: list[Group]
    rows: list[Row] = field(default_factory=list)
    footnotes: list[Footnote] = field(default_factory=list)
    flagged: list[tuple[str, str, str]] = field(default_factory=list)  # (mark, cell label, text), not shared
    ref_name: str = "paper"
    shared: list[str] = field(default_factory=list)                # what every cell shares, in words
    shared_flags: list[tuple[str, str]] = field(default_factory=list)  # (mark, text) of every cell
    published: list["PublishedCell"] = field(default_factory=list)  # others' numbers for these cells

    def flag_groups(self) -> list[tuple[str, str, list[str]]]:
        """(mark, text, cell labels): each distinct flag once, with the cells it applies to."""
        groups: dict[tuple[str, str], list[str]] = {}
        for mark, label, text in self.flagged:
            groups.setdefault((mark, text), []).append(label)
        return [(mark, text, labels) for (mark, text), labels in groups.items()]

    def marks_used(self) -> list[str]:
        return [m for m in MARKS if any(f[0] == m for f in self.flagged) or any(f[0] == m for f in self.shared_flags)]

    def sources(self) -> list[tuple[str, Reference]]:
        """(letter, a reference of that source and protocol): each distinct source once, lettered."""
        out: dict[tuple[str, str, str], tuple[str, Reference]] = {}
        for item in self.published:
            for ref in item.references:
                key = _source_key(ref)
                if key not in out:
                    out[key] = (_letter(len(out)), ref)
        return list(out.values())

    def source_letter(self, ref: Reference) -> str:
        return next(letter for letter, r in self.sources() if _source_key(r) == _source_key(ref))


@dataclass
class PublishedCell:
    """What others published for one cell of a table (none of it under the harness's protocol)."""

    label: str
    method: str
    references: list[Reference]


def _source_key(ref: Reference) -> tuple[str, str, str]:
    return (ref.source_label, ref.protocol, ref.citation)


def _letter(i: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return letters[i] if i < 26 else letters[i // 26 - 1] + letters[i % 26]

    @property
    def empty(self) -> bool:
        return not self.rows


# ---------------------------------------------------------------- building


def expected_cells(results: Results) -> dict[tuple[str, str, str, str], Missing]:
    """Cells without a result whose evaluate job exists: failed, blocked by a failed job it needs, unfinished."""
    out: dict[tuple[str, str, str, str], Missing] = {}
    for m in results.missing:
        if m.kind == "evaluate" and m.method and m.finetuner and (m.source or m.target):
            key = (paper.row_name(m.method, m.variant), m.finetuner, m.source or m.target, m.target or m.source)
            if key not in results.cells:
                out.setdefault(key, m)
    return out


class _Builder:
    def __init__(self, results: Results, other: Results | None):
        self.results, self.other = results, other
        self.expected = expected_cells(results)
        self.other_expected = expected_cells(other) if other is not None else {}

    def keys(self) -> set[tuple[str, str, str, str]]:
        out = set(self.results.cells) | set(self.expected)
        if self.other is not None:
            out |= set(self.other.cells) | set(self.other_expected)
        return out

    def table(self, id: str, title: str, caption: str, row_header: list[str], groups: list[Group],
              rows: list[tuple[list[str], str, str | None]]) -> Table:
        ref_name = self.other.label if self.other is not None else "paper"
        table = Table(id, title, caption, row_header, groups, ref_name=ref_name)
        # the cells of the table, in order: (row, group) -> (key, label)
        slots = [[((method, g.finetuner or row_ft, *g.pair), self.label(method, g.finetuner or row_ft, g.pair))
                  for g in groups] for _, method, row_ft in rows]
        shown = list(dict.fromkeys(key for row in slots for key, _ in row if key in self.results.cells))
        cells = [self.results.cells[k] for k in shown]
        common = shared_reasons(cells)
        table.shared_flags = [r for r in _reasons(cells[0]) if r in common] if cells else []
        metrics = [m for m in paper.METRICS if any(m in g.metrics for g in groups)]
        usual = usual_cell(cells, metrics)
        table.shared = shared_lines(cells, usual, metrics) if self.other is None else []
        notes: dict[tuple, int] = {}
        for (labels, method, row_ft), row_slots in zip(rows, slots):
            entries, cell_labels = [], []
            for g, (key, label) in zip(groups, row_slots):
                ft = key[1]
                cell = self.results.cells.get(key)
                other = self.other.cells.get(key) if self.other is not None else None
                missing = self.expected.get(key)
                other_missing = self.other_expected.get(key)
                cell_labels.append(label)
                number = None
                if self.needs_note(cell, other, missing, other_missing, usual, metrics):
                    if key not in notes:
                        notes[key] = len(table.footnotes) + 1
                        table.footnotes.append(Footnote(notes[key], label,
                                                        self.note_lines(cell, other, missing, other_missing)))
                    number = notes[key]
                marks = ""
                if cell is not None:
                    own = [r for r in _reasons(cell) if r not in common]
                    marks = "".join(m for m in MARKS if any(r[0] == m for r in own))
                    for mark, text in own:
                        if (mark, label, text) not in table.flagged:
                            table.flagged.append((mark, label, text))
                row_entries = []
                for metric in g.metrics:
                    agg = cell.metrics.get(metric) if cell is not None else None
                    if self.other is not None:
                        ref_agg = other.metrics.get(metric) if other is not None else None
                        ref = pct(ref_agg.mean) if ref_agg is not None else None
                    else:
                        ref_agg, ref = None, paper.published(method, ft, *g.pair, metric)
                    row_entries.append(Entry(
                        metric, agg, ref, ref_agg, number,
                        marks=marks if agg is not None else "",
                        status=missing.status if missing is not None else "",
                        compare=self.other is not None,
                        ref_status=other_missing.status if (other is None and other_missing is not None) else ""))
                entries.append(row_entries)
                published = paper.references_for(method, ft, *g.pair)
                if published and not any(p.label == label for p in table.published):
                    table.published.append(PublishedCell(label, method, published))
            table.rows.append(Row(labels, method, row_ft, entries, cell_labels))
        return table

    def label(self, method: str, finetuner: str | None, pair: tuple[str, str]) -> str:
        return f"{self.results.method_label(method)} / {paper.finetuner_label(finetuner)} / {paper.pair_label(*pair)}"

    def needs_note(self, cell: Cell | None, other: Cell | None, missing: Missing | None,
                   other_missing: Missing | None, usual: dict[str, Any], metrics: list[str]) -> bool:
        """A footnote for what the table's shared note does not say: a missing result, other seeds or
        n than the other cells, or (comparing) the other folder's numbers."""
        if self.other is not None:
            return cell is not None or missing is not None or other is not None or other_missing is not None
        if cell is None:
            return missing is not None
        return _cell_shape(cell, metrics) != usual

    def note_lines(self, cell: Cell | None, other: Cell | None, missing: Missing | None,
                   other_missing: Missing | None) -> list[str]:
        lines = _cell_lines(cell) if cell is not None else [_missing_line(missing)]
        if other is not None:
            lines.append(f"{self.other.label}: " + ", ".join(_cell_lines(other))
                         + (f" (flagged {other.marks})" if other.marks else ""))
        elif self.other is not None:
            lines.append(f"{self.other.label}: {_missing_line(other_missing)}")
        return lines


# ---------------------------------------------------------------- what the cells of a table share

# Flags whose warning says the same (the flag is for programs, the warning for the reader): one ‡, no §.
WORDED_FLAGS = {COLLAPSE_FLAG: "collapsed classifier"}


def _reasons(cell: Cell) -> list[tuple[str, str]]:
    """(mark, text) of everything a cell is flagged for."""
    out = [("†", "selected on the test set (selection=test)")] if cell.selection_on_test else []
    out += [("‡", w) for w in cell.sanity_warnings]
    unprefixed = [re.sub(r"^seed \d+: ", "", w) for w in cell.sanity_warnings]  # a multi-seed cell's warnings
    worded = {flag for flag, start in WORDED_FLAGS.items() if any(w.startswith(start) for w in unprefixed)}
    out += [("§", f"flag {f}") for f in cell.other_flags if f not in worded]
    return out


def shared_reasons(cells: list[Cell]) -> set[tuple[str, str]]:
    """The flags and warnings every one of `cells` has (none when there are fewer than two cells)."""
    if len(cells) < 2:
        return set()
    common = set(_reasons(cells[0]))
    for cell in cells[1:]:
        common &= set(_reasons(cell))
    return common


def _cell_shape(cell: Cell, metrics: list[str]) -> dict[str, Any]:
    """What the shared note says of a cell: its seeds and its n per metric shown."""
    return {"seeds": tuple(cell.seeds),
            **{m: (cell.metrics[m].n_label if cell.metrics.get(m) is not None else None) for m in metrics}}


def usual_cell(cells: list[Cell], metrics: list[str]) -> dict[str, Any]:
    """The seeds and n most cells have (ties: the first cell's); the shared note states them."""
    shapes = [_cell_shape(c, metrics) for c in cells]
    if not shapes:
        return {}
    return max(shapes, key=lambda s: (shapes.count(s), -shapes.index(s)))


def shared_lines(cells: list[Cell], usual: dict[str, Any], metrics: list[str]) -> list[str]:
    """The table's shared note: seeds, n and the width of the intervals of (most of) its cells."""
    if not cells:
        return []
    seeds = usual["seeds"]
    alike = sum(1 for c in cells if _cell_shape(c, metrics) == usual)
    who = "Every cell" if alike == len(cells) else f"{alike} of {len(cells)} cells (the others: footnotes)"
    by_n: dict[str, list[str]] = {}
    for m in sorted(metrics, key=("sa", "ra", "aa").index):
        if usual.get(m) is not None:
            by_n.setdefault(usual[m], []).append(paper.METRIC_LABELS[m])
    sizes = "; ".join(f"{_and(names)} on n = {n} test images" for n, names in
                      sorted(by_n.items(), key=lambda item: -int(str(item[0]).split("–")[0])))
    text = f"{who}: seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}" + (f"; {sizes}" if sizes else "")
    if len(seeds) == 1 and by_n:
        widest = min(int(str(n).split("–")[0]) for n in by_n)
        text += (f". One seed: each value's 95% Wilson interval is at most ±{wilson_halfwidth(widest):.1f} points "
                 f"wide at n = {widest} (each cell's own: report.csv, the HTML page's hover)")
    elif by_n:
        text += (". ± is the standard deviation over seeds; the 95% Student-t interval of each mean is in "
                 "report.csv and the HTML page's hover")
    return [text + "."]


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def wilson_halfwidth(n: int) -> float:
    """The largest half-width of a 95% Wilson interval at n (at p = 1/2), in points."""
    from bench.record import wilson_interval

    lo, hi = wilson_interval(n // 2, n) if n > 1 else (0.0, 1.0)
    return 100 * (hi - lo) / 2


def _missing_line(missing: Missing | None) -> str:
    if missing is None:
        return "no result here"
    return (f"no result: evaluate job {missing.key} {missing.state}"
            + (f" ({missing.detail})" if missing.detail else ""))


def _cell_lines(cell: Cell) -> list[str]:
    seeds = ", ".join(map(str, cell.seeds))
    lines = [f"seed{'s' if len(cell.seeds) > 1 else ''} {seeds}"]
    for metric in paper.METRICS:
        a = cell.metrics.get(metric)
        name = paper.METRIC_LABELS[metric]
        if a is None:
            lines.append(f"{name} not measured")
            continue
        lo, hi = a.ci95
        text = f"{name} n = {a.n_label}, 95% CI [{pct(lo):.2f}, {pct(hi):.2f}]"
        if a.k > 1:
            plo, phi = a.pooled_ci95
            text += f" (t over seeds; pooled Wilson [{pct(plo):.2f}, {pct(phi):.2f}])"
        lines.append(text)
    return lines


def _rows_method_finetuner(b: _Builder, pairs: list[tuple[str, str]]) -> list[tuple[list[str], str, str]]:
    keys = [k for k in b.keys() if (k[2], k[3]) in pairs]
    out = []
    for ft in paper.order_finetuners(k[1] for k in keys):
        for method in paper.order_methods(k[0] for k in keys if k[1] == ft):
            out.append(([b.results.method_label(method), paper.finetuner_label(ft)], method, ft))
    return out


def _pairs(b: _Builder) -> list[tuple[str, str]]:
    return paper.order_pairs((k[2], k[3]) for k in b.keys())


VALUE_LEGEND = ("mean over seeds in %, with ± the standard deviation over seeds; a single seed has no spread "
                "over seeds, so its value comes with its 95% Wilson interval in brackets, [low, high]")
CELL_VALUE = "value in % (the mean over seeds, ± their standard deviation when there are several)"
CELL_LEGEND_PAPER = (f"Each cell: our {CELL_VALUE}; in parentheses the paper's published value and our difference "
                     "(ours − paper, points); a superscript numbers the note of a cell that differs from what the "
                     f"table's cells share (said below the title). {DASH} = no result (with its reason when the job "
                     "exists).")


def _legend(other: Results | None) -> str:
    if other is None:
        return CELL_LEGEND_PAPER
    return (f"Each cell: the first results folder's {CELL_VALUE}; in parentheses the same for {other.label} and "
            "the difference (first − second, points); the superscript numbers a footnote with the seeds, n and "
            f"95% intervals of both. {DASH} = no result (with its reason when the job exists).")


def build_tables(results: Results, other: Results | None = None) -> list[Table]:
    """Tables 1-3 for whatever cells exist (in either folder when comparing)."""
    b = _Builder(results, other)
    pairs = _pairs(b)
    legend = _legend(other)
    vs = f" — {results.label} vs {other.label}" if other is not None else ""
    tables = []
    same = [p for p in pairs if p[0] == p[1]]
    cross = [p for p in pairs if p[0] != p[1]]
    metrics = list(paper.METRICS)
    if same:
        groups = [Group(paper.pair_label(*p), p, metrics) for p in same]
        tables.append(b.table("table1", f"Table 1: pretraining → finetuning on the same dataset (AA / RA / SA, %){vs}",
                              legend, ["Pretraining", "Finetuning"], groups, _rows_method_finetuner(b, same)))
    if cross:
        groups = [Group(paper.pair_label(*p), p, metrics) for p in cross]
        tables.append(b.table("table2", f"Table 2: cross-dataset, source → target (AA / RA / SA, %){vs}",
                              legend, ["Method", "Finetuning"], groups, _rows_method_finetuner(b, cross)))
    alf_pairs = [p for p in same if any(k[1] == "alf" and (k[2], k[3]) == p for k in b.keys())]
    if alf_pairs:
        groups = [Group(paper.pair_label(*p), p, ["ra", "sa"], ft) for p in alf_pairs for ft in ("slf", "alf")]
        methods = paper.order_methods(k[0] for k in b.keys() if k[1] in ("slf", "alf") and (k[2], k[3]) in alf_pairs)
        rows = [([results.method_label(m)], m, None) for m in methods]
        tables.append(b.table("table3", f"Table 3: standard vs adversarial linear finetuning, SLF vs ALF "
                                        f"(RA / SA, %){vs}", legend, ["Method"], groups, rows))
    return tables


# ---------------------------------------------------------------- Markdown


def sup(number: int | None) -> str:
    return str(number).translate(SUPERSCRIPT) if number else ""


_MD = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "|": "\\|", "*": "\\*", "_": "\\_", "`": "\\`", "\\": "\\\\",
       "\n": " ", "\r": " "}


def md_escape(text: str) -> str:
    """Text from a record or a failure as literal Markdown: no HTML (a `<script>` shows as text), no
    emphasis, code spans, table cells or links of its own, on one line."""
    out = "".join(_MD.get(ch, ch) for ch in str(text))
    return out.replace("](", "]\\(").replace("![", "!\\[")


def entry_md(e: Entry) -> str:
    text = e.ours_text() + (f" {md_escape(e.status)}" if e.agg is None and e.status else "") + sup(e.note)
    if e.agg is not None:
        text += e.marks
    ref = e.ref_text()
    return text + (f" ({md_escape(ref)})" if ref else "")


def cells_text(labels: list[str]) -> str:
    return labels[0] if len(labels) == 1 else f"{len(labels)} cells: " + "; ".join(labels)


def shared_flag_text(t: Table) -> str:
    return "Every cell is flagged: " + "; ".join(f"{m} {text}" for m, text in t.shared_flags)


def published_text(t: Table, item: PublishedCell) -> str:
    """'DynACL / SLF / CIFAR-10: AA 45.09, SA 75.41 [a]; DynACL-RCS: AA 44.94, SA 72.51 [b]'."""
    parts = []
    for ref in item.references:
        name = f"{ref.label}: " if ref.label and ref.label != paper.method_label(item.method) else ""
        parts.append(f"{name}{ref.text()} [{t.source_letter(ref)}]")
    return f"{item.label}: " + "; ".join(parts)


def source_text(letter: str, ref: Reference) -> str:
    return f"[{letter}] {ref.source_label}: {ref.protocol}" + (f" ({ref.citation})" if ref.citation else "")


PUBLISHED_HEAD = ("Published elsewhere for these cells, under other protocols (references beside ours, not "
                  "comparable with them)")


def table_markdown(t: Table) -> str:
    header = list(t.row_header) + [f"{g.full_label} {paper.METRIC_LABELS[m]}" for g in t.groups for m in g.metrics]
    align = ["---"] * len(t.row_header) + ["--:"] * (len(header) - len(t.row_header))
    lines = [f"### {md_escape(t.title)}", "", md_escape(t.caption), ""]
    lines += [md_escape(x) for x in t.shared] + ([""] if t.shared else [])
    if t.shared_flags:
        lines += [md_escape(shared_flag_text(t)), ""]
    lines += ["| " + " | ".join(md_escape(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    for row in t.rows:
        cells = [md_escape(x) for x in row.labels] + [entry_md(e) for group in row.entries for e in group]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if t.footnotes:
        lines += [f"- {sup(f.number)} {md_escape(f.text)}" for f in t.footnotes]
        lines.append("")
    if t.flagged:
        lines.append("Flagged cells: " + "; ".join(f"{m} = {MARKS[m]}" for m in t.marks_used()) + ".")
        lines.append("")
        lines += [f"- {m} {md_escape(text)} ({md_escape(cells_text(labels))})" for m, text, labels in t.flag_groups()]
        lines.append("")
    if t.published:
        lines += [PUBLISHED_HEAD + ":", ""]
        lines += [f"- {md_escape(published_text(t, item))}" for item in t.published]
        lines += ["", "Sources: " + " ".join(md_escape(source_text(letter, ref)) + "." for letter, ref in t.sources()),
                  ""]
    return "\n".join(lines)


def missing_markdown(results: Results) -> str:
    lines = []
    if results.missing:
        lines += [f"### Missing: {len(results.missing)} job(s) of {md_escape(results.label)} without a usable record",
                  ""]
        for m in sorted(results.missing, key=lambda m: (m.kind, m.key)):
            what = f" ({md_escape(m.what)})" if m.what else ""
            detail = f": {md_escape(m.detail)}" if m.detail else ""
            lines.append(f"- {md_escape(m.kind)} `{m.key.replace('`', '')}`{what}: **{md_escape(m.state)}**{detail}")
        lines.append("")
    if results.notes:
        lines += ["### Notes", ""] + [f"- {md_escape(n)}" for n in results.notes] + [""]
    return "\n".join(lines)


def no_results_text(results: Results) -> str:
    """What a folder without any evaluate result holds, in one sentence."""
    text = f"No evaluate results in {results.label} yet"
    if results.missing:
        return f"{text}: {missing_summary(results.missing)}, listed under Missing"
    return f"{text} ({results.n_records} record(s) of earlier jobs)"


FIDELITY_DOC = "docs/fidelity.md"
FIDELITY_NOTE = ("Every remaining difference from each method's and finetuner's official code (what, where, why, "
                 "expected effect, the option that restores it): " + FIDELITY_DOC + ".")


def header_markdown(results: Results, other: Results | None = None) -> str:
    lines = ["# bench report", "",
             f"Results: `{results.label}`: {len(results.cells)} cell(s) from {results.shown_records} "
             f"evaluate record(s)" + (f" (of {results.evaluate_records})"
                                      if results.shown_records != results.evaluate_records else "") + (f"; compared with `{other.label}` ({len(other.cells)} cell(s))"
                                      if other is not None else "") + ".", ""]
    if not results.cells:
        lines += [f"**{md_escape(no_results_text(results))}**", ""]
    protocols = results.protocols()
    if protocols:
        lines.append("Evaluation protocol" + ("s" if len(protocols) > 1 else "") + ":")
        lines.append("")
        lines += [f"- {md_escape(p)}" for p in protocols]
        lines.append("")
    lines += [FIDELITY_NOTE.replace(FIDELITY_DOC, f"[`{FIDELITY_DOC}`]({FIDELITY_DOC})"), ""]
    if other is None:
        lines.append("Paper: Fan et al., *When Does Contrastive Learning Preserve Adversarial Robustness from "
                     "Pretraining to Finetuning?* (NeurIPS 2021), ResNet-18, full test sets, AA = AutoAttack "
                     "standard, RA = PGD-20 at 8/255.")
        lines.append("")
    return "\n".join(lines)


def report_markdown(results: Results, tables: list[Table], other: Results | None = None,
                    figures: list[Any] | None = None, extra: list[str] = ()) -> str:
    """`extra`: more sections after the tables (the ablation tables, bench.report.ablations)."""
    parts = [header_markdown(results, other)]
    parts += [table_markdown(t) for t in tables]
    parts += list(extra)
    parts.append(others_markdown(results, md_escape))
    parts.append(missing_markdown(results))
    if other is not None and other.missing:
        parts.append(missing_markdown(other))
    if figures:
        lines = ["### Figures", ""]
        for fig in figures:
            lines.append(f"- {fig.title}: [{fig.png.name}](figures/{fig.png.name}), "
                         f"[{fig.pdf.name}](figures/{fig.pdf.name})")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(p for p in parts if p).rstrip() + "\n"


# ---------------------------------------------------------------- LaTeX (booktabs)

_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "—": "---", "–": "--",
        "→": r"$\rightarrow$", "±": r"$\pm$", "−": "-", "†": r"\dag{}", "‡": r"\ddag{}", "§": r"\S{}",
        "≤": r"$\leq$", "≥": r"$\geq$", "×": r"$\times$", "Δ": r"$\Delta$", "’": "'", "‘": "`",
        "“": "``", "”": "''", "·": r"$\cdot$", "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
        "\n": " ", "\r": " "}
TEX_MARKS = {"†": r"\dag", "‡": r"\ddag", "§": r"\S"}


def tex_escape(text: str) -> str:
    """Text as literal LaTeX (every special character, < and > included: in OT1 they print as ¡ and ¿),
    on one line, ASCII only."""
    out = "".join(_TEX.get(ch, ch) for ch in str(text))
    return out.encode("ascii", "replace").decode("ascii")


def entry_tex(e: Entry) -> str:
    sups = [str(e.note)] if e.note else []
    if e.agg is not None:
        sups += [TEX_MARKS[m] for m in e.marks]
    text = tex_escape(e.ours_text()) + ("$^{" + ",".join(sups) + "}$" if sups else "")
    if e.agg is None and e.status:
        text += f" {{\\scriptsize {tex_escape(e.status)}}}"
    ref = e.ref_text()
    if ref:
        text += f" {{\\scriptsize({tex_escape(ref)})}}"
    return text


def table_tex(t: Table) -> str:
    nrow = len(t.row_header)
    spec = "l" * nrow + "".join(" " + "r" * len(g.metrics) for g in t.groups)
    caption = t.title.split(": ", 1)[-1] + f" (layout of the paper's {t.title.split(':', 1)[0]})"
    lines = [f"% {tex_escape(t.title)}", r"\begin{table}[!htbp]", r"\centering", f"\\caption{{{tex_escape(caption)}}}",
             f"\\label{{tab:bench-{t.id}}}", r"\resizebox{\textwidth}{!}{%", f"\\begin{{tabular}}{{{spec}}}",
             r"\toprule"]
    top = [""] * nrow
    rules = []
    col = nrow + 1
    for g in t.groups:
        top.append(f"\\multicolumn{{{len(g.metrics)}}}{{c}}{{{tex_escape(g.full_label)}}}")
        rules.append(f"\\cmidrule(lr){{{col}-{col + len(g.metrics) - 1}}}")
        col += len(g.metrics)
    lines.append(" & ".join(top) + r" \\")
    lines.append(" ".join(rules))
    sub = [tex_escape(h) for h in t.row_header] + [f"{paper.METRIC_LABELS[m]} (\\%)" for g in t.groups for m in g.metrics]
    lines.append(" & ".join(sub) + r" \\")
    lines.append(r"\midrule")
    previous_ft = None
    for row in t.rows:
        if previous_ft is not None and row.finetuner != previous_ft:
            lines.append(r"\midrule")
        previous_ft = row.finetuner
        cells = [tex_escape(x) for x in row.labels] + [entry_tex(e) for group in row.entries for e in group]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}", ""]
    notes = [tex_escape(t.caption)] + [tex_escape(x) for x in t.shared]
    if t.shared_flags:
        notes.append("Every cell: " + "; ".join(f"{TEX_MARKS[m]}{{}} {tex_escape(text)}" for m, text in t.shared_flags))
    notes += [f"$^{{{f.number}}}$ {tex_escape(f.text)}" for f in t.footnotes]
    if t.flagged:
        notes.append("Flagged: " + "; ".join(f"{TEX_MARKS[m]}{{}} {tex_escape(MARKS[m])}" for m in t.marks_used()) + ".")
        notes += [f"{TEX_MARKS[m]}{{}} {tex_escape(text)} ({tex_escape(cells_text(labels))})"
                  for m, text, labels in t.flag_groups()]
    if t.published:
        notes.append(tex_escape(PUBLISHED_HEAD + ": " + "; ".join(published_text(t, item) for item in t.published)
                                + ". Sources: " + " ".join(source_text(l, r) + "." for l, r in t.sources())))
    lines.append(r"\par\smallskip\begin{minipage}{\textwidth}\scriptsize\raggedright")
    lines.append("\n\n".join(notes))
    lines += [r"\end{minipage}", r"\end{table}", ""]
    return "\n".join(lines)


def report_tex(results: Results, tables: list[Table], other: Results | None = None, extra: list[str] = ()) -> str:
    """A standalone LaTeX document (booktabs, graphicx); each table can also be \\input on its own."""
    lines = [r"% Generated by `bench report`. Needs \usepackage{booktabs,graphicx}.",
             r"\documentclass{article}", r"\usepackage[margin=1.5cm,landscape]{geometry}",
             r"\usepackage{booktabs}", r"\usepackage{graphicx}", r"\begin{document}",
             f"\\section*{{bench report: {tex_escape(results.label)}"
             + (f" vs {tex_escape(other.label)}" if other is not None else "") + "}", ""]
    for text in [table_tex(t) for t in tables] + list(extra):
        lines.append(text)
        lines.append(r"\clearpage")
    lines.append(r"\end{document}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- CSV (long / tidy)

CSV_FIELDS = ["results", "status", "method", "method_label", "finetuner", "finetuner_label", "source", "target",
              "dataset_label", "cross_dataset", "metric", "axis", "x", "n_seeds", "seeds", "value_pct",
              "std_pct", "values_pct", "n", "n_total", "correct_total",
              "ci95_low_pct", "ci95_high_pct", "ci_kind", "pooled_ci95_low_pct", "pooled_ci95_high_pct",
              "paper_pct", "diff_paper_pct", "other_results", "other_value_pct", "other_std_pct",
              "diff_other_pct", "selection_on_test", "marks", "flags", "warnings", "record_keys", "protocol",
              "threat_model",  # L2 and corruption rows: bench.report.extras
              "published_elsewhere"]
TEXT_FIELDS = ("flags", "warnings", "record_keys", "status", "published_elsewhere", "results", "other_results")


def csv_text(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula (=, +, -, @, tab, CR first) gets a leading
    apostrophe (the OWASP CSV-injection rule); numbers pass unchanged."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _r(x: float | None, digits: int = 4) -> Any:
    return "" if x is None else round(x, digits)


def _agg_fields(a: Aggregate | None) -> dict[str, Any]:
    if a is None:
        return {}
    lo, hi = a.ci95
    plo, phi = a.pooled_ci95
    return {"n_seeds": a.k, "seeds": ";".join(map(str, a.seeds)), "value_pct": _r(pct(a.mean)),
            "std_pct": _r(pct(a.std)),
            "values_pct": ";".join(f"{pct(v):.4f}" for v in a.values), "n": min(a.n), "n_total": a.n_total,
            "correct_total": a.correct_total, "ci95_low_pct": _r(pct(lo)), "ci95_high_pct": _r(pct(hi)),
            "ci_kind": a.ci_kind, "pooled_ci95_low_pct": _r(pct(plo)), "pooled_ci95_high_pct": _r(pct(phi)),
            "protocol": json.dumps(a.protocol, sort_keys=True, default=str)}


def _compare_fields(a: Aggregate | None, oa: Aggregate | None) -> dict[str, Any]:
    if oa is None:
        return {}
    out = {"other_value_pct": _r(pct(oa.mean)), "other_std_pct": _r(pct(oa.std))}
    if a is not None:
        out["diff_other_pct"] = _r(pct(a.mean) - pct(oa.mean))
    return out


def csv_rows(results: Results, other: Results | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    keys = list(results.cells)
    if other is not None:
        keys += [k for k in other.cells if k not in results.cells]
    order_m = {m: i for i, m in enumerate(paper.order_methods(k[0] for k in keys))}
    order_f = {f: i for i, f in enumerate(paper.order_finetuners(k[1] for k in keys))}
    order_p = {p: i for i, p in enumerate(paper.order_pairs((k[2], k[3]) for k in keys))}
    keys.sort(key=lambda k: (order_p[(k[2], k[3])], order_f[k[1]], order_m[k[0]]))
    for key in keys:
        method, ft, source, target = key
        cell = results.cells.get(key)
        ocell = other.cells.get(key) if other is not None else None
        base = {"results": results.label, "status": "ok" if cell is not None else "missing", "method": method,
                "method_label": results.method_label(method), "finetuner": ft, "threat_model": "Linf",
                "finetuner_label": paper.finetuner_label(ft), "source": source, "target": target,
                "dataset_label": paper.pair_label(source, target), "cross_dataset": source != target}
        if cell is not None:
            base.update({"selection_on_test": cell.selection_on_test, "marks": cell.marks,
                         "flags": ";".join(sorted({f for r in cell.records for f in r.flags})),
                         "warnings": " | ".join(cell.sanity_warnings),
                         "record_keys": ";".join(r.key for r in cell.records)})
        if other is not None:
            base["other_results"] = other.label
        published = paper.references_for(method, ft, source, target)
        if published:
            base["published_elsewhere"] = " | ".join(
                (f"{r.label}: " if r.label else "") + f"{r.text()} ({r.source_label}; {r.citation or r.file})"
                for r in published)
        for metric in paper.METRICS:
            a = cell.metrics.get(metric) if cell is not None else None
            oa = ocell.metrics.get(metric) if ocell is not None else None
            row = dict(base, metric=metric, axis="", x="", **_agg_fields(a))
            published = paper.published(method, ft, source, target, metric)
            row["paper_pct"] = _r(published)
            if published is not None and a is not None:
                row["diff_paper_pct"] = _r(pct(a.mean) - published)
            row.update(_compare_fields(a, oa))
            rows.append(row)
        for axis in ("eps", "steps"):
            ours = dict(cell.sweeps.get(axis, [])) if cell is not None else {}
            theirs = dict(ocell.sweeps.get(axis, [])) if ocell is not None else {}
            for x in sorted(set(ours) | set(theirs)):
                a, oa = ours.get(x), theirs.get(x)
                row = dict(base, metric="ra", axis=axis, x=int(x) if float(x).is_integer() else x, **_agg_fields(a))
                if a is None:
                    row["status"] = "missing"
                row.update(_compare_fields(a, oa))
                rows.append(row)
    for m in results.missing:
        rows.append({"results": results.label, "status": m.state, "method": m.method or "",
                     "method_label": paper.method_label(m.method) if m.method else "", "finetuner": m.finetuner or "",
                     "source": m.source or "", "target": m.target or "", "metric": "", "record_keys": m.key,
                     "warnings": f"{m.kind} job {m.state}" + (f": {m.detail}" if m.detail else "")})
    return rows


def report_csv(results: Results, other: Results | None = None, extra: list[dict[str, Any]] = ()) -> str:
    """`extra`: more rows (the L2 and corruption results, bench.report.extras)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in csv_rows(results, other) + list(extra):
        writer.writerow({k: csv_text(row.get(k, "")) if k in TEXT_FIELDS else row.get(k, "") for k in CSV_FIELDS})
    return buf.getvalue()
