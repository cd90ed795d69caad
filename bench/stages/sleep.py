"""A job that only sleeps: the scheduler benchmark's and the runner tests' stand-in for real work."""

from __future__ import annotations

import time
from pathlib import Path

from bench.jobs import Job
from bench.record import Record
from bench.registry import STAGES
from bench.stages.base import Resources, Stage, StageContext


@STAGES.register("sleep")
class Sleep(Stage):
    """Sleeps `config.sleep.seconds` (for benchmarks and tests of the executors); no data, no torch.

    `config.sleep.gpu` (default 1) is the share of a GPU it declares, `config.sleep.data_parallel`
    whether `--gpus-per-job` spreads it: the scheduler benchmark's stand-ins for each job kind.
    """

    def resources_for(self, job: Job) -> Resources:
        settings = job.config.get("sleep", {})
        return Resources(gpu=float(settings.get("gpu", 1.0)), data_parallel=bool(settings.get("data_parallel", False)))

    def run(self, job: Job, ctx: StageContext) -> Record:
        """It fails if `fail` is set, or while the file named by `fail_while` exists (so the same job
        can fail, then succeed on a rerun)."""
        settings = job.config.get("sleep", {})
        seconds = float(settings.get("seconds", 1.0))
        if settings.get("fail") or (settings.get("fail_while") and Path(settings["fail_while"]).exists()):
            raise RuntimeError(f"{job.key} was told to fail")
        started = time.time()
        steps = max(1, int(seconds / 0.25))
        for step in range(steps):
            # sleep to each step's deadline, so that the steps' overheads do not add up
            time.sleep(max(0.0, started + seconds * (step + 1) / steps - time.time()))
            ctx.progress({"epoch": 1, "epochs": 1, "step": step + 1, "steps": steps})
        return Record.for_job(job, {"slept_s": time.time() - started},
                              provenance={"started": started, "finished": time.time()})
