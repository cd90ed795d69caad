"""`bench list`: every registry and its entries."""

import click
from rich.console import Console
from rich.table import Table

from bench import registry


def _summary(obj) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    return doc[0] if doc else ""


@click.command()
@click.argument("kind", required=False)
def command(kind: str | None) -> None:
    """List registered plugins (methods, finetuners, datasets, encoders, attacks, executors)."""
    kinds = registry.ALL
    if kind is not None and kind not in kinds:
        from bench.errors import BenchError

        raise BenchError(f"unknown registry {kind!r}; one of {', '.join(kinds)}")
    console = Console()
    for name, reg in kinds.items():
        if kind and name != kind:
            continue
        console.print(f"[bold underline]{name}[/]")
        table = Table(show_header=False, box=None, padding=(0, 2))
        for entry, obj in reg.items():
            table.add_row(f"[bold]{entry}[/]", _summary(obj))
        console.print(table if table.rows else "  (none registered)")
