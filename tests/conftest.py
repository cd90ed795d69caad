"""Shared fixtures. Tests run on 2 CPU cores; keep models tiny."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# One intra-op thread: the tests' models are tiny, and a second OpenMP thread mostly spin-waits
# for its partner on a shared 2-core machine (measured: an AP-DPE step took 6 s with one thread,
# 37 s with two under load). Tests that need more set it themselves.
torch.set_num_threads(1)


def pytest_configure(config):
    """The user's cache folder (~/.cache/bench: data fingerprints, the dry run's step profiles) stays
    untouched: the session, and every bench process it starts, uses its own."""
    import tempfile

    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="bench-test-cache-")
    _pin_xdist_worker()


# The modules that take minutes go first, so that with one worker per core (scripts/test.sh) they do not
# start last and leave the other cores idle while they finish.
LONGEST_FIRST = ("test_smoke_preset.py", "test_real_cifar10.py", "test_variants_report.py", "test_report.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def _pin_xdist_worker() -> None:
    """Under pytest-xdist (scripts/test.sh runs one worker per core), each worker and every process it starts
    keeps to its own share of the cores: bench sizes its slots and threads from that share (cpu_count), so
    two workers never oversubscribe the machine with spin-waiting OpenMP threads."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return
    for name in ("COLUMNS", "LINES"):  # xdist sets 80x24 in its workers, which have no terminal: tables would wrap
        os.environ.pop(name, None)
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    index = int(worker[2:])
    share = [c for i, c in enumerate(cores) if i % count == index % count]
    if share:
        os.sched_setaffinity(0, share)


# Test modules live in folders mirroring the package; they share tests/helpers.py and tests/report/report_store.py.
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent  # benchmarks/ holds reference implementations the tests compare against
for _path in (TESTS, TESTS / "report", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def _shared_data_dir() -> Path | None:
    env = os.environ.get("BENCH_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for path in candidates:
        if (path / "cifar10_test.npz").is_file():
            return path
    return None


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """The folder holding the real CIFAR-10 cache, or skip."""
    path = _shared_data_dir()
    if path is None:
        pytest.skip("real CIFAR-10 cache (cifar10_test.npz) not found: set BENCH_DATA_DIR to ../shared/data")
    return path


@pytest.fixture
def results_dir(tmp_path) -> Path:
    return tmp_path / "results"


@pytest.fixture(scope="session")
def plugin_path(tmp_path_factory) -> Path:
    """tests/plugin_pkg pip-installed (offline) into a folder: put it on PYTHONPATH (helpers.plugin_env)."""
    work = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(TESTS / "plugin_pkg", work / "src")  # builds in a copy: no build/ left in the repo
    target = work / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                             "--no-index", "--quiet", "--target", str(target), str(source)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert list(target.glob("tinycl-*.dist-info"))
    return target
