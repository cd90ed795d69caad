"""`bench report`: tables (paper Tables 1-3 layouts), figures (paper Figures 1, 3, 4) and an HTML page.

    results = load_results("results", make_filters(methods="advcl,acl"))
    written = write_report(results, Path("report"), formats=("md", "tex", "csv", "html"))

Modules: `collect` (records -> cells aggregated over seeds, missing jobs), `paper` (the published
numbers, `paper_numbers.json`), `tables` (Markdown / LaTeX / CSV), `figures` (sweeps, SA-vs-RA),
`tsne` (encoder features), `html` (the self-contained page).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import BenchError
from bench.report.collect import Filters, Results, load_results, make_filters

log = logging.getLogger(__name__)

FORMATS = ("md", "tex", "csv", "html")
FILES = {"md": "report.md", "tex": "report.tex", "csv": "report.csv", "html": "report.html"}
FIGURES_DIR = "figures"

__all__ = ["FORMATS", "Filters", "Report", "Results", "build_tables", "load_results", "make_filters",
           "parse_formats", "render", "write_report"]


def parse_formats(value: str | None, default: tuple[str, ...] = FORMATS) -> tuple[str, ...]:
    if not value:
        return default
    items = [p.strip().lower() for p in value.split(",") if p.strip()]
    aliases = {"markdown": "md", "latex": "tex", "htm": "html"}
    items = [aliases.get(i, i) for i in items]
    unknown = [i for i in items if i not in FORMATS]
    if unknown:
        raise BenchError(f"unknown report format {', '.join(unknown)}; use some of {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(items))


def build_tables(results: Results, other: Results | None = None):
    from bench.report.tables import build_tables as build

    return build(results, other)


def render(fmt: str, results: Results, other: Results | None = None, figures=None, tables=None) -> str:
    """One text format (md, tex, csv, html) of the report; `tables` (from build_tables) saves rebuilding them."""
    from bench.report import tables as t

    if tables is None:
        tables = t.build_tables(results, other)
    if fmt == "md":
        return t.report_markdown(results, tables, other, figures)
    if fmt == "tex":
        return t.report_tex(results, tables, other)
    if fmt == "csv":
        return t.report_csv(results, other)
    if fmt == "html":
        from bench.report.html import report_html

        return report_html(results, tables, figures or [], other)
    raise BenchError(f"unknown report format {fmt!r}")


@dataclass
class Report:
    files: dict[str, Path] = field(default_factory=dict)
    figures: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def make_figures(results: Results, folder: Path, *, tsne: bool = True, tsne_n: int = 500,
                 data_dir=None) -> tuple[list, list[str]]:
    from bench.report.curves import curve_figures
    from bench.report.figures import scatter_figures, sweep_figures

    figures = scatter_figures(results, folder) + sweep_figures(results, folder)
    figures += curve_figures(results, folder)  # training curves per method (bench.report.curves)
    notes: list[str] = []
    if tsne:
        from bench.report.tsne import tsne_figures

        result = tsne_figures(results, folder, n=tsne_n, data_dir=data_dir)
        figures += result.figures
        notes += result.notes
    return figures, notes


def write_report(results: Results, out: Path | str, formats: tuple[str, ...] = FORMATS, *,
                 other: Results | None = None, tsne: bool = True, tsne_n: int = 500, data_dir=None) -> Report:
    """Write every requested format and the figures (PNG + PDF under out/figures) to `out`."""
    from bench import files

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures, notes = make_figures(results, out / FIGURES_DIR, tsne=tsne, tsne_n=tsne_n, data_dir=data_dir)
    results.notes.extend(n for n in notes if n not in results.notes)
    report = Report(figures=figures, notes=notes)
    tables = build_tables(results, other)
    for fmt in formats:
        path = out / FILES[fmt]
        files.write_text(path, render(fmt, results, other, figures, tables))
        report.files[fmt] = path
    return report
