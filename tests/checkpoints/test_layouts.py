"""Each official checkpoint layout, built here from stand-ins of the official model definitions
(their key names and shapes, width 64) and saved the way each official script saves it, loads
strictly onto the harness's models and computes the official forward; bad files give one clear
message naming the keys."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from bench.checkpoints import FORMATS, load_model
from bench.errors import BenchError
from bench.models import Classifier, ResNet18, save_encoder
from official_models import (KuangliuResNet18, MultiBNResNet18, PretrainEnsembleModel, randomize_batchnorm)

X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


@pytest.fixture(scope="module")
def acl_model():
    return randomize_batchnorm(MultiBNResNet18(["normal", "pgd"], normalize=True, heads="acl"), seed=1)


def test_acl_pretraining_checkpoint_keeps_the_pgd_branch(tmp_path, acl_model):
    path = tmp_path / "model.pt"
    torch.save({"epoch": 1000, "state_dict": acl_model.state_dict(), "optim": {"state": {}, "param_groups": []}}, path)
    loaded = load_model(path, "acl")
    assert loaded.kind == "encoder" and loaded.branch == "pgd" and loaded.normalize == "imagenet"
    assert loaded.model.feature_dim == 512 and not loaded.model.training
    assert any(d.startswith("fc.*") for d in loaded.dropped) and any("normal" in d for d in loaded.dropped)
    with torch.no_grad():
        assert close(loaded.model(X), acl_model.features(X, "pgd"))
        normal = load_model(path, "acl", branch="normal").model(X)
        assert close(normal, acl_model.features(X, "normal"))
        assert not close(normal, acl_model.features(X, "pgd"))  # the branches really differ
    both = load_model(path, "acl", branch="all")
    assert both.model.branches == ("normal", "pgd")
    with torch.no_grad():
        assert close(both.model(X, branch="pgd"), acl_model.features(X, "pgd"))


def test_advcl_pretraining_checkpoint(tmp_path):
    official = randomize_batchnorm(MultiBNResNet18(["normal", "pgd", "pgd_ce"], normalize=False, heads="advcl"), 2)
    path = tmp_path / "epoch_1000.ckpt"
    # DataParallel keys (module.), as pretraining_advCL.py's checkpoint() saves them
    torch.save({"model": prefixed(official.state_dict(), "module."), "epoch": 1000,
                "rng_state": torch.get_rng_state()}, path)
    loaded = load_model(path, "advcl")
    assert loaded.kind == "encoder" and loaded.branch == "pgd" and loaded.normalize == "none"
    dropped = " ".join(loaded.dropped)
    for head in ("fc_002", "fc_500", "head_ce", "head_proj", "head_pred"):
        assert head in dropped
    with torch.no_grad():
        assert close(loaded.model(X), official.features(X, "pgd"))
        assert close(load_model(path, "advcl", branch="pgd_ce").model(X), official.features(X, "pgd_ce"))


def test_advcl_slf_checkpoint_is_a_classifier(tmp_path):
    """finetuning_advCL_SLF.py: {'model': resnet_cifar ResNet18, 'classifier': LinearClassifier}; the
    model's own `linear` is never trained there and is dropped."""
    official = randomize_batchnorm(KuangliuResNet18(num_classes=10, extra="advcl"), 3)
    classifier = nn.Linear(512, 10)
    path = tmp_path / "best.ckpt"
    torch.save({"model": official.state_dict(), "classifier": prefixed(classifier.state_dict(), "fc."),
                "epoch": 20, "rng_state": torch.get_rng_state()}, path)
    loaded = load_model(path, "advcl")
    assert loaded.kind == "classifier" and loaded.num_classes == 10 and loaded.branch is None
    assert any(d.startswith("linear.*") for d in loaded.dropped)
    with torch.no_grad():
        assert close(loaded.model(X), classifier(official.features(X)))


def test_rocl_checkpoint(tmp_path):
    official = randomize_batchnorm(KuangliuResNet18(extra="rocl"), 4)
    path = tmp_path / "ckpt.t7rocl_0"
    # utils.checkpoint under DistributedDataParallel: keys under module.
    torch.save({"epoch": 999, "acc": 0.5, "model": prefixed(official.state_dict(), "module."),
                "optimizer_state": {"state": {}, "param_groups": []}, "rng_state": torch.get_rng_state()}, path)
    loaded = load_model(path, "rocl")
    assert loaded.kind == "encoder" and loaded.branch is None and loaded.normalize == "none"
    with torch.no_grad():
        assert close(loaded.model(X), official.features(X))
    with pytest.raises(BenchError, match="single BatchNorm set"):
        load_model(path, "rocl", branch="pgd")


def test_dynacl_encoder_k_and_wrapper_checkpoints(tmp_path):
    encoder_k = randomize_batchnorm(MultiBNResNet18(["normal", "pgd"], normalize=True, heads="acl"), 5)
    encoder_q = randomize_batchnorm(MultiBNResNet18(["normal", "pgd"], normalize=True, heads="acl"), 6)
    single = tmp_path / "model_encoder_k.pt"
    torch.save({"epoch": 1000, "state_dict": encoder_k.state_dict()}, single)
    wrapper = tmp_path / "model_encoder_k_1000.pt"  # the whole resnet18_momentum (dynacl.md §7)
    torch.save({"epoch": 1000, "state_dict": {**prefixed(encoder_q.state_dict(), "encoder_q."),
                                              **prefixed(encoder_k.state_dict(), "encoder_k.")}}, wrapper)
    for path in (single, wrapper):
        loaded = load_model(path, "dynacl")
        assert loaded.branch == "pgd" and loaded.kind == "encoder"
        with torch.no_grad():
            assert close(loaded.model(X), encoder_k.features(X, "pgd"))
    assert any("encoder_q" in d for d in load_model(wrapper, "dynacl").dropped)


def test_apdpe_ensemble_checkpoint(tmp_path):
    official = randomize_batchnorm(PretrainEnsembleModel(), 7)
    path = tmp_path / "ata_best_model.pt"
    torch.save({"epoch": 150, "selfie_state": {"fake": torch.zeros(1)}, "state_dict": official.state_dict(),
                "best_prec1": 1.0}, path)
    x = X[:1]
    for task, dim in (("rotation", 2048), ("jigsaw", 2048), ("selfie", 1024)):
        loaded = load_model(path, "apdpe", branch=None if task == "rotation" else task)
        assert loaded.branch == task and loaded.model.feature_dim == dim and loaded.normalize == "imagenet"
        with torch.no_grad():
            assert close(loaded.model(x), official.features(x, task))
    with pytest.raises(BenchError, match="no AP-DPE branch"):
        load_model(path, "apdpe", branch="pgd")


def test_apdpe_layout_refuses_a_plain_resnet(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save(ResNet18(width=4).state_dict(), path)
    with pytest.raises(BenchError, match="not AP-DPE's ensemble checkpoint|does not fit the apdpe layout"):
        load_model(path, "apdpe")


def test_torchvision_cifar_stem_becomes_the_harness_resnet(tmp_path):
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    randomize_batchnorm(net, 8)
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    loaded = load_model(path, "torchvision")
    assert loaded.kind == "classifier" and isinstance(loaded.model, Classifier)
    assert isinstance(loaded.model.encoder, ResNet18) and loaded.num_classes == 10
    with torch.no_grad():
        assert close(loaded.model(X), net(X))
    encoder = load_model(path, "torchvision", want="encoder")
    assert encoder.kind == "encoder" and encoder.model.feature_dim == 512


def test_torchvision_imagenet_stem_builds_torchvision_resnet(tmp_path):
    net = randomize_batchnorm(torchvision.models.resnet18(num_classes=7), 9)
    path = tmp_path / "imagenet_resnet18.pth"
    torch.save({"state_dict": net.state_dict()}, path)
    loaded = load_model(path, "torchvision")
    assert loaded.kind == "classifier" and loaded.num_classes == 7 and "ImageNet 7x7" in loaded.architecture
    with torch.no_grad():
        assert close(loaded.model(X), net(X))
    encoder = load_model(path, "torchvision", want="encoder", normalize="imagenet")
    assert encoder.model.feature_dim == 512 and encoder.normalize == "imagenet"


def test_acl_finetuned_classifier_loads_through_the_acl_layout(tmp_path):
    """train_trades.py's models/resnet.py: single BN, downsample.0/1, normalize buffers, a linear fc."""
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    randomize_batchnorm(net, 10)
    state = {**net.state_dict(), "normalize.mean": torch.tensor([0.485, 0.456, 0.406]),
             "normalize.std": torch.tensor([0.229, 0.224, 0.225])}
    path = tmp_path / "model_bestAT.pt"
    torch.save({"epoch": 25, "state_dict": state, "optim": {}}, path)
    loaded = load_model(path, "acl")
    assert loaded.kind == "classifier" and loaded.normalize == "imagenet"
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    with torch.no_grad():
        assert close(loaded.model(X), net((X - mean) / std))


def test_bench_files_round_trip(tmp_path):
    from bench.models import save_classifier

    encoder = randomize_batchnorm(ResNet18(width=4, normalize="imagenet"), 11)
    save_encoder(tmp_path / "encoder.pt", encoder)
    loaded = load_model(tmp_path / "encoder.pt", "bench")
    assert loaded.kind == "encoder" and loaded.branch == "normal"
    with torch.no_grad():
        assert torch.equal(loaded.model(X), encoder(X))
    model = Classifier(encoder, 3).eval()
    save_classifier(tmp_path / "classifier.pt", model, classes=["a", "b", "c"], image_size=32)
    loaded = load_model(tmp_path / "classifier.pt", "bench")
    assert loaded.kind == "classifier" and loaded.num_classes == 3
    with torch.no_grad():
        assert torch.equal(loaded.model(X), model(X))


# ---------------------------------------------------------------- bad input


def test_unknown_format_names_the_formats():
    with pytest.raises(BenchError, match=r"unknown checkpoint format 'acll'.*Did you mean 'acl'"):
        load_model("x.pt", "acll")


def test_a_checkpoint_that_does_not_fit_lists_missing_and_unexpected_keys(tmp_path, acl_model):
    state = dict(acl_model.state_dict())
    del state["layer3.1.conv2.weight"]
    state["layer3.1.extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(BenchError) as info:
        load_model(path, "acl")
    message = str(info.value)
    assert "does not fit the acl layout" in message
    assert "missing keys (1): blocks.5.conv2.weight" in message
    assert "unexpected keys (1): layer3.1.extra.weight" in message


def test_a_family_checkpoint_under_another_format_is_refused(tmp_path, acl_model):
    path = tmp_path / "acl.pt"
    torch.save({"state_dict": acl_model.state_dict()}, path)
    with pytest.raises(BenchError, match=r"does not fit the rocl layout.*unexpected keys \(\d+\): bn1\.bn_list\.0"):
        load_model(path, "rocl")  # RoCL's layout has plain BatchNorms, shortcut.0/1 and no `fc` head


def test_shape_mismatch_and_missing_branch_are_named(tmp_path, acl_model):
    state = dict(acl_model.state_dict())
    state["layer1.0.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "shape.pt"
    torch.save(state, path)
    with pytest.raises(BenchError, match=r"shape mismatches \(1\): blocks.0.conv2.weight: checkpoint \(64, 64, 1, 1\)"):
        load_model(path, "acl")
    ok = tmp_path / "ok.pt"
    torch.save(acl_model.state_dict(), ok)
    with pytest.raises(BenchError, match=r"no BatchNorm branch 'adv'.*normal \(bn_list.0\), pgd \(bn_list.1\)"):
        load_model(ok, "acl", branch="adv")


def test_architectures_the_harness_resnet_cannot_express_are_explained(tmp_path):
    bottleneck = tmp_path / "r50.pt"
    r50 = torchvision.models.resnet50(num_classes=10)
    r50.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # a CIFAR ResNet-50
    torch.save(r50.state_dict(), bottleneck)
    with pytest.raises(BenchError, match="Bottleneck block"):
        load_model(bottleneck, "rocl")
    imagenet = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), imagenet)
    with pytest.raises(BenchError, match="7x7 ImageNet stem loads with the `torchvision`"):
        load_model(imagenet, "acl")


def test_a_pickled_object_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(ResNet18(width=4), path)  # a pickled module, not a state dict
    with pytest.raises(BenchError, match="pickled Python objects"):
        load_model(path, "torchvision")


def test_wrong_kind_and_missing_files(tmp_path, acl_model):
    path = tmp_path / "model.pt"
    torch.save({"state_dict": acl_model.state_dict()}, path)
    with pytest.raises(BenchError, match="no linear classification head"):
        load_model(path, "acl", want="classifier")
    with pytest.raises(BenchError, match="no checkpoint at"):
        load_model(tmp_path / "absent.pt", "acl")
    with pytest.raises(BenchError, match="want="):
        load_model(path, "acl", want="features")


def test_every_format_is_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "outside-models.md").read_text()
    for name in FORMATS:
        assert f"`{name}`" in doc, name
