"""A fake Slurm for tests: sbatch, sacct, scancel and srun on one machine, no daemon.

State lives in $FAKE_SLURM_DIR: `counter` (last job id), `<id>.sh` (the script sbatch got),
`<id>.state` (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED), `calls.log` (every call).
With FAKE_SLURM_RUN=1, sbatch also runs the job in the background once its `afterok`
dependencies completed (cancelling it if one of them did not), like a one-node cluster.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import time
from pathlib import Path

BAD = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


def state_dir() -> Path:
    d = Path(os.environ.get("FAKE_SLURM_DIR", "/tmp/fake_slurm"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def log_call(name: str, args: list[str]) -> None:
    with open(state_dir() / "calls.log", "a") as fh:
        fh.write(" ".join([name, *args]) + "\n")


def set_state(job_id: str, state: str) -> None:
    path = state_dir() / f"{job_id}.state"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(state)
    os.replace(tmp, path)


def get_state(job_id: str) -> str | None:
    try:
        return (state_dir() / f"{job_id}.state").read_text().strip()
    except OSError:
        return None


def sbatch(args: list[str]) -> int:
    log_call("sbatch", args)
    script = Path(args[-1])
    d = state_dir()
    with open(d / "counter.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        counter = d / "counter"
        job_id = str(int(counter.read_text()) + 1 if counter.exists() else 1000)
        counter.write_text(job_id)
    text = script.read_text()
    (d / f"{job_id}.sh").write_text(text)
    set_state(job_id, "PENDING")
    if os.environ.get("FAKE_SLURM_RUN") == "1":
        subprocess.Popen([sys.executable, __file__, "_run", job_id, str(script.resolve())],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, cwd=os.getcwd())
    sys.stdout.write(f"Submitted batch job {job_id}\n")
    return 0


def run_job(job_id: str, script: str) -> int:
    text = (state_dir() / f"{job_id}.sh").read_text()
    match = re.search(r"^#SBATCH --dependency=afterok:([\d:]+)", text, re.M)
    deps = match.group(1).split(":") if match else []
    while deps:
        states = [get_state(d) for d in deps]
        if get_state(job_id) == "CANCELLED":
            return 0
        if any(s in BAD for s in states):
            set_state(job_id, "CANCELLED")
            return 0
        if all(s == "COMPLETED" for s in states):
            break
        time.sleep(0.1)
    set_state(job_id, "RUNNING")
    env = dict(os.environ, SLURM_JOB_ID=job_id, SLURM_JOB_NUM_NODES="1", SLURM_NTASKS="1", SLURM_PROCID="0",
               SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost")
    match = re.search(r"^#SBATCH --cpus-per-task=(\d+)", text, re.M)
    if match:
        env["SLURM_CPUS_PER_TASK"] = match.group(1)
    rc = subprocess.call(["bash", str(state_dir() / f"{job_id}.sh")], env=env, stdin=subprocess.DEVNULL)
    set_state(job_id, "COMPLETED" if rc == 0 else "FAILED")
    return rc


def srun(args: list[str]) -> int:
    """srun [--unbuffered] [--output F] [--error F] ... COMMAND: run COMMAND with those redirections."""
    log_call("srun", args)
    out = err = None
    i = 0
    while i < len(args) and args[i].startswith("-"):
        flag = args[i]
        if flag in ("--output", "-o", "--error", "-e") and i + 1 < len(args):
            value = args[i + 1].replace("%j", os.environ.get("SLURM_JOB_ID", "0")).replace("%t", "0")
            if flag in ("--output", "-o"):
                out = value
            else:
                err = value
            i += 2
        else:
            i += 1
    command = args[i:]
    stdout = open(out, "a") if out else None
    stderr = open(err, "a") if err else None
    try:
        return subprocess.call(command, stdout=stdout, stderr=stderr)
    finally:
        for fh in (stdout, stderr):
            if fh:
                fh.close()


def sacct(args: list[str]) -> int:
    log_call("sacct", args)
    ids: list[str] = []
    fields = ["JobID", "State"]
    header = True
    i = 0
    while i < len(args):
        if args[i] == "-j" and i + 1 < len(args):
            ids += args[i + 1].split(",")
            i += 2
        elif args[i] in ("-o", "--format") and i + 1 < len(args):
            fields = args[i + 1].split(",")
            i += 2
        elif args[i] in ("--noheader", "-n"):
            header = False
            i += 1
        else:
            i += 1
    lines = ["|".join(fields)] if header else []
    for job_id in ids:
        state = get_state(job_id)
        if state is None:
            continue
        values = {"JobID": job_id, "State": state, "NodeList": "localhost"}
        lines.append("|".join(values.get(f, "") for f in fields))
    sys.stdout.write("\n".join(lines) + ("\n" if lines else ""))
    return 0


def scancel(args: list[str]) -> int:
    log_call("scancel", args)
    for job_id in args:
        if job_id.isdigit() and get_state(job_id) in ("PENDING", "RUNNING"):
            set_state(job_id, "CANCELLED")
    return 0


def main() -> int:
    name = Path(sys.argv[0]).name
    args = sys.argv[1:]
    if name == "_fakeslurm.py" and args and args[0] == "_run":
        return run_job(args[1], args[2])
    return {"sbatch": sbatch, "sacct": sacct, "scancel": scancel, "srun": srun}[name](args)


if __name__ == "__main__":
    sys.exit(main())
