"""A cross-dataset cell end to end: pretrain on synthetic, finetune and evaluate on STL-10.

There is no real STL-10 training split here, so the test writes a small prepared cache in the
published format (96x96 uint8 NHWC); the real path runs on it: planning with STL-10's own
validation size (500), the up-front data check, 96 -> 32 resizing, finetuning on the target.
"""

from __future__ import annotations

import numpy as np
import torch

from bench import grid
from bench.datasets import load
from bench.datasets.torchvision_sets import STL10
from bench.models import load_classifier
from bench.stages.base import run_stage
from bench.stages.finetune import CLASSIFIER
from bench.store import Store
from helpers import stl10_cache

N_TRAIN, N_TEST = 600, 40  # STL-10's own 500 validation images leave 100 to finetune on
SETTINGS = ["encoder.width=4", "synthetic.n_train=64", "synthetic.n_test=16", "data.download=false",
            "simclr.epochs=1", "simclr.batch_size=16", "simclr.steps_per_epoch=1", "simclr.warmup_epochs=0",
            "slf.epochs=1", "slf.batch_size=16", "slf.steps_per_epoch=2",
            "eval.n=24", "eval.aa_n=0", "eval.sweep_n=0", "eval.val_n=16", "eval.batch_size=16", "eval.steps=1",
            "eval.selection_steps=1"]



def test_pretrain_on_synthetic_then_finetune_and_evaluate_on_stl10(tmp_path):
    data = stl10_cache(tmp_path / "data", N_TRAIN, N_TEST)
    store = Store(tmp_path / "results")
    _, graph, notes = grid.plan(methods="simclr", finetune="slf", datasets="synthetic:stl10", overrides=SETTINGS,
                                data_dir=str(data))
    assert [j.kind for j in graph] == ["pretrain", "finetune", "evaluate"]
    assert notes == []  # synthetic is generated, stl10 is in the cache: nothing to fetch
    for job in graph:
        store.write(run_stage(job, store, "cpu"))

    pre, ft, ev = (store.read(j.key) for j in graph)
    assert pre.source == "synthetic" and pre.config["data"]["val_size"] == 6  # synthetic's own: n_train / 10
    assert (ft.source, ft.target) == ("synthetic", "stl10")
    assert ft.config["data"]["val_size"] == 500  # STL-10's own, recorded as the number used
    assert len(ft.history) == 1
    selection = ft.metrics["val_ra"]
    assert selection["n"] == 16 and selection["protocol"]["images"] == "first 16 of stl10 val"
    classifier, meta = load_classifier(store.job_dir(ft.key) / CLASSIFIER, with_meta=True)
    assert meta["image_size"] == 32 and meta["classes"] == STL10.classes
    assert ev.target == "stl10" and ev.metrics["sa"]["n"] == 24 and ev.metrics["ra"]["n"] == 24

    # the split it finetuned on: the 100 images outside STL-10's validation split, resized 96 -> 32
    train = load("stl10", "train", data_dir=data, val_size=ft.config["data"]["val_size"])
    assert len(train) == N_TRAIN - 500 and train.x.shape[1:] == (3, 32, 32)
    x = torch.from_numpy(np.load(data / "stl10_test.npz")["x"][:24]).permute(0, 3, 1, 2).float()
    resized = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True).round()
    test = load("stl10", "test", data_dir=data)
    assert torch.equal(test.x[:24].float(), resized.clamp(0, 255))
    with torch.no_grad():
        assert classifier(test.images(slice(0, 4))).shape == (4, 10)
