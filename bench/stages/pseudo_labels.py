"""The pseudo-label stage: ClusterFit labels of a dataset's training images (AdvCL's supervision
stimulus), computed once and shared by every method and seed that asks for the same ones.

Parameters (from the method's dependency): `source` = "simclr" (k-means on the features of a
SimCLR pretraining on the same data: a pretrain job this one depends on), another method's name
(its pretraining), "imagenet" (torchvision's ImageNet ResNet-50 from the torch hub cache),
"file" (a label file: `file`, `sha256`); `ks` = the cluster counts. With an `upstream` job (a
method's post-processing chain), the features are that job's encoder's. Writes `labels.npz`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from bench import clusterfit, datasets
from bench.errors import BenchError
from bench.jobs import Job
from bench.record import PseudoLabelMetrics, Record
from bench.registry import DATASETS, METHODS, STAGES
from bench.stages.base import Cell, Resources, Stage, StageContext
from bench.store import JobDir

log = logging.getLogger(__name__)
LABELS = "labels.npz"


@STAGES.register("pseudo_labels")
class PseudoLabels(Stage):
    """ClusterFit pseudo-labels: k-means of a pretrained network's features, or a label file."""

    reads = (("source", "train"),)
    resources = Resources(gpu=0.0)  # k-means (scikit-learn) on the CPU; its feature pass too: no GPU slot
    artifacts = (LABELS,)
    provides = "pseudo_labels"
    Metrics = PseudoLabelMetrics

    def plugins(self, cell: Cell) -> list[Any]:
        return [DATASETS.get(cell.source)]

    def plan(self, planner: Any, params: dict[str, Any], cell: Cell, upstream: Job | None) -> Job:
        origin = params.get("source")
        own = cell.replace(method=None, finetuner=None, target=None, variant=None)
        config: dict[str, Any] = {"pseudo_labels": params, **planner.sections("encoder"), **planner.data(own.source)}
        deps: dict[str, str] = {}
        if upstream is not None:
            deps["pretrain"] = upstream.key
        elif not params.get("file") and isinstance(origin, str) and origin in METHODS:
            deps["pretrain"] = planner.need("pretrain", {"method": origin}, own).key
        label = origin if isinstance(origin, str) and origin else ("file" if params.get("file") else None)
        return planner.add(self, own, config=config, deps=deps, label=label)

    def run(self, job: Job, ctx: StageContext) -> Record:
        params = dict(job.config.get("pseudo_labels") or {})
        source = params.get("source")
        ks = [int(k) for k in params.get("ks") or ()]
        if not ks:
            raise BenchError(f"pseudo-label job {job.key}: no cluster counts (config pseudo_labels.ks)")
        from_file = bool(params.get("file")) or source == "file"
        # the training images exactly as the pretraining that uses them reads them
        data = datasets.load_source(job.source, job.config, torch.device("cpu") if from_file else ctx.device,
                                    job.data_dir)
        positions = data.indices.cpu().numpy() if data.indices is not None else np.arange(len(data))
        warnings: list[str] = []
        extra: dict[str, Any] = {}
        if from_file:
            index, labels = clusterfit.read_label_file(params.get("file") or "", ks)
            missing = np.setdiff1d(positions, index)
            if missing.size:
                raise BenchError(f"{params.get('file')}: no pseudo-labels for {missing.size} training images of "
                                 f"{job.source} (first position {int(missing[0])})")
            f_pre = f"file {params.get('file')}"
        else:
            if "pretrain" in job.deps:
                model, transform = ctx.input("pretrain"), None
                f_pre = f"{source or 'upstream'} encoder {job.deps['pretrain']}"
            elif source == "imagenet":
                model, transform, f_pre = clusterfit.imagenet_resnet50(ctx.device)
            else:
                raise BenchError(f"pseudo-label job {job.key}: unknown source {source!r} "
                                 "(a method name, imagenet or a file)")
            features = clusterfit.extract_features(model, data, transform=transform, on_progress=ctx.on_progress)
            too_many = [k for k in ks if k > len(features)]
            if too_many:
                warnings.append(f"K={too_many} exceed the {len(features)} training images: one cluster per image "
                                "for those K (use fewer clusters, e.g. advcl.cluster_ks=[2,10,50], on tiny data)")
                log.warning(warnings[-1])

            def on_k(k: int) -> None:
                log.info("k-means with K=%d on %d features", k, len(features))
                ctx.progress({"stage": "kmeans", "k": k, "epoch": 1, "epochs": 1, "step": ks.index(k) + 1,
                              "steps": len(ks)})

            labels, inertia = clusterfit.cluster_features(features, ks, seed=job.seed, on_k=on_k, allow_fewer=True)
            index = positions
            extra = {"feature_dim": int(features.shape[1]), "kmeans_n_init": clusterfit.KMEANS_N_INIT,
                     "inertia": {str(k): v for k, v in inertia.items()}}
        ctx.save_npz(LABELS, **clusterfit.label_arrays(index, labels))
        sizes = {str(k): np.bincount(y, minlength=k).tolist() for k, y in labels.items()}
        metrics = PseudoLabelMetrics(ks=ks, n=int(len(index)), cluster_sizes=sizes, f_pre=f_pre, **extra)
        return ctx.record(metrics, warnings=warnings)

    def load(self, job_dir: JobDir, device: Any) -> dict[int, torch.Tensor]:
        return clusterfit.load_pseudo_labels(job_dir / LABELS)

    def placeholder(self, params: dict[str, Any], data: Any, encoder: Any) -> dict[int, torch.Tensor]:
        """Random labels for every source-split position (tests, profiling)."""
        size = int(data.indices.max()) + 1 if data.indices is not None else len(data)
        generator = torch.Generator().manual_seed(0)
        return {int(k): torch.randint(int(k), (size,), generator=generator).to(data.y.device)
                for k in params.get("ks") or ()}

    def summary(self, record: Record) -> str:
        return f"K={record.metrics.get('ks')} on {record.metrics.get('n')} images"
