"""`bench report`: tables (paper Tables 1-5 layouts), figures (paper Figures 1, 3-6) and an HTML page.

    results = load_results("results", make_filters(methods="advcl,acl"))
    written = write_report(results, Path("report"), formats=("md", "tex", "csv", "html"))

Modules: `collect` (records -> cells aggregated over seeds, missing jobs), `variants` (a method's
configurations as labelled rows), `paper` (the published numbers, `paper_numbers.json`), `tables`
(Markdown / LaTeX / CSV), `ablations` (Tables 4 and 5, when the results have AdvCL variants),
`figures` (sweeps, SA against RA and against AA), `analysis_figures` (Figures 5 and 6 from the fim and
landscape jobs), `tsne` (encoder features), `html` (the self-contained page), `extras` (`threats`:
L2 tables; `corruptions`: common-corruption tables and the accuracy-against-severity figure),
`outside` (rows of outside models, `bench evaluate --name`), `others` (other stages' records).
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
ABLATIONS_CSV = "ablations.csv"  # Tables 4 and 5, long form (with --format csv, when they exist)

__all__ = ["FORMATS", "Filters", "Report", "Results", "build_ablations", "build_tables", "load_results",
           "make_filters", "parse_formats", "render", "write_report"]


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
    """The paper's Tables 1-3, then the other threat models' and the common corruptions' (extras)."""
    from bench.report.extras import extra_tables
    from bench.report.tables import build_tables as build

    return build(results, other) + extra_tables(results)


def build_ablations(results: Results, other: Results | None = None):
    """Tables 4 and 5 (the AdvCL ablations) where the results have AdvCL variants (none when comparing)."""
    from bench.report.ablations import build_ablations as build

    return build(results) if other is None else []


def render(fmt: str, results: Results, other: Results | None = None, figures=None, tables=None,
           ablations=None) -> str:
    """One text format (md, tex, csv, html) of the report; `tables` (from build_tables) and `ablations`
    (from build_ablations) save rebuilding them. The csv format is Tables 1-3's; Tables 4 and 5 have
    their own (`ablation_csv`, written as ablations.csv)."""
    from bench.report import ablations as a
    from bench.report import tables as t

    if tables is None:
        tables = build_tables(results, other)
    if ablations is None:
        ablations = build_ablations(results, other)
    if fmt == "md":
        return t.report_markdown(results, tables, other, figures, [a.ablation_markdown(x) for x in ablations])
    if fmt == "tex":
        return t.report_tex(results, tables, other, [a.ablation_tex(x) for x in ablations])
    if fmt == "csv":
        from bench.report.extras import extra_csv_rows

        return t.report_csv(results, other, extra_csv_rows(results))
    if fmt == "html":
        from bench.report.html import report_html

        return report_html(results, tables, figures or [], other, ablations)
    raise BenchError(f"unknown report format {fmt!r}")


@dataclass
class Report:
    files: dict[str, Path] = field(default_factory=dict)
    figures: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def make_figures(results: Results, folder: Path, *, tsne: bool = True, tsne_n: int = 500,
                 data_dir=None) -> tuple[list, list[str]]:
    from bench.report.analysis_figures import analysis_entries, fim_figures, landscape_figures
    from bench.report.curves import curve_figures
    from bench.report.extras import extra_figures
    from bench.report.figures import scatter_figures, sweep_figures

    figures = (scatter_figures(results, folder) + scatter_figures(results, folder, x_metric="aa")
               + sweep_figures(results, folder) + extra_figures(results, folder))
    figures += curve_figures(results, folder)  # training curves per method (bench.report.curves)
    notes: list[str] = []
    for kind, draw in (("fim", fim_figures), ("landscape", landscape_figures)):  # Figures 5 and 6
        entries, unreadable = analysis_entries(results, kind)
        notes += unreadable
        if entries:
            figures += draw(entries, folder)
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
    ablations = build_ablations(results, other)
    for fmt in formats:
        path = out / FILES[fmt]
        files.write_text(path, render(fmt, results, other, figures, tables, ablations))
        report.files[fmt] = path
    if "csv" in formats and ablations:
        from bench.report.ablations import ablation_csv

        report.files["ablations_csv"] = files.write_text(out / ABLATIONS_CSV, ablation_csv(ablations))
    return report
