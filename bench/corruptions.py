"""Accuracy under the 15 common corruptions x 5 severities (Hendrycks & Dietterich, ICLR 2019).

Two sources of corrupted images:

- **official** (the benchmark): CIFAR-10-C / CIFAR-100-C as RobustBench lays them out, a folder
  `<data_dir>/CIFAR-10-C/` (or `CIFAR-100-C/`) with one `<corruption>.npy` per corruption,
  uint8 (5 * m) x 32 x 32 x 3, severity s in rows (s-1)*m .. s*m (m = 10,000: the test set, in
  order), and `labels.npy` (5 * m or m labels). The first n rows of each severity are used.
- **generated** (not the benchmark): the test images corrupted here with the `imagecorruptions`
  module (the maintained fork `imagecorruptions-imaug`, extra `corruptions`), which implements
  the *ImageNet-C* parameters; CIFAR-10-C used CIFAR-specific ones, so generated numbers are not
  comparable with published CIFAR-10-C accuracies. Every metric, the result and the flags say
  "generated". Each image is corrupted with numpy's global generator seeded from (seed,
  corruption, severity, index) and restored afterwards, so a run is reproducible.

`corruption_accuracy(model, ...)` evaluates a classifier in eval mode (fp32, no gradient,
batched) and returns a `CorruptionResult`: a `Metric` per corruption and severity, per
corruption (over severities), per severity (over corruptions) and the mean corruption accuracy
(over all 75 cells; equal n per cell, so the pooled count is the mean of the cells, as RobustBench
reports `corruptions_acc`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

import bench
from bench.errors import BenchError
from bench.record import Metric

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)
FOLDERS = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}
OFFICIAL_PER_SEVERITY = 10000
GENERATED_FLAG = "corruptions_generated"
GENERATED_WARNING = ("common corruptions were generated with imagecorruptions (ImageNet-C parameters), not read "
                     "from the official CIFAR-10-C / CIFAR-100-C files: not comparable with published numbers")
MIN_SIZE = 32  # imagecorruptions refuses smaller images
Progress = Callable[[dict[str, Any]], None]


@dataclass
class CorruptionResult:
    cells: dict[str, dict[int, Metric]]       # corruption -> severity -> accuracy
    per_corruption: dict[str, Metric]         # over the severities
    per_severity: dict[int, Metric]           # over the corruptions
    mean: Metric                              # mean corruption accuracy (all cells)
    source: str                               # "official" or "generated"
    flags: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        """JSON-native metrics for a record (severity keys as strings)."""
        def plain(m: Metric) -> dict[str, Any]:
            return json.loads(json.dumps(dataclasses.asdict(m)))

        return {"mean": plain(self.mean), "source": self.source,
                "per_corruption": {c: plain(m) for c, m in self.per_corruption.items()},
                "per_severity": {str(s): plain(m) for s, m in self.per_severity.items()},
                "cells": {c: {str(s): plain(m) for s, m in row.items()} for c, row in self.cells.items()}}


# ---------------------------------------------------------------- the official files


def official_folder(data_dir: str | Path | None, dataset: str) -> Path | None:
    """`<data_dir>/CIFAR-10-C` (or -100-C) if it holds labels.npy, else None."""
    if data_dir is None or dataset not in FOLDERS:
        return None
    folder = Path(data_dir) / FOLDERS[dataset]
    return folder if (folder / "labels.npy").is_file() else None


class OfficialFiles:
    """One CIFAR-C folder, its arrays validated on first use (memory-mapped: nothing is read twice)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.labels = self._array("labels", integer=True)
        if self.labels.ndim != 1:
            raise BenchError(f"{self.folder / 'labels.npy'}: shape {self.labels.shape}; expected one label per image")
        self.per_severity: int | None = None

    def _array(self, name: str, integer: bool = False) -> np.ndarray:
        path = self.folder / f"{name}.npy"
        if not path.is_file():
            raise BenchError(f"{path} is missing: the {self.folder.name} folder needs one .npy per corruption "
                             f"({', '.join(CORRUPTIONS)}) and labels.npy (RobustBench's layout)")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BenchError(f"{path}: not a readable .npy array ({exc})") from exc
        if integer and not np.issubdtype(array.dtype, np.integer):
            raise BenchError(f"{path}: dtype {array.dtype}; labels must be integers")
        return array

    def images(self, corruption: str, severity: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first n images of one severity (uint8 N x 32 x 32 x 3) and their labels."""
        array = self._array(corruption)
        path = self.folder / f"{corruption}.npy"
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise BenchError(f"{path}: {array.dtype} {tuple(array.shape)}; expected uint8 (5 x m) x H x W x 3")
        if len(array) % len(SEVERITIES):
            raise BenchError(f"{path}: {len(array)} images is not 5 severities of equal size")
        m = len(array) // len(SEVERITIES)
        if self.per_severity is None:
            self.per_severity = m
        elif m != self.per_severity:
            raise BenchError(f"{path}: {m} images per severity, other files have {self.per_severity}")
        if len(self.labels) not in (m, len(array)):
            raise BenchError(f"{self.folder / 'labels.npy'}: {len(self.labels)} labels for {m} images per severity "
                             f"(expected {m} or {len(array)})")
        if n > m:
            raise BenchError(f"{path}: {m} images per severity, fewer than the {n} asked for")
        start = (severity - 1) * m
        labels = self.labels[start:start + n] if len(self.labels) == len(array) else self.labels[:n]
        return np.array(array[start:start + n]), np.array(labels, dtype=np.int64)  # copies out of the memory map


# ---------------------------------------------------------------- generated corruptions


def _corrupt_module():
    try:
        import imagecorruptions
    except ImportError as exc:
        raise BenchError("generating common corruptions needs the imagecorruptions module: pip install "
                         "'bench[corruptions]' (imagecorruptions-imaug, the maintained fork; the original "
                         f"imagecorruptions 1.1.2 fails with NumPy 2 and scikit-image >= 0.19) ({exc})") from exc
    return imagecorruptions


def corruption_package() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("imagecorruptions-imaug", "imagecorruptions"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "imagecorruptions (unknown version)"


def _seed(seed: int, corruption: str, severity: int, index: int) -> int:
    return zlib.crc32(f"{seed}/{corruption}/{severity}/{index}".encode()) & 0x7FFFFFFF


def generate(images: torch.Tensor | np.ndarray, corruption: str, severity: int, *, seed: int = 0,
             start: int = 0) -> np.ndarray:
    """uint8 N x 3 x H x W (tensor) or N x H x W x 3 (array) -> corrupted uint8 N x H x W x 3.

    Image i is corrupted with numpy's global generator seeded from (seed, corruption, severity,
    start + i) (and the function's own `seed` argument where it has one); the generator's state
    is restored afterwards."""
    module = _corrupt_module()
    if corruption not in CORRUPTIONS or severity not in SEVERITIES:
        raise BenchError(f"corruption {corruption!r} severity {severity}: one of {', '.join(CORRUPTIONS)}, 1-5")
    array = images.detach().cpu().permute(0, 2, 3, 1).numpy() if isinstance(images, torch.Tensor) else images
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise BenchError(f"images to corrupt must be uint8 with 3 channels, got {array.dtype} {array.shape}")
    if min(array.shape[1:3]) < MIN_SIZE:
        raise BenchError(f"imagecorruptions needs images of at least {MIN_SIZE}x{MIN_SIZE}; these are "
                         f"{array.shape[1]}x{array.shape[2]}")
    fn = module.corruption_dict[corruption]
    takes_seed = "seed" in inspect.signature(fn).parameters
    saved = np.random.get_state()
    out = np.empty_like(array)
    try:
        for i, image in enumerate(array):
            s = _seed(seed, corruption, severity, start + i)
            np.random.seed(s)
            kwargs = {"seed": s} if takes_seed else {}
            out[i] = np.uint8(module.corrupt(np.ascontiguousarray(image), severity=severity,
                                             corruption_name=corruption, **kwargs))
    finally:
        np.random.set_state(saved)
    return out


# ---------------------------------------------------------------- accuracy


def _correct(model: nn.Module, images: np.ndarray, labels: torch.Tensor, batch_size: int,
             device: torch.device) -> torch.Tensor:
    from bench.attacks.accuracy import clean_correct

    x = torch.from_numpy(images).permute(0, 3, 1, 2)

    def batches() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for s in range(0, len(x), batch_size):
            yield x[s:s + batch_size].to(device).float().div_(255), labels[s:s + batch_size].to(device)

    return clean_correct(model, batches)


def _uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    if x.dtype == torch.uint8:
        return x.detach().cpu().permute(0, 2, 3, 1).contiguous().numpy()
    if not torch.is_floating_point(x) or float(x.min()) < 0 or float(x.max()) > 1:
        raise BenchError("images must be uint8, or floats in [0, 1]")
    return (x.detach().cpu().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def corruption_accuracy(model: nn.Module, test: Any = None, *, x: torch.Tensor | None = None,
                        y: torch.Tensor | None = None, dataset: str | None = None,
                        data_dir: str | Path | None = None, n: int = 10000, source: str = "auto",
                        corruptions: Sequence[str] = CORRUPTIONS, severities: Sequence[int] = SEVERITIES,
                        batch_size: int = 500, seed: int = 0, device: torch.device | str | None = None,
                        on_progress: Progress | None = None) -> CorruptionResult:
    """Accuracy of a classifier (images in [0,1] -> logits) under each corruption and severity.

    `test`: the clean test ImageSet (its images are corrupted on the generated path; its name is
    the dataset), or `x` (uint8 or float [0,1] NCHW) and `y`. `source`: "official" (the
    CIFAR-C files under `data_dir`, required), "generated" (imagecorruptions), or "auto"
    (official when the folder is there, else generated). `n`: images per cell (the first n).
    """
    if source not in ("auto", "official", "generated"):
        raise BenchError(f"source={source!r}: auto, official or generated")
    for c in corruptions:
        if c not in CORRUPTIONS:
            raise BenchError(f"unknown corruption {c!r}; the 15: {', '.join(CORRUPTIONS)}")
    for s in severities:
        if s not in SEVERITIES:
            raise BenchError(f"severity {s}: 1 to 5")
    name = dataset or (test.name if test is not None else None)
    if test is not None:
        x, y = test.x, test.y
    param = next(iter(model.parameters()), None)
    device = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    folder = official_folder(data_dir, name) if name else None
    if source == "official" and folder is None:
        raise BenchError(f"no official corruption files: expected {Path(data_dir or '.') / FOLDERS.get(name or '', 'CIFAR-10-C')}"
                         f"/labels.npy and one <corruption>.npy per corruption (RobustBench's layout)")
    use = "official" if (source == "official" or (source == "auto" and folder is not None)) else "generated"
    flags, warnings = [], []
    files = OfficialFiles(folder) if use == "official" else None
    if files is not None:  # every file there before any work
        missing = [f"{c}.npy" for c in corruptions if not (folder / f"{c}.npy").is_file()]
        if missing:
            raise BenchError(f"{folder}: {len(missing)} corruption files missing ({', '.join(missing[:5])}"
                             f"{', ...' if len(missing) > 5 else ''}); RobustBench's layout has one .npy per "
                             f"corruption beside labels.npy")
    if use == "generated":
        if x is None or y is None:
            raise BenchError("generated corruptions need the clean test images (test= or x=, y=)")
        base = _uint8_nhwc(x[:n])
        labels = y[:n].detach().cpu().long()
        flags.append(GENERATED_FLAG)
        warnings.append(GENERATED_WARNING)
        what = f"generated ({corruption_package()}, ImageNet-C parameters)"
        images_of = f"first {len(labels)} of {name or 'the given'} test, corrupted here"
    else:
        what = f"official {folder.name}"
        images_of = f"first {{}} of each severity of {folder}"
    cells: dict[str, dict[int, Metric]] = {}
    total = len(corruptions) * len(severities)
    done = 0
    for corruption in corruptions:
        row: dict[int, Metric] = {}
        for severity in severities:
            if files is not None:
                images, lab = files.images(corruption, severity, n)
                labels_t = torch.from_numpy(lab)
                where = images_of.format(len(lab))
            else:
                images = generate(base, corruption, severity, seed=seed)
                labels_t, where = labels, images_of
            correct = _correct(model, images, labels_t, batch_size, device)
            protocol = {"attack": None, "corruption": corruption, "severity": severity, "source": use,
                        "corrupted_by": what, "n": len(correct), "seed": seed if use == "generated" else None,
                        "batch_size": batch_size, "images": where, "precision": "fp32", "mode": "eval",
                        "implementation": "bench.corruptions", "version": bench.__version__}
            row[severity] = Metric.from_counts(int(correct.sum()), len(correct), protocol)
            done += 1
            if on_progress is not None:
                on_progress({"phase": f"corruptions {corruption} {severity}", "done": done, "total": total})
        cells[corruption] = row
    if files is not None and files.per_severity != OFFICIAL_PER_SEVERITY:
        warnings.append(f"{folder} holds {files.per_severity} images per severity, not the official "
                        f"{OFFICIAL_PER_SEVERITY}")

    def pooled(metrics: list[Metric], **extra: Any) -> Metric:
        base_protocol = {k: v for k, v in metrics[0].protocol.items() if k not in ("corruption", "severity", "n")}
        correct = sum(m.correct for m in metrics)
        count = sum(m.n for m in metrics)
        return Metric.from_counts(correct, count, {**base_protocol, **extra, "n": count, "cells": len(metrics)})

    per_corruption = {c: pooled(list(row.values()), corruption=c) for c, row in cells.items()}
    per_severity = {s: pooled([cells[c][s] for c in corruptions], severity=s) for s in severities}
    mean = pooled([m for row in cells.values() for m in row.values()], corruption="mean")
    return CorruptionResult(cells, per_corruption, per_severity, mean, use, flags, warnings)
