"""Report stores for tests/test_report*.py: a hand-built one with known numbers, failed and blocked job
folders, and a tiny real `bench run`.

`build_store` writes records through `bench.record.Record` / `bench.store.Store` exactly as the jobs
write them: evaluate records with Metric dicts and sweeps, finetune and pretrain records linking to
`encoder.pt` files (tiny untrained ResNet-18s, for the t-SNE), a failed job and an unreadable record.
It holds what a tiny real run cannot: CIFAR cells with the paper's values, cross-dataset and ALF cells.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from click.testing import CliRunner

from bench.jobs import Job
from bench.record import Metric, Record
from bench.store import FAILURE, Store
from bench.worker import write_job_file

N = 1000


def metric(correct: int, n: int = N, **protocol) -> dict:
    m = Metric.from_counts(correct, n, {"n": n, **protocol})
    return json.loads(json.dumps({"value": m.value, "n": m.n, "correct": m.correct, "ci95": list(m.ci95),
                                  "protocol": m.protocol}))


def ra_protocol(eps_255: float = 8, steps: int = 20) -> dict:
    return {"attack": "pgd", "eps": eps_255 / 255, "eps_255": eps_255, "alpha_255": 2, "steps": steps,
            "restarts": 1}


def sweeps(base_ra: int, n: int = 200) -> dict:
    """RA against eps (2..16/255) and steps (1..100), falling with strength; counts out of n."""
    eps = [(2, base_ra + 60), (4, base_ra + 35), (8, base_ra), (16, max(0, base_ra - 60))]
    steps = [(1, base_ra + 30), (10, base_ra + 4), (20, base_ra), (100, base_ra - 3)]
    return {"eps": [metric(c, n, **ra_protocol(e, 20)) for e, c in eps],
            "steps": [metric(c, n, **ra_protocol(8, s)) for s, c in steps]}


def digest(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def write_chain(store: Store, method: str, ft: str, source: str, target: str, seed: int, *, encoder: bool,
                config: dict | None = None) -> str:
    """pretrain (+ encoder.pt) and finetune records; returns the finetune key."""
    pre_key = f"pretrain-{method}-{source}-s{seed}-{digest(method, source, seed)}"
    ft_key = f"finetune-{method}-{ft}-{source}-{target}-s{seed}-{digest(method, ft, source, target, seed)}"
    if not store.has(pre_key):
        record = Record(kind="pretrain", key=pre_key, seed=seed, method=method, source=source, config=config or {},
                        metrics={"epochs": 1})
        if encoder:
            import torch

            from bench.models import save_encoder
            from bench.models.resnet import ResNet18

            torch.manual_seed(seed + len(method))
            store.job_dir(pre_key).mkdir(parents=True, exist_ok=True)
            save_encoder(store.job_dir(pre_key) / "encoder.pt", ResNet18(width=2).eval(), {"method": method})
            record.artifacts = {"encoder.pt": store.job(pre_key).artifact_entry("encoder.pt")}
        store.write(record)
    store.write(Record(kind="finetune", key=ft_key, seed=seed, method=method, finetuner=ft, source=source,
                       target=target, config=config or {}, inputs={"encoder": pre_key}, metrics={"selected_epoch": 1}))
    return ft_key


def write_eval(store: Store, method: str, ft: str, source: str, target: str, seed: int, *, sa: int, ra: int,
               aa: int | None, n: int = N, sweep: bool = False, flags=(), warnings=(), encoder: bool = False,
               config: dict | None = None) -> str:
    ft_key = write_chain(store, method, ft, source, target, seed, encoder=encoder, config=config)
    key = f"evaluate-{method}-{ft}-{source}-{target}-s{seed}-{digest(ft_key)}"
    metrics = {"sa": metric(sa, n, attack=None), "ra": metric(ra, n, **ra_protocol()),
               "aa": metric(aa, n, attack="autoattack", aa_version="standard", eps_255=8) if aa is not None else None,
               "sweeps": sweeps(ra * 200 // n) if sweep else None}
    store.write(Record(kind="evaluate", key=key, seed=seed, method=method, finetuner=ft, source=source,
                       target=target, config=config or {}, inputs={"classifier": ft_key}, metrics=metrics,
                       warnings=list(warnings), flags=list(flags)))
    return key


SYNTHETIC = {"synthetic": {"n_train": 64, "n_test": 80, "image_size": 16}, "data": {"val_size": 8}}
FAILED_KEY = "evaluate-acl-aff-cifar10-s0-deadbeef0000"
UNREADABLE_KEY = "finetune-rocl-aff-cifar10-s0-badbadbadbad"
SANITY = "RA (0.6000) is above SA (0.5000, 95% CI up to 0.5300): the PGD attack is broken"
TEST_SELECTION_WARNING = ("the classifier was selected on the test set (selection=test): the numbers are "
                          "optimistic and not comparable with validation-selected ones")


def build_store(root: Path, *, scale: int = 0) -> Store:
    """The reference store. `scale` shifts every count (a second folder for --compare)."""
    store = Store(root)
    for seed, (sa, ra, aa) in enumerate([(800, 500, 420), (810, 505, 425), (820, 510, 430)]):
        write_eval(store, "advcl", "slf", "cifar10", "cifar10", seed, sa=sa + scale, ra=ra + scale, aa=aa + scale,
                   sweep=True)
    write_eval(store, "acl", "slf", "cifar10", "cifar10", 0, sa=780, ra=430, aa=390, sweep=True)
    write_eval(store, "advcl", "aff", "cifar10", "cifar10", 0, sa=830, ra=520, aa=490,
               flags=["selection=test"], warnings=[TEST_SELECTION_WARNING])
    write_eval(store, "rocl", "slf", "cifar10", "cifar10", 0, sa=500, ra=600, aa=280, warnings=[SANITY])
    write_eval(store, "supervised_at", "alf", "cifar10", "cifar10", 0, sa=790, ra=470, aa=None)
    write_eval(store, "advcl", "slf", "cifar10", "stl10", 0, sa=640, ra=360, aa=260)
    for method, (sa, ra) in {"simclr": (150, 40), "advcl": (120, 70)}.items():
        write_eval(store, method, "slf", "synthetic", "synthetic", 0, sa=sa, ra=ra, aa=None, n=200,
                   encoder=True, config=SYNTHETIC, sweep=True)
    if scale == 0:
        write_failed_job(store, "evaluate", FAILED_KEY, "JobFailed: the attack ran out of memory", method="acl",
                         finetuner="aff", source="cifar10", target="cifar10")
        bad = store.job_dir(UNREADABLE_KEY)
        bad.mkdir(parents=True)
        (bad / "record.json").write_text("{ not json")
    return store


def write_failed_job(store: Store, kind: str, key: str, error: str, *, blocked_by: str | None = None,
                     **fields) -> Job:
    """A job folder without a record: job.json as the worker (or, for a blocked job, the runner) writes it,
    and failure.json, with `blocked_by` naming the failed job a blocked one needed."""
    job = Job(kind=kind, key=key, seed=fields.pop("seed", 0), **fields)
    write_job_file(store, job)
    failure = {"error": error, "time": 1.0e9}
    if blocked_by:
        failure["blocked_by"] = blocked_by
    (store.job_dir(key) / FAILURE).write_text(json.dumps(failure))
    return job


# ---------------------------------------------------------------- a tiny real run

RUN_GRID = ["--methods", "simclr,supervised_at", "--finetune", "slf,aff", "--datasets", "synthetic",
            "--seeds", "0,1", "--slots", "2"]
# Tiny everything (seconds per job on a CPU core). Chosen to exercise the report:
# - RA is PGD-2 at 4/255 (not the paper's PGD-20 at 8/255), so labels must come from the records;
# - AFF selects on the test set (the selection=test flag, mark †);
# - the eps sweep runs 16/255 before 0/255, so where a classifier gets anything right the real sanity
#   check "the eps sweep rises" fires (mark ‡) and elsewhere it does not.
RUN_SETTINGS = ["encoder.width=4", "synthetic.n_train=256", "synthetic.n_test=32", "synthetic.image_size=16",
                "data.val_size=16", "pretrain.epochs=1", "pretrain.batch_size=32", "pretrain.steps_per_epoch=8",
                "pretrain.warmup_epochs=0", "finetune.epochs=1", "finetune.batch_size=32",
                "finetune.steps_per_epoch=8", "finetune.attack_steps=1", "eval.n=32", "eval.aa_n=8",
                "eval.sweep_n=32", "eval.val_n=16", "eval.batch_size=32", "eval.steps=2", "eval.selection_steps=1",
                f"eval.eps={4 / 255!r}", "eval.sweep_eps=[16,0]", "eval.sweep_steps=[1,2]", "aff.selection=test"]


def run_tiny_grid(results: Path) -> None:
    """`bench run` (the real runner, local executor, one worker subprocess per job) on the synthetic data:
    2 methods x 2 finetuners x 2 seeds = 4 pretrain, 8 finetune and 8 evaluate jobs."""
    from bench.cli import main

    res = CliRunner().invoke(main, ["run", *RUN_GRID, "--results", str(results), *RUN_SETTINGS])
    assert res.exit_code == 0, res.output[-5000:]


def evaluate_records(results: Path) -> list[dict]:
    """The evaluate records of a results folder, read straight from their JSON files."""
    out = [json.loads(p.read_text()) for p in sorted(results.glob("*/record.json"))]
    return [r for r in out if r["kind"] == "evaluate"]
