"""A job: one node of the run graph, run by the stage (job kind) it names.

Which kinds exist is the stage registry (`bench.registry.STAGES`): pseudo_labels, pretrain,
finetune, evaluate, and whatever plugins add. A job carries only what determines its result
(its key is a hash of exactly that) plus the operational settings its worker needs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Job:
    kind: str
    key: str
    seed: int
    method: str | None = None
    finetuner: str | None = None
    source: str | None = None  # pretraining dataset
    target: str | None = None  # finetuning / test dataset
    variant: str | None = None  # the grid variant's label (shown by the report; not in the key)
    config: dict[str, dict[str, Any]] = field(default_factory=dict)  # resolved sections it depends on
    deps: dict[str, str] = field(default_factory=dict)  # role -> key of the job it needs
    data: dict[str, Any] = field(default_factory=dict)  # "dataset/split" -> fingerprint of what it reads (in the key)
    data_dir: str | None = None


def job_to_dict(job: Job) -> dict[str, Any]:
    """The job as plain JSON data (what job.json holds)."""
    return json.loads(json.dumps(dataclasses.asdict(job), sort_keys=True, default=list))


def job_from_dict(data: dict[str, Any]) -> Job:
    names = {f.name for f in dataclasses.fields(Job)}
    return Job(**{k: v for k, v in data.items() if k in names})
