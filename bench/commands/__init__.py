"""One module per CLI command; each exposes a click command named `command`."""

import click

results_option = click.option("--results", "results", type=click.Path(file_okay=False), default=None,
                              envvar="BENCH_RESULTS", help="results folder [default: results/]")
data_dir_option = click.option("--data-dir", "data_dir", type=click.Path(file_okay=False), default=None,
                               envvar="BENCH_DATA_DIR", help="prepared dataset cache [default: BENCH_DATA_DIR]")
