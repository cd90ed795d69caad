"""What a run will cost before it starts: a time estimate per job and for the whole graph.

Every estimate is a measured unit cost on this device times a count from the job's settings:

- pretrain: the method's training step, measured by `bench.profile.profile_method` with the
  job's own method and encoder settings at its image size (on a CPU at a small batch, scaled to
  the job's batch by images), times epochs x steps per epoch;
- finetune, evaluate, pseudo_labels, lpaft: the encoder's three passes (`bench.profile.measure_passes`:
  clean forward, attack step, training step, per image) times the passes the job makes: its
  finetuner's steps and attack steps, model selection every epoch, PGD, the sweeps and AutoAttack
  (modelled from its iterations and Square's queries, see `AA_PASSES`);
- every job: the start of its worker process (python, torch and the stages imported), measured.

Measurements are cached per device (`record.device_description`) in the user's cache folder
(`~/.cache/bench/profiles.json`, or `$XDG_CACHE_HOME/bench/`), so they are taken once. Figures for
another device (one GPU, from a CPU-only machine) come only from measurements made there: a cache
file copied from that machine (a dry run there fills it), or the files in
`bench/profiles/` shipped with the project (none yet). Without one the figure is "unknown", never
a guess. The whole graph's wall time is a simulation of the local executor's scheduling (longest
chain first) on its slots.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from bench.grid import Graph
from bench.jobs import Job

log = logging.getLogger(__name__)

CACHE_FORMAT = "bench-profiles/1"
# Settings that change how many steps a job takes, not what a step costs: left out of a profile's key.
SCHEDULE_KEYS = frozenset({"epochs", "steps_per_epoch", "warmup_epochs", "checkpoint_every", "lr", "min_lr",
                           "warmup_from", "decay_at", "gamma", "schedule", "momentum", "weight_decay", "nesterov",
                           "batch_size", "reload_frequency", "swap_param", "lr_step_first", "teacher_epochs"})
CPU_PROFILE_BATCH = 32        # images per profiled step on a CPU (scaled to the job's batch)
CPU_PROFILE_BATCH_WIDE = 8    # ... for encoders wider than 16 channels (a step takes seconds there)
# AutoAttack standard, in attack steps per image at budget 1: APGD-CE (100 iterations) on every
# image; on those it leaves robust, APGD-T (9 targets x 100), FAB-T (9 x 100, about two gradients
# an iteration) and Square (5000 queries, forwards). How many it leaves is not known before the run:
# AA_ROBUST_SHARE for a classifier trained against an attack (its encoder or its finetuning),
# AA_STANDARD_SHARE for one that is not (APGD-CE breaks nearly every image of a standard model).
AA_ROBUST_SHARE = 0.4
AA_STANDARD_SHARE = 0.02
AA_PASSES = {"apgd-ce": 100, "apgd-t": 900, "fab-t": 1800}
AA_SQUARE_QUERIES = 5000
STARTUP_MODULES = "torch, torch._dynamo, bench.stages.pretrain, bench.stages.finetune, bench.stages.evaluate"


# ---------------------------------------------------------------- the cache of measurements


def cache_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "bench" / "profiles.json"


class ProfileCache:
    """Measurements by device and key: {device: {key: {..., "measured": time}}} in one JSON file,
    plus read-only shipped files (`bench/profiles/*.json`, same layout, each with its `source`)."""

    def __init__(self, path: Path | None = None, shipped: bool = True):
        self.path = path or cache_path()
        self.entries: dict[str, dict[str, Any]] = {}
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict) and data.get("format") == CACHE_FORMAT:
                self.entries = {d: dict(v) for d, v in (data.get("devices") or {}).items()}
        except (OSError, ValueError):
            pass
        self.shipped: dict[str, dict[str, Any]] = shipped_profiles() if shipped else {}

    def get(self, device: str, key: str) -> dict[str, Any] | None:
        return (self.entries.get(device) or {}).get(key) or (self.shipped.get(device) or {}).get(key)

    def put(self, device: str, key: str, value: dict[str, Any]) -> dict[str, Any]:
        """Store a measurement (with the time it was made) and return it as stored."""
        from bench import files

        entry = self.entries.setdefault(device, {})[key] = {**value, "measured": round(time.time())}
        try:
            files.write_json(self.path, {"format": CACHE_FORMAT, "devices": self.entries})
        except OSError as exc:  # a cache only: the next run measures again
            log.warning("could not write the profile cache %s: %s", self.path, exc)
        return entry

    def devices(self) -> list[str]:
        return list(dict.fromkeys([*self.entries, *self.shipped]))


def shipped_profiles() -> dict[str, dict[str, Any]]:
    """Measurements shipped with the project (`bench/profiles/*.json`), by device."""
    out: dict[str, dict[str, Any]] = {}
    try:
        folder = resources.files("bench").joinpath("profiles")
        names = [p.name for p in folder.iterdir() if p.name.endswith(".json")] if folder.is_dir() else []
    except (OSError, ModuleNotFoundError):
        return out
    for name in sorted(names):
        try:
            data = json.loads(folder.joinpath(name).read_text())
        except (OSError, ValueError):
            continue
        for device, entries in (data.get("devices") or {}).items():
            out.setdefault(device, {}).update({k: {**v, "source": data.get("source", name)} for k, v in entries.items()})
    return out


def _key(kind: str, **parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=list)
    return f"{kind}:" + hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the measurements of one device


@dataclass
class Device:
    """Where the jobs would run: its description (the cache's key), torch device, threads per job."""

    name: str         # "cpu: x86_64 x2", "cuda: NVIDIA H100 80GB HBM3"
    torch_device: str  # "cpu" / "cuda"
    threads: int = 1
    slots: int = 1    # jobs at once

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.startswith("cuda")


def local_device(gpus: list[str] | None = None, slots: int | None = None) -> Device:
    """The device the local executor would use with these --gpus / --slots, and its slots."""
    from bench.executors.local import make_slots
    from bench.record import device_description

    made = make_slots(gpus, slots)
    cuda = made[0].name.startswith("gpu")
    if cuda:
        import torch

        name = device_description("cuda") if torch.cuda.is_available() else "cuda: unknown"
    else:
        name = device_description("cpu")
    return Device(name, "cuda" if cuda else "cpu", made[0].threads, len(made))


class Costs:
    """Unit costs on one device, measured on demand (`measure=True`) or read from the cache only."""

    def __init__(self, device: Device, cache: ProfileCache | None = None, *, measure: bool = True,
                 on_measure: Callable[[str], None] | None = None):
        self.device, self.cache, self.measure = device, cache or ProfileCache(), measure
        self.on_measure = on_measure or (lambda what: None)
        self.missing: list[str] = []  # what could not be had (not cached, not measured)
        self.graph: Graph | None = None  # set by estimate_graph: models may look at a job's inputs

    # -- the worker process

    def startup_s(self) -> float | None:
        import torch

        key = _key("startup", python=sys.version.split()[0], torch=torch.__version__, threads=self._threads())
        found = self.cache.get(self.device.name, key)
        if found is None and self._can_measure():
            self.on_measure("the start of a worker process")
            found = self.cache.put(self.device.name, key, {"seconds": measure_startup(self.device.threads)})
        return self._seconds(found, "worker start-up")

    # -- a method's training step

    def step_s(self, method: str, method_settings: dict[str, Any], encoder: dict[str, Any], image_size: int,
               batch_size: int) -> tuple[float | None, str]:
        """(seconds per step at `batch_size`, how it was obtained)."""
        width = int(encoder.get("width", 64))
        profile_batch = batch_size if self.device.is_cuda else min(
            batch_size, CPU_PROFILE_BATCH if width <= 16 else CPU_PROFILE_BATCH_WIDE)
        own = {k: v for k, v in method_settings.items() if k not in SCHEDULE_KEYS}
        key = _key("step", method=method, settings=own, encoder=encoder, image_size=image_size,
                   batch=profile_batch, threads=self._threads())
        found = self.cache.get(self.device.name, key)
        if found is None and self._can_measure():
            from bench.profile import profile_method

            self.on_measure(f"a {method} training step (width {width}, {image_size}px, batch {profile_batch})")
            settings = {f"{method}.{k}": v for k, v in own.items()}
            settings.update({f"encoder.{k}": v for k, v in encoder.items() if k != "width"})
            profile = profile_method(method, device=self._torch(), batch_size=profile_batch, width=width, isolate=False,
                                     steps=2 if not self.device.is_cuda else 5, threads=self.device.threads,
                                     image_size=image_size, settings=settings)
            found = self.cache.put(self.device.name, key, {"seconds_per_step": profile.seconds_per_step,
                                                           "batch_size": profile_batch})
        if found is None:
            self.missing.append(f"{method} step")
            return None, "not measured"
        per_image = found["seconds_per_step"] / found["batch_size"]
        how = "measured" if found["batch_size"] == batch_size else f"measured at batch {found['batch_size']}, scaled"
        return per_image * batch_size, how

    # -- the encoder's passes

    def passes(self, encoder: dict[str, Any], image_size: int) -> dict[str, float] | None:
        width = int(encoder.get("width", 64))
        arch = encoder.get("arch", "resnet18")
        batch = 256 if self.device.is_cuda else (CPU_PROFILE_BATCH if width <= 16 else CPU_PROFILE_BATCH_WIDE)
        key = _key("passes", arch=arch, width=width, image_size=image_size, batch=batch, threads=self._threads())
        found = self.cache.get(self.device.name, key)
        if found is None and self._can_measure():
            from bench.profile import profile_passes

            self.on_measure(f"the encoder's forward, attack and training passes (width {width}, {image_size}px)")
            p = profile_passes(device=self._torch(), width=width, image_size=image_size, batch_size=batch,
                               threads=self.device.threads, arch=arch, isolate=False)
            found = self.cache.put(self.device.name, key, {"forward": p.forward_s, "attack": p.attack_step_s,
                                                           "train": p.train_step_s, "batch_size": batch})
        if found is None:
            self.missing.append(f"encoder passes (width {width}, {image_size}px)")
        return found

    def _threads(self) -> int:
        """CPU threads per job, as part of a measurement's key (not on a GPU, where they do not decide it)."""
        return 0 if self.device.is_cuda else self.device.threads

    def _can_measure(self) -> bool:
        if not self.measure:
            return False
        if self.device.is_cuda:
            import torch

            return torch.cuda.is_available()
        return True

    def _torch(self) -> Any:
        import torch

        return torch.device(self.device.torch_device)

    def _seconds(self, found: dict[str, Any] | None, what: str) -> float | None:
        if found is None:
            self.missing.append(what)
            return None
        return float(found["seconds"])


def measure_startup(threads: int = 1, repeats: int = 2) -> float:
    """Wall seconds of a fresh python that imports torch and the stages (what every job's worker does first)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {STARTUP_MODULES}"], env=env, check=True,
                       capture_output=True, timeout=300)
        times.append(time.perf_counter() - started)
    return min(times)


# ---------------------------------------------------------------- counting a job's work


@dataclass
class JobEstimate:
    key: str
    kind: str
    seconds: float | None        # None: unknown (a cost not measured, or a stage without a model)
    work: str = ""               # what was counted, in words: "50 steps x 0.12 s"
    done: bool = False


def _section(job: Job, name: str | None) -> dict[str, Any]:
    return dict(job.config.get(name or "", {}) or {})


def _steps(n: int, batch: int, cap: int, drop_last: bool = False) -> int:
    from bench.datasets import steps_per_epoch

    return steps_per_epoch(n, batch, drop_last, cap) if n > 0 else 0


def split_size(name: str | None, split: str, job: Job) -> tuple[int, int]:
    """(images the job's `split` of dataset `name` holds, the image side), from its config and data."""
    from bench.datasets import cache_path, dataset, dataset_config, default_data_dir, validation_size

    if not name:
        return 0, 32
    cfg = dataset_config(name, job.config)
    ds = dataset(name, cfg)
    source = "test" if split == "test" else "train"
    n = _source_size(ds, source, Path(job.data_dir) if job.data_dir else default_data_dir(), cache_path)
    data = _section(job, "data")
    if split == "test" or n is None:
        return n or 0, ds.image_size
    val = validation_size(ds, n, int(data.get("val_size", -1))) if split in ("train", "val") else 0
    count = {"all": n, "train": n - val, "val": val}[split]
    limit = int(data.get("train_limit", 0) or 0)
    if limit and split in ("all", "train"):
        count = min(count, limit)
    return count, ds.image_size


def _source_size(ds: Any, split: str, data_dir: Path, cache_path: Callable) -> int | None:
    cfg = getattr(ds, "cfg", None)
    if getattr(ds, "generated", False) and cfg is not None:
        return int(getattr(cfg, "n_train" if split == "train" else "n_test"))
    path = cache_path(data_dir, ds.name, split)
    if path.is_file():
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as data:
                return int(data["y"].shape[0])
        except (OSError, ValueError, KeyError):
            return None
    sizes = getattr(ds, "split_sizes", None) or {}
    return sizes.get(split)


def _pretrain_split(job: Job) -> str:
    from bench.datasets import pretrain_split
    from bench.registry import METHODS

    requested = _section(job, "data").get("pretrain_split", "auto")
    return pretrain_split(requested, bool(getattr(METHODS.get(job.method), "uses_labels", False)))


def estimate_pretrain(job: Job, costs: Costs) -> tuple[float | None, str]:
    cfg = _section(job, job.method)
    n, size = split_size(job.source, _pretrain_split(job), job)
    batch = int(cfg.get("batch_size", 128))
    steps = int(cfg.get("epochs", 1)) * _steps(n, batch, int(cfg.get("steps_per_epoch", 0) or 0))
    per_step, how = costs.step_s(job.method, cfg, _section(job, "encoder"), size, batch)
    if per_step is None:
        return None, f"{steps} steps of {job.method} (step not measured)"
    return steps * per_step, f"{steps} steps x {per_step:.3g} s ({how})"


def _attack_passes(per: dict[str, float], steps: int) -> float:
    return steps * per["attack"]


def estimate_finetune(job: Job, costs: Costs) -> tuple[float | None, str]:
    from bench.registry import FINETUNERS

    cfg = {**dataclasses.asdict(FINETUNERS.get(job.finetuner).Config()), **_section(job, job.finetuner)}
    n, size = split_size(job.target, "train", job)
    size = _encoder_size(job, size)
    per = costs.passes(_section(job, "encoder"), size)
    batch = int(cfg.get("batch_size", 512))
    epochs = int(cfg.get("epochs", 1))
    steps = epochs * _steps(n, batch, int(cfg.get("steps_per_epoch", 0) or 0))
    if per is None:
        return None, f"{steps} {job.finetuner} steps (passes not measured)"
    attack = int(cfg.get("attack_steps", 0) or 0) if job.finetuner != "slf" else 0
    linear = getattr(FINETUNERS.get(job.finetuner), "linear", True)
    if linear:  # a frozen encoder: forwards for the features, attack steps through it (ALF)
        per_image = per["forward"] + _attack_passes(per, attack)
    else:       # AFF (TRADES): the attack, then training on the clean and the adversarial images
        per_image = _attack_passes(per, attack) + 2 * per["train"]
    ev = _section(job, "eval")
    val_n = int(ev.get("val_n", 0)) if cfg.get("selection", "val") != "last" else 0
    selection = epochs * val_n * (2 * per["forward"] + _attack_passes(per, int(ev.get("selection_steps", 20))))
    seconds = steps * batch * per_image + selection
    return seconds, f"{steps} steps x {batch} images" + (f" ({attack}-step attack)" if attack else "") + \
        (f" + selection on {val_n} images x {epochs} epochs" if val_n else "")


def estimate_evaluate(job: Job, costs: Costs) -> tuple[float | None, str]:
    from bench.config import EvalConfig, from_dict

    c = from_dict(EvalConfig, _section(job, "eval"), "eval")
    n_test, size = split_size(job.target, "test", job)
    size = _encoder_size(job, size)
    per = costs.passes(_encoder_of(job, costs), size)
    n, aa_n, sweep_n = min(c.n, n_test), min(c.aa_n, n_test), min(c.sweep_n, n_test)
    if per is None:
        return None, "passes not measured"
    pgd = n * (2 * per["forward"] + c.steps * c.restarts * per["attack"])
    eps_points = len(c.l2_sweep_eps if c.norm == "L2" else c.sweep_eps)
    sweeps = sweep_n * (20 * eps_points + max(c.sweep_steps, default=0)) * per["attack"] if sweep_n else 0.0
    aa = aa_n * c.aa_budget * aa_attack_steps(per, robust_share(job, costs)) if aa_n else 0.0
    parts = [f"PGD-{c.steps} on {n}"] + ([f"sweeps on {sweep_n}"] if sweep_n else []) + \
        ([f"AutoAttack on {aa_n}" + (f" at {c.aa_budget:g}" if c.aa_budget < 1 else "")] if aa_n else [])
    return pgd + sweeps + aa, ", ".join(parts)


def aa_attack_steps(per: dict[str, float], share: float = AA_ROBUST_SHARE) -> float:
    """Seconds per image of AutoAttack standard at budget 1 when `share` of the images survive APGD-CE."""
    first = AA_PASSES["apgd-ce"] * per["attack"]
    rest = (AA_PASSES["apgd-t"] + AA_PASSES["fab-t"]) * per["attack"] + AA_SQUARE_QUERIES * per["forward"]
    return first + share * rest


def robust_share(job: Job, costs: Costs) -> float:
    """AA_ROBUST_SHARE when the classifier an evaluate job reads was trained against an attack (its
    finetuning trains the encoder adversarially, or a job upstream has attack steps), else AA_STANDARD_SHARE."""
    seen: set[str] = set()
    while job is not None and job.key not in seen:
        seen.add(job.key)
        for name in (job.finetuner, job.method) if job.kind != "evaluate" else ():
            section = _section(job, name) if name else {}
            if int(section.get("attack_steps", 0) or 0) > 0 and not (name == job.finetuner and _linear(name)):
                return AA_ROBUST_SHARE
        job = next((costs.graph[k] for k in job.deps.values() if costs.graph is not None and k in costs.graph), None)
    return AA_STANDARD_SHARE


def _linear(finetuner: str) -> bool:
    from bench.registry import FINETUNERS

    return bool(getattr(FINETUNERS.get(finetuner), "linear", True))


def estimate_pseudo_labels(job: Job, costs: Costs) -> tuple[float | None, str]:
    n, size = split_size(job.source, "all", job)
    per = costs.passes(_section(job, "encoder"), size)
    if per is None:
        return None, "passes not measured"
    return n * per["forward"], f"features of {n} images (k-means not counted)"


def estimate_lpaft(job: Job, costs: Costs) -> tuple[float | None, str]:
    from bench.lpaft import LPAFTConfig

    cfg = {**dataclasses.asdict(LPAFTConfig()), **_section(job, "lpaft")}
    n, size = split_size(job.source, "all", job)
    per = costs.passes(_section(job, "encoder"), size)
    if per is None:
        return None, "passes not measured"
    batch = int(cfg["batch_size"])
    steps = _steps(n, batch, int(cfg.get("steps_per_epoch", 0) or 0), drop_last=True)
    lp = int(cfg["lp_epochs"]) * steps * batch * per["forward"]
    aft = int(cfg["aft_epochs"]) * steps * batch * (int(cfg["attack_steps"]) * per["attack"] + 2 * per["train"])
    return n * per["forward"] + lp + aft, f"k-means features of {n}, LP {cfg['lp_epochs']} + AFT {cfg['aft_epochs']} " \
                                          f"epochs x {steps} steps"


def _encoder_size(job: Job, size: int) -> int:
    """The encoder's input size: the source dataset's (cross-dataset targets are resized to it)."""
    if job.source and job.source != job.target:
        _, source_size = split_size(job.source, "test", job)
        return source_size
    return size


def _encoder_of(job: Job, costs: Costs) -> dict[str, Any]:
    """The encoder settings of a job, or of the nearest job upstream that has them (an evaluate job's
    classifier's finetune job); the defaults when the graph does not hold it."""
    from bench.config import EncoderConfig, to_dict

    seen = set()
    while job is not None and job.key not in seen:
        seen.add(job.key)
        if "encoder" in job.config:
            return _section(job, "encoder")
        job = next((costs.graph[k] for k in job.deps.values() if costs.graph is not None and k in costs.graph), None)
    return to_dict(EncoderConfig())


MODELS: dict[str, Callable[[Job, Costs], tuple[float | None, str]]] = {
    "pretrain": estimate_pretrain,
    "finetune": estimate_finetune,
    "evaluate": estimate_evaluate,
    "pseudo_labels": estimate_pseudo_labels,
    "lpaft": estimate_lpaft,
}


def estimate_job(job: Job, costs: Costs) -> JobEstimate:
    """One job's time: its worker's start plus its stage's work (a stage may bring its own model:
    an `estimate(job, costs)` method returning (seconds or None, words))."""
    from bench.stages.base import get_stage

    model = getattr(get_stage(job.kind), "estimate", None) or MODELS.get(job.kind)
    if model is None:
        return JobEstimate(job.key, job.kind, None, "no cost model for this kind of job")
    try:
        seconds, work = model(job, costs)
    except Exception as exc:  # an estimate never stops a dry run
        log.debug("no estimate for %s", job.key, exc_info=True)
        return JobEstimate(job.key, job.kind, None, f"no estimate ({type(exc).__name__}: {exc})")
    startup = costs.startup_s()
    if seconds is None or startup is None:
        return JobEstimate(job.key, job.kind, None, work)
    return JobEstimate(job.key, job.kind, startup + seconds, work)


# ---------------------------------------------------------------- the whole graph


@dataclass
class Estimate:
    device: Device
    jobs: dict[str, JobEstimate] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    @property
    def known(self) -> bool:
        return all(e.seconds is not None for e in self.jobs.values() if not e.done)

    @property
    def serial_s(self) -> float | None:
        if not self.known:
            return None
        return sum(e.seconds or 0.0 for e in self.jobs.values() if not e.done)

    def wall_s(self, graph: Graph, slots: int | None = None) -> float | None:
        """The graph's wall time on `slots` (the device's by default), scheduled as the local executor does."""
        if not self.known:
            return None
        durations = {k: (0.0 if e.done else float(e.seconds or 0.0)) for k, e in self.jobs.items()}
        return simulate(graph, durations, slots or self.device.slots)

    def summary(self, graph: Graph) -> str:
        wall, serial = self.wall_s(graph), self.serial_s
        where = f"{self.device.name}, {self.device.slots} job(s) at once, {self.device.threads} thread(s) each"
        if wall is None:
            return f"unknown on {where}: not measured: {', '.join(dict.fromkeys(self.missing)) or '?'}"
        return f"{duration(wall)} on {where} ({duration(serial)} of work)"


def simulate(graph: Graph, durations: dict[str, float], slots: int) -> float:
    """Finish time of the graph when a job starts as soon as its inputs are done and a slot is
    free, the longest chain of dependents first (the local executor's rule)."""
    depth = graph.depth()
    order = {k: i for i, k in enumerate(graph.keys())}
    waiting = {k: set(graph.deps(k)) & set(graph.keys()) for k in graph.keys()}
    ready = [(-depth[k], order[k], k) for k, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    children = graph.dependents()
    running: list[tuple[float, str]] = []
    now, free = 0.0, max(1, slots)
    while ready or running:
        while ready and free:
            _, _, key = heapq.heappop(ready)
            heapq.heappush(running, (now + durations.get(key, 0.0), key))
            free -= 1
        now, key = heapq.heappop(running)
        free += 1
        for child in children.get(key, []):
            waiting[child].discard(key)
            if not waiting[child]:
                heapq.heappush(ready, (-depth[child], order[child], child))
    return now


def estimate_graph(graph: Graph, costs: Costs, done: set[str] | None = None) -> Estimate:
    """Every job's estimate (jobs in `done` cost nothing)."""
    out = Estimate(costs.device)
    costs.graph = graph
    for job in graph:
        if done and job.key in done:
            out.jobs[job.key] = JobEstimate(job.key, job.kind, 0.0, "done", done=True)
        else:
            out.jobs[job.key] = estimate_job(job, costs)
    out.missing = list(dict.fromkeys(costs.missing))
    return out


def other_device(cache: ProfileCache, prefix: str = "cuda") -> Device | None:
    """A device of the kind `prefix` that the cache (or a shipped file) has measurements for."""
    for name in cache.devices():
        if name.startswith(prefix):
            return Device(name, "cuda", 1, 1)
    return None


def duration(seconds: float | None) -> str:
    """'45 s', '12 min', '3.4 h', '2.1 days'."""
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def rough(seconds: float | None) -> str:
    """A duration as an order of magnitude for a table cell (two significant figures)."""
    if seconds is None:
        return "?"
    return duration(float(f"{seconds:.2g}")) if seconds >= 1 else f"{seconds:.1f} s"


__all__ = ["Costs", "Device", "Estimate", "JobEstimate", "ProfileCache", "duration", "estimate_graph",
           "estimate_job", "local_device", "other_device", "simulate"]
