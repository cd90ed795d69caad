"""Where artifacts and records live: results/<job-key>/{record.json, checkpoint.pt, ...}.

Writes are atomic (temp file + rename), so a killed run never leaves a half-written record;
a per-job lock stops two runs from working on the same job at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path
from typing import Iterator

from bench.errors import BenchError
from bench.record import Record

log = logging.getLogger(__name__)
RECORD = "record.json"


class JobLocked(BenchError):
    """Another process holds this job's lock."""


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def default_results_dir() -> Path:
    return Path(os.environ.get("BENCH_RESULTS", "results"))


class Store:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root else default_results_dir()

    def job_dir(self, key: str) -> Path:
        return self.root / key

    def has(self, key: str) -> bool:
        return (self.job_dir(key) / RECORD).is_file()

    def write(self, record: Record) -> Path:
        path = self.job_dir(record.key) / RECORD
        write_text_atomic(path, record.to_json())
        return path

    def read(self, key: str) -> Record | None:
        path = self.job_dir(key) / RECORD
        if not path.is_file():
            return None
        return Record.from_json(path.read_text(), origin=str(path))

    def records(self, kind: str | None = None) -> list[Record]:
        """Every readable record (unreadable ones are skipped with a warning)."""
        out = []
        if not self.root.is_dir():
            return out
        for path in sorted(self.root.glob(f"*/{RECORD}")):
            try:
                rec = Record.from_json(path.read_text(), origin=str(path))
            except BenchError as exc:
                log.warning("skipping %s", exc)
                continue
            if kind is None or rec.kind == kind:
                out.append(rec)
        return out

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Exclusive, non-blocking lock on a job; released when the process dies."""
        path = self.job_dir(key) / ".lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise JobLocked(f"job {key} is being run by another process (lock {path})") from None
            yield
        finally:
            os.close(fd)
