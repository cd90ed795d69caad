"""A job: one node of the run graph (pseudo-labels, pretrain, finetune, evaluate).

A job function has the signature `fn(job, store, device, on_progress) -> Record`; it writes its
artifacts under `store.job_dir(job.key)` and returns the record, which the caller writes last
(a job is done exactly when its record.json exists).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

KINDS = ("pseudo_labels", "pretrain", "finetune", "evaluate")

# kind -> "module:function"; imported lazily so the runner does not import torch-heavy code early.
JOB_FUNCTIONS = {
    "pseudo_labels": "bench.clusterfit:run_pseudo_labels_job",
    "pretrain": "bench.pretrain:run_pretrain_job",
    "finetune": "bench.finetune:run_finetune_job",
    "evaluate": "bench.evaluate:run_evaluate_job",
}


@dataclass(frozen=True)
class Job:
    kind: str
    key: str
    seed: int
    method: str | None = None
    finetuner: str | None = None
    source: str | None = None  # pretraining dataset
    target: str | None = None  # finetuning / test dataset
    config: dict[str, dict[str, Any]] = field(default_factory=dict)  # resolved sections it depends on
    deps: dict[str, str] = field(default_factory=dict)  # role -> key of the job it needs
    data_dir: str | None = None


def job_to_dict(job: Job) -> dict[str, Any]:
    """The job as plain JSON data (what job.json holds)."""
    return json.loads(json.dumps(dataclasses.asdict(job), sort_keys=True, default=list))


def job_from_dict(data: dict[str, Any]) -> Job:
    names = {f.name for f in dataclasses.fields(Job)}
    return Job(**{k: v for k, v in data.items() if k in names})


def job_function(kind: str, spec: str | None = None) -> Callable:
    """The job function `spec` ("module:function"), by default the one of `kind`, imported now."""
    spec = spec or JOB_FUNCTIONS.get(kind)
    if not spec:
        raise ValueError(f"no job function for kind {kind!r}")
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)
