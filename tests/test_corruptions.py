"""Common-corruption accuracy: the official CIFAR-C files (written here in RobustBench's layout,
tiny), their validation, and the generated path with the imagecorruptions module."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from bench.corruptions import CORRUPTIONS, GENERATED_FLAG, corruption_accuracy, generate
from bench.datasets import ImageSet
from bench.errors import BenchError
from bench.models import Classifier, ResNet18, bn_state

M = 4  # images per severity in the tiny official files


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Classifier(ResNet18(width=4), 10).eval()


def write_official(root, m=M, dtype=np.uint8, corruptions=CORRUPTIONS, labels_len=None):
    folder = root / "CIFAR-10-C"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for c in corruptions:
        np.save(folder / f"{c}.npy", rng.integers(0, 256, size=(5 * m, 32, 32, 3)).astype(dtype))
    labels = np.tile(rng.integers(0, 10, size=m), 5) if labels_len is None else rng.integers(0, 10, size=labels_len)
    np.save(folder / "labels.npy", labels.astype(np.uint8))
    return folder


def direct_accuracy(model, images, labels):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return int((model(x).argmax(1) == torch.from_numpy(labels.astype(np.int64))).sum())


def test_official_files_give_per_cell_severity_and_mean_accuracy(tmp_path, model):
    folder = write_official(tmp_path)
    before = bn_state(model)
    result = corruption_accuracy(model, dataset="cifar10", data_dir=tmp_path, n=3, batch_size=2)
    assert result.source == "official" and result.flags == []
    assert set(result.cells) == set(CORRUPTIONS) and all(set(r) == {1, 2, 3, 4, 5} for r in result.cells.values())
    labels = np.load(folder / "labels.npy")
    for c in ("gaussian_noise", "jpeg_compression"):
        arr = np.load(folder / f"{c}.npy")
        for s in (1, 5):
            block = slice((s - 1) * M, (s - 1) * M + 3)
            cell = result.cells[c][s]
            assert cell.n == 3 and cell.correct == direct_accuracy(model, arr[block], labels[block])
            assert cell.protocol["source"] == "official" and cell.protocol["severity"] == s
    total = sum(m.correct for row in result.cells.values() for m in row.values())
    assert result.mean.n == 15 * 5 * 3 and result.mean.correct == total
    assert result.per_corruption["fog"].n == 15 and result.per_severity[2].n == 45
    assert any("images per severity, not the official 10000" in w for w in result.warnings)
    assert all(torch.equal(v, bn_state(model)[k]) for k, v in before.items()) and not model.training
    metrics = result.metrics()
    assert metrics["cells"]["fog"]["3"]["n"] == 3 and metrics["source"] == "official"


def test_official_files_are_validated(tmp_path, model):
    write_official(tmp_path / "float", dtype=np.float32, corruptions=["fog"])
    with pytest.raises(BenchError, match="expected uint8"):
        corruption_accuracy(model, dataset="cifar10", data_dir=tmp_path / "float", corruptions=["fog"], n=2)
    write_official(tmp_path / "partial", corruptions=["fog"])
    with pytest.raises(BenchError, match=r"14 corruption files missing \(gaussian_noise.npy, shot_noise.npy"):
        corruption_accuracy(model, dataset="cifar10", data_dir=tmp_path / "partial", n=2)
    write_official(tmp_path / "labels", corruptions=["fog"], labels_len=7)
    with pytest.raises(BenchError, match="7 labels for 4 images per severity"):
        corruption_accuracy(model, dataset="cifar10", data_dir=tmp_path / "labels", corruptions=["fog"], n=2)
    folder = write_official(tmp_path / "odd", corruptions=["fog"])
    np.save(folder / "fog.npy", np.zeros((7, 32, 32, 3), np.uint8))
    with pytest.raises(BenchError, match="not 5 severities"):
        corruption_accuracy(model, dataset="cifar10", data_dir=tmp_path / "odd", corruptions=["fog"], n=1)
    write_official(tmp_path / "few", corruptions=["fog"])
    with pytest.raises(BenchError, match="fewer than the 9"):
        corruption_accuracy(model, dataset="cifar10", data_dir=tmp_path / "few", corruptions=["fog"], n=9)
    with pytest.raises(BenchError, match="no official corruption files"):
        corruption_accuracy(model, dataset="cifar10", data_dir=tmp_path / "nothing", source="official")
    with pytest.raises(BenchError, match="unknown corruption"):
        corruption_accuracy(model, dataset="cifar10", data_dir=tmp_path, corruptions=["rain"])


needs_imagecorruptions = pytest.mark.skipif(importlib.util.find_spec("imagecorruptions") is None,
                                            reason="the imagecorruptions module is not installed "
                                                   "(pip install 'bench[corruptions]')")


@needs_imagecorruptions
def test_generated_corruptions_are_flagged_reproducible_and_leave_numpy_alone(model):
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.integers(0, 256, size=(3, 3, 32, 32)).astype(np.uint8))
    test = ImageSet(x, torch.tensor([1, 2, 3]), [str(i) for i in range(10)], "cifar10")
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    result = corruption_accuracy(model, test, n=3, corruptions=["gaussian_noise", "glass_blur"], severities=[1, 5],
                                 source="generated")
    assert np.array_equal(np.random.get_state()[1], state)
    assert result.source == "generated" and GENERATED_FLAG in result.flags and result.warnings
    cell = result.cells["glass_blur"][5]
    assert cell.n == 3 and cell.protocol["source"] == "generated" and "ImageNet-C" in cell.protocol["corrupted_by"]
    again = corruption_accuracy(model, test, n=3, corruptions=["gaussian_noise", "glass_blur"], severities=[1, 5],
                                source="generated")
    assert again.metrics() == result.metrics()
    first = generate(x, "impulse_noise", 3, seed=0)
    assert np.array_equal(first, generate(x, "impulse_noise", 3, seed=0))
    assert not np.array_equal(first, generate(x, "impulse_noise", 3, seed=1))
    assert first.shape == (3, 32, 32, 3) and first.dtype == np.uint8


@needs_imagecorruptions
def test_every_corruption_generates_on_a_cifar_image():
    x = torch.from_numpy(np.random.default_rng(2).integers(0, 256, size=(1, 3, 32, 32)).astype(np.uint8))
    for c in CORRUPTIONS:
        out = generate(x, c, 5)
        assert out.shape == (1, 32, 32, 3), c
        assert not np.array_equal(out, x.permute(0, 2, 3, 1).numpy()), c


@needs_imagecorruptions
def test_generated_corruptions_need_cifar_sized_images(model):
    with pytest.raises(BenchError, match="at least 32x32"):
        generate(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "fog", 1)
