"""`bench profile`: images/second and peak memory of each method's training step."""

from __future__ import annotations

import click
import torch
from rich.console import Console
from rich.table import Table

from bench.errors import BenchError
from bench.registry import METHODS


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available here; use --device cpu")
    return torch.device(name)


@click.command()
@click.option("--methods", "methods", default=None,
              help="comma-separated method names or groups (all, ...) [default: every registered one]")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="images per step [default: each method's own on CUDA, 32 on CPU]")
@click.option("--width", type=click.IntRange(min=1), default=None,
              help="encoder stem width [default: 64 on CUDA, 16 on CPU]")
@click.option("--device", "device_name", type=click.Choice(["cpu", "cuda"]), default=None,
              help="[default: cuda if available]")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="timed steps after one warm-up step [default: 10 on CUDA, 5 on CPU]")
@click.option("--threads", type=click.IntRange(min=0), default=0,
              help="torch CPU threads per method (0 = torch's default; 1 is steadier on a shared machine)")
@click.option("--precision", type=click.Choice(["fp32", "tf32", "bf16", "fp16"]), default=None,
              help="training precision to time [default: each method's own, fp32]")
def command(methods, batch_size, width, device_name, steps, threads, precision) -> None:
    """Time each method's training step on synthetic data (one warm-up step, then STEPS timed)."""
    from rich.live import Live

    from bench import profile

    from bench.grid import expand_methods

    names = expand_methods([m.strip() for m in methods.split(",") if m.strip()]) if methods else METHODS.names()
    for name in names:
        METHODS.get(name)  # unknown names fail here, with a did-you-mean, before any work
    device = _device(device_name)
    width = width or profile.default_width(device)
    steps = steps or (10 if device.type == "cuda" else 5)
    table = Table(title=f"bench profile ({device.type}, encoder width {width}, {steps} timed steps)",
                  caption=profile.memory_note(device))
    for column in ("method", "batch", "threads", "s/step", "images/s", "peak memory (MB)"):
        table.add_column(column, justify="left" if column == "method" else "right")
    with Live(table, console=Console(), refresh_per_second=2) as live:  # each row as soon as it is measured
        for name in names:
            live.console.print(f"profiling {name} ...", style="dim", highlight=False)
            result = profile.profile_method(name, device=device, width=width, steps=steps, threads=threads,
                                            batch_size=batch_size or profile.default_batch_size(name, device),
                                            precision=precision)
            table.add_row(name, str(result.batch_size), str(result.threads), f"{result.seconds_per_step:.3f}",
                          f"{result.images_per_s:,.1f}", f"{result.peak_memory_mb:,.0f}")
