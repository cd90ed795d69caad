"""The checkpoint stage (outside models as jobs), the solo_learn format and DeACL's file teacher
through it, model selection in the threat model of eval.norm, the pgd attack entry's norm, and
the top-level `bench.evaluate`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from bench import config as cfgmod
from bench.errors import BenchError
from bench.grid import Graph, Planner
from bench.models import ResNet18, save_encoder
from bench.models.torchvision_layout import bench_to_torchvision
from bench.stages.base import Cell, get_stage, run_stage
from bench.store import Store

RANDOM_NET = '''
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).relu().mean((2, 3)))


def build():
    return Net()  # new random weights at every call
'''


def planner(settings: dict | None = None) -> Planner:
    return Planner(cfgmod.resolve(settings or {}, ["slf", "synthetic"]), Graph(), None)


def run(store: Store, job) -> None:
    store.write(run_stage(job, store, "cpu"))


def test_a_harness_encoder_becomes_a_plain_encoder_job_keyed_by_the_files_content(tmp_path):
    path = tmp_path / "encoder.pt"
    torch.manual_seed(0)
    original = ResNet18(width=4).eval()
    save_encoder(path, original, {"image_size": 32})
    params = {"source": str(path), "format": "bench", "want": "encoder", "name": "Mine"}
    job = planner().need("checkpoint", params, Cell(source="synthetic"))
    assert job.data == {} and job.seed == 0 and job.method == "Mine" and job.key.startswith("checkpoint-Mine-")
    store = Store(tmp_path / "results")
    run(store, job)
    record = store.read(job.key)
    assert record.metrics["stored"] == "encoder.pt" and list(record.artifacts) == ["encoder.pt"]
    loaded = get_stage("checkpoint").load(store.job(job.key), "cpu")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), original(x))
    assert loaded.meta["image_size"] == 32 and loaded.meta["outside"]
    # another file content is another job; the old job refuses the changed file
    with torch.no_grad():
        original.conv1.weight.add_(1.0)
    save_encoder(path, original, {"image_size": 32})
    assert planner().need("checkpoint", params, Cell(source="synthetic")).key != job.key
    with pytest.raises(BenchError, match="changed since job"):
        run_stage(job, Store(tmp_path / "other"), "cpu")
    with pytest.raises(BenchError, match="planned with"):
        planner().need("checkpoint", {**params, "sha256": record.metrics["digests"]["file"]}, Cell())


def test_a_foreign_model_is_stored_as_its_weights_and_rebuilt_by_its_format(tmp_path):
    (tmp_path / "net.py").write_text(RANDOM_NET)
    params = {"source": f"{tmp_path / 'net.py'}:build", "format": "module", "want": "classifier", "name": "Net"}
    job = planner().need("checkpoint", params, Cell(source="synthetic"))
    store = Store(tmp_path / "results")
    run(store, job)
    record = store.read(job.key)
    assert record.metrics["stored"] == "weights.pt" and record.metrics["num_classes"] == 10
    stage = get_stage("checkpoint")
    first, second = (stage.load(store.job(job.key), "cpu") for _ in range(2))
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(first(x), second(x))  # the stored weights, not a new random draw
    weights = torch.load(store.job(job.key) / "weights.pt", weights_only=True)
    assert all(torch.equal(first.state_dict()[k], v) for k, v in weights.items())
    assert first.meta["num_classes"] == 10 and not first.training
    # editing the module's source is a new job
    (tmp_path / "net.py").write_text(RANDOM_NET + "\n# edited\nEDITED = True\n")
    assert planner().need("checkpoint", params, Cell(source="synthetic")).key != job.key
    with pytest.raises(BenchError, match="code changed since job"):
        stage.load(store.job(job.key), "cpu")


def solo_learn_file(path, width: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A solo-learn Lightning checkpoint of a width-`width` CIFAR ResNet-18 (torchvision key names)."""
    torch.manual_seed(seed)
    backbone = ResNet18(width=width, stem_padding=2)
    backbone.train()
    with torch.no_grad():
        backbone(torch.rand(8, 3, 32, 32))  # running statistics that are not the init
    state = {f"backbone.{k}": v for k, v in bench_to_torchvision(backbone.state_dict()).items()}
    state.update({"projector.0.weight": torch.zeros(16, 8 * width), "classifier.weight": torch.zeros(10, 8 * width)})
    torch.save({"state_dict": state, "epoch": 999}, path)
    return state


def test_the_solo_learn_format_keeps_the_backbone_with_its_stem_padding(tmp_path):
    from bench.checkpoints import load_model

    path = tmp_path / "simclr.ckpt"
    state = solo_learn_file(path)
    loaded = load_model(path, "solo_learn")
    assert loaded.kind == "encoder" and loaded.model.stem_padding == 2 and loaded.normalize == "cifar10"
    assert loaded.dropped[:2] == ["classifier.*", "projector.*"] and "padding 2" in loaded.architecture
    assert torch.equal(loaded.model.state_dict()["blocks.2.shortcut_bn.running_mean"],
                       state["backbone.layer2.0.downsample.1.running_mean"])
    assert load_model(path, "solo_learn", stem_padding=1, normalize="none").model.stem_padding == 1
    with pytest.raises(BenchError, match="monitoring only"):
        load_model(path, "solo_learn", want="classifier")


@pytest.mark.slow  # a real bench run of a DeACL cell (~30 s)
def test_deacl_file_teacher_is_a_checkpoint_job_in_bench_run(tmp_path):
    from bench.cli import main
    from helpers import TINY

    path = tmp_path / "teacher.ckpt"
    state = solo_learn_file(path)
    results = tmp_path / "results"
    res = CliRunner().invoke(main, ["run", "--methods", "deacl", "--finetune", "slf", "--datasets", "synthetic",
                                    "--results", str(results), *TINY, f"deacl.teacher=file:{path}"])
    assert res.exit_code == 0, res.output[-3000:]
    recs = [json.loads(p.read_text()) for p in results.glob("*/record.json")]
    (teacher,) = [r for r in recs if r["kind"] == "checkpoint"]
    (student,) = [r for r in recs if r["kind"] == "pretrain"]
    assert student["inputs"] == {"teacher": teacher["key"]} and teacher["method"] is None
    assert teacher["metrics"]["format"] == "solo_learn" and teacher["metrics"]["stored"] == "encoder.pt"
    assert teacher["config"]["checkpoint"]["options"] == {"normalize": "cifar10", "stem_padding": 2}
    encoder = get_stage("checkpoint").load(Store(results).job(teacher["key"]), "cpu")
    assert encoder.stem_padding == 2 and encoder.normalize.kind == "cifar10"
    assert torch.equal(encoder.state_dict()["blocks.7.conv2.weight"], state["backbone.layer4.1.conv2.weight"])
    assert any(r["kind"] == "evaluate" for r in recs)


# ---------------------------------------------------------------- the threat model of model selection


def test_model_selection_follows_eval_norm():
    from bench.attacks.accuracy import clean_correct, image_batches, pgd_correct
    from bench.finetuning import finetune, selection_metrics

    settings = {"synthetic.n_train": 64, "synthetic.n_test": 16, "data.val_size": 16, "slf.epochs": 1,
                "slf.batch_size": 16, "slf.steps_per_epoch": 1, "eval.val_n": 16, "eval.selection_steps": 2,
                "eval.batch_size": 16, "eval.norm": "L2", "eval.l2_eps": 0.5, "eval.l2_alpha": 0.25}
    torch.manual_seed(0)
    result = finetune("slf", ResNet18(width=4), "synthetic", settings)
    ft = result.finetuner
    batches = image_batches(ft.ctx.selection_data, 16)
    robust = pgd_correct(ft.model, batches, eps=0.5, alpha=0.25, steps=2, seed=0, norm="L2")
    assert ft.validate() == (int(clean_correct(ft.model, batches).sum()), int(robust.sum()), 16)
    protocol = selection_metrics(result, ft.ctx.eval, "val").val_ra.protocol
    assert (protocol["norm"], protocol["eps"], protocol["alpha"]) == ("L2", 0.5, 0.25)


def test_the_finetune_key_holds_the_selection_threat_model():
    from bench.grid import expand, validate
    from bench.grid import build_request
    from helpers import TINY

    def keys(*extra):
        request = build_request(methods="simclr", finetune="slf", datasets="synthetic", overrides=TINY + list(extra))
        return {j.kind: j for j in expand(request, validate(request))}

    base, l2 = keys(), keys("eval.norm=L2")
    assert set(l2["finetune"].config["eval"]) >= {"norm", "l2_eps", "l2_alpha"} and "eps" not in l2["finetune"].config["eval"]
    assert "norm" not in base["finetune"].config["eval"]  # L-inf finetune jobs keep their keys
    assert l2["finetune"].key != base["finetune"].key and l2["pretrain"].key == base["pretrain"].key
    radius = keys("eval.l2_eps=0.25")  # an L2 radius under L-inf: the L-inf jobs' selection is untouched
    assert radius["finetune"].key == base["finetune"].key and radius["evaluate"].key != base["evaluate"].key


def test_the_pgd_attack_entry_takes_the_norm():
    from bench.attacks.accuracy import pgd_correct, tensor_batches
    from bench.registry import ATTACKS

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval()
    x, y = torch.rand(12, 3, 8, 8), torch.randint(0, 4, (12,))
    flags = ATTACKS.get("pgd")(model, x, y, eps=0.5, alpha=0.125, steps=3, norm="L2", batch_size=5)
    expected = pgd_correct(model, tensor_batches(x, y, 5), eps=0.5, alpha=0.125, steps=3, seed=0, norm="L2")
    assert torch.equal(flags, expected) and flags.dtype == torch.bool and len(flags) == 12


def test_bench_evaluate_is_top_level_and_import_bench_stays_light():
    import bench
    import bench.api

    assert bench.evaluate is bench.api.evaluate and "evaluate" in dir(bench)
    with pytest.raises(AttributeError):
        bench.no_such_thing
    out = subprocess.run([sys.executable, "-c", "import sys, bench; print('torch' in sys.modules)"],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
