import os
import subprocess
import sys

import numpy as np

BENCH = [sys.executable, "-m", "bench"]


def bench(*args, env=None, cwd=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*BENCH, *args], capture_output=True, text=True, env=full_env, cwd=cwd)


def test_list_shows_every_registry():
    out = bench("list")
    assert out.returncode == 0, out.stderr
    for word in ("methods", "finetuners", "datasets", "encoders", "synthetic", "resnet18"):
        assert word in out.stdout


def test_unknown_registry_is_exit_2():
    out = bench("list", "methodz")
    assert out.returncode == 2 and "unknown registry" in out.stderr


def test_data_import_and_ls(tmp_path):
    src = tmp_path / "src.npz"
    np.savez_compressed(src, x=np.zeros((4, 32, 32, 3), np.uint8), y=np.arange(4))
    cache = tmp_path / "cache"
    out = bench("data", "import", "cifar10", "test", str(src), "--data-dir", str(cache))
    assert out.returncode == 0, out.stderr
    assert (cache / "cifar10_test.npz").is_file()
    listing = bench("data", "ls", "--data-dir", str(cache))
    assert "cifar10_test.npz" in listing.stdout and "32x32x3" in listing.stdout


def test_data_import_of_a_bad_file_writes_nothing(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez_compressed(bad, x=np.zeros((4, 8, 8), np.float32), y=np.arange(4))
    cache = tmp_path / "cache"
    out = bench("data", "import", "cifar10", "test", str(bad), "--data-dir", str(cache))
    assert out.returncode == 2 and "uint8" in out.stderr
    assert not cache.exists()


def test_data_import_unknown_dataset_suggests(tmp_path):
    out = bench("data", "import", "cifar01", "test", "--data-dir", str(tmp_path))
    assert out.returncode == 2 and "Did you mean 'cifar10'" in out.stderr
