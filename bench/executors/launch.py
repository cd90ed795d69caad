"""Start the processes of one data-parallel job on this machine (`--gpus-per-job N`).

N worker processes, each with the variables torch.distributed's env:// rendezvous reads (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR = 127.0.0.1, MASTER_PORT = a free port), all writing to the
job's log.txt. They succeed or fail together (`RankGroup`): when one exits with an error, or rank
0 exits without running the job (locked, done elsewhere), the others are ended, and the group's
exit code is that first one. The local executor polls a group like a process; the Ray executor
waits for one inside its task (`run_group`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

TERMINATE_GRACE_S = 10.0


def free_port() -> int:
    """A TCP port free on this machine now (the rendezvous of one job)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rank_envs(env: dict[str, str], processes: int, port: int | None = None) -> list[dict[str, str]]:
    """The environment of each of `processes` ranks on this machine."""
    port = port or free_port()
    out = []
    for rank in range(processes):
        e = dict(env)
        e.update({"RANK": str(rank), "WORLD_SIZE": str(processes), "LOCAL_RANK": str(rank),
                  "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        e.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: gloo's pairs over loopback
        out.append(e)
    return out


class RankGroup:
    """The processes of one job, polled as one (`poll`, `wait`, `terminate`, `kill`, like a Popen)."""

    stdin = None

    def __init__(self, procs: list[subprocess.Popen]):
        self.procs = procs
        self.code: int | None = None       # the group's exit code, once every process has exited
        self.failure: int | None = None    # the first non-zero exit code seen
        self.ending_since: float | None = None

    @property
    def pid(self) -> int:
        return self.procs[0].pid

    def poll(self) -> int | None:
        if self.code is not None:
            return self.code
        codes = [p.poll() for p in self.procs]
        if self.failure is None:
            for code in codes:
                if code not in (None, 0):
                    self.failure = code
                    break
            if self.failure is None and codes[0] is not None and codes[0] != 0:
                self.failure = codes[0]
        if self.failure is not None and any(c is None for c in codes):
            if self.ending_since is None:
                self.ending_since = time.time()
                self.terminate()
            elif time.time() - self.ending_since > TERMINATE_GRACE_S:
                self.kill()
            return None
        if any(c is None for c in codes):
            return None
        self.code = self.failure if self.failure is not None else 0
        return self.code

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.time() + timeout
        while True:
            code = self.poll()
            if code is not None:
                return code
            if deadline is not None and time.time() > deadline:
                raise subprocess.TimeoutExpired("rank group", timeout)
            time.sleep(0.05)

    def terminate(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()


def spawn_group(command: list[str], env: dict[str, str], processes: int, log: Path, **popen: Any) -> RankGroup:
    """Start `processes` ranks of `command`, their output appended to `log`."""
    procs = []
    with open(log, "ab") as logfh:
        for rank_env in rank_envs(env, processes):
            procs.append(subprocess.Popen(command, env=rank_env, stdin=subprocess.DEVNULL, stdout=logfh,
                                          stderr=subprocess.STDOUT, **popen))
    return RankGroup(procs)


def run_group(command: list[str], env: dict[str, str], processes: int, log: Path) -> int:
    """`spawn_group` and wait for the group's exit code."""
    group = spawn_group(command, env, processes, log)
    try:
        return group.wait()
    finally:
        group.kill()
        for p in group.procs:
            p.wait()


def visible_gpus(env: dict[str, str] | None = None) -> list[str]:
    value = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    return [g for g in (value or "").split(",") if g.strip() and g.strip() != "-1"]
