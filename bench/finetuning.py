"""Finetuning without a results folder: a pretrained encoder + a registered finetuner on a target.

The finetune stage (`bench.stages.finetune`) runs this for a job; `finetune()` does the same from
plain dotted settings, for tests and scripts. The target's training split is loaded at the
encoder's image size (cross-dataset: e.g. STL-10 resized to 32x32), trained with
`bench.train.fit` (resumable in a workdir), and a state is selected (see
`bench.finetuners.base`).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from bench import datasets
from bench.datasets import check_image_size, dataset_config as target_config, dataset_image_size
from bench.attacks.accuracy import clean_protocol, pgd_protocol
from bench.attacks.threat import threat_of
from bench.config import DataConfig, EvalConfig, from_dict, resolve
from bench.errors import BenchError
from bench.finetuners.base import FinetuneContext, Finetuner
from bench.models import Classifier
from bench.record import TEST_SELECTION_FLAG, TEST_SELECTION_WARNING, FinetuneMetrics, Metric
from bench.registry import FINETUNERS
from bench.train import fit

log = logging.getLogger(__name__)
Progress = Callable[[dict[str, Any]], None]


# ---------------------------------------------------------------- datasets and sizes


def selection_split(target: str, selection: str, *, data_cfg: DataConfig, eval_cfg: EvalConfig, target_cfg: Any,
                    data_dir: Any, device: torch.device, image_size: int) -> datasets.ImageSet | None:
    """The fixed images model selection is measured on: the first eval.val_n of the validation
    split (or of the test split for selection=test); None for selection=last."""
    split = {"val": "val", "test": "test", "last": "val"}[selection]
    if split == "val" and data_cfg.val_size == 0:
        if selection == "last":
            return None
        raise BenchError("model selection on the validation split needs data.val_size > 0 "
                         "(or set finetune.selection=last)")
    data = datasets.load(target, split, data_dir=data_dir, download=data_cfg.download, val_size=data_cfg.val_size,
                         cfg=target_cfg, device=device, image_size=image_size)
    return data.first(eval_cfg.val_n)


# ---------------------------------------------------------------- training


@dataclass
class FinetuneResult:
    finetuner: Finetuner
    history: list[dict[str, float]]
    selected: dict[str, Any] | None      # {"epoch", "ra", "sa", "n"} or None (last state, not measured)
    train: datasets.ImageSet
    selection_data: datasets.ImageSet | None
    flags: list[str]
    warnings: list[str]

    @property
    def model(self) -> Classifier:
        return self.finetuner.model


def run_finetuner(name: str, config: dict[str, dict[str, Any]], encoder: nn.Module, target: str, *, seed: int,
         workdir: Path | None, device: torch.device, data_dir: Any, image_size: int,
         on_progress: Progress | None, stop_after_epoch: int | None = None) -> FinetuneResult:
    cls = FINETUNERS.get(name)
    cfg = from_dict(cls.Config, config.get(name, {}), name)
    data_cfg = from_dict(DataConfig, config.get("data", {}), "data")
    eval_cfg = from_dict(EvalConfig, config.get("eval", {}), "eval")
    target_cfg = target_config(target, config)
    check_image_size(target, target_cfg, image_size)
    train = datasets.load(target, "train", data_dir=data_dir, download=data_cfg.download, val_size=data_cfg.val_size,
                          train_limit=data_cfg.train_limit, cfg=target_cfg, device=device, image_size=image_size)
    if train.image_size != image_size:
        raise BenchError(f"{target} images are {train.image_size}px after resizing, the encoder expects {image_size}px")
    selection = selection_split(target, cfg.selection, data_cfg=data_cfg, eval_cfg=eval_cfg, target_cfg=target_cfg,
                                data_dir=data_dir, device=device, image_size=image_size)
    flags, warnings = [], []
    if cfg.selection == "test":
        flags.append(TEST_SELECTION_FLAG)
        warnings.append(TEST_SELECTION_WARNING)
        log.warning("%s", TEST_SELECTION_WARNING)
    torch.manual_seed(seed)  # the new head's initial weights
    ctx = FinetuneContext(num_classes=train.num_classes, device=device, eval=eval_cfg, selection_data=selection)
    finetuner = cls(cfg, encoder.to(device), ctx)
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    history = fit(finetuner, train, seed=seed, workdir=Path(workdir) if workdir else None,
                  on_progress=on_progress, stop_after_epoch=stop_after_epoch)
    selected = finetuner.finish()
    finetuner.model.eval()
    return FinetuneResult(finetuner, history, selected, train, selection, flags, warnings)


def finetune(finetuner: str, encoder: nn.Module, target: str, settings: dict[str, Any] | None = None, *,
             seed: int = 0, workdir: str | Path | None = None, device: torch.device | str = "cpu",
             data_dir: str | Path | None = None, image_size: int | None = None, on_progress: Progress | None = None,
             stop_after_epoch: int | None = None) -> FinetuneResult:
    """Finetune a copy of `encoder` on `target` from dotted settings (`slf.epochs`, `eval.val_n`, ...).

    `image_size` is the encoder's input size (default: the target's own size).
    """
    device = torch.device(device)
    config = resolve(settings or {}, [finetuner, target]).as_dict()
    size = image_size or dataset_image_size(target, target_config(target, config))
    return run_finetuner(finetuner, config, copy.deepcopy(encoder), target, seed=seed,
                workdir=Path(workdir) if workdir else None, device=device, data_dir=data_dir, image_size=size,
                on_progress=on_progress, stop_after_epoch=stop_after_epoch)


def selection_metrics(result: FinetuneResult, eval_cfg: EvalConfig, selection: str) -> FinetuneMetrics:
    """What was selected, with the protocol of the selection measurements."""
    epochs = result.finetuner.cfg.epochs
    selected = result.selected
    if selected is None:
        return FinetuneMetrics(selected_epoch=len(result.history) or epochs)
    n = int(selected["n"])
    split = "test" if selection == "test" else "val"
    images = f"first {n} of {result.train.name} {split}"
    seed = eval_cfg.seed
    threat = threat_of(eval_cfg)  # the threat model the finetuner selected in (Finetuner.validate)
    ra = Metric.from_counts(int(selected["ra"]), n, {**pgd_protocol(
        eps=threat.eps, alpha=threat.alpha, steps=eval_cfg.selection_steps, restarts=1, n=n, seed=seed,
        batch_size=eval_cfg.batch_size, images=images, clamp_start=eval_cfg.clamp_start, norm=threat.norm),
        "selection": selection})
    sa = Metric.from_counts(int(selected["sa"]), n, {**clean_protocol(
        n=n, seed=seed, batch_size=eval_cfg.batch_size, images=images), "selection": selection})
    return FinetuneMetrics(selected_epoch=int(selected["epoch"]), val_ra=ra, val_sa=sa)
