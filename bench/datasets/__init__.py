"""Datasets: a prepared `.npz` cache first, torchvision second; whole splits live on the device.

A split is an `ImageSet` (uint8 NCHW images, int64 labels). `load(name, split)` returns
"train" (the training split minus the validation images), "val", "test", or "all" (the whole
training split, validation images included: what unsupervised pretraining reads).

Every array is validated before it is used (`validate`: uint8 NHWC with 3 channels at the
dataset's image size, integer labels in 0..classes-1, one per image), and every split a job
reads has a content fingerprint (`fingerprint`: the cache file's sha256, remembered by path,
size and modification time) that goes into its key and record, so replacing or fixing a
cache file changes the keys of exactly the jobs that read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import BenchError
from bench.registry import DATASETS

SPLITS = ("train", "val", "test", "all")
SOURCE_SPLITS = ("train", "test")  # what a dataset stores; val and all come from train


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
    """Read a prepared cache file (x, y, optional classes) without pickles; BenchError if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("x", "y") if k not in data.files]
            if missing:
                raise BenchError(f"{path}: no array {' or '.join(missing)} (has {', '.join(data.files) or 'none'}); "
                                 "a dataset cache needs x (uint8 N x H x W x 3) and y (integer labels)")
            x, y = data["x"], data["y"]
            classes = [str(c) for c in data["classes"]] if "classes" in data.files else None
    except BenchError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise BenchError(f"{path}: not a readable .npz archive ({type(exc).__name__}: {exc})") from exc
    return x, y, classes


def validate(x: np.ndarray, y: np.ndarray, classes: list[str] | None, *, origin: str, image_size: int | None,
             num_classes: int | None) -> np.ndarray:
    """Check a split's arrays; return the labels as int64. One BenchError naming the array and the problem."""
    if x.dtype != np.uint8:
        raise BenchError(f"{origin}: x must be uint8 pixels (0..255), got {x.dtype}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise BenchError(f"{origin}: x must be N x H x W x 3 (NHWC, RGB), got shape {x.shape}")
    if image_size is not None and x.shape[1:3] != (image_size, image_size):
        raise BenchError(f"{origin}: x holds {x.shape[1]}x{x.shape[2]} images, this dataset's are "
                         f"{image_size}x{image_size}")
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) and y.dtype != np.bool_):
        raise BenchError(f"{origin}: y must be a 1-D array of integer labels, got {y.dtype} of shape {y.shape}")
    if len(y) != len(x):
        raise BenchError(f"{origin}: y has {len(y)} labels for the {len(x)} images of x")
    if classes is not None and num_classes is not None and len(classes) != num_classes:
        raise BenchError(f"{origin}: classes names {len(classes)} classes, this dataset has {num_classes}")
    count = num_classes if num_classes is not None else (len(classes) if classes is not None else None)
    if len(y) and (int(y.min()) < 0 or (count is not None and int(y.max()) >= count)):
        raise BenchError(f"{origin}: y has labels from {int(y.min())} to {int(y.max())}, outside 0..{count - 1 if count else '?'}")
    return y.astype(np.int64)


class Dataset:
    """A registered dataset. Subclasses implement `fetch` (torchvision) or `generate`."""

    Config = None
    classes: list[str] = []
    val_size: int = 5000
    image_size: int = 32   # the side of the images jobs get (after any resize)
    raw_size: int = 32     # the side of the images the dataset stores
    generated: bool = False  # made on the fly from its settings (nothing stored)

    def __init__(self, cfg=None):
        self.cfg = cfg

    @property
    def name(self) -> str:
        return self.registered_name  # type: ignore[attr-defined]

    def fetch(self, split: str, root: Path, download: bool) -> tuple[np.ndarray, np.ndarray]:
        raise BenchError(f"dataset {self.name} has no {split} split")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def raw(self, split: str, data_dir: Path, download: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The source split ('train' or 'test') as NHWC uint8 + labels, validated."""
        path = cache_path(data_dir, self.name, split)
        if path.is_file():
            x, y, classes = read_npz(path)
            origin = str(path)
        else:
            x, y = self.fetch(split, Path(data_dir) / "torchvision", download)
            classes, origin = None, f"{self.name} {split} (torchvision files under {Path(data_dir) / 'torchvision'})"
        y = validate(x, y, classes, origin=origin, image_size=self.raw_size, num_classes=self.num_classes)
        return x, y, classes or list(self.classes)

    def source_files(self, split: str, data_dir: Path) -> list[Path]:
        """The files the source split is read from (for its fingerprint); [] when generated."""
        path = cache_path(data_dir, self.name, split)
        return [path] if path.is_file() else self.torchvision_files(split, Path(data_dir) / "torchvision")

    def torchvision_files(self, split: str, root: Path) -> list[Path]:
        return []

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
    if split == "all" and train_limit > 0:
        images, labels, positions = images[:train_limit], labels[:train_limit], positions[:train_limit]
    elif split in ("train", "val"):
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


# ---------------------------------------------------------------- a job's dataset settings


def dataset_config(name: str, config: dict[str, dict[str, Any]]) -> Any:
    """The dataset plugin's config from a job's sections (None for datasets without settings)."""
    from bench.config import from_dict

    plugin = DATASETS.get(name)
    return from_dict(plugin.Config, config.get(name, {}), name) if plugin.Config else None


def dataset_image_size(name: str, cfg: Any) -> int:
    return int(DATASETS.get(name)(cfg).image_size)


def check_image_size(target: str, target_cfg: Any, encoder_size: int) -> None:
    """A target whose own image size is a setting must be set to the encoder's size; fixed-size
    targets are resized to it (cross-dataset: STL-10 96 -> 32 is the stl10 default)."""
    if target_cfg is not None and hasattr(target_cfg, "image_size") and target_cfg.image_size != encoder_size:
        raise BenchError(f"{target}.image_size={target_cfg.image_size} does not match the encoder's input size "
                         f"{encoder_size}: set {target}.image_size={encoder_size}")


# ---------------------------------------------------------------- what pretraining reads


SPLIT_NAMES = {"all": "train+val", "train": "train"}  # as records and the dry run name them


def pretrain_split(requested: str, uses_labels: bool) -> str:
    """The split a pretraining reads: "all" (the whole training split: unsupervised methods, as
    their official code) or "train" (without the validation images: methods that read labels)."""
    if requested == "auto":
        return "train" if uses_labels else "all"
    if requested == "all" and uses_labels:
        raise BenchError("data.pretrain_split=all: a method that reads labels would train on the validation "
                         "images that select the finetuned models; use auto or train")
    return requested


def load_source(source: str, config: dict[str, dict[str, Any]], device: torch.device | str,
                data_dir: str | Path | None = None, *, uses_labels: bool = False) -> ImageSet:
    """The training images a pretraining (or a job computing inputs for one) reads, on `device`:
    the whole training split for unsupervised methods, minus the validation images for methods
    that read labels (`data.pretrain_split`)."""
    from bench.config import DataConfig, from_dict

    data_cfg = from_dict(DataConfig, config.get("data", {}), "data")
    plugin = DATASETS.get(source)
    dataset_cfg = from_dict(plugin.Config, config.get(source, {}), source) if plugin.Config else None
    split = pretrain_split(data_cfg.pretrain_split, uses_labels)
    return load(source, split, data_dir=data_dir, download=data_cfg.download, val_size=data_cfg.val_size,
                train_limit=data_cfg.train_limit, cfg=dataset_cfg, device=device)


# ---------------------------------------------------------------- fingerprints


def _fingerprint_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "bench" / "data-fingerprints.json"


def _cached_file_digest(path: Path, check: Any) -> str:
    """sha256 of `path`, remembered by (real path, size, mtime) in the user's cache; `check()` runs
    when the file is hashed for the first time (so a bad file is refused before work, once)."""
    from bench import files

    real = str(path.resolve())
    stat = path.stat()
    cache_file = _fingerprint_cache()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(real) if isinstance(cache, dict) else None
    if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return str(entry["sha256"])
    check()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    cache = cache if isinstance(cache, dict) else {}
    cache[real] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": value}
    try:
        files.write_json(cache_file, cache)
    except OSError:
        pass  # a cache only: the next run hashes again
    return value


def fingerprint(name: str, split: str, *, data_dir: Path | str | None = None, cfg=None) -> dict[str, Any]:
    """What a job reading `split` of `name` reads, as it goes into keys and records:
    {"dataset", "split", "files", "sha256"} for stored data (validated when first hashed),
    {"generated": True} for generated data, {"missing": True} when it is not there yet."""
    ds = dataset(name, cfg)
    root = Path(data_dir) if data_dir else default_data_dir()
    source_split = "test" if split == "test" else "train"
    out: dict[str, Any] = {"dataset": name, "split": source_split}
    if ds.generated:
        return {**out, "generated": True}
    paths = ds.source_files(source_split, root)
    if not paths:
        return {**out, "missing": True}

    def check() -> None:
        if cache_path(root, name, source_split) in paths:
            ds.raw(source_split, root, download=False)  # reads and validates

    digests = [_cached_file_digest(p, check) for p in paths]
    combined = digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()
    return {**out, "files": [str(p) for p in paths], "sha256": combined}
