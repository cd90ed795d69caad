"""The finetuning job: a pretrained encoder + a registered finetuner (SLF, ALF, AFF) on a target dataset.

`run_finetune_job` is the runner's job function: it loads `encoder.pt` from the pretrain job,
the target's training split at the encoder's image size (cross-dataset: e.g. STL-10 resized to
32x32), trains with `bench.train.fit` in the job folder (resumable), selects a state (see
`bench.finetuners.base`), saves it as `classifier.pt` and returns the record. `finetune` does
the same from plain dotted settings, for tests and scripts. `load_classifier` reads
`classifier.pt` back (weights_only).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from bench import datasets
from bench.config import DataConfig, EvalConfig, from_dict, resolve
from bench.errors import BenchError
from bench.finetuners.base import FinetuneContext, Finetuner
from bench.models import Classifier, build_encoder
from bench.record import Metric, Record, provenance
from bench.registry import DATASETS, FINETUNERS
from bench.report.collect import TEST_SELECTION_FLAG  # the one definition (torch-free, for the report)
from bench.train import fit
from bench.train.loop import load_checkpoint, save_atomic

log = logging.getLogger(__name__)

CLASSIFIER_FILE = "classifier.pt"
ENCODER_FILE = "encoder.pt"
TEST_SELECTION_WARNING = (f"model selected on the test set ({TEST_SELECTION_FLAG}): this reproduces the papers' "
                          "practice; its numbers are optimistic and not comparable with validation-selected ones")
Progress = Callable[[dict[str, Any]], None]


# ---------------------------------------------------------------- classifier files


def encoder_spec(encoder: nn.Module) -> dict[str, Any]:
    return {"arch": getattr(encoder, "arch", "resnet18"), "width": int(encoder.width),
            "normalize": encoder.normalize.kind, "branch": encoder.branches[0]}


def save_classifier(path: Path | str, model: Classifier, *, classes: list[str], image_size: int,
                    meta: dict[str, Any] | None = None) -> None:
    """encoder spec + encoder weights + head weights (+ what evaluation needs); loads with weights_only."""
    blob = {"spec": encoder_spec(model.encoder), "num_classes": int(model.head.out_features),
            "classes": [str(c) for c in classes], "image_size": int(image_size),
            "encoder": model.encoder.state_dict(), "head": model.head.state_dict(), "meta": meta or {}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_atomic(blob, Path(path))


def load_classifier(path: Path | str, device: torch.device | str = "cpu", with_meta: bool = False):
    """The saved classifier in eval mode on `device` (and its description if `with_meta`)."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"no classifier at {path}: run the finetune job first")
    blob = load_checkpoint(path)
    spec = blob["spec"]
    encoder = build_encoder(spec["arch"], spec["width"], (spec["branch"],), spec["normalize"])
    encoder.load_state_dict(blob["encoder"])
    model = Classifier(encoder, blob["num_classes"])
    model.head.load_state_dict(blob["head"])
    model = model.to(device).eval()
    if not with_meta:
        return model
    meta = {k: blob[k] for k in ("spec", "num_classes", "classes", "image_size")}
    meta.update(blob.get("meta", {}))
    return model, meta


# ---------------------------------------------------------------- datasets and sizes


def target_config(name: str, config: dict[str, dict[str, Any]]) -> Any:
    """The dataset plugin's config from a job's sections (None for datasets without settings)."""
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


def encoder_image_size(store: Any, job: Any, meta: dict[str, Any]) -> int:
    """The image size the encoder was pretrained at: from encoder.pt, else from its pretrain record."""
    if meta.get("image_size"):
        return int(meta["image_size"])
    record = store.read(job.deps["pretrain"]) if store is not None else None
    source = (record.source if record is not None else None) or job.source
    sections = record.config if record is not None else job.config
    if source is None:
        raise BenchError(f"finetune job {job.key}: cannot tell the encoder's image size (no source dataset)")
    return dataset_image_size(source, target_config(source, sections))


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


def _run(name: str, config: dict[str, dict[str, Any]], encoder: nn.Module, target: str, *, seed: int,
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
    return _run(finetuner, config, copy.deepcopy(encoder), target, seed=seed,
                workdir=Path(workdir) if workdir else None, device=device, data_dir=data_dir, image_size=size,
                on_progress=on_progress, stop_after_epoch=stop_after_epoch)


def selection_metrics(result: FinetuneResult, eval_cfg: EvalConfig, selection: str) -> dict[str, Any]:
    from bench.evaluate import clean_protocol, pgd_protocol, plain

    epochs = result.finetuner.cfg.epochs
    selected = result.selected
    if selected is None:
        return {"selected_epoch": len(result.history) or epochs, "val_ra": None, "val_sa": None}
    n = int(selected["n"])
    split = "test" if selection == "test" else "val"
    images = f"first {n} of {result.train.name} {split}"
    seed = eval_cfg.seed
    ra = Metric.from_counts(int(selected["ra"]), n, {**pgd_protocol(
        eps=eval_cfg.eps, alpha=eval_cfg.alpha, steps=eval_cfg.selection_steps, restarts=1, n=n, seed=seed,
        batch_size=eval_cfg.batch_size, images=images), "selection": selection})
    sa = Metric.from_counts(int(selected["sa"]), n, {**clean_protocol(
        n=n, seed=seed, batch_size=eval_cfg.batch_size, images=images), "selection": selection})
    return {"selected_epoch": int(selected["epoch"]), "val_ra": plain(ra), "val_sa": plain(sa)}


def run_finetune_job(job: Any, store: Any, device: torch.device | str, on_progress: Progress | None = None) -> Record:
    """Finetune the encoder of job.deps["pretrain"] with job.finetuner on job.target; save classifier.pt."""
    from bench.models import load_encoder

    started = time.time()
    device = torch.device(device)
    encoder_path = store.job_dir(job.deps["pretrain"]) / ENCODER_FILE
    if not encoder_path.is_file():
        raise BenchError(f"no encoder at {encoder_path}: the pretrain job {job.deps['pretrain']} has not finished")
    meta = load_checkpoint(encoder_path).get("meta", {}) or {}
    size = encoder_image_size(store, job, meta)
    encoder = load_encoder(encoder_path, device)
    workdir = store.job_dir(job.key)
    result = _run(job.finetuner, job.config, encoder, job.target, seed=job.seed, workdir=workdir, device=device,
                  data_dir=job.data_dir, image_size=size, on_progress=on_progress)
    cfg = result.finetuner.cfg
    eval_cfg = from_dict(EvalConfig, job.config.get("eval", {}), "eval")
    metrics = selection_metrics(result, eval_cfg, cfg.selection)
    save_classifier(workdir / CLASSIFIER_FILE, result.model, classes=result.train.classes, image_size=size,
                    meta={"finetuner": job.finetuner, "method": job.method, "source": job.source,
                          "target": job.target, "seed": job.seed, "key": job.key, "selection": cfg.selection,
                          "selected_epoch": metrics["selected_epoch"], "flags": list(result.flags)})
    return Record(kind="finetune", key=job.key, seed=job.seed, method=job.method, finetuner=job.finetuner,
                  source=job.source, target=job.target, config=job.config, inputs=dict(job.deps),
                  metrics=metrics, history=result.history, warnings=list(result.warnings), flags=list(result.flags),
                  provenance=provenance(device, started))
