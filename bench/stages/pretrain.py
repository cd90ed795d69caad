"""The pretrain stage: train one method on one dataset's training images, export its encoder.

Unsupervised methods read the whole training split, as their official code does; methods that
read labels leave the validation images out (`data.pretrain_split`, recorded). The method's
dependencies (`Method.dependencies`: AdvCL's pseudo-labels, DeACL's teacher, ...) are planned as
jobs of their stages and arrive as `ctx.inputs`. A dependency may be a pretraining of another
method with some of its settings changed: `("pretrain", {"method": "simclr", "settings": {...}})`.
"""

from __future__ import annotations

from typing import Any

import torch

from bench import datasets, files
from bench.config import EncoderConfig, SelectConfig, from_dict, to_dict
from bench.errors import BenchError
from bench.jobs import Job
from bench.models import load_encoder, save_encoder
from bench.pretraining import build_method, train
from bench.record import PretrainMetrics, Record
from bench.registry import DATASETS, METHODS, STAGES
from bench.selection import attach_selector
from bench.stages.base import Cell, Resources, Stage, StageContext
from bench.train.knn import KnnMonitor
from bench.train.precision import resolve_precision
from bench.store import JobDir

ENCODER = "encoder.pt"


def fill_encoder(shared: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """The shared encoder settings with `wanted` filling those left to the method (-1, "method"):
    a dependency (DeACL's teacher) gets the architecture of the method that needs it."""
    return {k: (wanted[k] if k in wanted and v in (-1, "method") else v) for k, v in shared.items()}


@STAGES.register("pretrain")
class Pretrain(Stage):
    """Pretrain a method on a dataset's training images and export its encoder."""

    reads = (("source", "train"),)
    artifacts = (ENCODER,)
    provides = "encoder"
    Metrics = PretrainMetrics
    resources = Resources(gpu=1.0, data_parallel=True)  # a whole device each; --gpus-per-job N spreads it

    def plugins(self, cell: Cell) -> list[Any]:
        return [METHODS.get(cell.method), DATASETS.get(cell.source)]

    def plan(self, planner: Any, params: dict[str, Any], cell: Cell, upstream: Job | None) -> Job:
        method = params.get("method") or cell.method
        plugin = METHODS.get(method)
        section = planner.plugin_section(method, params.get("settings") or {})
        cfg = from_dict(plugin.Config, section.get(method, {}), method)
        # a dependency (another method's teacher or pseudo-label source) trains on the whole pool;
        # the grid's own pretrainings get the run's data selection (`select`)
        selected = params.get("select", not params.get("method"))
        own = cell.replace(method=method, source=params.get("source") or cell.source, finetuner=None, target=None,
                           variant=cell.variant if selected else None)
        deps = {role: planner.need(stage, dict(p or {}), own.replace(variant=None)).key
                for role, (stage, p) in plugin.dependencies(cfg).items()}
        encoder = fill_encoder(planner.section("encoder"), params.get("encoder") or {})
        select = planner.section("select")
        config = {"encoder": encoder, **planner.data(own.source), **section,
                  # only a pretraining that selects carries the section: without selection the same
                  # pretraining (a SimCLR row and AdvCL's ClusterFit source) stays one job
                  **({"select": select} if selected and select["method"] != "none" else {})}
        return planner.add(self, own, config=config, deps=deps, label=params.get("label"))

    def run(self, job: Job, ctx: StageContext) -> Record:
        method_cls = METHODS.get(job.method)
        data = datasets.load_source(job.source, job.config, ctx.device, job.data_dir,
                                    uses_labels=method_cls.uses_labels)
        method = build_method(job.method, job.config, data, ctx.device, ctx.inputs(), seed=job.seed)
        if "select" in job.config:
            attach_selector(method, from_dict(SelectConfig, job.config["select"], "select"), job.seed)
        monitor = KnnMonitor(data, method.cfg.knn_every, method.cfg.knn_images)  # representation quality
        history, images_per_s = train(method, data, seed=job.seed, workdir=ctx.dir.mkdir(),
                                      on_progress=ctx.on_progress, epoch_hooks=(monitor,))
        save_encoder(ctx.path(ENCODER), method.export_encoder(),
                     {"method": job.method, "branch": method.encoder_branch, "key": job.key, "seed": job.seed,
                      "image_size": data.image_size})
        for name, obj in method.extra_artifacts().items():
            ctx.save_torch(name, obj)
        split = datasets.pretrain_split(job.config.get("data", {}).get("pretrain_split", "auto"),
                                        method_cls.uses_labels)
        precision = resolve_precision(ctx.device, method.cfg.precision)
        metrics = PretrainMetrics(epochs=method.cfg.epochs, train_images_per_s=images_per_s, train_images=len(data),
                                  pretrain_split=datasets.SPLIT_NAMES[split], precision=precision.describe(),
                                  training=dict(method.run_info) or None)
        return ctx.record(metrics, history=history, flags=[precision.flag] if precision.flag else [])

    def describe(self, job: Job) -> str:
        split = datasets.pretrain_split(job.config.get("data", {}).get("pretrain_split", "auto"),
                                        METHODS.get(job.method).uses_labels)
        return f"{job.config[job.method]['precision']}, {job.source} {datasets.SPLIT_NAMES[split]}"

    def load(self, job_dir: JobDir, device: Any) -> Any:
        return load_encoder(job_dir / ENCODER, device)

    def load_extra(self, job_dir: JobDir, name: str) -> Any:
        """An artifact the method saved beside its encoder (`Method.extra_artifacts`), e.g. DynACL's
        dual-branch EMA encoder for DynACL++'s post-processing."""
        if name not in job_dir.read_record().artifacts:
            raise BenchError(f"pretrain job {job_dir.key} did not save {name}: its method has no such artifact")
        return files.read_torch(job_dir / name)

    def placeholder(self, params: dict[str, Any], data: Any, encoder: Any) -> Any:
        """A random-init encoder of the method the parameters name (a teacher in tests)."""
        method = METHODS.get(params["method"])
        encoder = from_dict(EncoderConfig, fill_encoder(to_dict(encoder), params.get("encoder") or {}), "encoder")
        with torch.random.fork_rng(devices=[]):  # the same stand-in every time, whatever the global RNG
            torch.manual_seed(0)
            out = method.encoder_for(encoder, (method.encoder_branch,)).to(data.y.device).eval()
        out.meta = {"method": params["method"], "image_size": data.image_size, "placeholder": True}
        return out

    def summary(self, record: Record) -> str:
        last = record.history[-1] if record.history else {}
        loss = f"loss {last['loss']:.3g} (epoch {last.get('epoch', len(record.history))})" if "loss" in last else ""
        return loss
