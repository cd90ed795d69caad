"""Pretraining without a results folder: build a method from config sections and train it.

The pretrain stage (`bench.stages.pretrain`) runs this for a job; `pretrain()` does the same
from plain dotted settings, for tests, scripts and `bench profile`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench import datasets
from bench.config import EncoderConfig, from_dict, resolve
from bench.method import Method, MethodContext
from bench.registry import METHODS
from bench.stages.base import get_stage
from bench.train import fit

Progress = Callable[[dict[str, Any]], None]


def method_config(name: str, config: dict[str, dict[str, Any]]) -> Any:
    return from_dict(METHODS.get(name).Config, config.get(name, {}), name)


def build_method(name: str, config: dict[str, dict[str, Any]], data: datasets.ImageSet,
                 device: torch.device, inputs: dict[str, Any] | None = None, seed: int = 0) -> Method:
    """A method built from a job's config sections (`encoder` and the method's own).

    The initial weights come from `seed`, so a job is a function of its key.
    """
    method_cls = METHODS.get(name)
    ctx = MethodContext(encoder=from_dict(EncoderConfig, config.get("encoder", {}), "encoder"),
                        num_classes=data.num_classes, device=device, inputs=inputs or {},
                        image_size=data.image_size)
    torch.manual_seed(seed)
    return method_cls(method_config(name, config), ctx)


def train(method: Method, data: datasets.ImageSet, *, seed: int, workdir: Path | None,
          on_progress: Progress | None = None, stop_after_epoch: int | None = None,
          epoch_hooks: tuple = ()) -> tuple[list[dict[str, float]], float | None]:
    """`fit` plus the throughput of this call (images per second, None if nothing was left to do)."""
    steps = 0

    def count(event: dict[str, Any]) -> None:
        nonlocal steps
        steps += 1
        if on_progress:
            on_progress(event)

    started = time.perf_counter()
    history = fit(method, data, seed=seed, workdir=workdir, on_progress=count, stop_after_epoch=stop_after_epoch,
                  epoch_hooks=epoch_hooks)
    if next(method.model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return history, (steps * method.cfg.batch_size / elapsed if steps else None)


def placeholder_inputs(method_cls: type, cfg: Any, data: datasets.ImageSet,
                       encoder: EncoderConfig | None = None) -> dict[str, Any]:
    """Random stand-ins for the artifacts of the jobs a method depends on (profiling and tests only)."""
    return {role: get_stage(stage).placeholder(dict(params or {}), data, encoder or EncoderConfig())
            for role, (stage, params) in method_cls.dependencies(cfg).items()}


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
    method_cls = METHODS.get(method_name)
    data = datasets.load_source(dataset_name, config, device, data_dir, uses_labels=method_cls.uses_labels)
    if inputs is None:
        encoder = from_dict(EncoderConfig, config.get("encoder", {}), "encoder")
        inputs = placeholder_inputs(method_cls, method_config(method_name, config), data, encoder)
    method = build_method(method_name, config, data, device, inputs, seed=seed)
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    history, _ = train(method, data, seed=seed, workdir=Path(workdir) if workdir else None,
                       on_progress=on_progress, stop_after_epoch=stop_after_epoch)
    return method, history
