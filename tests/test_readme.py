"""The README's method example is real code: it registers, trains and exports as the README says.

Run in a subprocess so the example's registration does not leak into other tests' registries.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

TRAIN = """
import json, sys, tempfile
from bench.pretraining import pretrain
from bench.registry import METHODS
method, history = pretrain("mycl", "synthetic",
                           {"encoder.width": 4, "synthetic.n_train": 32, "data.val_size": 0,
                            "mycl.epochs": 2, "mycl.batch_size": 16}, seed=0, workdir=tempfile.mkdtemp())
sys.stdout.write(json.dumps({"listed": "mycl" in METHODS.names(), "epochs": len(history),
                             "loss": history[-1]["loss"], "feature_dim": method.export_encoder().feature_dim}))
"""


def readme_method_example() -> str:
    section = README.read_text().split("## Adding a method", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_method_example_registers_and_trains():
    out = subprocess.run([sys.executable, "-c", readme_method_example() + TRAIN], capture_output=True, text=True,
                         timeout=300, cwd=README.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["listed"] and result["epochs"] == 2 and result["loss"] > 0
    assert result["feature_dim"] == 32  # width 4: 8 x width
