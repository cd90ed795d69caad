"""ClusterFit pseudo-labels: k-means, the cached job, label files, the restricted unpickler."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from bench import files
from bench.clusterfit import cluster_features, label_arrays, load_pseudo_labels, read_label_file, restricted_load
from bench.config import EncoderConfig
from bench.datasets import load
from bench.datasets.synthetic import Synthetic
from bench.errors import BenchError
from bench.jobs import Job
from bench.method import MethodContext
from bench.models import ResNet18
from bench.record import Record
from bench.stages.base import run_stage
from bench.stages.pseudo_labels import LABELS
from bench.store import Store
from helpers import done_encoder

SYNTH = {"n_train": 60, "n_test": 8}
DATA = {"val_size": 10}


def blobs(n_per=40, k=4, dim=16, seed=0):
    """k tight clusters on orthogonal directions (different norms: L2-normalization must not hurt)."""
    rng = np.random.default_rng(seed)
    centers = np.eye(dim)[:k] * 5
    truth = np.repeat(np.arange(k), n_per)
    scale = rng.uniform(0.5, 3.0, len(truth))[:, None]
    x = (centers[truth] + 0.05 * rng.standard_normal((len(truth), dim))) * scale
    perm = rng.permutation(len(truth))
    return x[perm].astype(np.float32), truth[perm]


def test_kmeans_recovers_obvious_clusters():
    from sklearn.metrics import adjusted_rand_score

    x, truth = blobs()
    labels, inertia = cluster_features(x, [4, 2, 8], seed=0)
    assert adjusted_rand_score(truth, labels[4]) == 1.0
    assert set(labels) == {2, 4, 8} and labels[2].max() == 1 and labels[8].max() <= 7
    assert labels[4].dtype == np.int64 and inertia[8] <= inertia[4] <= inertia[2]
    again, _ = cluster_features(torch.from_numpy(x), [4], seed=0)  # deterministic given the seed
    assert np.array_equal(again[4], labels[4])
    with pytest.raises(BenchError, match="cannot make"):
        cluster_features(x[:3], [4], seed=0)
    few, _ = cluster_features(x[:3], [4], seed=0, allow_fewer=True)  # tiny data: one cluster per image
    assert sorted(few[4].tolist()) == [0, 1, 2]


def test_labels_roundtrip_with_unknown_positions(tmp_path):
    index = np.array([5, 0, 3, 7])
    labels = {2: np.array([1, 0, 1, 1]), 10: np.array([9, 3, 0, 2])}
    files.write_npz(tmp_path / LABELS, **label_arrays(index, labels))
    assert not [p for p in tmp_path.iterdir() if p.name != LABELS]  # no temp file left behind
    with np.load(tmp_path / LABELS, allow_pickle=False) as f:
        assert set(f.files) == {"index", "pseudo_train_2", "pseudo_train_10"}
    out = load_pseudo_labels(tmp_path / LABELS)
    assert set(out) == {2, 10}
    assert out[2].dtype == torch.long and len(out[2]) == 8
    assert out[2].tolist() == [0, -1, -1, 1, -1, 1, -1, 1]
    assert out[10][torch.from_numpy(index)].tolist() == [9, 3, 0, 2]
    with pytest.raises(BenchError, match="no pseudo-labels at"):
        load_pseudo_labels(tmp_path / "nowhere" / LABELS)
    (tmp_path / LABELS).write_bytes((tmp_path / LABELS).read_bytes()[:100])  # truncated
    with pytest.raises(BenchError, match="damaged"):
        load_pseudo_labels(tmp_path / LABELS)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Sneaky:
    def __reduce__(self):
        return (np.load, ("/etc/passwd",))


@pytest.mark.parametrize("payload", ["system", "eval", "numpy_load"])
def test_restricted_unpickler_refuses_code(payload, tmp_path):
    marker = tmp_path / "pwned"
    obj = {"system": {"pseudo_train_2": Evil(marker)},
           "eval": {"pseudo_train_2": np.arange(3), "x": _Reduce(eval, ("1+1",))},
           "numpy_load": {"pseudo_train_2": Sneaky()}}[payload]
    blob = pickle.dumps(obj)
    with pytest.raises(BenchError, match="refusing to unpickle"):
        restricted_load(blob, "evil.pkl")
    path = tmp_path / "evil.pkl"
    path.write_bytes(blob)
    with pytest.raises(BenchError, match="refusing"):
        read_label_file(path, [2])
    assert not marker.exists()


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_restricted_unpickler_loads_the_official_layout(protocol, tmp_path):
    table = {"pseudo_train_2": np.array([0, 1, 1, 0], dtype=np.int64),
             "pseudo_train_10": np.array([3, 9, 0, 1], dtype=np.int32),
             "pseudo_train_500": np.array([[1, 2], [3, 4]])[:, 0]}  # a non-contiguous view
    loaded = restricted_load(pickle.dumps(table, protocol=protocol))
    assert set(loaded) == set(table)
    for key in table:
        assert np.array_equal(loaded[key], table[key]) and loaded[key].dtype == table[key].dtype
    path = tmp_path / "pseudo.pkl"
    path.write_bytes(pickle.dumps({k: v for k, v in table.items() if k != "pseudo_train_500"}, protocol=protocol))
    index, labels = read_label_file(path, [2, 10])
    assert index.tolist() == [0, 1, 2, 3] and labels[10].tolist() == [3, 9, 0, 1]
    with pytest.raises(BenchError, match="no pseudo_train_50"):
        read_label_file(path, [50])


def test_label_file_validation(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, pseudo_train_2=np.array([0, 2, 1]))
    with pytest.raises(BenchError, match="outside 0..1"):
        read_label_file(path, [2])
    np.savez(path, pseudo_train_2=np.array([0.5, 1.0]))
    with pytest.raises(BenchError, match="integer"):
        read_label_file(path, [2])
    path = tmp_path / "list.pkl"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(BenchError, match="expected a dict"):
        read_label_file(path, [2])
    path.write_bytes(b"not a pickle")
    with pytest.raises(BenchError, match="not a readable label pickle"):
        read_label_file(path, [2])


# ---------------------------------------------------------------- the job


def job(config_labels, deps=None, seed=0, data=DATA) -> Job:
    return Job(kind="pseudo_labels", key="pl-test", seed=seed, source="synthetic",
               config={"pseudo_labels": config_labels, "data": data, "synthetic": SYNTH}, deps=deps or {})


def train_split(split="all"):
    return load("synthetic", split, cfg=Synthetic.Config(**SYNTH), val_size=DATA["val_size"])


def labels_of(store):
    return load_pseudo_labels(store.job_dir("pl-test") / LABELS)


@pytest.mark.parametrize("split,n", [("auto", 60), ("train", 50)])
def test_simclr_job_writes_labels_for_every_image_pretraining_reads(tmp_path, split, n):
    """Unsupervised pretraining reads the whole training split (auto); `train` leaves the validation images out."""
    store = Store(tmp_path)
    torch.manual_seed(0)
    done_encoder(store, "simclr-pre", ResNet18(width=4).eval())
    events = []
    data_cfg = {**DATA, "pretrain_split": split}
    labels_job = job({"source": "simclr", "ks": [2, 5], "file": None}, {"pretrain": "simclr-pre"}, data=data_cfg)
    record = run_stage(labels_job, store, "cpu", events.append)
    assert record.warnings == []
    assert isinstance(record, Record) and record.kind == "pseudo_labels" and record.inputs == {"pretrain": "simclr-pre"}
    assert set(record.artifacts) == {LABELS}
    Record.from_json(record.to_json())  # serializable
    sizes = record.metrics["cluster_sizes"]
    assert set(sizes) == {"2", "5"} and sum(sizes["2"]) == sum(sizes["5"]) == n and len(sizes["5"]) == 5
    assert any(e.get("stage") == "kmeans" for e in events) and any(e.get("stage") == "features" for e in events)
    labels = labels_of(store)
    data = train_split("all" if split == "auto" else "train")
    assert len(labels[5]) == int(data.indices.max()) + 1
    known = labels[5] >= 0
    assert known.sum() == n and known[data.indices].all()  # every image the pretraining reads, nothing else
    assert labels[2][data.indices].max() == 1 and labels[5][data.indices].max() <= 4

    # same job, same labels (k-means seeded with the job seed)
    run_stage(labels_job, store, "cpu")
    assert torch.equal(labels_of(store)[5], labels[5])

    # and AdvCL trains on them
    from methods.advcl import AdvCL

    cfg = AdvCL.Config()
    cfg.cluster_ks, cfg.attack_steps, cfg.batch_size = (2, 5), 1, 8
    method = AdvCL(cfg, MethodContext(EncoderConfig(width=4), data.num_classes, torch.device("cpu"),
                                      {"pseudo_labels": labels}))
    method.train_mode()
    x = data.images(slice(0, 8))
    inputs = {"x_org": x, "tau1": x.flip(3), "tau2": x.flip(2), "x_hfc": x - x.mean()}
    out = method.step(inputs, data.indices[:8])
    assert torch.isfinite(out["loss"]) and "ce_loss" in out


def test_simclr_job_without_encoder_is_refused(tmp_path):
    with pytest.raises(BenchError, match="unknown source 'simclr'"):
        run_stage(job({"source": "simclr", "ks": [2], "file": None}), Store(tmp_path), "cpu")
    with pytest.raises(BenchError, match="needs pretrain job absent, which is pending"):
        run_stage(job({"source": "simclr", "ks": [2], "file": None}, {"pretrain": "absent"}), Store(tmp_path), "cpu")


@pytest.mark.parametrize("kind", ["npz", "pkl"])
def test_file_job_imports_a_label_file(kind, tmp_path):
    n = SYNTH["n_train"]
    rng = np.random.default_rng(0)
    table = {"pseudo_train_2": rng.integers(0, 2, n), "pseudo_train_10": rng.integers(0, 10, n)}
    path = tmp_path / f"labels.{kind}"
    if kind == "npz":
        np.savez(path, **table)
    else:
        path.write_bytes(pickle.dumps(table))
    store = Store(tmp_path / "results")
    record = run_stage(job({"source": "file", "ks": [2, 10], "file": str(path)}), store, "cpu")
    assert record.metrics["n"] == n
    labels = labels_of(store)
    assert labels[10].tolist() == table["pseudo_train_10"].tolist()

    short = tmp_path / "short.npz"
    np.savez(short, pseudo_train_2=table["pseudo_train_2"][:20])
    with pytest.raises(BenchError, match="no pseudo-labels for"):
        run_stage(job({"source": "file", "ks": [2], "file": str(short)}), store, "cpu")


def test_imagenet_source_never_downloads(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(BenchError, match="not in the torch hub cache"):
        run_stage(job({"source": "imagenet", "ks": [2], "file": None}), Store(tmp_path / "r"), "cpu")
    assert not (tmp_path / "hub").exists()


def test_more_clusters_than_images_warns_instead_of_failing(tmp_path):
    """The smoke preset's tiny data with AdvCL's K = 500: one cluster per image, and a warning."""
    store = Store(tmp_path)
    done_encoder(store, "pre", ResNet18(width=4).eval())
    record = run_stage(job({"source": "simclr", "ks": [2, 500], "file": None}, {"pretrain": "pre"}), store, "cpu")
    assert len(record.warnings) == 1 and "K=[500]" in record.warnings[0]
    labels = labels_of(store)[500]
    known = labels[labels >= 0]
    assert len(known) == 60 and len(set(known.tolist())) == 60 and int(known.max()) < 500
