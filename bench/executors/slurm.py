"""The Slurm executor, through submitit: one Slurm job per graph job.

Each job is submitted with its resources (GPUs, CPUs, memory, time, partition) and
`--dependency=afterok:<ids of the jobs it needs>`; a failed job's dependents are cancelled by
Slurm (`--kill-on-invalid-dep=yes`). The submitted callable is `SlurmTask`, a submitit
`Checkpointable`: on preemption or timeout submitit requeues it, and the job resumes from its
last training checkpoint. Everything Slurm writes for a job lives in `<job dir>/slurm/`.

GPUs: `--gpus-per-job N` is what a data-parallel kind (pretrain, finetune) gets, as N tasks of
one Slurm job (`srun` starts N workers; RANK/WORLD_SIZE/LOCAL_RANK from SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID); every other kind gets one whole GPU if it uses one (Slurm allocates whole GPUs)
and none if it runs on the CPU (k-means pseudo-labels). A per-kind table's `gpus_per_job` is
taken as it is.

Settings: CLI flags (--partition, --time-min, --mem-gb, --cpus-per-job, --gpus-per-job) over
bench.toml's `[executors.slurm]` (same names, plus `account`, `qos`, `constraint`, `setup`
(shell lines run before the job), `additional` (any other sbatch option), `poll_s`, and
per-kind tables such as `[executors.slurm.evaluate]` that override the rest for that kind).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.executors.base import (DONE, FAILED, FINAL, PENDING, RUNNING, SUBMITTED, Executor, Outcome, Reporter, Tracker,
                                  read_failure, read_progress)
from bench.grid import Graph
from bench.registry import EXECUTORS
from bench import files
from bench.store import Store
from bench.worker import payload_for

log = logging.getLogger(__name__)

SLURM_JOB_FILE = "slurm_job.json"
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "PREEMPTED",
          "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}
ENDED_BAD = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
SETTINGS = {"partition": str, "time_min": int, "mem_gb": (int, float), "cpus_per_job": int,
            "gpus_per_job": (int, float), "account": str, "qos": str, "constraint": str, "setup": list,
            "additional": dict, "poll_s": (int, float), "max_num_timeout": int, "folder": str}
DEFAULTS = {"time_min": 24 * 60, "cpus_per_job": 8, "gpus_per_job": 1, "poll_s": 15.0, "max_num_timeout": 20}


class SlurmTask:
    """What a Slurm job runs (pickled by submitit): `bench.worker.execute` on one job.

    A submitit Checkpointable (by duck typing, so this module imports without submitit): on
    preemption/timeout submitit calls `checkpoint` and requeues the same task, which resumes from
    the training checkpoint in the job directory.
    """

    def __init__(self, payload: dict[str, Any], results: str):
        self.payload = payload
        self.results = results

    def __call__(self) -> str:
        from bench.worker import EXIT_DONE, EXIT_ELSEWHERE, execute

        tasks = int(os.environ.get("SLURM_NTASKS") or 1)
        if tasks > 1:  # one rank of a data-parallel job, on one node (nodes = 1)
            job_id = int(os.environ.get("SLURM_JOB_ID") or 0)
            os.environ.update({"RANK": os.environ.get("SLURM_PROCID", "0"), "WORLD_SIZE": str(tasks),
                               "LOCAL_RANK": os.environ.get("SLURM_LOCALID", os.environ.get("SLURM_PROCID", "0")),
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(20000 + job_id % 20000)})
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus:
            os.environ.setdefault("OMP_NUM_THREADS", cpus)
        code = execute(self.payload, self.results, slot=f"slurm:{os.environ.get('SLURM_JOB_ID', '?')}",
                       threads=int(cpus) if cpus else None, wait_locked=True, log_file=True)
        key = self.payload["job"]["key"]
        if code not in (EXIT_DONE, EXIT_ELSEWHERE):
            raise RuntimeError(f"job {key} failed; see {Path(self.results) / key / 'log.txt'}")
        return key

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def kinds() -> list[str]:
    from bench.registry import STAGES

    return STAGES.names()


def _check_settings(extra: dict[str, Any], where: str = "[executors.slurm]") -> None:
    for name, value in extra.items():
        if isinstance(value, dict) and name in kinds():
            _check_settings(value, f"[executors.slurm.{name}]")
            continue
        if name not in SETTINGS:
            raise BenchError(f"{where}: unknown setting {name!r}; known: {', '.join(SETTINGS)} "
                             f"and per-kind tables ({', '.join(kinds())})")
        if not isinstance(value, SETTINGS[name]) or isinstance(value, bool):
            raise BenchError(f"{where}: {name} = {value!r} has the wrong type")
        if name in ("time_min", "cpus_per_job", "mem_gb", "poll_s") and value <= 0:
            raise BenchError(f"{where}: {name} must be positive, got {value!r}")
        if name == "gpus_per_job" and value < 0:
            raise BenchError(f"{where}: gpus_per_job must be >= 0, got {value!r}")
        if name == "gpus_per_job" and value != int(value):  # sbatch --gpus-per-node takes whole GPUs only
            raise BenchError(f"{where}: gpus_per_job = {value:g} (--gpus-per-job): Slurm allocates whole GPUs; "
                             f"use an integer (e.g. --gpus-per-job 1), or --executor ray to share a GPU between jobs")


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm job id -> state (first word, e.g. 'CANCELLED by 0' -> 'CANCELLED'); {} if sacct fails."""
    if not job_ids:
        return {}
    try:
        out = subprocess.run(["sacct", "-j", ",".join(job_ids), "-o", "JobID,State", "--parsable2", "--noheader"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("sacct failed: %s", exc)
        return {}
    states: dict[str, str] = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 2 and parts[0] and "." not in parts[0]:
            states[parts[0]] = (parts[1].split() or ["UNKNOWN"])[0]
    return states


@EXECUTORS.register("slurm")
class SlurmExecutor(Executor):
    """One Slurm job per graph job through submitit, with afterok dependencies and requeue."""

    name = "slurm"

    def check(self) -> None:
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise BenchError("the slurm executor needs submitit: pip install 'bench[slurm]'") from None
        for tool in ("sbatch", "srun", "sacct"):
            if shutil.which(tool) is None:
                raise BenchError(f"{tool} is not on PATH: run the slurm executor on a Slurm login node")
        _check_settings(self.options.extra)

    def settings(self, kind: str) -> dict[str, Any]:
        out = dict(DEFAULTS)
        out.update({k: v for k, v in self.options.extra.items() if not isinstance(v, dict) or k == "additional"})
        per_kind = self.options.extra.get(kind)
        if isinstance(per_kind, dict):
            out.update(per_kind)
        return out

    def gpus_and_tasks(self, kind: str, job: Any | None) -> tuple[int, int]:
        """(GPUs, tasks) of one Slurm job (see the module doc)."""
        s = self.settings(kind)
        gpus = int(s.get("gpus_per_job") or 0)
        per_kind = self.options.extra.get(kind)
        if job is None or (isinstance(per_kind, dict) and "gpus_per_job" in per_kind):
            return gpus, 1
        from bench.stages.base import get_stage

        resources = get_stage(kind).resources_for(job)
        if resources.data_parallel and gpus > 1:
            return gpus, gpus
        return (1 if gpus and resources.gpu > 0 else 0), 1

    def parameters(self, key: str, kind: str, dependency_ids: list[str], job: Any | None = None) -> dict[str, Any]:
        """submitit SlurmExecutor parameters of one job."""
        s = self.settings(kind)
        gpus, tasks = self.gpus_and_tasks(kind, job)
        params: dict[str, Any] = {"job_name": key[:120], "time": int(s["time_min"]),
                                  "cpus_per_task": max(1, int(s["cpus_per_job"]) // tasks), "nodes": 1,
                                  "ntasks_per_node": tasks, "signal_delay_s": 120}
        if gpus:
            params["gpus_per_node"] = gpus
        if s.get("mem_gb"):
            params["mem"] = f"{int(s['mem_gb'])}GB"
        for name in ("partition", "account", "qos", "constraint"):
            if s.get(name):
                params[name] = s[name]
        if s.get("setup"):
            params["setup"] = [str(line) for line in s["setup"]]
        additional = dict(s.get("additional") or {})
        if dependency_ids:
            params["dependency"] = "afterok:" + ":".join(dependency_ids)
            additional.setdefault("kill-on-invalid-dep", "yes")
        if additional:
            params["additional_parameters"] = additional
        return params

    def _active_submission(self, store: Store, key: str) -> str | None:
        """The id of a Slurm job an earlier run submitted for `key` that is still queued or running."""
        path = store.job_dir(key) / SLURM_JOB_FILE
        try:
            job_id = str(json.loads(path.read_text())["job_id"])
        except (OSError, ValueError, KeyError):
            return None
        return job_id if sacct_states([job_id]).get(job_id) in ACTIVE else None

    def submit(self, graph: Graph, store: Store) -> dict[str, str]:
        """Submit every job of `graph` (topological order); return key -> Slurm job id."""
        import submitit

        results = str(store.root.resolve())
        ids: dict[str, str] = {}
        for job in graph:
            reused = self._active_submission(store, job.key)
            if reused:
                log.info("%s is already queued as Slurm job %s", job.key, reused)
                ids[job.key] = reused
                continue
            dep_ids = [ids[d] for d in graph.deps(job.key) if d in ids]
            folder = store.job_dir(job.key) / "slurm"
            folder.mkdir(parents=True, exist_ok=True)
            ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=int(self.settings(job.kind)["max_num_timeout"]))
            ex.update_parameters(**self.parameters(job.key, job.kind, dep_ids, job))
            payload = payload_for(job)
            sjob = ex.submit(SlurmTask(payload, results))
            ids[job.key] = str(sjob.job_id)
            files.write_json(store.job_dir(job.key) / SLURM_JOB_FILE,
                             {"job_id": str(sjob.job_id), "submitted": time.time(), "folder": str(folder)})
        return ids

    def run(self, graph: Graph, store: Store, reporter: Reporter) -> dict[str, Outcome]:
        tracker = Tracker(graph, store, reporter)
        ids = self.submit(graph, store)
        for key in graph.keys():
            tracker.set(key, SUBMITTED if not self.options.wait else PENDING, slot=f"slurm:{ids[key]}")
        if not self.options.wait:
            return tracker.outcomes
        poll_s = float(self.settings("pretrain")["poll_s"])
        t0 = time.time()
        last_sacct = 0.0
        try:
            while tracker.unfinished():
                now = time.time()
                states = sacct_states([ids[k] for k in tracker.unfinished()]) if now - last_sacct >= poll_s else {}
                if states:
                    last_sacct = now
                for key in graph.keys():
                    if tracker.state(key) not in (PENDING, RUNNING):
                        continue
                    slot = f"slurm:{ids[key]}"
                    if store.has(key):
                        tracker.set(key, DONE, slot=slot)
                        continue
                    info = read_progress(store, key)
                    if info and info.get("state") == "running" and float(info.get("started", 0)) >= t0 - 1:
                        if tracker.state(key) != RUNNING:
                            tracker.set(key, RUNNING, slot=slot)
                        reporter.progress(key, info)
                    state = states.get(ids[key])
                    if state == "RUNNING" and tracker.state(key) != RUNNING:
                        tracker.set(key, RUNNING, slot=slot)
                    elif state == "COMPLETED" or state in ENDED_BAD:
                        if store.has(key):
                            tracker.set(key, DONE, slot=slot)
                        elif state == "CANCELLED" and any(tracker.state(d) not in FINAL for d in graph.deps(key)
                                                          if d in tracker.outcomes):
                            # Slurm cancelled it for a dependency that this poll still saw active (sacct
                            # reads jobs one by one): that dependency's failure, seen next, blocks it
                            continue
                        else:
                            error = read_failure(store, key) or f"Slurm job {ids[key]} ended {state}"
                            tracker.set(key, FAILED, slot=slot, error=error)
                reporter.tick()
                time.sleep(min(1.0, poll_s))
        except KeyboardInterrupt:
            log.warning("stopped watching; the Slurm jobs keep running (scancel to stop them)")
            raise
        return tracker.outcomes
