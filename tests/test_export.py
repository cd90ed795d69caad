"""Export: a plain state dict and a RobustBench-style model card that load without bench."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from bench.export import eps_text, export_model
from bench.models import Classifier, ResNet18
from bench.record import Metric

# The model a user writes without bench: the harness's ResNet names (the card's state_dict_layout).
PLAIN_MODEL = '''
import torch, torch.nn as nn, torch.nn.functional as F
class Block(nn.Module):
    def __init__(s, i, o, stride):
        super().__init__()
        s.conv1, s.bn1 = nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o)
        s.conv2, s.bn2 = nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o)
        s.short = stride != 1 or i != o
        if s.short:
            s.shortcut_conv, s.shortcut_bn = nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o)
    def forward(s, x):
        out = s.bn2(s.conv2(F.relu(s.bn1(s.conv1(x)))))
        return F.relu(out + (s.shortcut_bn(s.shortcut_conv(x)) if s.short else x))
class Net(nn.Module):
    def __init__(s, w, classes, mean, std):
        super().__init__()
        s.mean, s.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        s.encoder = nn.Module()
        s.encoder.conv1, s.encoder.bn1 = nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w)
        widths = [w, w, 2 * w, 2 * w, 4 * w, 4 * w, 8 * w, 8 * w]
        s.encoder.blocks = nn.ModuleList(Block(a, b, 2 if b != a else 1) for a, b in zip([w] + widths[:-1], widths))
        s.head = nn.Linear(8 * w, classes)
    def forward(s, x):
        out = F.relu(s.encoder.bn1(s.encoder.conv1((x - s.mean) / s.std)))
        for block in s.encoder.blocks:
            out = block(out)
        return s.head(out.mean((2, 3)))
'''


def metrics():
    sa = Metric.from_counts(912, 1000, {"attack": None, "n": 1000})
    aa = Metric.from_counts(480, 1000, {"attack": "autoattack", "norm": "Linf", "eps": 8 / 255, "n": 1000})
    return {"sa": sa, "ra": None, "aa": aa}


def test_export_writes_a_plain_state_dict_and_a_robustbench_card(tmp_path):
    torch.manual_seed(0)
    model = Classifier(ResNet18(width=4, normalize="imagenet"), 10).eval()
    weights, card_path = export_model(model, tmp_path, name="MyACL", metrics=metrics(), dataset="cifar10",
                                      architecture="ResNet-18", card={"authors": "Someone", "venue": "bench"})
    card = json.loads(card_path.read_text())
    for field in ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                  "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote"):
        assert field in card
    assert (card["name"], card["dataset"], card["eps"], card["clean_acc"], card["autoattack_acc"]) == \
        ("MyACL", "cifar10", "8/255", "91.20", "48.00")
    assert card["threat_model"] == "Linf" and card["bench"]["metrics"]["aa"]["n"] == 1000
    assert card["bench"]["normalization"]["kind"] == "imagenet" and card["bench"]["num_classes"] == 10
    state = torch.load(weights, weights_only=True)  # tensors only: no bench class is unpickled
    assert set(state) == set(model.state_dict())

    # A fresh interpreter where bench cannot be imported, with the 20-line definition above.
    x = torch.rand(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model(x)
    script = f'''
import sys
sys.modules["bench"] = None  # any import of bench now fails
sys.modules["methods"] = None
{PLAIN_MODEL}
import json
card = json.load(open({str(card_path)!r}))
norm = card["bench"]["normalization"]
net = Net(4, card["bench"]["num_classes"], norm["mean"], norm["std"])
net.load_state_dict(torch.load({str(weights)!r}, weights_only=True), strict=True)
out = net.eval()(torch.load({str(tmp_path / "x.pt")!r}, weights_only=True))
torch.save(out, {str(tmp_path / "out.pt")!r})
'''
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert torch.allclose(torch.load(tmp_path / "out.pt", weights_only=True), expected, atol=1e-5)


def test_eps_is_written_the_robustbench_way():
    assert eps_text(8 / 255, "Linf") == "8/255" and eps_text(4 / 255, "Linf") == "4/255"
    assert eps_text(0.5, "L2") == "0.5" and eps_text(0.031, "Linf") == "0.031"


def test_an_export_without_autoattack_says_so(tmp_path):
    model = ResNet18(width=4)
    _, card_path = export_model(model, tmp_path, name="enc")
    card = json.loads(card_path.read_text())
    assert card["autoattack_acc"] is None and "AutoAttack was not run" in card["footnote"]
    assert card["bench"]["kind"] == "encoder" and card["bench"]["feature_dim"] == 32


def test_export_file_reads_any_format_and_records_where_it_came_from(tmp_path):
    from bench.models import save_classifier

    model = Classifier(ResNet18(width=4), 3).eval()
    save_classifier(tmp_path / "classifier.pt", model, classes=["a", "b", "c"], image_size=32)
    from bench.export import export_file

    weights, card_path = export_file(tmp_path / "classifier.pt", tmp_path / "out", name="Ours", metrics=metrics(),
                                     dataset="cifar10")
    card = json.loads(card_path.read_text())
    assert card["bench"]["exported_from"]["format"] == "bench" and card["bench"]["num_classes"] == 3
    assert card["architecture"].startswith("resnet18")
    assert set(torch.load(weights, weights_only=True)) == set(model.state_dict())
