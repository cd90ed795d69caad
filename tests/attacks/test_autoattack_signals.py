"""AutoAttack's warnings reach the result (and so the record's sanity flags), with the real pyautoattack.

- a model with constant logits: APGD's "points with zero gradient" (logged by pyautoattack only);
- a model whose forward calls autograd: the dynamic-defence check;
- attacks with no sample left to attack are not listed as run;
- version="rand" skips the randomness check (as pyautoattack does), "standard" flags a random model.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from bench.attacks.autoattack import capture_pyautoattack, run_autoattack
from bench.attacks.pgd import eval_guard
from bench.sanity import sanity_warnings

pytest.importorskip("pyautoattack")

N, C = 8, 4
EPS = 8 / 255


class Constant(nn.Module):
    """Logits that do not depend on the input: every input gradient is exactly zero."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, C)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.copy_(torch.tensor([2.0, 1.0, 0.0, -1.0]))

    def forward(self, x):
        return self.fc(x.flatten(1))


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 8 * 8, C)

    def forward(self, x):
        return self.fc(x.flatten(1))


class DifferentiatesInside(Linear):
    """A 'defence' that takes a gradient in its forward (what check_dynamic looks for)."""

    def __init__(self):
        super().__init__()
        self.probe = torch.ones(3, requires_grad=True)

    def forward(self, x):
        with torch.enable_grad():
            torch.autograd.grad((self.probe * 2).sum(), self.probe)
        return super().forward(x)


class Noisy(Linear):
    def forward(self, x):
        return super().forward(x) + 10 * torch.randn(x.shape[0], C, device=x.device)


def run(model, y, **kw):
    x = torch.rand(len(y), 3, 8, 8, generator=torch.Generator().manual_seed(1))
    settings = dict(eps=EPS, num_classes=C, seed=0, batch_size=N, budget=0.05)
    settings.update(kw)
    with eval_guard(model):
        return run_autoattack(model, x, y, **settings)


def labels(*values):
    return torch.tensor(values, dtype=torch.long)


def test_constant_logits_raise_the_zero_gradient_warning_and_it_becomes_a_sanity_flag():
    y = labels(0, 0, 0, 0, 1, 2, 3, 1)  # class 0 is predicted: 4 samples are correct and get attacked
    result = run(Constant(), y)
    assert result.attacks == ["apgd-ce", "apgd-t", "fab-t", "square"] and result.correct == 4
    zero = [m for m in result.messages if "points with zero gradient" in m]
    assert zero, result.messages
    flags = sanity_warnings(None, None, aa_result=result)
    assert any(f.startswith("pyautoattack: there are") and "zero gradient" in f for f in flags)


def test_a_forward_that_calls_autograd_is_flagged_as_dynamic_and_the_check_is_repeatable():
    y = labels(*range(C), *range(C))
    flagged = run(DifferentiatesInside(), y)
    assert any("dynamic defense" in m for m in flagged.messages), flagged.messages
    plain = run(Linear(), y)  # pyautoattack's counters are global: a later model is not flagged too
    assert not any("dynamic defense" in m for m in plain.messages), plain.messages


def test_attacks_left_without_samples_are_not_listed_as_run():
    result = run(Constant(), labels(1, 2, 3, 1, 2, 3, 1, 2))  # every sample wrong before any attack
    assert result.correct == 0 and result.robust_after == {"clean": 0}
    assert result.attacks == [] and result.not_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert result.to_dict()["not_run"] == result.not_run


def test_the_randomness_check_is_skipped_for_version_rand_only():
    y = labels(*range(C), *range(C))
    torch.manual_seed(0)
    standard = run(Noisy(), y, version="standard")
    assert any("randomized defense" in m for m in standard.messages)
    torch.manual_seed(0)
    rand = run(Noisy(), y, version="rand")
    assert not any("randomized defense" in m for m in rand.messages)
    assert rand.aa_version == "rand" and set(rand.attacks) <= {"apgd-ce", "apgd-dlr"}


def test_python_warnings_from_pyautoattack_are_captured_and_others_pass_through():
    from pyautoattack import checks

    messages: list[str] = []
    with warnings.catch_warnings(record=True) as outside:
        warnings.simplefilter("always")
        with capture_pyautoattack(messages):
            checks.check_range_output(lambda x: torch.softmax(x, 1), torch.rand(2, 4))  # logger=None: warnings.warn
            warnings.warn("not pyautoattack's", UserWarning)
    assert any("probability distribution" in m for m in messages)
    assert [str(w.message) for w in outside] == ["not pyautoattack's"]
