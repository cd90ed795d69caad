import numpy as np
import pytest
import torch

from bench import datasets
from bench.errors import BenchError
from helpers import stl10_cache


def test_synthetic_is_deterministic_and_class_structured():
    a = datasets.load("synthetic", "train")
    b = datasets.load("synthetic", "train")
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert a.x.dtype == torch.uint8 and a.x.shape[1:] == (3, 32, 32)
    # Class means differ much more than the spread within a class.
    x = a.x.float().flatten(1)
    means = torch.stack([x[a.y == c].mean(0) for c in range(10)])
    within = torch.stack([(x[a.y == c] - means[c]).norm(dim=1).mean() for c in range(10)]).mean()
    between = torch.cdist(means, means).sum() / (10 * 9)
    assert between > 0.5 * within


def test_synthetic_any_size_and_classes():
    from bench.datasets.synthetic import Synthetic

    cfg = Synthetic.Config(n_train=30, n_test=12, num_classes=3, image_size=16)
    test = datasets.load("synthetic", "test", cfg=cfg)
    assert test.x.shape == (12, 3, 16, 16) and test.num_classes == 3
    assert set(test.y.tolist()) == {0, 1, 2}


def test_validation_split_is_deterministic_and_disjoint():
    train = datasets.load("synthetic", "train")
    val = datasets.load("synthetic", "val")
    assert len(train) + len(val) == 2000 and len(val) == 200
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    assert torch.equal(val.indices, datasets.load("synthetic", "val").indices)


def test_train_limit_and_too_large_validation():
    assert len(datasets.load("synthetic", "train", train_limit=100)) == 100
    with pytest.raises(BenchError, match="val_size"):
        datasets.load("synthetic", "train", val_size=5000)


def test_cache_is_read_first(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (20, 32, 32, 3), dtype=np.uint8)
    y = np.arange(20) % 10
    np.savez_compressed(tmp_path / "cifar10_test.npz", x=x, y=y)
    test = datasets.load("cifar10", "test", data_dir=tmp_path, download=False)
    assert torch.equal(test.x, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert test.classes[0] == "airplane"


def test_corrupt_cache_is_a_clear_error(tmp_path):
    (tmp_path / "cifar10_test.npz").write_bytes(b"not a zip")
    with pytest.raises(BenchError, match="not a readable .npz archive"):
        datasets.load("cifar10", "test", data_dir=tmp_path, download=False)


def test_missing_dataset_offline_names_the_fix(tmp_path):
    with pytest.raises(BenchError, match="cifar100_test.npz") as err:
        datasets.load("cifar100", "test", data_dir=tmp_path, download=False)
    assert "BENCH_DATA_DIR" in str(err.value)


def test_batches_cover_the_split_on_its_device():
    data = datasets.load("synthetic", "test")
    seen = []
    for x, y, idx in datasets.batches(data, 64, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and x.device == data.x.device
        seen.append(idx)
    assert sorted(torch.cat(seen).tolist()) == list(range(len(data)))
    assert datasets.steps_per_epoch(500, 64, drop_last=True) == 7


def test_resize_for_cross_dataset():
    data = datasets.load("synthetic", "test", image_size=16)
    assert data.x.shape[-1] == 16 and data.x.dtype == torch.uint8


def test_real_cifar10_test_split_is_exact(cifar_dir):
    test = datasets.load("cifar10", "test", data_dir=cifar_dir, download=False)
    assert test.x.shape == (10000, 3, 32, 32)
    assert test.y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert torch.bincount(test.y).tolist() == [1000] * 10
    mean = test.x.float().div(255).mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor([0.4942, 0.4851, 0.4504]), atol=1e-3)
    val = datasets.load("cifar10", "val", data_dir=cifar_dir, download=False)
    assert len(val) == 5000


def test_each_dataset_has_its_own_validation_size():
    from bench.config import DataConfig
    from bench.datasets.synthetic import Synthetic

    auto = DataConfig().val_size  # the default means "the dataset's own"
    assert datasets.resolve_val_size("cifar10", auto) == 5000
    assert datasets.resolve_val_size("cifar100", auto) == 5000
    assert datasets.resolve_val_size("stl10", auto) == 500
    assert datasets.resolve_val_size("synthetic", auto) == 200
    assert datasets.resolve_val_size("synthetic", auto, Synthetic.Config(n_train=512)) == 51
    assert datasets.resolve_val_size("stl10", 64) == 64  # an explicit size overrides
    assert datasets.resolve_val_size("cifar10", 0) == 0


def test_stl10_default_validation_is_its_own_500_and_images_are_resized(tmp_path):
    root = stl10_cache(tmp_path, n_train=600)
    train = datasets.load("stl10", "train", data_dir=root, download=False)
    val = datasets.load("stl10", "val", data_dir=root, download=False)
    assert (len(train), len(val)) == (100, 500)
    assert train.x.shape[1:] == (3, 32, 32) and train.x.dtype == torch.uint8  # 96 -> 32 for a 32px encoder
    assert sorted(train.indices.tolist() + val.indices.tolist()) == list(range(600))
    # the old fixed default (5000) is the whole real STL-10 training split; the own size is not
    with pytest.raises(BenchError, match="val_size=5000 leaves no training images in stl10"):
        datasets.load("stl10", "train", data_dir=root, download=False, val_size=5000)
    small = stl10_cache(tmp_path / "small", n_train=300)
    with pytest.raises(BenchError, match=r"val_size=500 \(stl10's own\).*below 300"):
        datasets.load("stl10", "train", data_dir=small, download=False)


def test_availability_is_known_without_loading_or_downloading(tmp_path):
    assert datasets.available("synthetic", "train", data_dir=tmp_path / "absent")
    assert not datasets.available("cifar10", "test", data_dir=tmp_path)
    assert not datasets.available("stl10", "train", data_dir=tmp_path)
    stl10_cache(tmp_path, n_train=40)
    assert datasets.available("stl10", "train", data_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stl10_test.npz", "stl10_train.npz"]  # nothing added


def test_missing_data_message_fits_the_situation(tmp_path):
    off = str(datasets.DataUnavailable([("cifar10", "train"), ("stl10", "test")], tmp_path))
    assert "cifar10_train.npz, stl10_test.npz" in off and "data.download=true" in off
    assert "bench data import cifar10 train FILE.npz" in off and "BENCH_DATA_DIR" in off
    failed = str(datasets.DataUnavailable([("cifar10", "train")], tmp_path, download_error="URLError: no route"))
    assert "downloading failed (URLError: no route)" in failed and "offline" in failed
    assert "data.download=true" not in failed  # downloads were on: the fix is to provide the files
    assert "bench data import cifar10 train FILE.npz" in failed and "BENCH_DATA_DIR" in failed
