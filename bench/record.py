"""The result record: one JSON document per job, with a versioned, typed schema.

Accuracies are fractions in [0,1]. Every metric carries its n, its 95% Wilson interval and
the full attack protocol that produced it.
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
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import bench
from bench.errors import BenchError

SCHEMA_VERSION = 1
KINDS = ("pseudo_labels", "pretrain", "finetune", "evaluate")


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


@dataclass
class Record:
    kind: str
    key: str
    seed: int
    method: str | None = None
    finetuner: str | None = None
    source: str | None = None  # pretraining dataset
    target: str | None = None  # finetuning / test dataset
    config: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, default=_jsonable)

    @classmethod
    def from_json(cls, text: str, origin: str = "record") -> "Record":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BenchError(f"{origin}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
            raise BenchError(f"{origin}: schema {data.get('schema') if isinstance(data, dict) else '?'} "
                             f"is not the supported version {SCHEMA_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        missing = {"kind", "key", "seed"} - set(data)
        if unknown or missing:
            raise BenchError(f"{origin}: unknown fields {sorted(unknown)} / missing {sorted(missing)}")
        if data["kind"] not in KINDS:
            raise BenchError(f"{origin}: kind {data['kind']!r} is not one of {KINDS}")
        return cls(**data)


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
