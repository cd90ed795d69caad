"""bench.api.evaluate: any classifier, float or uint8 data, separate n per measurement, L2, the same
numbers as the harness's own evaluation, clear errors; an outside architecture through SLF."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from bench import api
from bench.checkpoints import load_model
from bench.config import EvalConfig, from_dict
from bench.datasets import batches, load
from bench.datasets.synthetic import Synthetic
from bench.errors import BenchError
from bench.evaluation import evaluate_classifier
from bench.models import save_classifier
from bench.models import Classifier, ResNet18

DATA = {"synthetic.n_train": 256, "synthetic.n_test": 64, "synthetic.num_classes": 4, "data.val_size": 32}


@pytest.fixture(scope="module")
def test_set():
    cfg = Synthetic.Config(n_train=256, n_test=64, num_classes=4)
    return load("synthetic", "train", cfg=cfg, val_size=32), load("synthetic", "test", cfg=cfg)


@pytest.fixture(scope="module")
def classifier(test_set):
    train, _ = test_set
    torch.manual_seed(0)
    model = Classifier(ResNet18(width=4), 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for x, y, _ in batches(train, 64, shuffle=True, generator=torch.Generator().manual_seed(0)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def test_same_numbers_as_the_harness_evaluation_through_a_saved_file(tmp_path, classifier, test_set):
    _, test = test_set
    cfg = from_dict(EvalConfig, {"n": 32, "aa_n": 0, "sweep_n": 0, "batch_size": 16, "steps": 3}, "eval")
    own = evaluate_classifier(classifier, test, cfg, seed=0)
    save_classifier(tmp_path / "classifier.pt", classifier, classes=test.classes, image_size=32)
    loaded = load_model(tmp_path / "classifier.pt", "bench")
    result = api.evaluate(loaded, test, n=32, steps=3, batch_size=16, device="cpu")
    assert result.metrics["sa"] == api.Evaluation(own.metrics.sa, own.metrics.ra).metrics["sa"]
    assert result.metrics["ra"] == api.Evaluation(own.metrics.sa, own.metrics.ra).metrics["ra"]
    assert api.AA_SKIPPED in result.warnings
    assert "SA" in result.summary() and "PGD-3" in result.summary()


def test_separate_n_float_tensors_exactly_and_l2(classifier, test_set):
    _, test = test_set
    x = test.images(slice(0, 40)) * 0.9 + 0.05  # not multiples of 1/255: must not be requantized
    y = test.y[:40]
    result = api.evaluate(classifier, (x, y), n=40, pgd_n=12, steps=2, batch_size=16, device="cpu", norm="L2")
    with torch.no_grad():
        direct = int((classifier(x).argmax(1) == y).sum())
    assert result.sa.n == 40 and result.sa.correct == direct
    assert result.ra.n == 12 and result.ra.protocol["norm"] == "L2" and result.ra.protocol["eps"] == 0.5
    eps = api.evaluate(classifier, (x, y), n=12, steps=2, batch_size=16, device="cpu", eps=4 / 255)
    assert eps.ra.protocol["eps"] == 4 / 255 and eps.ra.protocol["alpha"] == 1 / 255


def test_dataset_by_name_with_its_settings(classifier):
    result = api.evaluate(classifier, "synthetic", data_settings=DATA, n=16, steps=1, batch_size=16, device="cpu")
    assert result.sa.n == 16 and "synthetic" in result.sa.protocol["images"]


def test_bad_input_is_one_clear_message(classifier, test_set):
    _, test = test_set
    x, y = test.images(slice(0, 8)), test.y[:8]
    with pytest.raises(BenchError, match="the model has 4 outputs but tensors has 10 classes"):
        api.evaluate(classifier, (x, y), classes=10, n=8, device="cpu")
    with pytest.raises(BenchError, match=r"float images must lie in \[0, 1\]"):
        api.evaluate(classifier, (x * 2 - 1, y), n=8, device="cpu")
    with pytest.raises(BenchError, match="looks like an encoder.*pass finetune="):
        api.evaluate(ResNet18(width=4).eval(), (x, y), n=8, device="cpu")
    with pytest.raises(BenchError, match="eval.norm"):
        api.evaluate(classifier, (x, y), n=8, device="cpu", norm="L1")


WRN = textwrap.dedent('''
    import torch.nn as nn, torch.nn.functional as F

    class Block(nn.Module):  # pre-activation wide-ResNet block
        def __init__(s, i, o, stride):
            super().__init__()
            s.bn1, s.conv1 = nn.BatchNorm2d(i), nn.Conv2d(i, o, 3, stride, 1, bias=False)
            s.bn2, s.conv2 = nn.BatchNorm2d(o), nn.Conv2d(o, o, 3, 1, 1, bias=False)
            s.short = None if i == o and stride == 1 else nn.Conv2d(i, o, 1, stride, bias=False)

        def forward(s, x):
            o = F.relu(s.bn1(x))
            y = s.conv2(F.relu(s.bn2(s.conv1(o))))
            return y + (x if s.short is None else s.short(o))

    class WideResNet(nn.Module):  # WRN-10-k: one block per group, no feature_dim attribute
        def __init__(s, k=1):
            super().__init__()
            w = [16, 16 * k, 32 * k, 64 * k]
            s.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            s.blocks = nn.Sequential(Block(w[0], w[1], 1), Block(w[1], w[2], 2), Block(w[2], w[3], 2))
            s.bn = nn.BatchNorm2d(w[3])

        def forward(s, x):
            return F.relu(s.bn(s.blocks(s.conv(x)))).mean((2, 3))

    def build(k=1):
        return WideResNet(k)
''')


def test_a_module_function_wide_resnet_through_slf(tmp_path):
    (tmp_path / "wrn.py").write_text(WRN)
    loaded = load_model(f"{tmp_path / 'wrn.py'}:build", "module", want="encoder", kwargs={"k": 2})
    assert loaded.kind == "encoder" and loaded.model.feature_dim == 128  # inferred from a dummy forward
    assert any("bench ran it" in note for note in loaded.notes)
    settings = {"slf.epochs": 1, "slf.batch_size": 32, "slf.steps_per_epoch": 2, "eval.val_n": 16,
                "eval.batch_size": 16, "eval.selection_steps": 1}
    result = api.evaluate(loaded.model, "synthetic", finetune="slf", finetune_settings=settings, data_settings=DATA,
                          n=16, steps=1, batch_size=16, device="cpu")
    assert result.finetune["finetuner"] == "slf" and result.finetune["selected_epoch"] == 1
    assert result.sa.n == 16 and result.model.head.in_features == 128


def test_module_function_errors(tmp_path):
    with pytest.raises(BenchError, match="could not import no_such_package_xyz"):
        load_model("no_such_package_xyz.models:build", "module")
    (tmp_path / "bad.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(BenchError, match="RuntimeError: boom"):
        load_model(f"{tmp_path / 'bad.py'}:build", "module")
    (tmp_path / "notmodule.py").write_text("def build():\n    return 3\n")
    with pytest.raises(BenchError, match="returned a int, not a torch.nn.Module"):
        load_model(f"{tmp_path / 'notmodule.py'}:build", "module")
    with pytest.raises(BenchError, match="has no 'missing'"):
        load_model(f"{tmp_path / 'notmodule.py'}:missing", "module")
    with pytest.raises(BenchError, match="needs 'package.module:function'"):
        load_model("just_a_name", "module")
