"""The result record: one JSON document per job, with a versioned, validated schema.

Accuracies are fractions in [0,1]. Every metric carries its n, its 95% Wilson interval and the
full protocol that produced it. A record also names the data it was computed from (`data`: the
file and content hash of every split the job read) and the artifacts it wrote (`artifacts`:
name -> size and sha256), so a damaged or replaced file is noticed. The metrics of each kind of
job are a typed payload (`PretrainMetrics`, `FinetuneMetrics`, `EvaluateMetrics`, or a stage's
own dataclass) checked when the record is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import socket
import subprocess
import time
import typing
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import bench
from bench.errors import BenchError

SCHEMA_VERSION = 2

# Record vocabulary shared by the stages that write it and the report that reads it.
TEST_SELECTION_FLAG = "selection=test"
TEST_SELECTION_WARNING = (f"model selected on the test set ({TEST_SELECTION_FLAG}): this reproduces the papers' "
                          "practice; its numbers are optimistic and not comparable with validation-selected ones")
COLLAPSE_FLAG = "collapsed-classifier"


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


@dataclass
class Metric:
    value: float
    n: int
    correct: int
    ci95: tuple[float, float]
    protocol: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_counts(cls, correct: int, n: int, protocol: dict[str, Any] | None = None) -> "Metric":
        return cls(correct / n if n else float("nan"), n, correct, wilson_interval(correct, n), protocol or {})

    def plain(self) -> dict[str, Any]:
        """JSON-native form, as a record stores it (so a record read back compares equal)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ---------------------------------------------------------------- typed payloads


@dataclass
class PretrainMetrics:
    epochs: int
    train_images_per_s: float | None = None
    train_images: int | None = None        # images the method trained on per epoch (before selection)
    pretrain_split: str | None = None      # "train+val" or "train": which part of the training split
    precision: dict[str, Any] | None = None  # what training ran in (bench.train.precision.describe)
    training: dict[str, Any] | None = None   # how it ran: processes, backend, BatchNorm, fast paths (fit's run_info)


@dataclass
class PseudoLabelMetrics:
    ks: list[int]
    n: int
    cluster_sizes: dict[str, list[int]]
    f_pre: str | None = None
    feature_dim: int | None = None
    kmeans_n_init: int | None = None
    inertia: dict[str, float] | None = None


@dataclass
class FinetuneMetrics:
    selected_epoch: int
    val_ra: Metric | None = None
    val_sa: Metric | None = None
    precision: dict[str, Any] | None = None  # what training ran in (bench.train.precision.describe)
    training: dict[str, Any] | None = None   # how it ran: processes, backend, BatchNorm, fast paths (fit's run_info)


@dataclass
class EvaluateMetrics:
    sa: Metric
    ra: Metric | None = None
    aa: Metric | None = None
    sweeps: dict[str, list[Metric]] | None = None
    prediction_share: float | None = None  # the share of the most predicted class on clean test images


def typed(cls: type, data: Any, origin: str = "record") -> Any:
    """`data` (JSON) as an instance of the dataclass `cls`, recursively; BenchError if it does not fit."""
    if not isinstance(data, dict):
        raise BenchError(f"{origin}: expected an object for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    unknown, missing = set(data) - names, required - set(data)
    if unknown or missing:
        raise BenchError(f"{origin}: {cls.__name__} has unknown fields {sorted(unknown)} / misses {sorted(missing)}")
    return cls(**{k: _convert(hints[k], v, f"{origin}.{k}") for k, v in data.items()})


def _convert(hint: Any, value: Any, origin: str) -> Any:
    origin_type = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin_type in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, origin) if len(inner) == 1 else value
    if dataclasses.is_dataclass(hint):
        return typed(hint, value, origin)
    if origin_type is list and isinstance(value, list):
        return [_convert(args[0], v, origin) for v in value] if args else value
    if origin_type is dict and isinstance(value, dict):
        return {k: _convert(args[1], v, origin) for k, v in value.items()} if args else value
    if origin_type is tuple and isinstance(value, list):
        return tuple(value)
    check = {int: int, float: (int, float), str: str, bool: bool}.get(hint)
    if check is not None and (not isinstance(value, check) or (hint is not bool and isinstance(value, bool))):
        raise BenchError(f"{origin}: expected {hint.__name__}, got {value!r}")
    return value


def plain(payload: Any) -> Any:
    """A payload (dataclass, Metric, ...) as JSON-native data."""
    return json.loads(json.dumps(payload, default=_jsonable))


# ---------------------------------------------------------------- the record


@dataclass
class Record:
    kind: str
    key: str
    seed: int
    method: str | None = None
    finetuner: str | None = None
    source: str | None = None  # pretraining dataset
    target: str | None = None  # finetuning / test dataset
    variant: str | None = None  # the grid variant that asked for it (a label, not part of the key)
    config: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)      # role -> key of the job it read
    data: dict[str, Any] = field(default_factory=dict)        # the data fingerprint it was computed from
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)  # file -> {"size", "sha256"}
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    @classmethod
    def for_job(cls, job: Any, metrics: Any, **fields: Any) -> "Record":
        """The record of `job` (kind, key, names, config, inputs and data from the job)."""
        return cls(kind=job.kind, key=job.key, seed=job.seed, method=job.method, finetuner=job.finetuner,
                   source=job.source, target=job.target, variant=job.variant, config=job.config,
                   inputs=dict(job.deps), data=dict(job.data), metrics=plain(metrics), **fields)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, default=_jsonable)

    @classmethod
    def from_json(cls, text: str, origin: str = "record") -> "Record":
        """Parse and validate (fields and their types); the metrics are checked by `typed_metrics`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BenchError(f"{origin}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
            found = data.get("schema") if isinstance(data, dict) else "?"
            raise BenchError(f"{origin}: schema {found} is not the supported version {SCHEMA_VERSION}")
        record = typed(cls, data, origin)
        if not record.kind or not record.key:
            raise BenchError(f"{origin}: empty kind or key")
        return record

    def typed_metrics(self, metrics_cls: type | None) -> Any:
        """The metrics as the stage's payload dataclass (BenchError if they do not fit)."""
        if metrics_cls is None:
            return self.metrics
        return typed(metrics_cls, self.metrics, f"record {self.key} metrics")


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in a record")


# ---------------------------------------------------------------- provenance


def git_sha() -> str | None:
    root = Path(bench.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        sha = out.stdout.strip()
        if out.returncode != 0 or not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions(names=("torch", "torchvision", "numpy", "pyautoattack", "scikit-learn")) -> dict[str, str | None]:
    out: dict[str, str | None] = {"bench": bench.__version__, "python": platform.python_version()}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def device_description(device: Any) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"


def provenance(device: Any, started: float) -> dict[str, Any]:
    return {"git_sha": git_sha(), "versions": package_versions(), "device": device_description(device),
            "host": socket.gethostname(), "started": started, "finished": time.time(),
            "duration_s": round(time.time() - started, 3)}
