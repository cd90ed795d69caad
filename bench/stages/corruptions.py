"""The corruptions stage: accuracy of a classifier under the 15 common corruptions x 5 severities
(`bench.corruptions`), one job per classifier (`bench run --stages corruptions`, `bench evaluate
... --stages corruptions`).

Source of the corrupted images (`corruptions.source`, default auto):
- **official**: RobustBench's CIFAR-10-C / CIFAR-100-C arrays in the data folder
  (`<data_dir>/CIFAR-10-C/<corruption>.npy` + `labels.npy`); the first `corruptions.n` images of
  each severity (default 10000: all). The sha256 of every file read is in the job's key;
- **generated**: the target's test images corrupted with the `imagecorruptions` package (ImageNet-C
  parameters), `corruptions.generated_n` images (default 1000); flagged `corruptions_generated` in
  the record and the report. The package and its version are in the key.

"auto" takes the official files when the folder is there. What is missing (files, the package, a
folder without a file of a named corruption) is bad input at planning time, before any job runs.
Metrics: the mean corruption accuracy over all cells, per corruption, per severity, and every
(corruption, severity) cell, each a `Metric` with its protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import corruptions as cc, datasets
from bench.config import DataConfig, from_dict, param, to_dict
from bench.datasets import dataset_config as target_config
from bench.errors import BenchError
from bench.jobs import Job
from bench.record import Metric, Record
from bench.registry import DATASETS, STAGES
from bench.stages.base import Cell, Stage, StageContext

SOURCES = ("auto", "official", "generated")


@dataclass
class CorruptionsConfig:
    n: int = param(10000, min=1, help="official files: images per corruption and severity (the first n of each; "
                                      "10000 = all of CIFAR-10-C)")
    generated_n: int = param(1000, min=1, help="generated corruptions: test images per corruption and severity "
                                               "(imagecorruptions on the CPU: about 0.2 s per image for all 75 cells)")
    source: str = param("auto", choices=SOURCES, help="official CIFAR-C files, generated (flagged), or auto: "
                                                      "official when the folder is in the data directory")
    names: tuple[str, ...] = param(cc.CORRUPTIONS, help="corruptions to measure (default the 15)")
    severities: tuple[int, ...] = param(cc.SEVERITIES, min=1, max=5, help="severities to measure (1-5)")
    batch_size: int = param(500, min=1)
    seed: int = param(0, min=0, help="seed of the generated corruptions (unused with the official files)")


@dataclass
class CorruptionMetrics:
    mean: Metric                                  # over every (corruption, severity) cell
    source: str                                   # official | generated
    per_corruption: dict[str, Metric]             # over the severities
    per_severity: dict[str, Metric]               # over the corruptions ("1" .. "5")
    cells: dict[str, dict[str, Metric]]           # corruption -> severity -> accuracy


def _official_files(folder: Path, names: tuple[str, ...]) -> dict[str, Any]:
    """{"folder", "per_severity", "sha256": {file: digest}} of an official folder, checked for every
    named corruption (BenchError naming what is missing)."""
    missing = [f"{c}.npy" for c in names if not (folder / f"{c}.npy").is_file()]
    if missing:
        raise BenchError(f"{folder}: {len(missing)} corruption file(s) missing ({', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''}); RobustBench's layout has one .npy per corruption "
                         f"beside labels.npy")
    try:
        first = np.load(folder / f"{names[0]}.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BenchError(f"{folder / (names[0] + '.npy')}: not a readable .npy array ({exc})") from exc
    digests = {name: datasets._cached_file_digest(folder / name, lambda: None)  # cached by size and mtime
               for name in ["labels.npy", *(f"{c}.npy" for c in names)]}
    return {"folder": folder.name, "per_severity": len(first) // len(cc.SEVERITIES), "sha256": digests}


@STAGES.register("corruptions")
class Corruptions(Stage):
    """Accuracy under the 15 common corruptions x 5 severities (official CIFAR-C files, else generated)."""

    reads = (("target", "test"),)
    attach = "classifier"
    Config = CorruptionsConfig
    Metrics = CorruptionMetrics

    def plugins(self, cell: Cell) -> list[Any]:
        return [DATASETS.get(cell.target)]

    def plan(self, planner: Any, params: dict[str, Any], cell: Cell, upstream: Job | None) -> Job:
        cfg = from_dict(CorruptionsConfig, {**planner.section("corruptions"), **params}, "corruptions")
        unknown = [c for c in cfg.names if c not in cc.CORRUPTIONS]
        if unknown or not cfg.names or not cfg.severities:
            raise BenchError(f"corruptions.names: {', '.join(unknown) or 'none given'}; choose among "
                             f"{', '.join(cc.CORRUPTIONS)} (and at least one severity)")
        root = Path(planner.data_dir) if planner.data_dir else datasets.default_data_dir()
        folder = cc.official_folder(root, cell.target)
        if cfg.source == "official" and folder is None:
            where = root / cc.FOLDERS.get(cell.target, "CIFAR-10-C")
            raise BenchError(f"corruptions.source=official: no {where}/labels.npy (RobustBench's layout: one "
                             f"<corruption>.npy per corruption beside labels.npy; CIFAR-10 and CIFAR-100 only)")
        section = to_dict(cfg)
        if cfg.source == "generated" or folder is None:
            cc._corrupt_module()  # the package is there, or a message saying how to install it
            section.update(source="generated", n=cfg.generated_n)
            origin = {"generator": cc.corruption_package()}
        else:
            origin = _official_files(folder, tuple(cfg.names))
            section.update(source="official", n=min(cfg.n, origin["per_severity"]))
        config = {"corruptions": section, "corruption_source": origin, **planner.data(cell.target)}
        return planner.add(self, cell, config=config, deps={"classifier": upstream.key})

    def run(self, job: Job, ctx: StageContext) -> Record:
        c = job.config["corruptions"]
        data_cfg = from_dict(DataConfig, job.config.get("data", {}), "data")
        model = ctx.input("classifier")
        size = int(model.meta["image_size"])
        root = Path(job.data_dir) if job.data_dir else datasets.default_data_dir()
        test = None
        if c["source"] == "generated":
            test = datasets.load(job.target, "test", data_dir=job.data_dir, download=data_cfg.download,
                                 cfg=target_config(job.target, job.config), device=ctx.device, image_size=size)
            n = min(int(c["n"]), len(test))
        else:
            folder = cc.official_folder(root, job.target)
            if folder is None or _official_files(folder, tuple(c["names"]))["sha256"] != \
                    job.config["corruption_source"]["sha256"]:
                raise BenchError(f"the official corruption files of {job.target} under {root} are gone or changed "
                                 f"since job {job.key} was planned; plan it again")
            if size != 32:
                raise BenchError(f"the official CIFAR-C images are 32x32; this classifier takes {size}x{size}")
            n = int(c["n"])
        result = cc.corruption_accuracy(model, test, dataset=job.target, data_dir=root, n=n, source=c["source"],
                                        corruptions=c["names"], severities=c["severities"],
                                        batch_size=int(c["batch_size"]), seed=int(c["seed"]), device=ctx.device,
                                        on_progress=ctx.on_progress)
        flags = list(dict.fromkeys(list(ctx.input_record("classifier").flags) + result.flags))
        return ctx.record(result.metrics(), warnings=list(result.warnings), flags=flags)

    def summary(self, record: Record) -> str:
        m = record.metrics
        mean = m.get("mean") or {}
        value = mean.get("value")
        return (f"mean corruption accuracy {100 * value:.1f} ({m.get('source')}, n={mean.get('n')})"
                if isinstance(value, (int, float)) else "")
