"""The robustbench format: its import problem gives one clear message with the workaround, and a
zoo model comes back as a classifier. robustbench (and its zoo weights, a download) are not
available here, so a stand-in package with the import chain of robustbench 1.1.1 is used:
`robustbench/__init__.py` imports `robustbench.eval`, which imports `autoattack`."""

from __future__ import annotations

import sys
import textwrap

import pytest

from bench.checkpoints import load_model
from bench.checkpoints.robustbench_format import AUTOATTACK_MISSING, NOT_INSTALLED
from bench.errors import BenchError


def fake_robustbench(root, load_model_body):
    pkg = root / "robustbench"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .utils import load_model\nfrom .eval import benchmark\n")
    (pkg / "eval.py").write_text("from autoattack import AutoAttack\n\ndef benchmark():\n    pass\n")
    (pkg / "utils.py").write_text(textwrap.dedent(load_model_body))


@pytest.fixture
def isolated(monkeypatch):
    for name in [m for m in sys.modules if m == "robustbench" or m.startswith("robustbench.")]:
        monkeypatch.delitem(sys.modules, name)
    yield monkeypatch
    for name in [m for m in sys.modules if m == "robustbench" or m.startswith("robustbench.")]:
        del sys.modules[name]


def test_the_autoattack_import_problem_is_one_message_with_the_workaround(tmp_path, isolated):
    fake_robustbench(tmp_path, "def load_model(**kw):\n    raise AssertionError('not reached')\n")
    isolated.syspath_prepend(str(tmp_path))
    isolated.setitem(sys.modules, "autoattack", None)  # pyautoattack provides `pyautoattack`, not `autoattack`
    with pytest.raises(BenchError) as info:
        load_model("Carmon2019Unlabeled", "robustbench")
    assert str(info.value) == AUTOATTACK_MISSING
    assert "pip install git+https://github.com/fra31/auto-attack" in str(info.value)


def test_robustbench_absent(isolated):
    isolated.setitem(sys.modules, "robustbench", None)
    with pytest.raises(BenchError, match="needs the optional robustbench package"):
        load_model("Carmon2019Unlabeled", "robustbench")
    assert "bench[robustbench]" in NOT_INSTALLED


def test_a_zoo_model_is_a_classifier(tmp_path, isolated):
    fake_robustbench(tmp_path, '''
        import torch.nn as nn

        def load_model(model_name, model_dir, dataset, threat_model):
            if model_name != "Standard":
                raise KeyError(model_name)
            return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).train()
    ''')
    (tmp_path / "autoattack.py").write_text("class AutoAttack:\n    pass\n")
    isolated.syspath_prepend(str(tmp_path))
    isolated.delitem(sys.modules, "autoattack", raising=False)
    loaded = load_model("Standard", "robustbench", model_dir=tmp_path / "models")
    assert loaded.kind == "classifier" and not loaded.model.training
    with pytest.raises(BenchError, match="not in RobustBench's cifar10 Linf zoo"):
        load_model("Nobody2099", "robustbench")
    with pytest.raises(BenchError, match="RobustBench models are classifiers"):
        load_model("Standard", "robustbench", want="encoder")
