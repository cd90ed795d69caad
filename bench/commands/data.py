"""`bench data import/ls`: manage the prepared dataset cache (.npz files)."""

from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from bench import datasets
from bench.commands import data_dir_option
from bench.errors import BenchError
from bench.registry import DATASETS


def _dir(data_dir) -> Path:
    return Path(data_dir) if data_dir else datasets.default_data_dir()


@click.group()
def command() -> None:
    """Manage the prepared dataset cache under BENCH_DATA_DIR."""


@command.command("ls")
@data_dir_option
def ls(data_dir) -> None:
    """List cached splits with their image counts and shapes."""
    root = _dir(data_dir)
    table = Table(title=f"dataset cache: {root}")
    for col in ("file", "images", "shape", "classes"):
        table.add_column(col)
    for path in sorted(root.glob("*.npz")) if root.is_dir() else []:
        try:
            x, y, classes = datasets.read_npz(path)
        except BenchError as exc:
            table.add_row(path.name, "[red]unreadable[/]", str(exc), "")
            continue
        table.add_row(path.name, str(len(y)), "x".join(map(str, x.shape[1:])), str(len(np.unique(y))))
    Console().print(table)


@command.command("import")
@click.argument("name")
@click.argument("split", type=click.Choice(["train", "test"]))
@click.argument("source", required=False, type=click.Path(exists=True, dir_okay=False))
@data_dir_option
def import_(name, split, source, data_dir) -> None:
    """Put SPLIT of dataset NAME into the cache: from a SOURCE .npz, or via torchvision (download)."""
    dataset = DATASETS.get(name)()
    root = _dir(data_dir)
    target = datasets.cache_path(root, name, split)
    if source:
        x, y, classes = datasets.read_npz(Path(source))
    else:
        x, y = dataset.fetch(split, root / "torchvision", download=True)
        classes = None
    root.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.stem + ".tmp.npz")
    np.savez_compressed(tmp, x=x, y=y, classes=np.array(classes or dataset.classes))
    tmp.replace(target)
    Console().print(f"wrote {target} ({len(y)} images)")
