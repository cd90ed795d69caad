"""GPU fast paths of training, each behind a `TrainConfig` setting and recorded in the record.

- `channels_last`: the model's 4-D weights and its convolution inputs in channels-last memory
  layout (NHWC), which cuDNN's tensor-core convolutions prefer (mostly under bf16/fp16). Same
  arithmetic, other kernels. On CPU the CIFAR ResNet already feeds its stem channels-last
  (oneDNN's backward is faster so); the setting also converts the weights there.
- `cudnn_benchmark`: `torch.backends.cudnn.benchmark` for the run: cuDNN times its convolution
  algorithms for each new input shape and keeps the fastest. Training shapes are fixed (the
  batch, the views, the attack's batches), so the search is paid once per shape. It may pick a
  non-deterministic algorithm: runs are then not bit-reproducible on CUDA.
- `compile`: `torch.compile` of the encoder (in place, `nn.Module.compile`, so checkpoints and
  exported weights keep their names) and of the attack's per-step update (`attack_step`,
  used by `bench.attacks.pgd`). Compilation takes tens of seconds to minutes per new shape.

None of them changes what is computed beyond float rounding, so none is part of a job's key
(`bench.grid.NOT_IN_KEY`); `describe` says what ran.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from typing import Any, Iterator

import torch
from torch import nn

from bench.attacks.compiled import attack_steps_compiled

log = logging.getLogger(__name__)

@contextlib.contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def use_channels_last(model: nn.Module) -> None:
    """Weights channels-last, and every module that converts its inputs (`channels_last` attribute) told to."""
    model.to(memory_format=torch.channels_last)
    for module in model.modules():
        if hasattr(module, "channels_last"):
            module.channels_last = True


def compile_encoder(model: nn.Module) -> nn.Module:
    """The module compiled in place: the model's `encoder` if it has one (heads stay eager), else the model."""
    target = getattr(model, "encoder", None)
    target = target if isinstance(target, nn.Module) else model
    target.compile(dynamic=None)
    return target


def compile_available() -> tuple[bool, str]:
    """Whether torch.compile can run here, and why not."""
    if not hasattr(torch, "compile"):
        return False, "this torch has no torch.compile"
    try:
        importlib.import_module("torch._dynamo")
        importlib.import_module("torch._inductor")
    except Exception as exc:  # noqa: BLE001 - any import failure means no compile here
        return False, f"torch.compile is not usable: {exc}"
    return True, ""


@contextlib.contextmanager
def fast_paths(model: nn.Module, cfg: Any, device: torch.device) -> Iterator[dict[str, Any]]:
    """Apply the run's fast paths (channels-last and compile stay on the model) and yield what ran."""
    ran = {"channels_last": False, "cudnn_benchmark": False, "compile": False}
    if getattr(cfg, "channels_last", False):
        use_channels_last(model)
        ran["channels_last"] = True
    if getattr(cfg, "compile", False):
        compile_encoder(model)
        ran["compile"] = True
    benchmark = bool(getattr(cfg, "cudnn_benchmark", False)) and device.type == "cuda"
    ran["cudnn_benchmark"] = benchmark
    with cudnn_benchmark(benchmark) if device.type == "cuda" else contextlib.nullcontext(), \
            attack_steps_compiled(ran["compile"]):
        yield ran
