"""Where jobs live: results/<job-key>/, one `JobDir` per job that owns its file names and its state.

A job is *done* only when its record.json parses, validates, and every artifact it lists exists
with the recorded size (and, when verified, the recorded sha256). Anything else that has a
record is *damaged* (with the file and the reason) and runs again. One `state()` serves the
runner, `bench show` and `bench report`:

    done         a valid record and intact artifacts
    damaged      a record that does not parse or validate, or an artifact missing or changed
    running      another process holds the job's lock
    failed       its last attempt failed (failure.json)
    blocked      a job it needs failed (failure.json with blocked_by)
    interrupted  a training checkpoint but no record: the next run resumes it
    pending      nothing finished yet

A per-job lock (flock on .lock, released when its process dies) stops two runs from working on
the same job at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bench import files
from bench.errors import BenchError
from bench.record import Record

log = logging.getLogger(__name__)

RECORD = "record.json"
JOB_FILE = "job.json"
LOG = "log.txt"
PROGRESS = "progress.json"
FAILURE = "failure.json"
LOCK = ".lock"
CHECKPOINT = "checkpoint.pt"

DONE, DAMAGED, RUNNING, FAILED, BLOCKED, INTERRUPTED, PENDING = (
    "done", "damaged", "running", "failed", "blocked", "interrupted", "pending")
STATES = (DONE, DAMAGED, RUNNING, FAILED, BLOCKED, INTERRUPTED, PENDING)


class JobLocked(BenchError):
    """Another process holds this job's lock."""


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class JobState:
    name: str
    reason: str = ""
    blocked_by: str | None = None
    record: Record | None = None

    @property
    def done(self) -> bool:
        return self.name == DONE

    def __str__(self) -> str:
        return self.name


class JobDir:
    """The folder of one job and everything in it."""

    def __init__(self, root: Path | str, key: str):
        self.root = Path(root)
        self.key = key
        self.path = self.root / key

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def record_path(self) -> Path:
        return self.path / RECORD

    def exists(self) -> bool:
        return self.path.is_dir()

    def mkdir(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    # ------------------------------------------------------------ record and artifacts

    def read_record(self) -> Record:
        """The record, validated (BenchError naming the file and the problem)."""
        try:
            text = self.record_path.read_text()
        except OSError as exc:
            raise BenchError(f"{self.record_path}: unreadable ({exc.strerror or exc})") from exc
        return Record.from_json(text, origin=str(self.record_path))

    def record(self) -> Record | None:
        """The record if the job is done, else None."""
        state = self.state()
        return state.record if state.done else None

    def artifact_entry(self, name: str) -> dict[str, Any]:
        path = self.path / name
        return {"size": path.stat().st_size, "sha256": file_sha256(path)}

    def check_artifacts(self, record: Record, verify: bool = False) -> str:
        """Why the record's artifacts are not intact ("" if they are)."""
        for name, entry in sorted(record.artifacts.items()):
            path = self.path / name
            if not path.is_file():
                return f"{name} is missing"
            size = path.stat().st_size
            if size != entry.get("size"):
                return f"{name} is {size} bytes, the record says {entry.get('size')} (truncated or replaced)"
            if verify and file_sha256(path) != entry.get("sha256"):
                return f"{name} does not match its recorded sha256 (changed or corrupted)"
        return ""

    def write_record(self, record: Record) -> Path:
        return files.write_text(self.record_path, record.to_json())

    # ------------------------------------------------------------ state

    def state(self, verify: bool = False) -> JobState:
        """The job's state (see the module docstring); `verify` also hashes the artifacts."""
        if self.record_path.exists():
            try:
                record = self.read_record()
            except BenchError as exc:
                problem = str(exc)
            else:
                problem = self.check_artifacts(record, verify)
                if not problem:
                    return JobState(DONE, record=record)
            if self.locked():
                return JobState(RUNNING, "running again to replace a damaged record")
            return JobState(DAMAGED, f"{problem}; the next run recomputes it")
        if self.locked():
            return JobState(RUNNING)
        failure = read_json(self.path / FAILURE)
        if failure is not None:
            blocked_by = failure.get("blocked_by")
            if blocked_by:
                return JobState(BLOCKED, str(failure.get("error", "")), str(blocked_by))
            return JobState(FAILED, str(failure.get("error", "")))
        if (self.path / CHECKPOINT).is_file():
            return JobState(INTERRUPTED, "has a checkpoint; the next run resumes it")
        return JobState(PENDING)

    def job(self) -> dict[str, Any]:
        """The Job fields of job.json ({} when there is none)."""
        return (read_json(self.path / JOB_FILE) or {}).get("job") or {}

    def failure(self) -> str | None:
        data = read_json(self.path / FAILURE)
        return str(data.get("error")) if data else None

    def progress(self) -> dict[str, Any] | None:
        return read_json(self.path / PROGRESS)

    def clear_progress(self) -> None:
        (self.path / PROGRESS).unlink(missing_ok=True)

    def remove_temporaries(self) -> None:
        """Temporary files a killed write left behind (their writer is gone: the job's lock is held)."""
        if not self.path.is_dir():
            return
        for path in self.path.iterdir():
            if files.TEMP_MARK in path.name:
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------ lock

    def locked(self) -> bool:
        """Whether another process holds the job's lock; creates nothing."""
        path = self.path / LOCK
        if not path.is_file():
            return False
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
        finally:
            os.close(fd)
        return False

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive, non-blocking lock on the job; released when the process dies."""
        self.mkdir()
        path = self.path / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise JobLocked(f"job {self.key} is being run by another process (lock {path})") from None
            yield
        finally:
            os.close(fd)


def default_results_dir() -> Path:
    return Path(os.environ.get("BENCH_RESULTS", "results"))


class Store:
    """A results folder: one JobDir per job key."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root else default_results_dir()

    def job(self, key: str) -> JobDir:
        return JobDir(self.root, key)

    def job_dir(self, key: str) -> Path:
        return self.root / key

    def state(self, key: str, verify: bool = False) -> JobState:
        return self.job(key).state(verify)

    def has(self, key: str) -> bool:
        """Whether the job is done (valid record, intact artifacts)."""
        return self.job(key).state().done

    def lock(self, key: str):
        return self.job(key).lock()

    def write(self, record: Record) -> Path:
        return self.job(record.key).write_record(record)

    def read(self, key: str) -> Record | None:
        """The record of a done job, else None."""
        return self.job(key).record()

    def records(self, kind: str | None = None) -> list[Record]:
        """The records of every done job (of `kind`), in key order."""
        out = []
        for key in self.keys():
            record = self.read(key)
            if record is not None and (kind is None or record.kind == kind):
                out.append(record)
        return out

    def keys(self) -> list[str]:
        """Every job folder of the results folder (sorted)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
