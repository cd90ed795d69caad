"""The landscape stage: the adversarial loss landscape of a finetuned classifier (the paper's Figure 6).

One job per classifier of a grid whose finetuner is in `landscape.finetuners` (SLF only by
default, as the paper; `bench run --stages landscape`, attach = "classifier"):
`bench.analysis.landscape.loss_landscape` on the first `landscape.n` test images of the target,
along one and two filter-normalised random weight directions seeded `landscape.seed` (a 1-D curve
of `landscape.points_1d` points, a `points_2d` x `points_2d` surface), each point's loss the mean
cross-entropy of PGD examples crafted against the model at that point. Its settings are the
`landscape` section (in the job's key and its record; `finetuners` only chooses which
classifiers get a job).

The record's metrics are exactly what `bench.report.analysis_figures.landscape_figures` takes
(`Landscape.to_record()`: a few dozen floats). Each finished point is saved (`points.json`), so
an interrupted job computes only the points it is missing. The classifier's weights are restored
bit for bit after each point and its BatchNorm statistics never move (checked).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

import torch

from bench import datasets, files
from bench.analysis.landscape import LandscapeConfig, loss_landscape
from bench.config import from_dict, param, to_dict
from bench.errors import BenchError
from bench.jobs import Job
from bench.models import bn_state
from bench.record import Record
from bench.registry import DATASETS, FINETUNERS, STAGES
from bench.stages.base import Cell, Stage, StageContext
from bench.store import JobDir

POINTS = "points.json"  # the points an unfinished job has computed


@dataclass
class LandscapeSettings(LandscapeConfig):
    finetuners: tuple[str, ...] = param(("slf",), help="the finetuners whose classifiers get a landscape job "
                                                       "(the paper's Figure 6: SLF)")


@dataclass
class LandscapeMetrics:
    alphas: list[float]
    loss: list[float]
    accuracy: list[float]
    surface: dict[str, Any] | None  # {"alphas", "betas", "loss": [ny][nx], "accuracy": [ny][nx]}
    n_images: int
    settings: dict[str, Any]
    weights_restored: bool = True   # weights and BatchNorm statistics compared bit for bit afterwards


def landscape_config(section: dict[str, Any]) -> LandscapeConfig:
    names = {f.name for f in fields(LandscapeConfig)}
    return from_dict(LandscapeConfig, {k: v for k, v in section.items() if k in names}, "landscape")


@STAGES.register("landscape")
class Landscape(Stage):
    """The adversarial loss along filter-normalised random weight directions of a classifier (Figure 6)."""

    reads = (("target", "test"),)
    attach = "classifier"
    Config = LandscapeSettings
    Metrics = LandscapeMetrics

    def plugins(self, cell: Cell) -> list[Any]:
        return [DATASETS.get(cell.target)]

    def plan(self, planner: Any, params: dict[str, Any], cell: Cell, upstream: Job | None) -> Job | None:
        section = {**planner.section("landscape"), **params}
        for name in section.get("finetuners", ()):
            FINETUNERS.get(name)  # a misspelt finetuner is bad input, not a silently empty figure
        if cell.finetuner not in section.get("finetuners", ()):
            return None  # not one of the classifiers this analysis is for
        config = {"landscape": to_dict(landscape_config(section)), **planner.data(cell.target)}
        return planner.add(self, cell, config=config, deps={"classifier": upstream.key})

    def run(self, job: Job, ctx: StageContext) -> Record:
        cfg = landscape_config(job.config["landscape"]).check()
        model = ctx.input("classifier")
        meta = model.meta
        target_cfg = datasets.dataset_config(job.target, job.config)
        datasets.check_image_size(job.target, target_cfg, meta["image_size"])
        test = datasets.load(job.target, "test", data_dir=job.data_dir,
                             download=bool(job.config.get("data", {}).get("download", True)), cfg=target_cfg,
                             device=ctx.device, image_size=meta["image_size"]).first(cfg.n)
        if test.num_classes != meta["num_classes"]:
            raise BenchError(f"{job.target} has {test.num_classes} classes but the classifier of "
                             f"{job.deps['classifier']} predicts {meta['num_classes']}")

        points_path = ctx.dir.mkdir() / POINTS
        saved = json.loads(points_path.read_text()) if points_path.is_file() else []
        known = {(float(a), float(b)): (float(loss), float(acc)) for a, b, loss, acc in saved}
        total = cfg.points_1d + cfg.points_2d ** 2

        def on_point(a: float, b: float, loss: float, acc: float) -> None:
            saved.append([a, b, loss, acc])
            files.write_json(points_path, saved)
            ctx.progress({"stage": "landscape", "epoch": 1, "epochs": 1, "step": len(saved), "steps": total})

        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bn = bn_state(model)
        result = loss_landscape(model, test.images(slice(None)), test.y, cfg, known=known, on_point=on_point)
        after = model.state_dict()
        restored = all(torch.equal(weights[k], after[k]) for k in weights) and all(
            torch.equal(bn[k], v) for k, v in bn_state(model).items())
        if not restored:
            raise RuntimeError(f"landscape job {job.key}: the sweep left the classifier's weights or BatchNorm "
                               "statistics changed")
        data = result.to_record()
        return ctx.record(LandscapeMetrics(**data, weights_restored=restored))

    def figure_entry(self, job_dir: JobDir, record: Record) -> dict[str, Any]:
        """What `landscape_figures` takes for this job."""
        return {"method": record.method, "finetuner": record.finetuner, "source": record.source,
                "target": record.target, "seed": record.seed, **record.metrics}

    def summary(self, record: Record) -> str:
        m = record.metrics
        loss = m.get("loss") or []
        return f"adversarial loss at 0: {loss[len(loss) // 2]:.3g} ({len(loss)} points)" if loss else ""
