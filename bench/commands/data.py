"""`bench data import/ls`: manage the prepared dataset cache (.npz files)."""

from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bench import datasets, files
from bench.commands import data_dir_option
from bench.errors import BenchError
from bench.registry import DATASETS


def _dir(data_dir) -> Path:
    return Path(data_dir) if data_dir else datasets.default_data_dir()


@click.group()
def command() -> None:
    """Manage the prepared dataset cache under BENCH_DATA_DIR."""


def _dataset_of(path: Path):
    """The registered dataset and split a cache file name names (<dataset>_<split>.npz), or None."""
    stem = path.stem
    for split in datasets.SOURCE_SPLITS:
        name = stem[:-len(split) - 1] if stem.endswith("_" + split) else None
        if name and name in DATASETS:
            return datasets.dataset(name), split
    return None


@command.command("ls")
@data_dir_option
def ls(data_dir) -> None:
    """List cached splits with their image counts and shapes; a damaged or invalid file is one bad row."""
    root = _dir(data_dir)
    table = Table(title=f"dataset cache: {root}")
    for col in ("file", "images", "shape", "classes", "problem"):
        table.add_column(col, overflow="fold")
    for path in sorted(p for p in root.glob("*.npz") if files.TEMP_MARK not in p.name) if root.is_dir() else []:
        try:
            x, y, classes = datasets.read_npz(path)
            found = _dataset_of(path)
            if found is not None:
                ds, _ = found
                y = datasets.validate(x, y, classes, origin=path.name, image_size=ds.raw_size,
                                      num_classes=ds.num_classes)
        except BenchError as exc:
            table.add_row(path.name, Text("bad", style="red"), "", "", Text(str(exc)))
            continue
        note = "" if found is not None else "not a registered dataset's name (<dataset>_<train|test>.npz)"
        table.add_row(path.name, str(len(y)), "x".join(map(str, x.shape[1:])), str(len(np.unique(y))), note)
    Console().print(table)


@command.command("import")
@click.argument("name")
@click.argument("split", type=click.Choice(list(datasets.SOURCE_SPLITS)))
@click.argument("source", required=False, type=click.Path(exists=True, dir_okay=False))
@data_dir_option
def import_(name, split, source, data_dir) -> None:
    """Put SPLIT of dataset NAME into the cache: from a SOURCE .npz, or via torchvision (download).

    The arrays are checked first (uint8 NHWC images of the dataset's size, integer labels in range,
    one per image); a bad file is refused with exit code 2 and nothing is written. The cache file
    is written under a temporary name, fsynced and renamed, so a killed import leaves the old file.
    """
    dataset = DATASETS.get(name)()
    root = _dir(data_dir)
    if source:
        x, y, classes = datasets.read_npz(Path(source))
        origin = str(source)
    else:
        x, y = dataset.fetch(split, root / "torchvision", download=True)
        classes, origin = None, f"{name} {split} from torchvision"
    y = datasets.validate(x, y, classes, origin=origin, image_size=dataset.raw_size, num_classes=dataset.num_classes)
    files.check_writable(root, "data folder")
    target = datasets.cache_path(root, name, split)
    files.write_npz(target, compressed=True, x=x, y=y, classes=np.array(classes or dataset.classes))
    Console().print(f"wrote {target} ({len(y)} images)")
