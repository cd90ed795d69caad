"""Datasets: a prepared `.npz` cache first, torchvision second; whole splits live on the device.

A split is an `ImageSet` (uint8 NCHW images, int64 labels). `load(name, split)` returns
"train" (the training split minus the validation images), "val" or "test".
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import BenchError
from bench.registry import DATASETS

SPLITS = ("train", "val", "test")


@dataclass
class ImageSet:
    x: torch.Tensor  # uint8, N x 3 x H x W
    y: torch.Tensor  # int64, N
    classes: list[str]
    name: str
    indices: torch.Tensor | None = None  # positions in the source split (for pseudo-labels)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.x.shape[-1])

    def to(self, device: torch.device | str) -> "ImageSet":
        idx = self.indices.to(device) if self.indices is not None else None
        return ImageSet(self.x.to(device), self.y.to(device), self.classes, self.name, idx)

    def subset(self, index: torch.Tensor | slice) -> "ImageSet":
        src = self.indices if self.indices is not None else torch.arange(len(self.y), device=self.y.device)
        return ImageSet(self.x[index], self.y[index], self.classes, self.name, src[index])

    def first(self, n: int) -> "ImageSet":
        return self if n <= 0 or n >= len(self) else self.subset(slice(0, n))

    def images(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Float images in [0,1] for the given positions."""
        return self.x[index].float().div_(255)


def default_data_dir() -> Path:
    env = os.environ.get("BENCH_DATA_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bench" / "data"


def cache_path(data_dir: Path, name: str, split: str) -> Path:
    return Path(data_dir) / f"{name}_{split}.npz"


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Read a prepared cache file (x uint8 NHWC, y int, optional classes) without pickles."""
    try:
        with np.load(path, allow_pickle=False) as data:
            x, y = data["x"], data["y"]
            classes = [str(c) for c in data["classes"]] if "classes" in data.files else None
    except (OSError, ValueError, KeyError) as exc:
        raise BenchError(f"{path}: not a valid dataset cache ({exc}); it needs arrays x (uint8 NHWC) and y") from exc
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3 or len(x) != len(y):
        raise BenchError(f"{path}: x must be uint8 N x H x W x 3 with one label per image, got {x.dtype} {x.shape}")
    return x, y.astype(np.int64), classes


class Dataset:
    """A registered dataset. Subclasses implement `fetch` (torchvision) or `generate`."""

    Config = None
    classes: list[str] = []
    val_size: int = 5000
    image_size: int = 32

    def __init__(self, cfg=None):
        self.cfg = cfg

    @property
    def name(self) -> str:
        return self.registered_name  # type: ignore[attr-defined]

    def fetch(self, split: str, root: Path, download: bool) -> tuple[np.ndarray, np.ndarray]:
        raise BenchError(f"dataset {self.name} has no {split} split")

    def raw(self, split: str, data_dir: Path, download: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The source split ('train' or 'test') as NHWC uint8 + labels."""
        path = cache_path(data_dir, self.name, split)
        if path.is_file():
            x, y, classes = read_npz(path)
            return x, y, classes or list(self.classes)
        x, y = self.fetch(split, Path(data_dir) / "torchvision", download)
        return x, y, list(self.classes)

    def available(self, split: str, data_dir: Path) -> bool:
        """Whether the source split can be read without a download (the cache file is not opened)."""
        if cache_path(data_dir, self.name, split).is_file():
            return True
        try:
            self.raw(split, data_dir, download=False)
        except BenchError:
            return False
        return True


class DataUnavailable(BenchError):
    """Source splits that cannot be read; the message names the fix that fits the situation:
    downloads off -> provide the files or allow downloads; a failed download -> provide the files."""

    def __init__(self, splits: list[tuple[str, str]], data_dir: Path | str, download_error: str | None = None):
        self.splits, self.data_dir, self.download_error = list(splits), Path(data_dir), download_error
        one = len(self.splits) == 1
        names = ", ".join(f"{name} {split}" for name, split in self.splits)
        what = f"dataset split{'' if one else 's'} {names} {'is' if one else 'are'} not in {self.data_dir}"
        files = ", ".join(cache_path(self.data_dir, name, split).name for name, split in self.splits)
        imports = "; ".join(f"`bench data import {name} {split} FILE.npz`" for name, split in self.splits)
        provide = (f"put {files} in {self.data_dir} ({imports}), or point BENCH_DATA_DIR / --data-dir at a "
                   f"folder that has {'it' if one else 'them'}")
        if download_error is None:
            message = (f"{what} (neither as a prepared cache file nor as torchvision's files under "
                       f"{self.data_dir / 'torchvision'}) and downloads are off (data.download=false). Fix: "
                       f"{provide}, or allow downloads (data.download=true) on a machine with internet access.")
        else:
            fetch = "; ".join(f"`bench data import {name} {split}`" for name, split in self.splits)
            message = (f"{what} and downloading failed ({download_error}): is this machine offline? Fix: {provide}. "
                       f"On a machine with internet access, {fetch} download{'s' if one else ''} into the cache, "
                       f"to copy here.")
        super().__init__(message)


def _validation_permutation(name: str, n: int) -> torch.Tensor:
    # Fixed per dataset (not per run seed), so every method and seed is selected on the same images.
    seed = int(hashlib.sha256(f"val:{name}".encode()).hexdigest()[:8], 16)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def validation_size(ds: Dataset, n_train: int, requested: int) -> int:
    size = ds.val_size if requested < 0 else requested
    if size >= n_train:
        whose = f" ({ds.name}'s own)" if requested < 0 else ""
        raise BenchError(f"data.val_size={size}{whose} leaves no training images in {ds.name} "
                         f"({n_train} images): set data.val_size below {n_train}")
    return size


def dataset(name: str, cfg=None) -> Dataset:
    """The registered dataset `name`, built with `cfg` (its Config's defaults when None)."""
    plugin = DATASETS.get(name)
    return plugin(cfg if cfg is not None else (plugin.Config() if plugin.Config else None))


def resolve_val_size(name: str, requested: int, cfg=None) -> int:
    """`data.val_size` as a number: a negative request means the dataset's own size."""
    return dataset(name, cfg).val_size if requested < 0 else requested


def available(name: str, split: str, *, data_dir: Path | str | None = None, cfg=None) -> bool:
    """Whether the source split ('train' or 'test') of `name` can be read without a download."""
    return dataset(name, cfg).available(split, Path(data_dir) if data_dir else default_data_dir())


def download(name: str, split: str, *, data_dir: Path | str | None = None, cfg=None) -> None:
    """Fetch the source split now (downloads allowed); BenchError naming the fix when it fails."""
    dataset(name, cfg).raw(split, Path(data_dir) if data_dir else default_data_dir(), download=True)


def load(name: str, split: str, *, data_dir: Path | str | None = None, download: bool = True,
         val_size: int = -1, train_limit: int = 0, cfg=None, device: torch.device | str = "cpu",
         image_size: int | None = None) -> ImageSet:
    """Load a split onto `device`. `image_size` resizes (e.g. STL-10 96 -> 32 for cross-dataset)."""
    if split not in SPLITS:
        raise BenchError(f"unknown split {split!r}; use one of {SPLITS}")
    ds = dataset(name, cfg)
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    x, y, classes = ds.raw("test" if split == "test" else "train", data_dir, download)
    images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(y)
    positions = torch.arange(len(labels))
    if split != "test":
        n_val = validation_size(ds, len(labels), val_size)
        perm = _validation_permutation(name, len(labels))
        chosen = perm[:n_val] if split == "val" else perm[n_val:].sort().values
        if split == "train" and train_limit > 0:
            chosen = chosen[:train_limit]
        images, labels, positions = images[chosen], labels[chosen], chosen
    size = image_size or ds.image_size
    if images.shape[-1] != size:
        images = resize_uint8(images, size)
    return ImageSet(images, labels, classes, name, positions).to(device)


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    out = []
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk].float()
        part = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(part.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out) if out else images


def batches(data: ImageSet, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
            drop_last: bool = False, max_steps: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(float images in [0,1], labels, source indices) batches drawn on the data's device."""
    n = len(data)
    order = torch.randperm(n, generator=generator).to(data.y.device) if shuffle else torch.arange(n, device=data.y.device)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for step, start in enumerate(range(0, stop, batch_size)):
        if max_steps and step >= max_steps:
            return
        idx = order[start:start + batch_size]
        src = data.indices[idx] if data.indices is not None else idx
        yield data.images(idx), data.y[idx], src


def steps_per_epoch(n: int, batch_size: int, drop_last: bool, max_steps: int = 0) -> int:
    steps = n // batch_size if drop_last and n >= batch_size else -(-n // batch_size)
    return min(steps, max_steps) if max_steps else steps
