"""A classifier that predicts one class for most inputs is flagged (COLLAPSE_FLAG) and warned about."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.config import EvalConfig, to_dict
from bench.datasets import load
from bench.datasets.synthetic import Synthetic
from bench.evaluation import evaluate_classifier
from bench.jobs import Job
from bench.models import Classifier, ResNet18, save_classifier
from bench.record import COLLAPSE_FLAG, EvaluateMetrics
from bench.sanity import collapse_threshold, collapse_warning
from bench.stages.base import run_stage
from bench.stages.finetune import CLASSIFIER
from bench.store import Store
from helpers import done_job

SYNTH = {"n_train": 64, "n_test": 40, "num_classes": 4, "image_size": 8}
EVAL = dict(n=40, aa_n=0, sweep_n=0, steps=1, batch_size=16, val_n=8)


class Constant(nn.Module):
    """Logits that always favour `label` (and still depend on x, so PGD has a graph to differentiate)."""

    def __init__(self, label: int, classes: int = 4):
        super().__init__()
        self.logits = nn.Parameter(torch.nn.functional.one_hot(torch.tensor(label), classes).float() * 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits + 0 * x.flatten(1).sum(1, keepdim=True)


class Spread(nn.Module):
    """Predicts the brightest of the first four pixel values: its predictions spread over the classes."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :4] * self.scale


@pytest.fixture(scope="module")
def test_set():
    return load("synthetic", "test", cfg=Synthetic.Config(**SYNTH))


def test_the_threshold_is_halfway_between_the_label_share_and_a_constant_output():
    assert collapse_threshold(10) == pytest.approx(0.55)
    assert collapse_threshold(2) == pytest.approx(0.75)
    assert collapse_threshold(100) == pytest.approx(0.505)
    assert collapse_threshold(10, label_share=0.3) == pytest.approx(0.65)  # an imbalanced test set
    assert collapse_warning(0.5, 1, 100, 10) is None
    assert "class 1 (b)" in collapse_warning(0.6, 1, 100, 10, classes=list("abcdefghij"))
    assert collapse_warning(0.7, 0, 100, 2) is None and collapse_warning(0.8, 0, 100, 2) is not None


def test_a_constant_classifier_is_flagged_with_its_share(test_set):
    out = evaluate_classifier(Constant(2).eval(), test_set, EvalConfig(**EVAL), seed=0)
    assert out.metrics.prediction_share == 1.0
    assert out.flags == [COLLAPSE_FLAG]
    (warning,) = [w for w in out.warnings if w.startswith("collapsed classifier")]
    assert "class 2" in warning and "100.0% of the 40 clean test images" in warning and "threshold 62.5%" in warning
    assert out.metrics.sa.correct == int((test_set.y == 2).sum())  # it is right exactly on class 2


def test_a_classifier_that_spreads_its_predictions_is_not_flagged(test_set):
    out = evaluate_classifier(Spread().eval(), test_set, EvalConfig(**EVAL), seed=0)
    assert out.metrics.prediction_share < collapse_threshold(4)
    assert out.flags == [] and not any(w.startswith("collapsed") for w in out.warnings)


def test_the_evaluate_record_carries_the_flag_and_the_share(tmp_path):
    store = Store(tmp_path / "results")
    ft_key, ev_key = "finetune-x-slf-synthetic-s0-abc", "evaluate-x-slf-synthetic-s0-def"
    model = Classifier(ResNet18(width=2), 4)
    with torch.no_grad():  # a head that ignores its features: class 0 always
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([5.0, 0, 0, 0]))
    save = lambda path: save_classifier(path, model, classes=[f"c{i}" for i in range(4)], image_size=8)  # noqa: E731
    done_job(store, ft_key, "finetune", {CLASSIFIER: save}, metrics={"selected_epoch": 1})
    job = Job(kind="evaluate", key=ev_key, seed=0, method="x", finetuner="slf", source="synthetic",
              target="synthetic", config={"eval": to_dict(EvalConfig(**EVAL)), "synthetic": dict(SYNTH)},
              deps={"classifier": ft_key})
    record = run_stage(job, store, "cpu")
    assert COLLAPSE_FLAG in record.flags
    assert record.typed_metrics(EvaluateMetrics).prediction_share == 1.0
    assert any(w.startswith("collapsed classifier") for w in record.warnings)
