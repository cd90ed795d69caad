"""DynACL++'s post-processing (dynacl.md 8): single-run Lloyd k-means without L2 normalization on the
`normal` branch, then LP (head only, BN frozen) and AFT (TRADES on pseudo-labels) from the `pgd` branch."""

import pytest
import torch

from bench.clusterfit import kmeans_lloyd
from bench.datasets import load
from bench.datasets.synthetic import Synthetic
from bench.errors import BenchError
from bench.lpaft import (LPAFTConfig, _phase_config, check_k, dynacl_pseudo_labels, lpaft_from_dual, resolve_k,
                         run_lpaft)
from bench.models import ResNet18, bn_state, export_encoder
from bench.models.blob import encoder_blob
from bench.train import lr_at


def blobs(centers, n=20, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.tensor(c) + spread * torch.randn(n, len(c), generator=g) for c in centers])
    return x, torch.arange(len(centers)).repeat_interleave(n)


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(len(set(b[a == c].tolist())) == 1 for c in a.unique()) and len(a.unique()) == len(b.unique())


def init_rows(n, k, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]  # kmeans_lloyd's init


def test_lloyd_recovers_separated_clusters_and_converges():
    x, truth = blobs([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    # one run from K random rows (no restarts): a seed whose init rows lie in three different blobs
    seed = next(s for s in range(100) if len(set(truth[init_rows(len(x), 3, s)].tolist())) == 3)
    labels, centers, iterations = kmeans_lloyd(x, 3, seed=seed)
    assert same_partition(labels, truth) and iterations < 20
    assert torch.allclose(centers.sort(dim=0).values, torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0]]), atol=0.1)
    again, _, _ = kmeans_lloyd(x, 3, seed=seed)
    assert torch.equal(labels, again)  # seeded
    # a seed whose init puts two rows in one blob stays in that local optimum, as a single run does
    bad = next(s for s in range(100) if len(set(truth[init_rows(len(x), 3, s)].tolist())) < 3)
    assert not same_partition(kmeans_lloyd(x, 3, seed=bad)[0], truth)


def test_lloyd_does_not_normalize_the_features():
    # the same direction at two norms: identical after L2 normalization, two clusters without it
    x, truth = blobs([[1.0, 1.0], [10.0, 10.0]], spread=0.01)
    seed = next(s for s in range(100) if len(set(truth[init_rows(len(x), 2, s)].tolist())) == 2)
    labels, _, _ = kmeans_lloyd(x, 2, seed=seed)
    assert same_partition(labels, truth)


def test_lloyd_reseeds_an_empty_cluster_and_checks_k():
    x = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 5)  # two distinct points, three clusters
    labels, centers, _ = kmeans_lloyd(x, 3, seed=0)
    assert labels.max() < 3 and torch.isfinite(centers).all()
    with pytest.raises(BenchError, match="clusters"):
        kmeans_lloyd(x, 11, seed=0)


def test_k_option():
    assert resolve_k("10", 100) == 10 and resolve_k("classes", 100) == 100
    assert check_k("2") == "2"
    for bad in ("1", "ten", "-3"):
        with pytest.raises(BenchError, match="lpaft k"):
            check_k(bad)


def test_phase_schedules_of_lpaft():
    c = LPAFTConfig()
    lp = _phase_config(c, epochs=c.lp_epochs, lr=c.lp_lr, schedule="constant")
    assert [lr_at(lp, e, 0, 10) for e in (0, 9)] == [0.01, 0.01]
    aft = _phase_config(c, epochs=c.aft_epochs, lr=c.aft_lr, schedule="step")
    assert [lr_at(aft, e, 0, 10) for e in (0, 9, 10, 19, 20, 24)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert (aft.weight_decay, aft.momentum, aft.batch_size, aft.nesterov, aft.precision) == (1e-4, 0.9, 512, False, "fp32")


@pytest.fixture(scope="module")
def data():
    return load("synthetic", "train", cfg=Synthetic.Config(n_train=40, n_test=4), val_size=4)


def dual_encoder():
    torch.manual_seed(0)
    enc = ResNet18(width=4, branches=("normal", "pgd"), normalize="imagenet")
    with torch.no_grad():  # the branches differ, so the tests can tell which one was used
        for name, p in enc.named_parameters():
            if ".bns.pgd." in name and name.endswith("bias"):
                p.add_(0.05)
    return enc


def tiny(**kw):
    return LPAFTConfig(**{"batch_size": 8, "attack_steps": 1, "steps_per_epoch": 2, **kw})


def test_pseudo_labels_cluster_the_normal_branch_by_source_position(data):
    enc = dual_encoder()
    labels, info = dynacl_pseudo_labels(enc, data, 3, seed=0)
    assert len(labels) == int(data.indices.max()) + 1
    known = labels[data.indices]
    assert (known >= 0).all() and (known < 3).all() and int((labels == -1).sum()) == len(labels) - len(data)
    enc.eval()
    with torch.no_grad():
        normal = enc(data.images(slice(None)), "normal")
    expected, _, _ = kmeans_lloyd(normal, 3, seed=0)
    assert torch.equal(known, expected) and sum(info["cluster_sizes"]) == len(data)


def test_lp_alone_keeps_the_pgd_branch_encoder_bit_identical(data):
    enc = dual_encoder()
    start = export_encoder(enc, "pgd")
    labels, _ = dynacl_pseudo_labels(enc, data, 3, seed=0)
    out, history = run_lpaft(enc, data, labels, tiny(lp_epochs=2, aft_epochs=0), num_classes=10, seed=0)
    assert isinstance(out, ResNet18) and out.branches == ("pgd",) and not out.training
    assert len(history["lp"]) == 2 and history["aft"] == []
    for key, value in start.state_dict().items():  # head only, BN statistics frozen
        assert torch.equal(value, out.state_dict()[key]), key


def test_lpaft_trains_the_encoder_and_resumes_from_its_workdir(data, tmp_path):
    enc = dual_encoder()
    start = export_encoder(enc, "pgd")
    labels, _ = dynacl_pseudo_labels(enc, data, 3, seed=0)
    cfg = tiny(lp_epochs=1, aft_epochs=1)
    out, history = run_lpaft(encoder_blob(enc), data, labels, cfg, num_classes=10, seed=0, workdir=tmp_path)
    assert any(not torch.equal(v, out.state_dict()[k]) for k, v in start.state_dict().items() if "conv" in k)
    assert bn_state(out) != {} and (tmp_path / "lp").is_dir() and (tmp_path / "aft").is_dir()
    again, _ = run_lpaft(encoder_blob(enc), data, labels, cfg, num_classes=10, seed=0, workdir=tmp_path)
    for key, value in out.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])


def test_lpaft_from_dual_runs_both_parts_and_rejects_labels_beyond_the_head(data):
    enc = dual_encoder()
    out, labels, info = lpaft_from_dual(enc, data, tiny(lp_epochs=1, aft_epochs=1, k="3"), num_classes=10, seed=1)
    assert out.branches == ("pgd",) and info["pseudo_labels"]["k"] == 3 and labels[data.indices].max() < 3
    with pytest.raises(BenchError, match="pseudo-labels go up to"):
        run_lpaft(enc, data, torch.full_like(labels, 12), tiny(lp_epochs=1, aft_epochs=0), num_classes=10, seed=0)
