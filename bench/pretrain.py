"""The pretraining job: train one method on one dataset's training split, export its encoder.

`run_pretrain_job` is the runner's job function (it writes `encoder.pt` and returns the
record); `pretrain` does the same from plain dotted settings, for tests and `bench profile`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench import datasets
from bench.config import DataConfig, EncoderConfig, from_dict, resolve
from bench.jobs import Job
from bench.method import Method, MethodContext
from bench.models import save_encoder
from bench.record import Record, provenance
from bench.registry import DATASETS, METHODS
from bench.store import Store
from bench.train import fit

ENCODER_FILE = "encoder.pt"
Progress = Callable[[dict[str, Any]], None]


def load_source(source: str, config: dict[str, dict[str, Any]], device: torch.device,
                data_dir: str | Path | None = None) -> datasets.ImageSet:
    """The source dataset's training split (minus validation images) on `device`."""
    data_cfg = from_dict(DataConfig, config.get("data", {}), "data")
    plugin = DATASETS.get(source)
    dataset_cfg = from_dict(plugin.Config, config.get(source, {}), source) if plugin.Config else None
    return datasets.load(source, "train", data_dir=data_dir, download=data_cfg.download,
                         val_size=data_cfg.val_size, train_limit=data_cfg.train_limit, cfg=dataset_cfg,
                         device=device)


def build_method(name: str, config: dict[str, dict[str, Any]], data: datasets.ImageSet,
                 device: torch.device, inputs: dict[str, Any] | None = None, seed: int = 0) -> Method:
    """A method built from a job's config sections (`encoder` and the method's own).

    The initial weights come from `seed`, so a job is a function of its key.
    """
    method_cls = METHODS.get(name)
    cfg = from_dict(method_cls.Config, config.get(name, {}), name)
    ctx = MethodContext(encoder=from_dict(EncoderConfig, config.get("encoder", {}), "encoder"),
                        num_classes=data.num_classes, device=device, inputs=inputs or {},
                        image_size=data.image_size)
    torch.manual_seed(seed)
    return method_cls(cfg, ctx)


def train(method: Method, data: datasets.ImageSet, *, seed: int, workdir: Path | None,
          on_progress: Progress | None = None, stop_after_epoch: int | None = None
          ) -> tuple[list[dict[str, float]], float | None]:
    """`fit` plus the throughput of this call (images per second, None if nothing was left to do)."""
    steps = 0

    def count(event: dict[str, Any]) -> None:
        nonlocal steps
        steps += 1
        if on_progress:
            on_progress(event)

    started = time.perf_counter()
    history = fit(method, data, seed=seed, workdir=workdir, on_progress=count, stop_after_epoch=stop_after_epoch)
    if next(method.model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return history, (steps * method.cfg.batch_size / elapsed if steps else None)


def run_pretrain_job(job: Job, store: Store, device: torch.device | str,
                     on_progress: Progress | None = None) -> Record:
    """Pretrain `job.method` on `job.source`, save `encoder.pt`, and return the record (not written)."""
    started = time.time()
    device = torch.device(device)
    data = load_source(job.source, job.config, device, job.data_dir)
    inputs: dict[str, Any] = {}
    if "pseudo_labels" in job.deps:
        from bench.clusterfit import load_pseudo_labels

        labels = load_pseudo_labels(store.job_dir(job.deps["pseudo_labels"]))
        inputs["pseudo_labels"] = {k: v.to(device) for k, v in labels.items()}
    method = build_method(job.method, job.config, data, device, inputs, seed=job.seed)
    workdir = store.job_dir(job.key)
    workdir.mkdir(parents=True, exist_ok=True)
    history, images_per_s = train(method, data, seed=job.seed, workdir=workdir, on_progress=on_progress)
    save_encoder(workdir / ENCODER_FILE, method.export_encoder(),
                 {"method": job.method, "branch": method.encoder_branch, "key": job.key, "seed": job.seed})
    return Record(kind="pretrain", key=job.key, seed=job.seed, method=job.method, source=job.source,
                  config=job.config, inputs=dict(job.deps), history=history,
                  metrics={"train_images_per_s": images_per_s, "epochs": method.cfg.epochs},
                  provenance=provenance(device, started))


def pretrain(method_name: str, dataset_name: str, settings: dict[str, Any], seed: int,
             workdir: str | Path | None, device: torch.device | str = "cpu", *,
             inputs: dict[str, Any] | None = None, data_dir: str | Path | None = None,
             on_progress: Progress | None = None, stop_after_epoch: int | None = None
             ) -> tuple[Method, list[dict[str, float]]]:
    """Pretrain without the runner: `settings` are dotted keys (`simclr.epochs`, `encoder.width`, ...).

    Methods that need inputs (AdvCL's pseudo-labels) get random stand-ins unless `inputs` is given.
    """
    device = torch.device(device)
    config = resolve(settings, [method_name, dataset_name]).as_dict()
    data = load_source(dataset_name, config, device, data_dir)
    method_cls = METHODS.get(method_name)
    if inputs is None:
        cfg = from_dict(method_cls.Config, config.get(method_name, {}), method_name)
        inputs = placeholder_inputs(method_cls, cfg, data)
    method = build_method(method_name, config, data, device, inputs, seed=seed)
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    history, _ = train(method, data, seed=seed, workdir=Path(workdir) if workdir else None,
                       on_progress=on_progress, stop_after_epoch=stop_after_epoch)
    return method, history


def placeholder_inputs(method_cls: type, cfg: Any, data: datasets.ImageSet) -> dict[str, Any]:
    """Random stand-ins for the outputs of the jobs a method needs (profiling and tests only)."""
    inputs: dict[str, Any] = {}
    deps = method_cls.dependencies(cfg)
    if "pseudo_labels" in deps:
        ks = deps["pseudo_labels"]["ks"]
        size = int(data.indices.max()) + 1 if data.indices is not None else len(data)
        generator = torch.Generator().manual_seed(0)
        inputs["pseudo_labels"] = {k: torch.randint(k, (size,), generator=generator).to(data.y.device) for k in ks}
    if "teacher" in deps:  # DeACL: a random-init teacher built with the student's encoder settings
        inputs["teacher"] = method_cls.placeholder_teacher()
    return inputs

