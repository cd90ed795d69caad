"""Run one job: `python -m bench.worker --job FILE --results DIR`.

The worker takes the job's lock, skips the job if its record already exists, calls the job
function, and writes the returned record atomically (the record is the job's "done" marker, so
a killed worker never leaves a half-done job that looks finished). Progress goes to
`<job dir>/progress.json` (polled by the runner), logs to `<job dir>/log.txt`.

Every executor runs jobs through `execute`: the local one in a fresh subprocess per job (so
CUDA_VISIBLE_DEVICES and thread counts are set before torch is imported), Ray likewise from
inside a task, Slurm in the submitit process of the Slurm job.

Exit codes: 0 done (or already done), 1 failed, 75 locked by another process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_LOCKED = 75
EXIT_ELSEWHERE = 76  # the job was already finished by another run: nothing done here
PROGRESS = "progress.json"
FAILURE = "failure.json"
JOB_FILE = "job.json"
LOG = "log.txt"
# Test and benchmark hook: JSON {kind: "module:function"} replacing bench.jobs.JOB_FUNCTIONS entries.
FUNCTIONS_ENV = "BENCH_JOB_FUNCTIONS"

log = logging.getLogger("bench.worker")


def write_json_quick(path: Path, data: dict[str, Any]) -> None:
    """Atomic (rename) but not fsynced: for progress files rewritten many times a minute."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def function_overrides() -> dict[str, str]:
    raw = os.environ.get(FUNCTIONS_ENV)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise SystemExit(f"{FUNCTIONS_ENV} must be a JSON object of kind -> 'module:function'") from None
    return {str(k): str(v) for k, v in data.items()}


def payload_for(job: Any, function: str | None = None) -> dict[str, Any]:
    from bench.jobs import job_to_dict

    out: dict[str, Any] = {"job": job_to_dict(job)}
    if function:
        out["function"] = function
    return out


def write_job_file(store: Any, job: Any, function: str | None = None) -> Path:
    """The job's description for its worker (atomic; rewritten by every run, so not fsynced)."""
    path = store.job_dir(job.key) / JOB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload_for(job, function), indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def _device(slot: str | None) -> Any:
    torch = sys.modules.get("torch")
    if torch is None:  # a torch-free job (the scheduler benchmark's sleep jobs): no import for them
        return "cpu"
    if torch.cuda.is_available() and not (slot or "").startswith("cpu"):
        return torch.device("cuda", 0)  # the slot's GPU is the only one visible
    return torch.device("cpu")


class _Progress:
    """on_progress callback: throttled writes of progress.json."""

    def __init__(self, path: Path, base: dict[str, Any], every_s: float = 0.5):
        self.path, self.base, self.every_s = path, base, every_s
        self.last = 0.0
        self.last_epoch: Any = None

    def __call__(self, info: dict[str, Any]) -> None:
        now = time.time()
        epoch = info.get("epoch")
        if now - self.last < self.every_s and epoch == self.last_epoch:
            return
        self.last, self.last_epoch = now, epoch
        try:
            write_json_quick(self.path, {**self.base, **{k: _plain(v) for k, v in info.items()}, "time": now})
        except OSError:
            pass  # progress is best-effort


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        try:
            return value.item()
        except (TypeError, ValueError):
            return str(value)
    return value


def _take_lock(store: Any, key: str, wait: bool, poll_s: float = 2.0):
    """Enter store.lock(key); if `wait`, retry until free or the job is done elsewhere."""
    from bench.store import JobLocked

    while True:
        ctx = store.lock(key)
        try:
            ctx.__enter__()
            return ctx
        except JobLocked:
            if not wait or store.has(key):
                return None
            time.sleep(poll_s)


def execute(payload: dict[str, Any], results: str | Path, *, slot: str | None = None,
            threads: int | None = None, wait_locked: bool = False, log_file: bool = True) -> int:
    """Run the job in `payload` (from `payload_for`) against the store at `results`; return an exit code."""
    from bench.jobs import job_from_dict
    from bench.store import Store

    store = Store(Path(results))
    job = job_from_dict(payload["job"])
    job_dir = store.job_dir(job.key)
    job_dir.mkdir(parents=True, exist_ok=True)
    handler = None
    if log_file:
        handler = logging.FileHandler(job_dir / LOG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        if logging.getLogger().level > logging.INFO or logging.getLogger().level == logging.NOTSET:
            logging.getLogger().setLevel(logging.INFO)
    try:
        if store.has(job.key):
            log.info("%s is already done", job.key)
            return EXIT_ELSEWHERE
        lock = _take_lock(store, job.key, wait_locked)
        if lock is None:
            if store.has(job.key):
                return EXIT_ELSEWHERE
            log.info("%s is locked by another run", job.key)
            return EXIT_LOCKED
        try:
            return _run_locked(job, store, payload.get("function"), slot, threads)
        finally:
            lock.__exit__(None, None, None)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _run_locked(job: Any, store: Any, function: str | None, slot: str | None, threads: int | None) -> int:
    from bench.jobs import job_function
    from bench.record import Record

    job_dir = store.job_dir(job.key)
    if store.has(job.key):  # finished by another run between our check and the lock
        log.info("%s is already done", job.key)
        return EXIT_ELSEWHERE
    started = time.time()
    host = socket.gethostname()
    progress_path = job_dir / PROGRESS
    base = {"key": job.key, "state": "running", "started": started, "pid": os.getpid(), "host": host,
            "slot": slot}
    try:
        missing = [d for d in job.deps.values() if not store.has(d)]
        if missing:
            raise RuntimeError(f"dependencies not done: {', '.join(missing)}")
        fn = job_function(job.kind, function or function_overrides().get(job.kind))
        torch = sys.modules.get("torch")
        if torch is not None and threads:
            torch.set_num_threads(threads)
        device = _device(slot)
        (job_dir / FAILURE).unlink(missing_ok=True)
        write_json_quick(progress_path, {**base, "time": started})
        log.info("start %s pid=%d host=%s slot=%s device=%s threads=%s", job.key, os.getpid(), host, slot,
                 device, threads or os.environ.get("OMP_NUM_THREADS"))
        record = fn(job, store, device, _Progress(progress_path, base))
        if not isinstance(record, Record):
            raise TypeError(f"job function for {job.kind} returned {type(record).__name__}, not a Record")
        if record.key != job.key or record.kind != job.kind:
            raise ValueError(f"job function returned the record of {record.kind} {record.key}, not of {job.key}")
        finished = time.time()
        record.provenance = dict(record.provenance or {})
        record.provenance["run"] = {"started": started, "finished": finished,
                                    "duration_s": round(finished - started, 3), "slot": slot, "host": host,
                                    "pid": os.getpid()}
        store.write(record)
        write_json_quick(progress_path, {**base, "state": "done", "finished": finished, "time": finished})
        log.info("done %s in %.1f s", job.key, finished - started)
        return EXIT_DONE
    except Exception as exc:  # noqa: BLE001 - any job failure is recorded (SystemExit/interrupts pass)
        log.error("failed %s: %s\n%s", job.key, exc, traceback.format_exc())
        try:
            write_json_quick(job_dir / FAILURE, {"error": f"{type(exc).__name__}: {exc}", "time": time.time(),
                                                 "host": host, "slot": slot})
            write_json_quick(progress_path, {**base, "state": "failed", "time": time.time()})
        except OSError:
            pass
        return EXIT_FAILED


def _die_with_parent() -> None:
    """Linux: get SIGKILLed when the runner dies, so a killed run leaves no orphan workers."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


def _standby(preload: list[str]) -> str | None:
    """Warm start: import what jobs need, then wait for a job file path on stdin ('' = not needed).

    Once a job arrives, stdout and stderr are pointed at its log.txt (appending).
    """
    import importlib

    import bench.jobs  # noqa: F401 - what every job needs, imported while the slot is busy
    import bench.record  # noqa: F401
    import bench.store  # noqa: F401

    for name in preload:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the job will import it again and report the error
            pass
    line = sys.stdin.readline().strip()
    if not line:
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(Path(line).parent / LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker", description="Run one bench job.")
    parser.add_argument("--job", default=None, help="job file written by the runner (job.json)")
    parser.add_argument("--standby", action="store_true",
                        help="start now, read the job file path from stdin later (log to the job's log.txt)")
    parser.add_argument("--preload", default="", help="standby: comma-separated modules to import early")
    parser.add_argument("--results", required=True, help="results folder")
    parser.add_argument("--slot", default=None, help="slot name (cpu0, gpu1, ...) for logs and progress")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--wait-locked", action="store_true", help="wait while another run holds the job")
    parser.add_argument("--parent-pid", type=int, default=None, help="die when this process dies")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        _die_with_parent()
        if os.getppid() != args.parent_pid:  # the parent died before prctl took effect
            return EXIT_FAILED
    job_file = args.job
    if args.standby:
        job_file = _standby([m for m in args.preload.split(",") if m])
        if job_file is None:
            return EXIT_DONE
    if not job_file:
        parser.error("--job FILE (or --standby) is required")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    payload = read_json(Path(job_file))
    if payload is None or "job" not in payload:
        log.error("cannot read job file %s", job_file)
        return EXIT_FAILED
    # stderr is the job's log.txt when the local executor starts us; else log to the file too.
    to_file = os.environ.get("BENCH_WORKER_LOG_TO_STDERR") != "1"
    return execute(payload, args.results, slot=args.slot, threads=args.threads,
                   wait_locked=args.wait_locked, log_file=to_file)


def sleep_job(job: Any, store: Any, device: Any, on_progress: Callable[[dict[str, Any]], None]) -> Any:
    """Benchmark/test hook: sleep `job.config["sleep"]["seconds"]`, reporting progress; no torch,
    no data. It fails if `fail` is set, or while the file named by `fail_while` exists (so the
    same job can fail, then succeed on a rerun)."""
    from bench.record import Record

    settings = job.config.get("sleep", {})
    seconds = float(settings.get("seconds", 1.0))
    if settings.get("fail") or (settings.get("fail_while") and Path(settings["fail_while"]).exists()):
        raise RuntimeError(f"{job.key} was told to fail")
    started = time.time()
    steps = max(1, int(seconds / 0.25))
    for step in range(steps):
        # sleep to each step's deadline, so that the steps' overheads do not add up
        time.sleep(max(0.0, started + seconds * (step + 1) / steps - time.time()))
        on_progress({"epoch": 1, "epochs": 1, "step": step + 1, "steps": steps})
    return Record(kind=job.kind, key=job.key, seed=job.seed, config=job.config, inputs=dict(job.deps),
                  metrics={"slept_s": time.time() - started}, provenance={"started": started,
                                                                          "finished": time.time()})


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the record is written and fsynced; skip the interpreter's slow teardown
