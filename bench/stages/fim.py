"""The fim stage: feature inversion maps of a pretrained encoder (the paper's Figure 5).

One job per encoder of a grid (`bench run --stages fim`, attach = "encoder"): the seed images are
`fim.n_images` test images of the pretraining dataset, drawn with `fim.seed` (the same positions
for every encoder), and `bench.analysis.inversion.invert_feature` drives coordinate `fim.coordinate`
of the eval-mode encoder up (`fim.direction=max`, Engstrom et al.) or down (`min`, the paper's
formula as written) by `fim.steps` projected gradient steps. Its settings are the `fim` section
(in the job's key and its record).

The record holds the coordinate per step (`values`, [steps + 1][n]) and the settings; the seed and
optimised images (uint8, [n, H, W, 3]) are the artifact `fim.npz`. `figure_entry` turns both into
what `bench.report.analysis_figures.fim_figures` takes. An interrupted job resumes from its last
saved step (`fim_state.pt`, every `CHECKPOINT_STEPS` steps): the steps are deterministic, so the
result is the uninterrupted one. The encoder's weights and BatchNorm statistics are checked
unchanged afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench import datasets, files
from bench.analysis.inversion import InversionConfig, choose_seed_images, invert_feature, to_uint8_hwc
from bench.config import from_dict, to_dict
from bench.errors import BenchError
from bench.jobs import Job
from bench.models import bn_state
from bench.record import Record
from bench.registry import DATASETS, STAGES
from bench.stages.base import Cell, Stage, StageContext
from bench.store import JobDir

IMAGES = "fim.npz"
STATE = "fim_state.pt"  # the last saved step of an unfinished job
CHECKPOINT_STEPS = 20


@dataclass
class FIMMetrics:
    coordinate: int
    direction: str
    feature_dim: int
    n_images: int
    steps: int
    values: list[list[float]]   # [t][k]: the coordinate of image k after t steps (t = 0: the seed image)
    seed_indices: list[int]     # positions of the seed images in the test split
    delta_norm: list[float]     # ||delta||_2 per image (its budget: settings.eps in settings.norm)
    settings: dict[str, Any]
    image_size: int


def feature_dim_of(encoder_settings: dict[str, Any]) -> int | None:
    """The representation size of a ResNet-18 of these encoder settings (8 x width), else None."""
    return 8 * int(encoder_settings["width"]) if encoder_settings.get("arch") == "resnet18" else None


@STAGES.register("fim")
class FIM(Stage):
    """Feature inversion maps of one representation coordinate of a pretrained encoder (Figure 5)."""

    reads = (("source", "test"),)
    artifacts = (IMAGES,)
    attach = "encoder"
    Config = InversionConfig
    Metrics = FIMMetrics

    def plugins(self, cell: Cell) -> list[Any]:
        return [DATASETS.get(cell.source)]

    def plan(self, planner: Any, params: dict[str, Any], cell: Cell, upstream: Job | None) -> Job:
        settings = to_dict(from_dict(InversionConfig, {**planner.section("fim"), **params}, "fim"))
        size = feature_dim_of(planner.section("encoder"))
        if size is not None and settings["coordinate"] >= size:
            raise BenchError(f"fim.coordinate={settings['coordinate']} is outside the representation of this grid's "
                             f"encoders (size {size} = 8 x encoder.width): choose fim.coordinate=0..{size - 1}")
        own = cell.replace(finetuner=None, target=None)
        config = {"fim": settings, **planner.data(own.source)}
        return planner.add(self, own, config=config, deps={"encoder": upstream.key})

    def run(self, job: Job, ctx: StageContext) -> Record:
        cfg = from_dict(InversionConfig, job.config["fim"], "fim")
        encoder = ctx.input("encoder")
        meta = getattr(encoder, "meta", {}) or {}
        dataset_cfg = datasets.dataset_config(job.source, job.config)
        size = int(meta.get("image_size") or datasets.dataset_image_size(job.source, dataset_cfg))
        test = datasets.load(job.source, "test", data_dir=job.data_dir,
                             download=bool(job.config.get("data", {}).get("download", True)), cfg=dataset_cfg,
                             image_size=size)
        chosen = choose_seed_images(len(test), cfg.n_images, cfg.seed)
        x0 = test.images(torch.tensor(chosen)).to(ctx.device)
        feature_dim = int(getattr(encoder, "feature_dim", 0)) or None
        cfg.check(feature_dim)

        state_path = ctx.dir.mkdir() / STATE
        resume = files.read_torch(state_path) if state_path.is_file() else None

        def on_step(state: dict[str, Any]) -> None:
            t = state["t"]
            if t % CHECKPOINT_STEPS == 0 and t < cfg.steps:
                files.write_torch(state_path, {"t": t, "delta": state["delta"].cpu(),
                                               "values": [v.cpu() for v in state["values"]]})
            ctx.progress({"stage": "fim", "epoch": 1, "epochs": 1, "step": t, "steps": cfg.steps})

        weights = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        bn = bn_state(encoder)
        result = invert_feature(encoder, x0, cfg, seed_indices=chosen, resume=resume, on_step=on_step)
        after = encoder.state_dict()
        if any(not torch.equal(weights[k], after[k]) for k in weights) or any(
                not torch.equal(bn[k], v) for k, v in bn_state(encoder).items()):
            raise RuntimeError(f"fim job {job.key}: the inversion changed the encoder's weights or BatchNorm "
                               "statistics")
        ctx.save_npz(IMAGES, seeds=to_uint8_hwc(result.seeds), images=to_uint8_hwc(result.images),
                     seed_indices=np.asarray(chosen, dtype=np.int64))
        metrics = FIMMetrics(coordinate=cfg.coordinate, direction=cfg.direction, feature_dim=feature_dim or 0,
                             n_images=len(chosen), steps=cfg.steps,
                             values=[[float(v) for v in row] for row in result.values.tolist()],
                             seed_indices=chosen, delta_norm=result.delta.flatten(1).norm(dim=1).tolist(),
                             settings=to_dict(cfg), image_size=size)
        return ctx.record(metrics)

    def figure_entry(self, job_dir: JobDir, record: Record) -> dict[str, Any]:
        """What `fim_figures` takes for this job (its record's values and its images)."""
        with np.load(job_dir / IMAGES) as arrays:
            seeds, images = arrays["seeds"], arrays["images"]
        m = record.metrics
        return {"method": record.method, "source": record.source, "target": record.source, "seed": record.seed,
                "seeds": seeds, "images": images, "values": m["values"], "coordinate": m["coordinate"],
                "direction": m["direction"], "settings": m["settings"], "seed_indices": m["seed_indices"]}

    def summary(self, record: Record) -> str:
        m = record.metrics
        values = m.get("values") or [[]]
        start, end = np.mean(values[0]) if values[0] else 0.0, np.mean(values[-1]) if values[-1] else 0.0
        return f"coordinate {m.get('coordinate')} ({m.get('direction')}): mean {start:.3g} -> {end:.3g}"
