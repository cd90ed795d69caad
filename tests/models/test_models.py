import torch
from torch import nn

from bench.models import BranchedBatchNorm2d, Classifier, ResNet18, bn_state, export_encoder, load_encoder, save_encoder
from bench.models.norm import Normalize


def _x(n=4, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_resnet18_shape_and_width():
    enc = ResNet18(width=64)
    assert enc.feature_dim == 512
    assert sum(p.numel() for p in enc.parameters()) == 11_168_832  # CIFAR ResNet-18 without fc
    small = ResNet18(width=4)
    assert small(_x()).shape == (4, 32)


def test_single_branch_model_is_a_plain_resnet():
    enc = ResNet18(width=8)
    assert not any(isinstance(m, BranchedBatchNorm2d) for m in enc.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in enc.modules()) == 1 + 8 * 2 + 3


def test_branches_share_conv_weights_and_keep_separate_statistics():
    enc = ResNet18(width=8, branches=("normal", "pgd"))
    n_conv = sum(isinstance(m, nn.Conv2d) for m in enc.modules())
    assert n_conv == sum(isinstance(m, nn.Conv2d) for m in ResNet18(width=8).modules())
    before = bn_state(enc)
    enc.train()
    enc(_x(), branch="pgd")
    after = bn_state(enc)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".bns.pgd." in k for k in changed)
    assert any(".bns.normal." in k for k in before)


def test_branch_equals_plain_resnet_with_the_same_weights():
    torch.manual_seed(0)
    multi = ResNet18(width=8, branches=("normal", "pgd", "pgd_ce"))
    multi.train()
    for branch in multi.branches:  # give each branch distinct statistics
        multi(_x(8, seed=hash(branch) % 100), branch=branch)
    for branch in multi.branches:
        plain = export_encoder(multi, branch)
        assert plain.branches == (branch,)
        multi.eval(), plain.eval()
        assert torch.allclose(multi(_x(), branch=branch), plain(_x()), atol=1e-6)
        multi.train(), plain.train()
        assert torch.allclose(multi(_x(), branch=branch), plain(_x()), atol=1e-5)


def test_normalization_lives_inside_the_model():
    norm = Normalize("imagenet")
    x = torch.full((1, 3, 2, 2), 0.485)
    assert torch.allclose(norm(x)[0, 0], torch.zeros(2, 2), atol=1e-6)
    assert torch.equal(Normalize("none")(x), x)
    enc = ResNet18(width=4, normalize="imagenet")
    assert "mean" not in enc.state_dict()  # constants, not weights


def test_encoder_file_round_trip(tmp_path):
    enc = ResNet18(width=4, normalize="imagenet").eval()
    save_encoder(tmp_path / "e.pt", enc, {"method": "x"})
    again = load_encoder(tmp_path / "e.pt")
    assert again.normalize.kind == "imagenet"
    assert torch.equal(enc(_x()), again(_x()))


def test_classifier_zero_init_head():
    clf = Classifier(ResNet18(width=4), 10, zero_init=True)
    assert torch.count_nonzero(clf(_x())) == 0


# ---------------------------------------------------------------- stem padding, CIFAR-10 constants, specs


def test_stem_padding_2_is_the_torchvision_layout_cifar_resnet():
    plain, padded = ResNet18(width=4), ResNet18(width=4, stem_padding=2)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in padded.parameters())
    sizes = []
    padded.blocks[2].register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))  # first block of stage 2
    padded.blocks[4].register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    padded.blocks[6].register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    assert padded.forward_stem(_x(), None).shape[-1] == 34 and plain.forward_stem(_x(), None).shape[-1] == 32
    assert padded(_x()).shape == (4, 32) and sizes == [17, 9, 5]
    padded.load_state_dict(plain.state_dict())  # same keys and shapes, different function
    plain.eval(), padded.eval()
    assert not torch.allclose(plain(_x()), padded(_x()))


def test_cifar10_normalization_constants():
    norm = Normalize("cifar10")
    x = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1) + torch.tensor([0.247, 0.243, 0.261]).view(1, 3, 1, 1)
    assert torch.allclose(norm(x), torch.ones(1, 3, 1, 1), atol=1e-6)


def test_export_and_files_keep_the_encoder_options(tmp_path):
    import torch as _torch

    from bench.models import encoder_from_spec, encoder_spec

    multi = ResNet18(width=4, branches=("normal", "pgd"), normalize="cifar10", stem_padding=2)
    plain = export_encoder(multi, "pgd")
    assert (plain.stem_padding, plain.normalize.kind) == (2, "cifar10")
    save_encoder(tmp_path / "e.pt", plain.eval())
    again = load_encoder(tmp_path / "e.pt")
    assert (again.stem_padding, again.normalize.kind) == (2, "cifar10") and torch.equal(again(_x()), plain(_x()))
    assert encoder_spec(again)["stem_padding"] == 2 and encoder_from_spec(encoder_spec(again)).stem_padding == 2
    # a file written before the option existed: padding 1
    old = {"spec": {"arch": "resnet18", "width": 4, "normalize": "none", "branch": "normal"},
           "state": ResNet18(width=4).state_dict(), "meta": {}}
    _torch.save(old, tmp_path / "old.pt")
    assert load_encoder(tmp_path / "old.pt").stem_padding == 1


def test_encoder_settings_fill_the_methods_own_values():
    from bench.config import EncoderConfig, resolve
    from bench.models import encoder_from_config, encoder_options

    assert encoder_options(EncoderConfig(), "cifar10", 2) == {"normalize": "cifar10", "stem_padding": 2}
    assert encoder_options(EncoderConfig(stem_padding=1, normalize="none"), "cifar10", 2) == \
        {"normalize": "none", "stem_padding": 1}
    enc = encoder_from_config(resolve({"encoder.width": 4, "encoder.normalize": "imagenet"})["encoder"], ("normal",))
    assert (enc.width, enc.normalize.kind, enc.stem_padding) == (4, "imagenet", 1)
    from bench.errors import BenchError
    import pytest
    with pytest.raises(BenchError, match="not one of"):
        resolve({"encoder.normalize": "cifar100"})
    with pytest.raises(BenchError, match="above the maximum"):
        resolve({"encoder.stem_padding": 5})


def test_torchvision_key_mapping():
    import torchvision

    from bench.models.torchvision_layout import bench_to_torchvision, torchvision_to_bench

    ours = ResNet18(width=64).state_dict()
    theirs = torchvision.models.resnet18().state_dict()
    theirs = {k: v for k, v in theirs.items() if not k.startswith("fc.")}  # fc = Identity in solo-learn
    mapped = torchvision_to_bench(theirs)
    assert mapped.keys() == ours.keys()
    assert [k for k in ours if mapped[k].shape != ours[k].shape] == ["conv1.weight"]  # 7x7 until solo-learn's 3x3 stem
    assert bench_to_torchvision(torchvision_to_bench(theirs)).keys() == theirs.keys()
    assert torchvision_to_bench({"layer2.0.downsample.1.running_mean": 0}) == {"blocks.2.shortcut_bn.running_mean": 0}
