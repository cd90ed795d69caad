"""ALF, AFF and supervised AT train under L2 when asked (`norm = L2`): the real PGD runs with
norm="L2", eps 0.5 and alpha 0.125, and its examples lie in the L2 ball; L-inf stays the default."""

from __future__ import annotations

import pytest
import torch

import bench.finetuners.aff as aff
import bench.finetuners.alf as alf
import methods.supervised_at as sat
from bench.attacks.pgd import l2_norms
from bench.config import EncoderConfig, EvalConfig, from_dict
from bench.errors import BenchError
from bench.finetuners.base import FinetuneContext
from bench.method import MethodContext
from bench.models import ResNet18


def batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(4, (n,), generator=g), torch.arange(n)


def spy(module, monkeypatch):
    record = {}
    real = module.pgd

    def spy_pgd(objective, x, **kw):
        record["kw"], record["x"] = kw, x
        record["adv"] = real(objective, x, **kw)
        return record["adv"]

    monkeypatch.setattr(module, "pgd", spy_pgd)
    return record


def finetuner(module, cls, norm):
    torch.manual_seed(0)
    cfg = from_dict(cls.Config, {"attack_steps": 3, "norm": norm}, cls.__name__.lower())
    return cls(cfg, ResNet18(width=4), FinetuneContext(num_classes=4, device=torch.device("cpu"), eval=EvalConfig()))


@pytest.mark.parametrize("module, cls", [(alf, alf.ALF), (aff, aff.AFF)])
def test_finetuners_attack_under_l2_when_asked(module, cls, monkeypatch):
    record = spy(module, monkeypatch)
    ft = finetuner(module, cls, "L2")
    ft.train_mode()
    out = ft.training_step(*batch(), None)
    assert torch.isfinite(out["loss"])
    assert (record["kw"]["norm"], record["kw"]["eps"], record["kw"]["alpha"]) == ("L2", 0.5, 0.125)
    norms = l2_norms(record["adv"] - record["x"])
    assert bool((norms <= 0.5 * (1 + 1e-6)).all())
    if module is alf:  # (AFF's zero-initialized head gives a zero KL gradient at the first step: no move)
        assert float(norms.max()) > 0.1
    ft = finetuner(module, cls, "Linf")
    ft.training_step(*batch(), None)
    assert (record["kw"]["norm"], record["kw"]["eps"]) == ("Linf", 8 / 255)


def test_supervised_at_trains_under_l2(monkeypatch):
    record = spy(sat, monkeypatch)
    torch.manual_seed(0)
    cfg = from_dict(sat.SupervisedAT.Config, {"attack_steps": 3, "norm": "L2", "l2_eps": 0.25}, "supervised_at")
    method = sat.SupervisedAT(cfg, MethodContext(EncoderConfig(width=4), 4, torch.device("cpu"), {}))
    method.train_mode()
    out = method.training_step(*batch(), None)
    assert torch.isfinite(out["loss"]) and record["kw"]["norm"] == "L2" and record["kw"]["eps"] == 0.25
    assert bool((l2_norms(record["adv"] - record["x"]) <= 0.25 * (1 + 1e-6)).all())


def test_a_bad_norm_is_refused_before_work():
    with pytest.raises(BenchError, match="alf.norm"):
        from_dict(alf.ALF.Config, {"norm": "L1"}, "alf")
