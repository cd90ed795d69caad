"""What each pretraining reads: the official split of every registered method, in the dry run and
in the data loaded; the paper preset's dry run states fp32 and that split for every pretraining."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench import datasets, grid
from bench.errors import BenchError
from bench.registry import METHODS
from bench.stages.base import get_stage

CIFAR_TRAIN, CIFAR_VAL = 50_000, 5_000


def official_split(method: str) -> str:
    # the official code of every unsupervised method reads all 50,000 training images; a method
    # that reads labels must keep the validation images (they select the finetuned models) out
    return "train" if METHODS.get(method).uses_labels else "train+val"


@pytest.fixture(scope="module")
def pretrain_jobs():
    graph = grid.plan(methods="all", finetune="slf", datasets="cifar10", fetch=False)[1]
    return {job.method: job for job in graph if job.kind == "pretrain"}


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_pretrains_on_its_official_split(method, pretrain_jobs):
    job = pretrain_jobs[METHODS.get(method).pretrain_as or method]
    assert get_stage("pretrain").describe(job) == f"fp32, cifar10 {official_split(job.method)}"


@pytest.mark.parametrize("uses_labels, size", [(False, CIFAR_TRAIN), (True, CIFAR_TRAIN - CIFAR_VAL)])
def test_the_loaded_split_has_the_official_size(cifar_dir, uses_labels, size):
    config = {"data": {"pretrain_split": "auto", "val_size": -1}}
    data = datasets.load_source("cifar10", config, "cpu", cifar_dir, uses_labels=uses_labels)
    assert len(data) == size
    val = datasets.load("cifar10", "val", data_dir=cifar_dir)
    overlap = set(val.indices.tolist()) & set(data.indices.tolist())
    assert bool(overlap) is not uses_labels  # supervised pretraining never sees a validation image


def test_a_labelled_method_cannot_read_the_validation_images():
    with pytest.raises(BenchError, match="validation"):
        datasets.pretrain_split("all", uses_labels=True)
    assert datasets.pretrain_split("train", uses_labels=False) == "train"  # the non-official option


def test_paper_preset_dry_run_states_fp32_and_the_official_split(tmp_path):
    env = {**os.environ, "COLUMNS": "300"}
    out = subprocess.run([sys.executable, "-m", "bench", "run", "--preset", "paper", "--dry-run", "--no-estimate",
                          "--results", str(tmp_path)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if "│ pretrain " in line]
    assert rows
    for row in rows:
        method = row.split("│")[2].strip().split("-")[1]
        assert "fp32, " in row and f" {official_split(method)} " in row, row
