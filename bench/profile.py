"""Throughput and peak memory of each method's training step, on synthetic data.

Each step is what `bench.train.fit` runs: the method's `training_step` (views, attack, loss)
at the method's `precision` (autocast and TF32 flags as the loop sets them, fp16 loss scaling),
backward and the optimizer step. The first step is a warm-up and
is not timed. Each method runs in a fresh process, so one method's allocator caches and
one-time initialization do not leak into another's numbers.

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` (data, model, optimizer state and
activations; the allocator's cache is not counted). On CPU, the growth of the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs once the process is warm) over its
resident set before the method was built; where /proc is unavailable, the growth of
`ru_maxrss` (a lower bound: it only counts growth past the earlier peak).
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.config import EncoderConfig, from_dict, resolve
from bench.datasets import batches
from bench.datasets import load_source
from bench.pretraining import build_method, placeholder_inputs
from bench.registry import METHODS
from bench.train import StepInfo, build_optimizer
from bench.train.precision import resolve_precision

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Profile:
    method: str
    batch_size: int
    width: int
    steps: int
    threads: int
    seconds_per_step: float
    images_per_s: float
    peak_memory_mb: float
    precision: str = "fp32"  # what ran (bench.train.precision)


def default_width(device: torch.device) -> int:
    return 64 if device.type == "cuda" else 16


def default_batch_size(method: str, device: torch.device) -> int:
    """The method's own batch size on a GPU; a small one on CPU so a profile takes seconds."""
    return METHODS.get(method).Config().batch_size if device.type == "cuda" else 32


class CpuPeakMemory:
    """Peak resident-set growth (MB) of this process between `start` and `peak_mb`."""

    def start(self) -> None:
        self.use_proc = self._reset_hwm()
        self.base_kb = self._status_kb("VmRSS") if self.use_proc else self._maxrss_kb()

    def peak_mb(self) -> float:
        peak = self._status_kb("VmHWM") if self.use_proc else self._maxrss_kb()
        return max(peak - self.base_kb, 0) / 1024

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            CLEAR_REFS.write_text("5")  # "5" resets the peak RSS (VmHWM) to the current RSS
            return True
        except OSError:
            return False

    @staticmethod
    def _status_kb(field: str) -> int:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise OSError(f"{field} not in {STATUS}")

    @staticmethod
    def _maxrss_kb() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def profile_method(name: str, *, device: torch.device, batch_size: int, width: int, steps: int,
                   threads: int = 0, isolate: bool = True, precision: str | None = None,
                   image_size: int = 32, settings: dict[str, Any] | None = None) -> Profile:
    """Time `steps` training steps of `name` after one warm-up step (in a fresh process if `isolate`).

    threads > 0 sets torch's CPU threads: on a shared machine one thread per process avoids
    OpenMP threads spin-waiting for a descheduled partner, which distorts the figures.
    `precision` overrides the method's `precision` setting (None: its default, fp32).
    `image_size` is the side of the synthetic images; `settings` are more dotted settings (the
    method's own section of a job, its `encoder.*`), so a step costs what that job's step costs.
    """
    kwargs = dict(device=device, batch_size=batch_size, width=width, steps=steps, threads=threads,
                  precision=precision, image_size=image_size, settings=settings)
    if not isolate:
        return measure(name, **kwargs)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, name, **kwargs).result()


def warm_up_process(device: torch.device) -> None:
    """One-time costs that belong to no method: the optimizer's lazy imports, the CUDA context."""
    torch.optim.SGD([torch.zeros(1, device=device, requires_grad=True)], lr=0.1)


def measure(name: str, *, device: torch.device, batch_size: int, width: int, steps: int,
            threads: int = 0, precision: str | None = None, image_size: int = 32,
            settings: dict[str, Any] | None = None) -> Profile:
    if threads:
        torch.set_num_threads(threads)
    warm_up_process(device)
    settings = {**(settings or {}), f"{name}.batch_size": batch_size, "encoder.width": width,
                "synthetic.n_train": batch_size, "synthetic.image_size": image_size, "data.val_size": 0,
                "data.train_limit": 0, "select.method": "none"}
    if precision is not None:
        settings[f"{name}.precision"] = precision
    config = resolve(settings, [name, "synthetic"]).as_dict()
    cpu_memory = CpuPeakMemory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        cpu_memory.start()
    data = load_source("synthetic", config, device)
    cfg = from_dict(METHODS.get(name).Config, config.get(name, {}), name)
    encoder = from_dict(EncoderConfig, config.get("encoder", {}), "encoder")
    method = build_method(name, config, data, device, placeholder_inputs(METHODS.get(name), cfg, data, encoder))
    optimizer = build_optimizer(method.trainable_parameters(), method.cfg)
    for group in optimizer.param_groups:
        group["lr"] = method.lr_at(0, 0, 1)  # the warm-up's first value: keeps random weights finite
    x, y, index = next(batches(data, batch_size, shuffle=False))
    method.train_mode()
    precision = resolve_precision(device, method.cfg.precision)
    scaler = precision.scaler()

    def one_step(step: int) -> None:
        info = StepInfo(0, step, step, steps + 1, optimizer.param_groups[0]["lr"])
        with precision.autocast():
            loss = method.training_step(x, y, index, info)["loss"]
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    durations = []
    with precision.training():
        one_step(0)
        synchronize(device)
        for step in range(1, steps + 1):  # fit syncs every step too (it reads the loss)
            started = time.perf_counter()
            one_step(step)
            synchronize(device)
            durations.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else cpu_memory.peak_mb()
    per_step = statistics.median(durations)  # robust to a busy machine's stalls
    return Profile(name, batch_size, width, steps, torch.get_num_threads(), per_step, batch_size / per_step, peak,
                   precision.ran)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_note(device: torch.device) -> str:
    what = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "growth of peak RSS (VmHWM)"
    return f"median step time; peak memory = {what}; one fresh process per method"


# ---------------------------------------------------------------- the passes finetuning and evaluation make


@dataclass
class PassProfile:
    """Seconds per image of the three passes finetuning and evaluation are made of, for one encoder
    architecture on one device: a clean forward (eval, no graph), one attack step (eval-mode
    forward + input gradient, weights frozen) and one training step (train-mode forward, backward,
    SGD step)."""

    width: int
    image_size: int
    batch_size: int
    threads: int
    forward_s: float
    attack_step_s: float
    train_step_s: float


def measure_passes(*, device: torch.device, width: int, image_size: int, batch_size: int, repeats: int = 3,
                   threads: int = 0, arch: str = "resnet18", num_classes: int = 10) -> PassProfile:
    """Median per-image time of each pass over `repeats` batches, after one warm-up of each."""
    from bench.models import Classifier
    from bench.models.resnet import build_encoder

    if threads:
        torch.set_num_threads(threads)
    warm_up_process(device)
    torch.manual_seed(0)
    model = Classifier(build_encoder(arch, width, ("normal",)), num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.rand(batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    def attack_step() -> None:
        model.eval()
        adv = x.clone().requires_grad_(True)
        torch.autograd.grad(torch.nn.functional.cross_entropy(model(adv), y), adv)

    def train_step() -> None:
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def per_image(work) -> float:
        work()
        synchronize(device)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            work()
            synchronize(device)
            times.append(time.perf_counter() - started)
        return statistics.median(times) / batch_size

    return PassProfile(width, image_size, batch_size, torch.get_num_threads(), per_image(forward),
                       per_image(attack_step), per_image(train_step))


def profile_passes(*, device: torch.device, width: int, image_size: int, batch_size: int, threads: int = 0,
                   isolate: bool = True, arch: str = "resnet18") -> PassProfile:
    """`measure_passes` in a fresh process (if `isolate`), as `profile_method`."""
    kwargs = dict(device=device, width=width, image_size=image_size, batch_size=batch_size, threads=threads, arch=arch)
    if not isolate:
        return measure_passes(**kwargs)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure_passes, **kwargs).result()
