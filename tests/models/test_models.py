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
