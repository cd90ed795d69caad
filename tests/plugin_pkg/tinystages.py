"""Stages from a third-party package (found through the `bench.stages` entry point).

- `knn`: the k-nearest-neighbour accuracy of a pretrained encoder on the target's test split,
  with the target's training images as the memory bank: one job per encoder of a grid
  (`bench run --stages knn`), cached and reported like any other.
- `probe`: reports, from inside its worker, the environment the worker was started with (the
  executors' tests use it to check GPU assignment and thread counts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.record import Metric
from bench.stages.base import Stage


@dataclass
class KNNMetrics:
    accuracy: Metric
    k: int


class KNN(Stage):
    """k-nearest-neighbour accuracy of a pretrained encoder (cosine, majority vote)."""

    reads = (("target", "train"), ("target", "test"))
    attach = "encoder"
    Metrics = KNNMetrics

    def plan(self, planner, params, cell, upstream):
        config = {**planner.data(cell.target), "knn": {"k": int(params.get("k", 5)), "n": 64}}
        return planner.add(self, cell.replace(finetuner=None), config=config, deps={"encoder": upstream.key})

    def run(self, job, ctx):
        import torch
        import torch.nn.functional as F

        from bench import datasets

        encoder = ctx.input("encoder")
        size = encoder.meta.get("image_size")
        cfg = datasets.dataset_config(job.target, job.config)
        data_cfg = job.config["data"]
        train = datasets.load(job.target, "train", data_dir=job.data_dir, val_size=data_cfg["val_size"], cfg=cfg,
                              image_size=size)
        test = datasets.load(job.target, "test", data_dir=job.data_dir, cfg=cfg, image_size=size).first(
            job.config["knn"]["n"])
        k = job.config["knn"]["k"]
        with torch.no_grad():
            bank = F.normalize(encoder(train.images(slice(None))), dim=1)
            queries = F.normalize(encoder(test.images(slice(None))), dim=1)
            nearest = (queries @ bank.T).topk(k, dim=1).indices
            votes = F.one_hot(train.y[nearest], train.num_classes).sum(1)
            correct = int((votes.argmax(1) == test.y).sum())
        ctx.progress({"phase": "knn", "done": 1, "total": 1})
        protocol = {"k": k, "n": len(test), "metric": "cosine", "images": f"first {len(test)} of {job.target} test"}
        return ctx.record(KNNMetrics(Metric.from_counts(correct, len(test), protocol), k))

    def summary(self, record):
        return f"kNN accuracy {100 * record.metrics['accuracy']['value']:.1f} (k={record.metrics['k']})"


class Probe(Stage):
    """Reports the environment its worker was started with (tests of the executors)."""

    def run(self, job, ctx):
        import torch

        initial = dict(item.split("=", 1) for item in Path("/proc/self/environ").read_bytes()
                       .decode(errors="replace").split("\0") if "=" in item)
        metrics: dict[str, Any] = {
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cuda_visible_devices_at_exec": initial.get("CUDA_VISIBLE_DEVICES"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
            "forked": "--fork-server" in Path("/proc/self/cmdline").read_bytes().decode(errors="replace").split("\0"),
            "device": str(ctx.device)}
        return ctx.record(metrics)
