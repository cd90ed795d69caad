"""The local executor's fork servers: one fresh worker process per device that imports torch and
the job modules once, then forks a child per job (`bench.worker.serve_forks`).

A job still runs in a process of its own, started with its device's environment before torch was
imported, but it starts in milliseconds instead of paying python's and torch's imports (seconds of
CPU, which on a busy CPU machine is taken from the jobs running). `ForkedWorker` is the runner's
handle on one child, polled like a Popen.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

FORK_WAIT_S = 120.0  # how long a signal waits for a requested child to be forked
SERVER_GONE = -signal.SIGKILL  # a child whose server died: killed with it (PR_SET_PDEATHSIG)


class ForkServer:
    def __init__(self, command: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.pending = b""
        self.pids: dict[int, int] = {}
        self.exits: dict[int, int] = {}
        self.next_id = 0

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None and not self.proc.stdin.closed

    def start(self, job_file: str, slot: str, threads: int) -> ForkedWorker:
        """Ask for a job to be forked (raises OSError if the server is gone)."""
        self.next_id += 1
        request = {"id": self.next_id, "job": str(job_file), "slot": slot, "threads": threads}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        return ForkedWorker(self, self.next_id)

    def pump(self) -> None:
        """Read what the server has said so far."""
        while True:
            try:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
            except BlockingIOError:
                break
            if not chunk:  # the server closed its end
                break
            self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        for line in lines:
            what, request, value = line.decode().split()
            (self.pids if what == "started" else self.exits)[int(request)] = int(value)

    def close(self) -> None:
        """No more jobs: the server exits once its children have."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass


class ForkedWorker:
    """One job's child of a fork server: `poll`, `wait`, `terminate`, `kill`, like a Popen."""

    stdin = None

    def __init__(self, server: ForkServer, request: int):
        self.server, self.request = server, request
        self.returncode: int | None = None

    @property
    def pid(self) -> int | None:
        self.server.pump()
        return self.server.pids.get(self.request)

    def poll(self) -> int | None:
        if self.returncode is None:
            self.server.pump()
            if self.request in self.server.exits:
                self.returncode = self.server.exits[self.request]
            elif self.server.proc.poll() is not None:
                self.server.pump()
                self.returncode = self.server.exits.get(self.request, SERVER_GONE)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.time() + timeout
        while self.poll() is None:
            if deadline is not None and time.time() > deadline:
                raise subprocess.TimeoutExpired(f"job {self.request} of fork server {self.server.proc.pid}",
                                                timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        deadline = time.time() + FORK_WAIT_S
        while self.pid is None and self.poll() is None and time.time() < deadline:
            time.sleep(0.02)  # not forked yet: the server is still importing
        if self.poll() is not None:
            return
        if self.pid is None:  # a server that never forks it is of no use: end it (and its children)
            self.server.proc.kill()
            return
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
