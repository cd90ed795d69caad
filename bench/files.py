"""Atomic, durable file writes: a temporary file in the same folder, fsync, rename, fsync of the folder.

A reader sees either the old file or the whole new one, never a part; after an OS crash a file
that was renamed into place has its content (the folder entry and the data are both on disk).
A failed write removes its temporary file, and running out of space is reported as `DiskFull`,
naming the disk, instead of a bare OSError.
"""

from __future__ import annotations

import errno
import io
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, IO

from bench.errors import BenchError

TEMP_MARK = ".tmp-"  # every temporary file's name contains it (cleanup, listings)


class DiskFull(BenchError):
    """A write ran out of space (ENOSPC / EDQUOT); nothing partial was left behind."""

    exit_code = 1


def disk_full_message(path: Path, exc: OSError) -> str:
    folder = Path(path).parent
    try:
        free = shutil.disk_usage(folder).free
        room = f"{free / 2**20:.0f} MB free"
    except OSError:
        room = "free space unknown"
    return (f"the disk holding {folder} is full ({room}) while writing {Path(path).name}: "
            f"{exc.strerror or exc}. Free some space and run again (finished work is kept)")


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def temp_path(path: Path) -> Path:
    """A temporary name beside `path`, unique per process and call."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some file systems do not allow opening folders; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path | str, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write `path` through `write(binary file object)`, atomically and durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if is_disk_full(exc):
            raise DiskFull(disk_full_message(path, exc)) from exc
        raise
    fsync_dir(path.parent)
    return path


def write_bytes(path: Path | str, data: bytes) -> Path:
    return write_atomic(path, lambda fh: fh.write(data))


def write_text(path: Path | str, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: Path | str, data: Any, **kwargs: Any) -> Path:
    return write_text(path, json.dumps(data, **kwargs))


def write_torch(path: Path | str, obj: Any) -> Path:
    import torch

    def write(fh: IO[bytes]) -> None:
        buf = io.BytesIO()  # torch.save seeks; serialize in memory, then one write
        torch.save(obj, buf)
        fh.write(buf.getbuffer())

    return write_atomic(path, write)


def write_npz(path: Path | str, compressed: bool = False, **arrays: Any) -> Path:
    import numpy as np

    save = np.savez_compressed if compressed else np.savez
    return write_atomic(path, lambda fh: save(fh, **arrays))


def write_quick(path: Path | str, text: str) -> None:
    """Atomic but not fsynced: for progress files rewritten many times a minute."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def check_writable(folder: Path | str, what: str) -> None:
    """BenchError (exit 2) unless `folder` exists and can be written, or can be created; creates nothing.

    Tried for real (a probe file in the folder, or in its nearest existing parent), so read-only
    mounts and permissions count whoever runs it.
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise BenchError(f"{what} {folder}: {existing} is a file, not a folder")
    probe = temp_path(existing / ".bench-write-probe")
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        where = "is not writable" if existing == folder else f"cannot be created in {existing}"
        raise BenchError(f"{what} {folder} {where} ({exc.strerror or exc}): choose another folder "
                         "(--results, --out, --data-dir) or fix its permissions") from None


def read_torch(path: Path | str) -> Any:
    """A torch file of tensors and plain data (weights_only); BenchError if it is damaged."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BenchError(f"{path} does not exist") from None
    except Exception as exc:  # truncated zip, bad pickle opcode, ...: all mean a damaged file
        raise BenchError(f"{path} is damaged or not a torch file ({type(exc).__name__}: {exc})") from exc
