"""The LP-AFT stage (DynACL++'s post-processing, dynacl.md section 8): k-means pseudo-labels of the
pretrained dual-branch encoder, then a linear probe and TRADES on those labels (`bench.lpaft`).

It runs after the pretraining of a method that declares it (`Method.post_stages`: `dynacl_pp`,
`dynacl_air_pp`), reads the pretrain job's dual-branch artifact (`encoder_dual.pt`), and provides
the encoder that SLF/ALF/AFF then finetune like any other. Its settings are the `lpaft` section
(`lpaft.aft_epochs=5`, ...); the method sets K and the TRADES start.
"""

from __future__ import annotations

from typing import Any

from bench import clusterfit, datasets
from bench.config import from_dict, to_dict
from bench.jobs import Job
from bench.lpaft import LPAFTConfig, lpaft_from_dual
from bench.models import load_encoder, save_encoder
from bench.record import Record
from bench.registry import DATASETS, STAGES
from bench.stages.base import Cell, Stage, StageContext, get_stage
from bench.store import JobDir
from bench.train.precision import resolve_precision

ENCODER = "encoder.pt"
LABELS = "labels.npz"
DUAL = "encoder_dual.pt"  # what the pretraining saves for it (DynACL's `extra_artifacts`)


@STAGES.register("lpaft")
class LPAFT(Stage):
    """DynACL++'s post-processing: k-means pseudo-labels, then a linear probe and TRADES on them."""

    reads = (("source", "train"),)
    artifacts = (ENCODER, LABELS)
    provides = "encoder"
    Config = LPAFTConfig

    def plugins(self, cell: Cell) -> list[Any]:
        return [DATASETS.get(cell.source)]

    def plan(self, planner: Any, params: dict[str, Any], cell: Cell, upstream: Job | None) -> Job:
        settings = {**planner.section("lpaft"), **params}  # the method's K and start win
        config = {"lpaft": to_dict(from_dict(LPAFTConfig, settings, "lpaft")), **planner.data(cell.source)}
        return planner.add(self, cell.replace(finetuner=None, target=None), config=config,
                           deps={"pretrain": upstream.key})

    def run(self, job: Job, ctx: StageContext) -> Record:
        upstream = ctx.input_dir("pretrain")
        dual = get_stage(ctx.input_record("pretrain").kind).load_extra(upstream, DUAL)
        data = datasets.load_source(job.source, job.config, ctx.device, job.data_dir)
        encoder, labels, info = lpaft_from_dual(dual, data, job.config["lpaft"], num_classes=data.num_classes,
                                                seed=job.seed, workdir=ctx.dir.mkdir() / "lpaft",
                                                on_progress=ctx.on_progress)
        save_encoder(ctx.path(ENCODER), encoder, {"method": job.method, "branch": "pgd", "key": job.key,
                                                  "seed": job.seed, "image_size": data.image_size})
        positions = data.indices.cpu()
        k = int(info["pseudo_labels"]["k"])
        ctx.save_npz(LABELS, **clusterfit.label_arrays(positions.numpy(), {k: labels[positions].numpy()}))
        history = [{**h, "phase": "lp"} for h in info["lp"]] + [{**h, "phase": "aft"} for h in info["aft"]]
        precision = resolve_precision(ctx.device, job.config["lpaft"]["precision"])
        flags = list(dict.fromkeys(ctx.input_record("pretrain").flags + ([precision.flag] if precision.flag else [])))
        return ctx.record({"k": k, "n": len(data), "pseudo_labels": info["pseudo_labels"],
                           "precision": precision.describe()}, history=history, flags=flags)

    def describe(self, job: Job) -> str:
        split = datasets.pretrain_split(job.config.get("data", {}).get("pretrain_split", "auto"), False)
        return f"{job.config['lpaft']['precision']}, {job.source} {datasets.SPLIT_NAMES[split]}"

    def load(self, job_dir: JobDir, device: Any) -> Any:
        return load_encoder(job_dir / ENCODER, device)

    def summary(self, record: Record) -> str:
        last = record.history[-1] if record.history else {}
        return f"K={record.metrics.get('k')}" + (f", last AFT loss {last['loss']:.3g}" if "loss" in last else "")
