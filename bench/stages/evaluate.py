"""The evaluate stage: SA, RA (PGD-20), AutoAttack and attack-strength sweeps of a finetuned
classifier on the target's test split (`bench.evaluation`), resumable part by part."""

from __future__ import annotations

from typing import Any

from bench import datasets
from bench.config import DataConfig, EvalConfig, from_dict
from bench.errors import BenchError
from bench.evaluation import evaluate_classifier
from bench.datasets import check_image_size, dataset_config as target_config
from bench.jobs import Job
from bench.record import TEST_SELECTION_FLAG, TEST_SELECTION_WARNING, EvaluateMetrics, Record
from bench.registry import DATASETS, STAGES
from bench.stages.base import Cell, Resources, Stage, StageContext


@STAGES.register("evaluate")
class Evaluate(Stage):
    """Clean accuracy, PGD-20, AutoAttack and attack-strength curves of a finetuned classifier."""

    reads = (("target", "test"),)
    attach = "classifier"
    Metrics = EvaluateMetrics
    resources = Resources(gpu=0.5)  # forward-and-attack work on batches of 500: two share a GPU

    def plugins(self, cell: Cell) -> list[Any]:
        return [DATASETS.get(cell.target)]

    def plan(self, planner: Any, params: dict[str, Any], cell: Cell, upstream: Job | None) -> Job:
        # `data` too: how the test split is loaded (download allowed or not)
        config = {**planner.sections("eval"), **planner.data(cell.target)}
        return planner.add(self, cell, config=config, deps={"classifier": upstream.key})

    def run(self, job: Job, ctx: StageContext) -> Record:
        eval_cfg = from_dict(EvalConfig, job.config.get("eval", {}), "eval")
        data_cfg = from_dict(DataConfig, job.config.get("data", {}), "data")
        model = ctx.input("classifier")
        meta = model.meta
        target_cfg = target_config(job.target, job.config)
        check_image_size(job.target, target_cfg, meta["image_size"])
        test = datasets.load(job.target, "test", data_dir=job.data_dir, download=data_cfg.download,
                             cfg=target_cfg, device=ctx.device, image_size=meta["image_size"])
        if test.num_classes != meta["num_classes"]:
            raise BenchError(f"{job.target} has {test.num_classes} classes but the classifier of "
                             f"{job.deps['classifier']} predicts {meta['num_classes']}")
        result = evaluate_classifier(model, test, eval_cfg, eval_cfg.seed, workdir=ctx.dir.mkdir(),
                                     on_progress=ctx.on_progress)
        flags = list(ctx.input_record("classifier").flags)
        flags += [f for f in result.flags if f not in flags]  # COLLAPSE_FLAG
        warnings = list(result.warnings)
        if TEST_SELECTION_FLAG in flags:
            warnings.insert(0, TEST_SELECTION_WARNING)
        # The saved parts stay: the worker writes the record after this returns, and until then they
        # are the only copy of the results. The record, once written, marks the job done.
        return ctx.record(result.metrics, warnings=warnings, flags=flags)

    def describe(self, job: Job) -> str:
        c = job.config["eval"]
        aa = f", AA {c['aa_version']} n={c['aa_n']}" if c["aa_n"] else ""
        return f"{c['norm']} PGD-{c['steps']} n={c['n']}{aa}"

    def summary(self, record: Record) -> str:
        parts = []
        for name in ("sa", "ra", "aa"):
            m = record.metrics.get(name)
            if isinstance(m, dict) and isinstance(m.get("value"), (int, float)):
                parts.append(f"{name.upper()} {100 * m['value']:.1f}")
        return "  ".join(parts)
