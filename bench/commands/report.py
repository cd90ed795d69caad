"""`bench report`: the results as the paper's tables (terminal, Markdown, LaTeX, CSV), figures and HTML."""

from __future__ import annotations

import click
from rich.console import Console

from bench.commands import data_dir_option, results_option


@click.command()
@results_option
@click.option("--format", "formats", default=None, metavar="LIST",
              help="comma-separated formats: md,tex,csv,html [default: md in the terminal; all four with --out]")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="write the requested formats and the figures (PNG + PDF) to this folder")
@click.option("--methods", multiple=True, metavar="LIST", help="only these pretraining methods (comma-separated)")
@click.option("--finetune", "finetuners", multiple=True, metavar="LIST",
              help="only these finetuners (comma-separated: slf,alf,aff)")
@click.option("--datasets", multiple=True, metavar="LIST",
              help="only these datasets: NAME (pretrained and tested on NAME) or SOURCE:TARGET; * matches any, "
                   "e.g. '*:stl10'")
@click.option("--compare", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="another results folder to show beside these (ours vs other, difference)")
@click.option("--no-tsne", is_flag=True, help="skip the t-SNE figure (it loads every encoder and a test subset)")
@click.option("--tsne-n", type=click.IntRange(min=10), default=500, show_default=True,
              help="test images in the t-SNE figure")
@data_dir_option
def command(results, formats, out, methods, finetuners, datasets, compare, no_tsne, tsne_n, data_dir) -> None:
    """Tables in the layout of the paper's Tables 1-3 (mean over seeds, spread, n, 95% intervals, the paper's
    value and our difference, flagged cells), Tables 4 and 5 when the results hold AdvCL variants, figures
    (RA against attack strength, SA against RA and against AA, t-SNE of the encoders, feature inversion maps
    and loss landscapes from fim and landscape jobs) and one self-contained HTML page. A method run with
    several configurations has a labelled row per configuration.

    Without --out the Markdown tables are printed to the terminal (--format tex or csv prints that text instead);
    with --out every requested format and the figures are written there. A folder whose jobs all failed (or
    are unfinished) still gets a report listing them (exit code 0). Exit code 2: no job folders at all, or the
    filters match no result.
    """
    from pathlib import Path

    from bench.errors import BenchError
    from bench.report import load_results, make_filters, parse_formats, render, write_report

    from bench import files

    if out is not None:
        files.check_writable(Path(out), "report folder")
    filters = make_filters(methods, finetuners, datasets)
    ours = load_results(results, filters)
    other = load_results(compare, filters) if compare else None
    err = Console(stderr=True)
    if out is None:
        chosen = parse_formats(formats, default=("md",))
        if "html" in chosen:
            raise BenchError("--format html writes a page with figures: give --out DIR")
        console = Console()
        for fmt in chosen:
            text = render(fmt, ours, other)
            if fmt == "md":
                from rich.markdown import Markdown

                console.print(Markdown(text))
            else:
                click.echo(text, nl=False)
        _summary(err, ours, other)
        return
    chosen = parse_formats(formats)
    report = write_report(ours, Path(out), chosen, other=other, tsne=not no_tsne, tsne_n=tsne_n, data_dir=data_dir)
    err.print(f"[bold green]wrote[/] {', '.join(p.name for p in report.files.values())} and {len(report.figures)} "
              f"figure(s) (PNG + PDF) to {out}", highlight=False)
    for note in report.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    _summary(err, ours, other)


def _summary(err: Console, ours, other) -> None:
    from bench.report.tables import no_results_text

    for res in (ours, other):
        if res is not None and not res.cells:
            err.print(f"[bold yellow]{no_results_text(res)}[/]", highlight=False, soft_wrap=True)
        elif res is not None and res.missing:
            err.print(f"[yellow]{len(res.missing)} job(s) in {res.label} have no usable record[/] "
                      f"(listed in the report)", highlight=False)
