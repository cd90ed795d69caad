"""No silent wrong result, nothing damaged counted as done, bad data refused before work.

One test per promise of docs/running.md ("What the harness guarantees"); each first builds the
situation a hostile but realistic user makes (a replaced cache, a truncated record or artifact,
a bad archive, a read-only folder, a full disk, a killed import), then checks the behaviour.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench import files, grid
from bench.store import Store
from helpers import TINY, done_job

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
GRID = ["--methods", "simclr", "--finetune", "slf", "--datasets", "synthetic"]


def bench(*args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "BENCH_DATA_DIR": os.environ.get("BENCH_DATA_DIR", "")}, **kw)


def say(out: subprocess.CompletedProcess) -> str:
    return " ".join((out.stdout + out.stderr).split())


def cifar_cache(root: Path, n: int = 60, seed: int = 0, **overrides) -> Path:
    """A small valid CIFAR-10 cache (train and test), with array overrides for bad variants."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        arrays = {"x": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), "y": np.arange(n) % 10,
                  "classes": np.array(CIFAR_CLASSES)}
        arrays.update(overrides)
        np.savez(root / f"cifar10_{split}.npz", **arrays)
    return root


@contextlib.contextmanager
def read_only(folder: Path):
    """A folder nobody can write to, root included (the immutable attribute), or skip."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("cannot make a read-only folder here (root, and chattr +i is not available)")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)])


# ---------------------------------------------------------------- results reused across different data


def test_a_changed_data_file_changes_the_keys_of_exactly_the_jobs_that_read_it(tmp_path):
    data = cifar_cache(tmp_path / "data")
    args = dict(methods="simclr", finetune="slf", datasets="synthetic:cifar10", overrides=TINY, data_dir=str(data))
    before = {j.kind: j for j in grid.plan(**args)[1]}
    assert before["finetune"].data["cifar10/train"]["sha256"] and before["evaluate"].data["cifar10/test"]["files"]
    # the same images, shuffled (what a re-import or another source gives): a different file
    with np.load(data / "cifar10_train.npz") as f:
        order = np.random.default_rng(1).permutation(len(f["y"]))
        np.savez(data / "cifar10_train.npz", x=f["x"][order], y=f["y"][order], classes=f["classes"])
    after = {j.kind: j for j in grid.plan(**args)[1]}
    changed = {kind for kind in before if before[kind].key != after[kind].key}
    assert changed == {"finetune", "evaluate"}  # the synthetic pretraining reads none of it
    # a subset of the test file: the evaluation's key, and only it, changes again
    with np.load(data / "cifar10_test.npz") as f:
        np.savez(data / "cifar10_test.npz", x=f["x"][:40], y=f["y"][:40], classes=f["classes"])
    third = {j.kind: j for j in grid.plan(**args)[1]}
    assert {k for k in after if after[k].key != third[k].key} == {"evaluate"}


def test_records_name_the_data_they_were_computed_from(tmp_path):
    results = tmp_path / "results"
    data = cifar_cache(tmp_path / "data")
    out = bench("run", "--methods", "simclr", "--finetune", "slf", "--datasets", "synthetic:cifar10",
                "--results", str(results), "--data-dir", str(data), *TINY)
    assert out.returncode == 0, say(out)[-3000:]
    (ev,) = Store(results).records("evaluate")
    fp = ev.data["cifar10/test"]
    assert fp["files"] == [str(data / "cifar10_test.npz")] and len(fp["sha256"]) == 64
    assert fp["sha256"] == files_sha(data / "cifar10_test.npz")


def files_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def arrays_sha(path: Path) -> str:
    """The digest of an .npz's x and y (an import rewrites the archive, so its bytes are new)."""
    import hashlib

    with np.load(path) as archive:
        return hashlib.sha256(archive["x"].tobytes() + archive["y"].tobytes()).hexdigest()


# ---------------------------------------------------------------- damaged records and artifacts


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished AdvCL grid (pseudo-labels, two pretrainings, a finetuning, an evaluation)."""
    results = tmp_path_factory.mktemp("finished") / "results"
    args = ["--methods", "advcl", "--finetune", "slf", "--datasets", "synthetic", "--results", str(results), *TINY,
            "advcl.cluster_ks=[2,5]", "advcl.attack_steps=1"]
    out = bench("run", *args)
    assert out.returncode == 0, say(out)[-3000:]
    return results, args


@pytest.mark.parametrize("kind,damage", [("evaluate", "record.json"), ("pretrain", "encoder.pt"),
                                         ("pseudo_labels", "labels.npz")])
def test_a_damaged_record_or_artifact_is_reported_and_runs_again(finished, tmp_path, kind, damage):
    source, args = finished
    results = tmp_path / "results"
    shutil.copytree(source, results)
    args = [a if a != str(source) else str(results) for a in args]
    store = Store(results)
    (job,) = [r for r in store.records(kind) if kind != "pretrain" or r.method == "advcl"]
    path = store.job_dir(job.key) / damage
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated (a full disk, a bad copy)
    state = store.state(job.key)
    assert state.name == "damaged" and damage in state.reason
    dry = bench("run", *args, "--dry-run")
    assert dry.returncode == 0 and "damaged" in dry.stdout and "1 to run" in say(dry), say(dry)[-2000:]
    shown = bench("show", "--results", str(results))
    assert "damaged" in shown.stdout and damage in shown.stdout
    report = bench("report", "--results", str(results), "--format", "md")
    assert report.returncode == 0 and "damaged" in report.stdout
    again = bench("run", *args)
    assert again.returncode == 0, say(again)[-3000:]
    assert store.state(job.key).done  # recomputed, replacing the damaged file
    assert store.state(job.key, verify=True).done


def test_a_same_size_corruption_of_an_input_is_caught_before_it_is_read(finished, tmp_path):
    source, args = finished
    results = tmp_path / "results"
    shutil.copytree(source, results)
    args = [a if a != str(source) else str(results) for a in args]
    store = Store(results)
    (ft,) = store.records("finetune")
    encoder = store.job_dir(ft.inputs["encoder"]) / "encoder.pt"
    blob = bytearray(encoder.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte: same size, different content
    encoder.write_bytes(bytes(blob))
    shutil.rmtree(store.job_dir(ft.key))  # the finetuning must run again, reading that encoder
    assert store.state(ft.inputs["encoder"]).done and not store.state(ft.inputs["encoder"], verify=True).done
    again = bench("run", *args)
    assert again.returncode == 0, say(again)[-3000:]
    assert store.state(ft.inputs["encoder"], verify=True).done  # re-pretrained first, then finetuned
    assert store.state(ft.key).done


# ---------------------------------------------------------------- data checked before any work


@pytest.mark.parametrize("name,overrides,message", [
    ("truncated", None, "not a readable .npz archive"),
    ("64px", {"x": np.zeros((60, 64, 64, 3), np.uint8)}, "x holds 64x64 images, this dataset's are 32x32"),
    ("float-labels", {"y": np.arange(60) % 10 + 0.5}, "y must be a 1-D array of integer labels"),
    ("label-range", {"y": np.arange(60) % 12}, "y has labels from 0 to 11, outside 0..9"),
    ("short-labels", {"y": np.arange(50) % 10}, "y has 50 labels for the 60 images of x"),
    ("gray", {"x": np.zeros((60, 32, 32), np.uint8)}, "x must be N x H x W x 3"),
    ("float-images", {"x": np.zeros((60, 32, 32, 3), np.float32)}, "x must be uint8"),
])
def test_bad_data_is_refused_before_any_work_with_one_message(tmp_path, name, overrides, message):
    data = cifar_cache(tmp_path / "data", **(overrides or {}))
    if name == "truncated":
        path = data / "cifar10_train.npz"
        path.write_bytes(path.read_bytes()[:1000])
    results = tmp_path / "results"
    out = bench("run", "--methods", "simclr", "--finetune", "slf", "--datasets", "synthetic:cifar10",
                "--results", str(results), "--data-dir", str(data), *TINY)
    assert out.returncode == 2, say(out)[-2000:]
    assert out.stderr.count("error:") == 1 and message in say(out) and "cifar10_train.npz" in say(out)
    assert not results.exists()
    # the same checks guard the cache import: exit 2, nothing written
    cache = tmp_path / "cache"
    imported = bench("data", "import", "cifar10", "train", str(data / "cifar10_train.npz"), "--data-dir", str(cache))
    assert imported.returncode == 2 and message in say(imported) and not cache.exists()
    listing = bench("data", "ls", "--data-dir", str(data))
    assert listing.returncode == 0 and "bad" in listing.stdout and "cifar10_test.npz" in listing.stdout


def test_a_killed_data_import_leaves_the_cache_usable(tmp_path):
    source = cifar_cache(tmp_path / "source", n=3000) / "cifar10_train.npz"
    cache = tmp_path / "cache"
    cifar_cache(cache)  # an earlier, complete import of both splits
    before = arrays_sha(cache / "cifar10_train.npz")
    rng = np.random.default_rng(0)
    for attempt in range(4):  # SIGKILL at a random moment of the import
        proc = subprocess.Popen([sys.executable, "-m", "bench", "data", "import", "cifar10", "train", str(source),
                                 "--data-dir", str(cache)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(float(rng.uniform(0.5, 4.0)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        listing = bench("data", "ls", "--data-dir", str(cache))
        assert listing.returncode == 0 and "bad" not in listing.stdout, listing.stdout
        assert arrays_sha(cache / "cifar10_train.npz") in (before, arrays_sha(source))  # old or new, never half
    run = bench("run", "--methods", "simclr", "--finetune", "slf", "--datasets", "synthetic:cifar10",
                "--results", str(tmp_path / "results"), "--data-dir", str(cache), *TINY)
    assert run.returncode == 0, say(run)[-2000:]


# ---------------------------------------------------------------- permissions and full disks


def test_unwritable_folders_are_bad_input_and_nothing_is_created(tmp_path):
    with read_only(tmp_path / "locked") as locked:
        results = locked / "results"
        out = bench("run", *GRID, "--results", str(results), *TINY)
        assert out.returncode == 2 and "results folder" in say(out) and str(locked) in say(out)
        done = tmp_path / "done"
        done_job(Store(done), "pretrain-x-synthetic-s0-000000000000", "pretrain", metrics={"epochs": 1})
        report_out = bench("report", "--results", str(done), "--out", str(locked / "report"))
        assert report_out.returncode == 2 and "report folder" in say(report_out) and "cannot be created" in say(report_out)
        src = cifar_cache(tmp_path / "data") / "cifar10_test.npz"
        imported = bench("data", "import", "cifar10", "test", str(src), "--data-dir", str(locked / "cache"))
        assert imported.returncode == 2 and "data folder" in say(imported)
        assert list(locked.iterdir()) == []
    under_a_file = tmp_path / "a-file"
    under_a_file.write_text("x")
    out = bench("run", *GRID, "--results", str(under_a_file / "results"), *TINY)
    assert out.returncode == 2 and "is a file, not a folder" in say(out)


class FullDisk:
    """Files opened for writing raise ENOSPC once `room` bytes are written (the disk fills up)."""

    def __init__(self, room: int):
        self.room = room
        self.real = open

    def __call__(self, path, mode="r", *args, **kwargs):
        fh = self.real(path, mode, *args, **kwargs)
        if "w" not in mode and "a" not in mode:
            return fh
        disk, write = self, fh.write

        def limited(data):
            if len(data) > disk.room:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            disk.room -= len(data)
            return write(data)

        fh.write = limited
        return fh


def test_a_full_disk_leaves_no_temporary_file_no_record_and_says_so(tmp_path, monkeypatch):
    from bench.worker import EXIT_DISK_FULL, execute, payload_for, worker_error

    results = tmp_path / "results"
    _, graph, _ = grid.plan(methods="simclr", datasets="synthetic", overrides=TINY, fetch=False)
    (job,) = list(graph)
    monkeypatch.setattr(files, "open", FullDisk(room=20_000), raising=False)  # the encoder does not fit
    code = execute(payload_for(job), results, log_file=False)
    monkeypatch.undo()
    store = Store(results)
    folder = store.job_dir(job.key)
    assert code in (1, EXIT_DISK_FULL)
    assert not (folder / "record.json").exists() and not (folder / "encoder.pt").exists()
    assert not [p.name for p in folder.iterdir() if files.TEMP_MARK in p.name]  # the partial write is gone
    failure = json.loads((folder / "failure.json").read_text())["error"]
    assert "is full" in failure and str(folder) in failure and "No space left on device" in failure
    # when not even failure.json fits, the exit code says it and the runner names the disk
    monkeypatch.setattr(files, "open", FullDisk(room=0), raising=False)
    code = execute(payload_for(job), results, log_file=False)
    monkeypatch.undo()
    assert code == EXIT_DISK_FULL
    assert "out of space" in worker_error(store, job.key, code) or "is full" in worker_error(store, job.key, code)


def test_every_artifact_write_is_atomic_and_durable(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    target = tmp_path / "sub" / "encoder.pt"
    files.write_torch(target, {"w": np.zeros(3)})
    assert target.is_file() and len(synced) >= 2  # the file, then its folder
    assert [p.name for p in target.parent.iterdir()] == ["encoder.pt"]
    monkeypatch.setattr(files, "open", FullDisk(room=10), raising=False)
    with pytest.raises(files.DiskFull, match="is full"):
        files.write_text(target, "x" * 100)
    assert [p.name for p in target.parent.iterdir()] == ["encoder.pt"]  # old file kept, no temporary


# ---------------------------------------------------------------- smaller things


def test_config_names_are_checked_before_work(tmp_path):
    out = bench("run", *GRID, "--results", str(tmp_path / "r"), *TINY, "encoder.arch=resnet50")
    assert out.returncode == 2 and "unknown encoders 'resnet50'" in say(out) and not (tmp_path / "r").exists()
    out = bench("run", *GRID, "--results", str(tmp_path / "r"), *TINY, "eval.aa_version=fast")
    assert out.returncode == 2 and "not one of" in say(out)


def test_an_evaluation_n_larger_than_the_split_is_a_warning_and_the_record_holds_the_n_used(tmp_path):
    results = tmp_path / "results"
    out = bench("run", *GRID, "--results", str(results), *TINY, "eval.n=100")  # the test split has 32
    assert out.returncode == 0, say(out)[-2000:]
    (ev,) = Store(results).records("evaluate")
    assert ev.metrics["sa"]["n"] == 32 and any("eval.n=100 is larger than the 32 images" in w for w in ev.warnings)


def test_ctrl_c_exits_130_and_says_what_will_resume(tmp_path):
    results = tmp_path / "results"
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", *GRID, "--results", str(results), *TINY,
                             "pretrain.epochs=2000", "pretrain.steps_per_epoch=4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(results.glob("pretrain-*/progress.json")):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    text = " ".join((out + err).split())
    assert proc.returncode == 130, text[-2000:]
    assert "interrupted" in text and "Run the same command again" in text


def test_a_job_file_cannot_make_the_worker_import_code(tmp_path):
    from bench.jobs import Job, job_to_dict
    from bench.worker import EXIT_FAILED, execute

    marker = tmp_path / "ran"
    job = Job(kind="os:system", key="evil-job", seed=0, config={})
    payload = {"job": job_to_dict(job), "function": f"os:system touch {marker}"}
    assert execute(payload, tmp_path / "results", log_file=False) == EXIT_FAILED
    assert not marker.exists()
    failure = json.loads((tmp_path / "results" / "evil-job" / "failure.json").read_text())["error"]
    assert "unknown stages 'os:system'" in failure
