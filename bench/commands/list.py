"""`bench list`: every registry and its entries, and the presets of bench.toml with their cost here."""

import click
from rich.table import Table

from bench import registry
from bench.progress import wide_console

PRESETS = "presets"


def _summary(obj) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    return doc[0] if doc else ""


@click.command()
@click.argument("kind", required=False)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="bench.toml to read the presets from")
@click.option("--estimate", is_flag=True,
              help="presets: measure what an estimate still needs on this device (else only cached measurements)")
def command(kind: str | None, config_path: str | None, estimate: bool) -> None:
    """List registered plugins (methods, finetuners, datasets, encoders, attacks, executors, ...) and the
    presets of bench.toml with their one-line descriptions and estimated time here."""
    kinds = registry.ALL
    if kind is not None and kind not in kinds and kind != PRESETS:
        from bench.errors import BenchError

        raise BenchError(f"unknown registry {kind!r}; one of {', '.join([*kinds, PRESETS])}")
    console = wide_console()
    for name, reg in kinds.items():
        if kind and name != kind:
            continue
        console.print(f"[bold underline]{name}[/]")
        table = Table(show_header=False, box=None, padding=(0, 2))
        for entry, obj in reg.items():
            table.add_row(f"[bold]{entry}[/]", _summary(obj))
        console.print(table if table.rows else "  (none registered)")
    if kind in (None, PRESETS):
        console.print(f"[bold underline]{PRESETS}[/]")
        console.print(presets_table(config_path, measure=estimate))


def presets_table(config_path: str | None = None, *, measure: bool = False) -> Table:
    """Each preset: its description and its estimated time on this machine's devices (`bench.estimate`)."""
    from bench import config as cfgmod

    path = cfgmod.find_config_file(config_path)
    table = Table(show_header=True, box=None, padding=(0, 2), caption=f"from {path}")
    for column in ("preset", "description", "estimated here"):
        table.add_column(column, overflow="fold")
    for name, preset in cfgmod.load_presets(path).items():
        table.add_row(f"[bold]{name}[/]", str(preset.get("description", "")),
                      preset_estimate(name, path, measure=measure))
    return table


def preset_estimate(name: str, path, *, measure: bool = False) -> str:
    """'4 min (2 jobs at once)', or why there is no figure (not measured yet: a dry run measures it)."""
    from bench import estimate, grid
    from bench.errors import BenchError

    try:
        _, graph, _ = grid.plan(preset=name, config_path=path, fetch=False)
    except BenchError as exc:
        return f"? ({exc})"
    device = estimate.local_device()
    costs = estimate.Costs(device, measure=measure)
    guess = estimate.estimate_graph(graph, costs)
    wall = guess.wall_s(graph)
    if wall is None:
        return "not measured yet (--estimate, or a dry run, measures it)"
    return f"{estimate.duration(wall)} ({len(graph)} jobs, {device.slots} at once on {device.name})"
