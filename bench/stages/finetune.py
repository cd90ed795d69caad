"""The finetune stage: an encoder (from any job that provides one) + a finetuner on a target dataset.

The encoder is trained at its own image size (cross-dataset targets are resized to it), the
finetuner's model selection runs on the validation split, and the selected classifier is saved.
"""

from __future__ import annotations

from typing import Any

from bench.config import EvalConfig, from_dict
from bench.datasets import dataset_config as target_config, dataset_image_size
from bench.finetuning import run_finetuner, selection_metrics
from bench.jobs import Job
from bench.models import load_classifier, save_classifier
from bench.record import FinetuneMetrics, Record
from bench.registry import DATASETS, FINETUNERS, STAGES
from bench.stages.base import Cell, Resources, Stage, StageContext, get_stage
from bench.train.precision import resolve_precision
from bench.store import JobDir

CLASSIFIER = "classifier.pt"

# The eval settings a finetune job uses: model selection (Finetuner.validate) measures SA and PGD
# robustness on the first val_n validation images. The rest (n, aa_n, sweeps, steps, restarts,
# ...) belong to the evaluate job only, so adding AutoAttack images retrains nothing.
# batch_size stays: the PGD random starts come from one generator consumed batch by batch, which
# gives the same noise for any batch size on the CPU but not on CUDA (Philox offsets advance per
# call), and GPU kernels may reduce differently per batch size; either can change the selected epoch.
SELECTION_EVAL = ("val_n", "eps", "alpha", "selection_steps", "seed", "batch_size", "clamp_start")
# Selection attacks in the threat model of eval.norm (bench.attacks.threat.threat_of): under L2 the
# norm and its radius and step replace eps and alpha (L-inf jobs keep exactly the keys above).
SELECTION_L2 = ("norm", "l2_eps", "l2_alpha")


def selection_eval(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The eval settings of a finetune job (its key): SELECTION_EVAL, in the threat model of eval.norm."""
    if evaluation.get("norm", "Linf") == "L2":
        keys = [k for k in SELECTION_EVAL if k not in ("eps", "alpha")] + list(SELECTION_L2)
    else:
        keys = list(SELECTION_EVAL)
    return {k: evaluation[k] for k in keys}


@STAGES.register("finetune")
class Finetune(Stage):
    """Finetune an encoder with a finetuner (SLF, ALF, AFF) on a target dataset; select on validation."""

    reads = (("target", "train"),)
    artifacts = (CLASSIFIER,)
    provides = "classifier"
    Metrics = FinetuneMetrics

    def plugins(self, cell: Cell) -> list[Any]:
        return [FINETUNERS.get(cell.finetuner), DATASETS.get(cell.target)]

    def resources_for(self, job: Job) -> Resources:
        """The finetuner's share of a GPU (`Finetuner.gpu_share`: SLF 1/4, ALF 1/2, AFF a whole one)."""
        return Resources(gpu=float(getattr(FINETUNERS.get(job.finetuner), "gpu_share", 1.0)), data_parallel=True)

    def plan(self, planner: Any, params: dict[str, Any], cell: Cell, upstream: Job | None) -> Job:
        own = cell.replace(finetuner=params.get("finetuner") or cell.finetuner)
        evaluation = planner.section("eval")
        config = {**planner.sections("encoder"), **planner.data(own.target),
                  "eval": selection_eval(evaluation), **planner.sections(own.finetuner)}
        return planner.add(self, own, config=config, deps={"encoder": upstream.key})

    def run(self, job: Job, ctx: StageContext) -> Record:
        encoder = ctx.input("encoder")
        meta = getattr(encoder, "meta", {}) or {}
        size = int(meta.get("image_size") or dataset_image_size(job.source, target_config(job.source, job.config)))
        result = run_finetuner(job.finetuner, job.config, encoder, job.target, seed=job.seed,
                               workdir=ctx.dir.mkdir(), device=ctx.device, data_dir=job.data_dir, image_size=size,
                               on_progress=ctx.on_progress)
        selection = result.finetuner.cfg.selection
        metrics = selection_metrics(result, from_dict(EvalConfig, job.config.get("eval", {}), "eval"), selection)
        precision = resolve_precision(ctx.device, result.finetuner.cfg.precision)
        metrics.precision = precision.describe()
        metrics.training = dict(result.finetuner.run_info) or None
        # the encoder's flags (its training precision, ...) travel on: they qualify every number below
        inherited = [f for f in ctx.input_record("encoder").flags if f not in result.flags]
        flags = list(dict.fromkeys(inherited + list(result.flags) + ([precision.flag] if precision.flag else [])))
        save_classifier(ctx.path(CLASSIFIER), result.model, classes=result.train.classes, image_size=size,
                        meta={"finetuner": job.finetuner, "method": job.method, "source": job.source,
                              "target": job.target, "seed": job.seed, "key": job.key, "selection": selection,
                              "selected_epoch": metrics.selected_epoch, "flags": flags},
                        encoder_job=job.deps["encoder"])  # an outside encoder's architecture comes from there
        return ctx.record(metrics, history=result.history, warnings=list(result.warnings), flags=flags)

    def describe(self, job: Job) -> str:
        cfg = job.config[job.finetuner]
        return f"{cfg['precision']}, selection on {cfg['selection']}"

    def load(self, job_dir: JobDir, device: Any) -> Any:
        def encoder_of(key: str) -> Any:  # an outside encoder no spec describes: rebuilt by its own job
            upstream = JobDir(job_dir.root, key)
            return get_stage(upstream.read_record().kind).load(upstream, device)

        return load_classifier(job_dir / CLASSIFIER, device, encoder_of=encoder_of)

    def summary(self, record: Record) -> str:
        m = record.metrics
        if isinstance(m.get("val_ra"), dict):
            return (f"selected epoch {m.get('selected_epoch')}: val SA {100 * m['val_sa']['value']:.1f} "
                    f"RA {100 * m['val_ra']['value']:.1f}")
        return f"last epoch {m.get('selected_epoch')}"
