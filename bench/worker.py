"""Run one job: `python -m bench.worker --job FILE --results DIR`.

The worker takes the job's lock, skips the job if it is done, runs the registered stage the job
names (`bench.registry.STAGES`; a job file cannot make it import anything else), and writes the
returned record atomically with the list of artifacts the stage wrote (the record is the job's
"done" marker, so a killed worker never leaves a half-done job that looks finished). Progress
goes to `<job dir>/progress.json` (polled by the runner), logs to `<job dir>/log.txt`.

Every executor runs jobs through `execute`: the local one in a fresh subprocess per job (so
CUDA_VISIBLE_DEVICES and thread counts are set before torch is imported), Ray likewise from
inside a task, Slurm in the submitit process of the Slurm job.

Data-parallel jobs (`bench run --gpus-per-job N`): the launcher starts N workers with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Rank 0 is the worker above (lock, checks,
record, progress, failure.json); it joins the process group only once it runs the job. The other
ranks join at once (so they wait for rank 0's decision), run the same stage on `cuda:LOCAL_RANK`
(or the CPU) with their artifacts written to a scratch folder that is then deleted, and write
nothing to the job folder but a failure.json when they fail. A launcher ends every rank when one
fails or when rank 0 exits without running the job (`bench.executors.launch`).

Exit codes: 0 done, 1 failed, 75 locked by another process, 76 already done by another run.
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
from typing import Any

from bench import files
from bench.store import FAILURE, JOB_FILE, LOG, PROGRESS, JobDir, JobLocked, Store, read_json

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_LOCKED = 75
EXIT_ELSEWHERE = 76  # the job was already finished by another run: nothing done here
EXIT_DISK_FULL = 77  # failed for lack of space, perhaps without room to say so in failure.json

log = logging.getLogger("bench.worker")


def payload_for(job: Any) -> dict[str, Any]:
    from bench.jobs import job_to_dict

    return {"job": job_to_dict(job)}


def write_job_file(store: Store, job: Any) -> Path:
    """The job's description for its worker (atomic; rewritten by every run, so not fsynced)."""
    path = store.job_dir(job.key) / JOB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_quick(path, json.dumps(payload_for(job), indent=2, sort_keys=True))
    return path


def worker_error(store: Store, key: str, code: int) -> str:
    """Why a worker that exited with `code` failed: its failure.json, else what its exit code says."""
    error = store.job(key).failure()
    if code == EXIT_DISK_FULL:
        room = files.disk_full_message(store.job_dir(key) / "record.json", OSError(28, "No space left on device"))
        return error or f"out of space: {room}"
    return error or f"worker exited with code {code}"


def rank_env() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) the launcher gave this worker; (0, 1, 0) alone. No torch import."""
    try:
        size = int(os.environ.get("WORLD_SIZE") or 1)
        rank = int(os.environ.get("RANK") or 0)
        local = int(os.environ.get("LOCAL_RANK") or rank)
    except ValueError:
        return 0, 1, 0
    return (rank, size, local) if size > 1 and 0 <= rank < size else (0, 1, 0)


def _device(slot: str | None, local_rank: int = 0) -> Any:
    torch = sys.modules.get("torch")
    if torch is None:  # a torch-free job (the scheduler benchmark's sleep jobs): no import for them
        return "cpu"
    if torch.cuda.is_available() and not (slot or "").startswith("cpu"):
        # the job's GPUs are the only ones visible; rank r of a data-parallel job takes the r-th
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _join_group(device: Any, size: int) -> Any:
    """Join the data-parallel job's process group (nothing for a single process)."""
    if size <= 1:
        return None
    from bench.train import distributed

    return distributed.init(device)


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
            files.write_quick(self.path, json.dumps({**self.base, **{k: _plain(v) for k, v in info.items()},
                                                     "time": now}, default=str))
        except OSError:
            pass  # progress is best-effort


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        try:
            return value.item()
        except (TypeError, ValueError):
            return str(value)
    return value


def _take_lock(job_dir: JobDir, wait: bool, poll_s: float = 2.0):
    """Enter the job's lock; if `wait`, retry until free or the job is done elsewhere."""
    while True:
        ctx = job_dir.lock()
        try:
            ctx.__enter__()
            return ctx
        except JobLocked:
            if not wait or job_dir.state().done:
                return None
            time.sleep(poll_s)


def execute(payload: dict[str, Any], results: str | Path, *, slot: str | None = None,
            threads: int | None = None, wait_locked: bool = False, log_file: bool = True) -> int:
    """Run the job in `payload` (from `payload_for`) against the store at `results`; return an exit code."""
    from bench.jobs import job_from_dict

    store = Store(Path(results))
    job = job_from_dict(payload["job"])
    job_dir = store.job(job.key)
    job_dir.mkdir()
    rank, size, _ = rank_env()
    handler = None
    if log_file:
        handler = logging.FileHandler(job_dir / LOG)
        handler.setFormatter(logging.Formatter(log_format(rank, size)))
        logging.getLogger().addHandler(handler)
        if logging.getLogger().level > logging.INFO or logging.getLogger().level == logging.NOTSET:
            logging.getLogger().setLevel(logging.INFO)
    try:
        if rank > 0:
            return _run_rank(job, store, slot, threads)
        if job_dir.state(verify=True).done:  # verified: a changed artifact means the job runs again
            log.info("%s is already done", job.key)
            return EXIT_ELSEWHERE
        lock = _take_lock(job_dir, wait_locked)
        if lock is None:
            if job_dir.state().done:
                return EXIT_ELSEWHERE
            log.info("%s is locked by another run", job.key)
            return EXIT_LOCKED
        try:
            return _run_locked(job, store, slot, threads)
        finally:
            lock.__exit__(None, None, None)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _run_locked(job: Any, store: Store, slot: str | None, threads: int | None) -> int:
    from bench.stages.base import get_stage, run_stage

    job_dir = store.job(job.key)
    state = job_dir.state(verify=True)
    if state.done:  # finished by another run between our check and the lock
        log.info("%s is already done", job.key)
        return EXIT_ELSEWHERE
    if state.name == "damaged":  # the record goes first: until a new one is written the job is not done
        log.warning("%s: %s; running it again", job.key, state.reason)
        job_dir.record_path.unlink(missing_ok=True)
    job_dir.remove_temporaries()  # left by a killed write; we hold the lock, so their writer is gone
    started = time.time()
    host = socket.gethostname()
    progress_path = job_dir / PROGRESS
    base = {"key": job.key, "state": "running", "started": started, "pid": os.getpid(), "host": host,
            "slot": slot}
    try:
        get_stage(job.kind)  # an unknown kind fails here, before anything is loaded
        for role, dep in job.deps.items():
            dep_state = store.state(dep, verify=True)
            if not dep_state.done:
                raise RuntimeError(f"its {role} job {dep} is {dep_state.name}"
                                   + (f" ({dep_state.reason})" if dep_state.reason else ""))
        torch = sys.modules.get("torch")
        if torch is not None and threads:
            torch.set_num_threads(threads)
        _, size, local_rank = rank_env()
        device = _device(slot, local_rank)
        (job_dir / FAILURE).unlink(missing_ok=True)
        files.write_quick(progress_path, json.dumps({**base, "time": started}))
        log.info("start %s pid=%d host=%s slot=%s device=%s threads=%s processes=%d", job.key, os.getpid(), host,
                 slot, device, threads or os.environ.get("OMP_NUM_THREADS"), size)
        _join_group(device, size)
        record = run_stage(job, store, device, _Progress(progress_path, base), started=started)
        finished = time.time()
        record.provenance = dict(record.provenance or {})
        record.provenance["run"] = {"started": started, "finished": finished,
                                    "duration_s": round(finished - started, 3), "slot": slot, "host": host,
                                    "pid": os.getpid(), "processes": size}
        job_dir.write_record(record)
        files.write_quick(progress_path, json.dumps({**base, "state": "done", "finished": finished, "time": finished}))
        log.info("done %s in %.1f s", job.key, finished - started)
        return EXIT_DONE
    except Exception as exc:  # noqa: BLE001 - any job failure is recorded (SystemExit/interrupts pass)
        full = isinstance(exc, files.DiskFull) or files.is_disk_full(exc)
        error = f"{type(exc).__name__}: {exc}"
        log.error("failed %s: %s\n%s", job.key, exc, traceback.format_exc())
        try:
            files.write_quick(job_dir / FAILURE, json.dumps({"error": error, "time": time.time(), "host": host,
                                                              "slot": slot}))
            files.write_quick(progress_path, json.dumps({**base, "state": "failed", "time": time.time()}))
        except OSError as write_error:  # no room to say it: the exit code does, the runner reports it
            full = full or files.is_disk_full(write_error)
            sys.stderr.write(f"bench worker: {job.key} failed: {error}\n")
        return EXIT_DISK_FULL if full else EXIT_FAILED


def log_format(rank: int, size: int) -> str:
    who = f"rank {rank}/{size} " if size > 1 else ""
    return f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s"


def _run_rank(job: Any, store: Store, slot: str | None, threads: int | None) -> int:
    """Rank > 0 of a data-parallel job: the same stage, nothing written to the job folder (see the module doc)."""
    import shutil
    import tempfile

    from bench.stages.base import get_stage, run_stage

    rank, size, local_rank = rank_env()
    job_dir = store.job(job.key)
    scratch = Path(tempfile.mkdtemp(prefix=f"bench-rank{rank}-"))
    try:
        get_stage(job.kind)
        torch = sys.modules.get("torch")
        if torch is not None and threads:
            torch.set_num_threads(threads)
        device = _device(slot, local_rank)
        log.info("rank %d of %d joins %s on %s", rank, size, job.key, device)
        _join_group(device, size)
        run_stage(job, store, device, None, scratch=scratch)
        log.info("rank %d of %d done with %s", rank, size, job.key)
        return EXIT_DONE
    except Exception as exc:  # noqa: BLE001 - recorded for the runner, as rank 0 records its own
        error = f"rank {rank}: {type(exc).__name__}: {exc}"
        log.error("failed %s: %s\n%s", job.key, error, traceback.format_exc())
        try:
            files.write_quick(job_dir / FAILURE, json.dumps({"error": error, "time": time.time(),
                                                              "host": socket.gethostname(), "slot": slot,
                                                              "rank": rank}))
        except OSError:
            sys.stderr.write(f"bench worker: {job.key} failed on rank {rank}: {error}\n")
        return EXIT_FAILED
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _die_with_parent() -> None:
    """Linux: get SIGKILLed when the runner dies, so a killed run leaves no orphan workers."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


def _preload(names: list[str]) -> None:
    import importlib

    import bench.jobs  # noqa: F401 - what every job needs
    import bench.record  # noqa: F401

    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the job will import it again and report the error
            pass


def _point_output_at(log_file: Path) -> None:
    """stdout and stderr (the file descriptors) append to the job's log.txt from now on."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def serve_forks(preload: list[str], results: str, wait_locked: bool) -> int:
    """The fork server (`--fork-server`): import what jobs need once, then run each job in a fork.

    Requests arrive on stdin, one JSON line each: {"id", "job" (its job file), "slot", "threads"}.
    For each, a child is forked that runs the job (its output in the job's log.txt) and the server
    answers "started ID PID" on stdout at once and "exit ID CODE" once the child has exited. At EOF
    it waits for its children and exits. The server ignores SIGINT (Ctrl-C reaches the children
    through the process group; the runner then closes stdin), so no child's exit goes unreported.
    """
    import select
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _preload(preload)
    children: dict[int, int] = {}  # pid -> request id
    pending = b""
    open_ = True

    def say(line: str) -> None:
        os.write(1, (line + "\n").encode())

    while open_ or children:
        readable, _, _ = select.select([0] if open_ else [], [], [], 0.05)
        if readable:
            chunk = os.read(0, 65536)
            open_ = bool(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    os._exit(_forked_job(request, results, wait_locked))
                children[pid] = request["id"]
                say(f"started {request['id']} {pid}")
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            say(f"exit {children.pop(pid)} {os.waitstatus_to_exitcode(status)}")
    return EXIT_DONE


def _forked_job(request: dict[str, Any], results: str, wait_locked: bool) -> int:
    """In the forked child: a worker of its own for one job (exit code as `main`'s)."""
    import signal

    code = EXIT_FAILED
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        server = os.getppid()
        _die_with_parent()
        if os.getppid() != server:
            return EXIT_FAILED
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        _point_output_at(Path(request["job"]).parent / LOG)
        code = _run_job_file(request["job"], results, request.get("slot"), request.get("threads"), wait_locked)
    except BaseException:  # noqa: BLE001 - whatever happens, the child exits here, never in the server's loop
        traceback.print_exc()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def _run_job_file(job_file: str, results: str, slot: str | None, threads: int | None, wait_locked: bool) -> int:
    rank, size, _ = rank_env()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=log_format(rank, size))
    payload = read_json(Path(job_file))
    if payload is None or "job" not in payload:
        log.error("cannot read job file %s", job_file)
        return EXIT_FAILED
    # stderr is the job's log.txt when the local executor starts us; else log to the file too.
    to_file = os.environ.get("BENCH_WORKER_LOG_TO_STDERR") != "1"
    return execute(payload, results, slot=slot, threads=threads, wait_locked=wait_locked, log_file=to_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker", description="Run one bench job.")
    parser.add_argument("--job", default=None, help="job file written by the runner (job.json)")
    parser.add_argument("--fork-server", action="store_true",
                        help="import once, then run each job named on stdin in a fork (the local executor's)")
    parser.add_argument("--preload", default="", help="fork server: comma-separated modules to import first")
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
    if args.fork_server:
        return serve_forks([m for m in args.preload.split(",") if m], args.results, args.wait_locked)
    if not args.job:
        parser.error("--job FILE (or --fork-server) is required")
    return _run_job_file(args.job, args.results, args.slot, args.threads, args.wait_locked)

if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the record is written and fsynced; skip the interpreter's slow teardown
