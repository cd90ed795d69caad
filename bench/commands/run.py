"""`bench run` (filled in by its own issue)."""

import click

from bench.errors import BenchError


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1)
def command(args) -> None:
    """Not available yet."""
    raise BenchError("bench run is not implemented yet")
