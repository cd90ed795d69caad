"""The stage refactor changed where the code lives, not what it computes.

`tests/fixtures/smoke_advcl_before_stages.json` holds the records of a smoke run of AdvCL and its
three finetuners made with the code before the refactor (commit 90490f7). The same run now must
give the same job kinds and the same numbers: every count, every selected epoch, every loss.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.store import Store

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "smoke_advcl_before_stages.json"


def _numbers(value):
    """Metric dicts reduced to (correct, n); protocol texts, throughput and f_pre (it names a job key) left out."""
    if isinstance(value, dict) and "correct" in value:
        return (value["correct"], value["n"])
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items() if k not in ("protocol", "train_images_per_s", "f_pre")}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def _setting(key, value) -> str:
    return f"{key}={json.dumps(value).replace(' ', '') if isinstance(value, list) else value}"


def test_the_smoke_run_of_a_method_gives_the_numbers_it_gave_before_the_stages(tmp_path):
    fixture = json.loads(FIXTURE.read_text())
    results = tmp_path / "results"
    settings = [_setting(k, v) for k, v in fixture["settings"].items()]
    # what that code did where the fidelity work later chose the official behaviour by default: the
    # pretraining split without the validation images, PGD's random start clipped to [0, 1] (in the
    # evaluation and ALF's training attack), SimCLR dropping its last partial batch
    settings += ["data.pretrain_split=train", "eval.clamp_start=true", "alf.clamp_start=true",
                 "simclr.last_batch=drop"]
    run = subprocess.run([sys.executable, "-m", "bench", "run", "--methods", ",".join(fixture["methods"]),
                          "--finetune", ",".join(fixture["finetune"]), "--datasets", ",".join(fixture["datasets"]),
                          "--slots", "2", "--results", str(results), *settings],
                         capture_output=True, text=True, timeout=900, env=os.environ)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = Store(results).records()
    assert sorted(r.kind for r in records) == sorted(j["kind"] for j in fixture["jobs"])
    for before in fixture["jobs"]:
        (now,) = [r for r in records if (r.kind, r.method, r.finetuner) == (before["kind"], before["method"],
                                                                               before["finetuner"])]
        ours = _numbers(now.metrics)
        for name, value in _numbers(before["metrics"]).items():
            assert ours[name] == value, (now.key, name)
        assert len(now.history) == len(before["history"])
        for new_epoch, old_epoch in zip(now.history, before["history"]):
            for name, value in old_epoch.items():
                assert new_epoch[name] == pytest.approx(value, rel=1e-6, abs=1e-9), (now.key, name)
