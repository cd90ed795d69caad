"""CIFAR-10, CIFAR-100 and STL-10 through torchvision (downloaded only when allowed)."""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.config import param
from bench.datasets import Dataset, DataUnavailable
from bench.registry import DATASETS


# torchvision's urlopen has no timeout: on a network that drops packets a download would hang for
# minutes. This bounds each connect/read (not the whole download).
DOWNLOAD_TIMEOUT_S = 30


class TorchvisionDataset(Dataset):
    """Subclasses define `_open(split, root, download)` returning the torchvision dataset."""

    def fetch(self, split, root, download):
        try:
            ds = self._open(split, root, download=False)
        except RuntimeError:
            if not download:
                raise DataUnavailable([(self.name, split)], root.parent) from None
            ds = self._download(split, Path(root))
        return self._arrays(ds)

    def _download(self, split: str, root: Path):
        # Folders this attempt creates are removed if it fails: a failed download writes nothing.
        created = next((p for p in (root.parent, root) if not p.exists()), None)
        timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            return self._open(split, root, download=True)
        except Exception as exc:  # network errors come in many types
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            raise DataUnavailable([(self.name, split)], root.parent,
                                  download_error=f"{exc.__class__.__name__}: {exc}") from None
        finally:
            socket.setdefaulttimeout(timeout)

    @staticmethod
    def _arrays(ds) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)

    folder = ""  # torchvision's folder under the root

    def torchvision_files(self, split, root):
        base = Path(root) / self.folder
        return sorted(p for p in base.rglob("*") if p.is_file()) if self.folder and base.is_dir() else []


@DATASETS.register("cifar10")
class CIFAR10(TorchvisionDataset):
    """CIFAR-10: 50,000 train / 10,000 test, 32x32, 10 classes."""

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    folder = "cifar-10-batches-py"
    split_sizes = {"train": 50_000, "test": 10_000}  # what a cost estimate counts before any download

    def _open(self, split, root, download):
        from torchvision.datasets import CIFAR10 as TV

        return TV(str(root), train=split == "train", download=download)


@DATASETS.register("cifar100")
class CIFAR100(TorchvisionDataset):
    """CIFAR-100: 50,000 train / 10,000 test, 32x32, 100 classes."""

    classes = [f"class_{i}" for i in range(100)]
    folder = "cifar-100-python"
    split_sizes = {"train": 50_000, "test": 10_000}

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
    raw_size = 96
    folder = "stl10_binary"
    split_sizes = {"train": 5_000, "test": 8_000}

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.image_size = cfg.image_size if cfg is not None else 32

    def _open(self, split, root, download):
        from torchvision.datasets import STL10 as TV

        return TV(str(root), split=split, download=download)

    @staticmethod
    def _arrays(ds):
        return np.ascontiguousarray(ds.data.transpose(0, 2, 3, 1)), np.asarray(ds.labels, dtype=np.int64)
