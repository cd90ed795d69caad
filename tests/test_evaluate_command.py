"""`bench evaluate` and `bench export` on a model the harness trained (a tiny real `bench run` cell):
the same numbers through the outside path, L2 beside L-inf, a module:function WideResNet through
SLF, common corruptions (official files and generated), the report rows, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bench.cli import main

DATA = ["synthetic.n_train=256", "synthetic.n_test=64", "data.val_size=16"]
# An AFF cell learns the synthetic data in 24 steps (SA about 50%): a trained smoke model.
TRAIN = ["encoder.width=8", "pretrain.epochs=1", "pretrain.batch_size=32", "pretrain.steps_per_epoch=1",
         "pretrain.warmup_epochs=0", "finetune.epochs=3", "finetune.batch_size=32", "finetune.steps_per_epoch=8",
         "finetune.attack_steps=1"]
EVAL = ["eval.n=64", "eval.steps=2", "eval.val_n=16", "eval.batch_size=32", "eval.selection_steps=1",
        "eval.aa_n=8", "eval.aa_budget=0.05", "eval.sweep_n=16", "eval.sweep_eps=[2,8]", "eval.sweep_steps=[1,2]"]
RUN = ["run", "--methods", "simclr", "--finetune", "aff", "--datasets", "synthetic", *DATA, *TRAIN, *EVAL]

WRN = '''
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, i, o, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(i), nn.Conv2d(i, o, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(o), nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.short = None if (i == o and stride == 1) else nn.Conv2d(i, o, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (x if self.short is None else self.short(o))


class WideResNet(nn.Module):  # WRN-10-k, an encoder without feature_dim
    def __init__(self, k=1):
        super().__init__()
        w = [16, 16 * k, 32 * k, 64 * k]
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.blocks = nn.Sequential(Block(w[0], w[1], 1), Block(w[1], w[2], 2), Block(w[2], w[3], 2))
        self.bn = nn.BatchNorm2d(w[3])

    def forward(self, x):
        return F.relu(self.bn(self.blocks(self.conv(x)))).mean((2, 3))


def build(k=1):
    return WideResNet(k)  # random weights each call: the checkpoint job's weights are what count
'''


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def records(results: Path, kind: str) -> list[dict]:
    out = [json.loads(p.read_text()) for p in sorted(results.glob("*/record.json"))]
    return [r for r in out if r["kind"] == kind]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A results folder with one finished harness cell: simclr -> AFF -> evaluate on synthetic."""
    results = tmp_path_factory.mktemp("trained") / "results"
    res = invoke(*RUN, "--results", results)
    assert res.exit_code == 0, res.output[-3000:]
    return results


@pytest.fixture
def results(trained, tmp_path) -> Path:
    """A private copy of the trained results folder (tests add jobs to it)."""
    return Path(shutil.copytree(trained, tmp_path / "results"))


def harness(results: Path) -> tuple[dict, Path]:
    """The harness's own evaluate record and the classifier file its finetune job saved."""
    ev = next(r for r in records(results, "evaluate") if r["method"] == "simclr")
    return ev, results / ev["inputs"]["classifier"] / "classifier.pt"


@pytest.mark.slow  # the module's trained cell (~35 s), then its own bench evaluate runs
def test_a_saved_harness_classifier_gives_the_same_numbers_through_bench_evaluate(results):
    ours, classifier = harness(results)
    res = invoke("evaluate", classifier, "--format", "bench", "--name", "Mine", "--datasets", "synthetic",
                 "--results", results, *DATA, *EVAL)
    assert res.exit_code == 0, res.output[-3000:]
    outside = next(r for r in records(results, "evaluate") if r["method"] == "Mine")
    assert outside["metrics"] == ours["metrics"]  # SA, RA, AA, both sweeps, prediction share: every field
    assert outside["metrics"]["aa"] is not None and outside["metrics"]["sweeps"]["eps"]
    assert outside["finetuner"] is None and outside["config"]["eval"] == ours["config"]["eval"]
    checkpoint = next(r for r in records(results, "checkpoint"))
    assert checkpoint["metrics"]["stored"] == "classifier.pt" and checkpoint["metrics"]["format"] == "bench"
    assert outside["inputs"]["classifier"] == checkpoint["key"]
    # cached: the same command again runs nothing; the report shows the outside row beside simclr's
    again = invoke("evaluate", classifier, "--format", "bench", "--name", "Mine", "--datasets", "synthetic",
                   "--results", results, *DATA, *EVAL, "--dry-run")
    assert again.exit_code == 0 and "to run" in again.output and "0 to run" in again.output.replace("\n", " ")
    report = invoke("report", "--results", results, "--format", "md")
    assert report.exit_code == 0, report.output
    assert "Mine (outside: bench)" in report.output and "SimCLR" in report.output and "as given" in report.output


@pytest.mark.slow  # the module's trained cell (~35 s), then its own bench evaluate runs
def test_l2_is_a_second_result_and_ra_falls_with_the_l2_radius(results):
    _, classifier = harness(results)
    l2 = ["eval.norm=L2", "eval.sweep_n=64", "eval.l2_sweep_eps=[0.05,0.25,1.0,4.0]"]
    res = invoke("evaluate", classifier, "--format", "bench", "--name", "Mine", "--datasets", "synthetic",
                 "--results", results, *DATA, *EVAL, *l2)
    assert res.exit_code == 0, res.output[-3000:]
    rec = next(r for r in records(results, "evaluate") if r["method"] == "Mine")
    m = rec["metrics"]
    assert m["ra"]["protocol"]["norm"] == "L2" and m["ra"]["protocol"]["eps"] == 0.5
    assert m["aa"]["protocol"]["norm"] == "L2"  # pyautoattack's standard version with norm="L2"
    curve = [(p["protocol"]["eps"], p["value"]) for p in m["sweeps"]["eps"]]
    assert [e for e, _ in curve] == [0.05, 0.25, 1.0, 4.0]
    values = [v for _, v in curve]
    assert m["sa"]["value"] >= 0.3  # a trained model, so the curve means something
    assert all(a >= b for a, b in zip(values, values[1:])) and values[0] > values[-1], curve
    # the L-inf evaluation of the same classifier too: two results, both in the report
    res = invoke("evaluate", classifier, "--format", "bench", "--name", "Mine", "--datasets", "synthetic",
                 "--results", results, *DATA, *EVAL)
    assert res.exit_code == 0, res.output[-3000:]
    from bench.report import load_results

    loaded = load_results(results)
    key = ("Mine", "none", "synthetic", "synthetic")
    assert key in loaded.cells and key in loaded.threat_cells["L2"]
    assert loaded.cells[key].metrics["ra"].protocol["norm"] == "Linf"
    assert not any("different configurations" in n for n in loaded.notes)
    md = invoke("report", "--results", results, "--format", "md").output
    assert "L2 threat model, eps 0.5" in md
    csv_text = invoke("report", "--results", results, "--format", "csv").output
    assert ",L2" in csv_text and ",Linf" in csv_text


def test_export_writes_the_classifier_and_its_evaluations_card(results, tmp_path):
    ours, _ = harness(results)
    finetune_key = ours["inputs"]["classifier"]
    out = tmp_path / "export"
    res = invoke("export", finetune_key, "--results", results, "--out", out, "--name", "simclr-aff",
                 "--card", "authors=Someone")
    assert res.exit_code == 0, res.output
    card = json.loads((out / "simclr-aff.json").read_text())
    m = ours["metrics"]
    assert card["clean_acc"] == f"{100 * m['sa']['value']:.2f}" and card["autoattack_acc"] == f"{100 * m['aa']['value']:.2f}"
    assert card["eps"] == "8/255" and card["threat_model"] == "Linf" and card["authors"] == "Someone"
    assert card["bench"]["metrics"]["aa"]["n"] == 8 and card["bench"]["evaluate_job"] == ours["key"]
    assert card["bench"]["eval_settings"]["n"] == 64 and card["architecture"].startswith("ResNet-18")
    # a plain state dict: the harness's classifier loads it strictly and computes the same logits
    from bench.models import load_classifier

    state = torch.load(out / "simclr-aff.pt", weights_only=True)
    model = load_classifier(results / finetune_key / "classifier.pt")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model.load_state_dict(state, strict=True)
        assert torch.equal(model(x), expected)
    # the encoder of the pretrain job: a card without accuracies; a job that provides no model: exit 2
    pretrain = next(r for r in records(results, "pretrain"))
    assert invoke("export", pretrain["key"], "--results", results, "--out", out).exit_code == 0
    assert json.loads((out / f"{pretrain['key']}.json").read_text())["clean_acc"] is None
    bad = invoke("export", ours["key"], "--results", results, "--out", tmp_path / "nothing")
    assert bad.exit_code == 2 and "provides no model" in bad.output and not (tmp_path / "nothing").exists()
    missing = invoke("export", finetune_key, "--results", results, "--out", tmp_path / "nothing", "--norm", "L2")
    assert missing.exit_code == 2 and "no finished L2 evaluation" in missing.output


def test_a_module_function_wide_resnet_through_slf(results, tmp_path):
    (tmp_path / "wrn.py").write_text(WRN)
    res = invoke("evaluate", f"{tmp_path / 'wrn.py'}:build", "--format", "module", "--option", "kwargs={k = 2}",
                 "--finetune", "slf", "--name", "MyWRN", "--datasets", "synthetic", "--results", results,
                 *DATA, "finetune.epochs=1", "finetune.batch_size=32", "finetune.steps_per_epoch=2", *EVAL,
                 "eval.aa_n=0", "eval.sweep_n=0")
    assert res.exit_code == 0, res.output[-3000:]
    checkpoint = next(r for r in records(results, "checkpoint") if r["method"] == "MyWRN")
    assert checkpoint["metrics"]["stored"] == "weights.pt" and checkpoint["metrics"]["feature_dim"] == 128
    assert set(checkpoint["metrics"]["digests"]) == {"code"}  # the module's source is in the key
    finetune = next(r for r in records(results, "finetune") if r["method"] == "MyWRN")
    blob = torch.load(results / finetune["key"] / "classifier.pt", weights_only=True)
    assert blob["encoder_job"] == checkpoint["key"] and "spec" not in blob
    # SLF kept the imported encoder: the finetuned classifier's encoder holds the checkpoint job's weights
    weights = torch.load(results / checkpoint["key"] / "weights.pt", weights_only=True)
    assert all(torch.equal(blob["encoder"][k], v) for k, v in weights.items())
    evaluate = next(r for r in records(results, "evaluate") if r["method"] == "MyWRN")
    assert evaluate["finetuner"] == "slf" and evaluate["metrics"]["sa"]["n"] == 64
    md = invoke("report", "--results", results, "--format", "md").output
    assert "MyWRN (outside: module)" in md and "SimCLR" in md
    # the name now belongs to this model: another model under it would mix two models in one row
    before = sorted(p.name for p in results.iterdir())
    _, classifier = harness(results)
    clash = invoke("evaluate", classifier, "--format", "bench", "--name", "MyWRN", "--datasets", "synthetic",
                   "--results", results, *DATA)
    assert clash.exit_code == 2 and "--name MyWRN already names another model" in clash.output, clash.output
    assert sorted(p.name for p in results.iterdir()) == before


def test_generated_corruptions_through_bench_run_end_in_the_report(results):
    pytest.importorskip("imagecorruptions", reason="the generated path needs the imagecorruptions package")
    settings = ["corruptions.generated_n=4", 'corruptions.names=["fog","gaussian_noise"]',
                "corruptions.severities=[1,5]"]
    res = invoke(*RUN, "--results", results, "--stages", "corruptions", *settings)
    assert res.exit_code == 0, res.output[-3000:]
    (rec,) = records(results, "corruptions")
    assert rec["metrics"]["source"] == "generated" and "corruptions_generated" in rec["flags"]
    assert set(rec["metrics"]["cells"]) == {"fog", "gaussian_noise"} and set(rec["metrics"]["per_severity"]) == {"1", "5"}
    assert rec["metrics"]["mean"]["n"] == 16 and rec["config"]["corruption_source"]["generator"]
    out = results.parent / "report"
    report = invoke("report", "--results", results, "--out", out, "--no-tsne")
    assert report.exit_code == 0, report.output
    md = (out / "report.md").read_text()
    assert "Common corruptions: mean corruption accuracy" in md and "§" in md and "generated" in md
    assert (out / "figures" / "corruptions_by_severity_synthetic_synthetic.png").is_file()
    assert "corruption_accuracy" in (out / "report.csv").read_text()
    assert 'id="corruptions"' in (out / "report.html").read_text() and "Common corruptions" in (out / "report.tex").read_text()


def write_cifar_c(folder: Path, m: int = 4) -> dict[str, np.ndarray]:
    """Official-layout arrays: one uint8 (5 m) x 32 x 32 x 3 file per corruption and labels.npy."""
    from bench.corruptions import CORRUPTIONS

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    arrays = {c: rng.integers(0, 256, (5 * m, 32, 32, 3), dtype=np.uint8) for c in CORRUPTIONS}
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array)
    labels = rng.integers(0, 10, 5 * m).astype(np.int64)
    np.save(folder / "labels.npy", labels)
    return {**arrays, "labels": labels}


def test_official_corruption_files_through_bench_evaluate_end_in_the_report(results, tmp_path, cifar_dir):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"cifar10_{split}.npz").symlink_to(cifar_dir / f"cifar10_{split}.npz")
    arrays = write_cifar_c(data / "CIFAR-10-C")
    _, classifier = harness(results)
    res = invoke("evaluate", classifier, "--format", "bench", "--name", "Mine", "--datasets", "cifar10",
                 "--stages", "corruptions", "--results", results, "--data-dir", data, *EVAL,
                 "eval.aa_n=0", "eval.sweep_n=0", "eval.n=16")
    assert res.exit_code == 0, res.output[-3000:]
    (rec,) = records(results, "corruptions")
    m = rec["metrics"]
    assert m["source"] == "official" and not rec["flags"] and rec["config"]["corruptions"]["n"] == 4
    assert set(rec["config"]["corruption_source"]["sha256"]) == {"labels.npy", *(f"{c}.npy" for c in m["cells"])}
    # the numbers are the classifier's own predictions on those arrays
    from bench.models import load_classifier

    model = load_classifier(classifier)
    correct = 0
    for c in m["cells"]:
        x = torch.from_numpy(arrays[c]).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            hits = (model(x).argmax(1) == torch.from_numpy(arrays["labels"])).reshape(5, 4)
        correct += int(hits.sum())
        assert [m["cells"][c][str(s)]["correct"] for s in range(1, 6)] == hits.sum(1).tolist()
    assert m["mean"]["correct"] == correct and m["mean"]["n"] == 15 * 5 * 4
    out = tmp_path / "report"
    assert invoke("report", "--results", results, "--out", out, "--no-tsne").exit_code == 0
    md = (out / "report.md").read_text()
    table = md.split("### Common corruptions: mean corruption accuracy")[1].split("###")[0]
    (row,) = [line for line in table.splitlines() if line.startswith("| Mine (outside: bench)")]
    assert "official CIFAR-10-C" in table and "§" not in row and "Flagged" not in table


@pytest.mark.parametrize("case", ["format", "layout", "classes", "import", "name", "option"])
def test_bad_input_is_one_message_exit_2_and_nothing_written(trained, tmp_path, case):
    target = tmp_path / "results"
    _, classifier = harness(trained)
    args = [classifier, "--format", "bench", "--datasets", "synthetic"]
    if case == "format":
        args, message = [classifier, "--format", "bnch"], "unknown checkpoint format 'bnch'. Did you mean 'bench'?"
    elif case == "layout":
        from bench.models import ResNet18
        from bench.models.torchvision_layout import bench_to_torchvision

        state = bench_to_torchvision(ResNet18(width=4).state_dict())  # torchvision key names ...
        del state["layer3.0.conv1.weight"]                             # ... one missing, one foreign
        state["extra.weight"] = torch.zeros(3)
        path = tmp_path / "resnet.pt"
        torch.save(state, path)
        args, message = [path, "--format", "torchvision", "--finetune", "slf"], "does not fit the torchvision layout"
    elif case == "classes":
        args, message = [*args, "synthetic.num_classes=5"], "the model has 10 outputs but synthetic has 5 classes"
    elif case == "import":
        args, message = ["no_such_package_xyz.models:build", "--format", "module"], "could not import no_such_package_xyz"
    elif case == "name":
        args, message = [*args, "--name", "acl"], "is a harness method's"
    else:
        args, message = [*args, "--option", "normalise=imagenet"], "the bench format has no such option"
    res = invoke("evaluate", *args, "--results", target, *DATA)
    assert res.exit_code == 2, res.output
    assert message in res.output and res.output.count("error:") == 1, res.output
    if case == "layout":
        assert "missing keys (1): blocks.4.conv1.weight" in res.output and "unexpected keys (1): extra.weight" in res.output
    assert not target.exists()
