"""CIFAR-10, CIFAR-100 and STL-10 through torchvision (downloaded only when allowed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.config import param
from bench.datasets import Dataset
from bench.errors import BenchError
from bench.registry import DATASETS


def _unavailable(name: str, split: str, root: Path, why: str) -> BenchError:
    from bench.datasets import cache_path

    return BenchError(
        f"dataset {name} ({split}) is not available: {why}. Fix: put {cache_path(root.parent, name, split).name} "
        f"in {root.parent} (see `bench data import`), point BENCH_DATA_DIR/--data-dir at a folder that has it, "
        f"or allow downloads (data.download=true) on a machine with internet access.")


class TorchvisionDataset(Dataset):
    """Subclasses define `_open(split, root, download)` returning the torchvision dataset."""

    def fetch(self, split, root, download):
        try:
            ds = self._open(split, root, download=False)
        except RuntimeError:
            if not download:
                raise _unavailable(self.name, split, root, "not in the cache and downloads are off") from None
            try:
                ds = self._open(split, root, download=True)
            except Exception as exc:  # network errors come in many types
                raise _unavailable(self.name, split, root, f"download failed ({exc.__class__.__name__}: {exc})") from None
        return self._arrays(ds)

    @staticmethod
    def _arrays(ds) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)


@DATASETS.register("cifar10")
class CIFAR10(TorchvisionDataset):
    """CIFAR-10: 50,000 train / 10,000 test, 32x32, 10 classes."""

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def _open(self, split, root, download):
        from torchvision.datasets import CIFAR10 as TV

        return TV(str(root), train=split == "train", download=download)


@DATASETS.register("cifar100")
class CIFAR100(TorchvisionDataset):
    """CIFAR-100: 50,000 train / 10,000 test, 32x32, 100 classes."""

    classes = [f"class_{i}" for i in range(100)]

    def _open(self, split, root, download):
        from torchvision.datasets import CIFAR100 as TV

        ds = TV(str(root), train=split == "train", download=download)
        self.classes = list(ds.classes)
        return ds


@DATASETS.register("stl10")
class STL10(TorchvisionDataset):
    """STL-10's labelled splits (5,000 train / 8,000 test), resized to 32x32 for cross-dataset use."""

    @dataclass
    class Config:
        image_size: int = param(32, min=8, help="side the 96x96 images are resized to")

    classes = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    val_size = 500

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.image_size = cfg.image_size if cfg is not None else 32

    def _open(self, split, root, download):
        from torchvision.datasets import STL10 as TV

        return TV(str(root), split=split, download=download)

    @staticmethod
    def _arrays(ds):
        return np.ascontiguousarray(ds.data.transpose(0, 2, 3, 1)), np.asarray(ds.labels, dtype=np.int64)
