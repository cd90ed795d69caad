import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF

from bench.augment import (ACL_VIEW, ROCL_VIEW, SIMCLR_VIEW, WEAK_VIEW, ViewRecipe, color_jitter,
                           color_jitter_params, horizontal_flip, make_view, pad_crop, random_grayscale,
                           random_resized_crop, resize, resized_crop_params)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
RECIPES = [SIMCLR_VIEW, ACL_VIEW, ROCL_VIEW, WEAK_VIEW]


def gen(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def images(n=8, size=32, seed=0, device="cpu", dtype=torch.float32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=gen(seed)).to(device=device, dtype=dtype)


def distinct(x: torch.Tensor) -> int:
    return len({tuple(v.tolist()) for v in x.flatten(1).round(decimals=5)})


ALL_OPS = {
    "rrc": lambda x, g: random_resized_crop(x, 32, generator=g),
    "rrc_bicubic": lambda x, g: random_resized_crop(x, 32, (0.1, 1.0), interpolation="bicubic", generator=g),
    "flip": lambda x, g: horizontal_flip(x, generator=g),
    "jitter": lambda x, g: color_jitter(x, generator=g),
    "gray": lambda x, g: random_grayscale(x, generator=g),
    "pad_crop": lambda x, g: pad_crop(x, 4, generator=g),
    **{f"view_{i}": (lambda r: lambda x, g: make_view(x, r, generator=g))(r) for i, r in enumerate(RECIPES)},
}


# -- shapes, range, device, dtype, reproducibility


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(ALL_OPS))
def test_shape_range_device_dtype(name, dtype, device):
    x = images(16, device=device, dtype=dtype)
    y = ALL_OPS[name](x, gen(1, device))
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert y.min() >= 0 and y.max() <= 1


@pytest.mark.parametrize("name", sorted(ALL_OPS))
def test_seeded_generator_reproduces(name):
    x = images(16)
    a, b = ALL_OPS[name](x, gen(5)), ALL_OPS[name](x, gen(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, ALL_OPS[name](x, gen(6)))


def test_global_rng_when_no_generator():
    x = images(8)
    torch.manual_seed(3)
    a = make_view(x, SIMCLR_VIEW)
    torch.manual_seed(3)
    assert torch.equal(a, make_view(x, SIMCLR_VIEW))


@pytest.mark.parametrize("name", ["rrc", "rrc_bicubic", "jitter", "pad_crop", "view_0", "view_1", "view_2", "view_3"])
def test_per_sample_randomness(name):
    # One image repeated: every copy must get its own random parameters.
    x = images(1).expand(32, -1, -1, -1).contiguous()
    assert distinct(ALL_OPS[name](x, gen(0))) >= 20


def test_per_sample_coin_flips():
    x = images(1).expand(400, -1, -1, -1).contiguous()
    flipped = (horizontal_flip(x, 0.5, gen(0)) != x).flatten(1).any(1).float().mean()
    gray = (random_grayscale(x, 0.2, gen(0)) != x).flatten(1).any(1).float().mean()
    jit = (color_jitter(x, p=0.8, generator=gen(0)) != x).flatten(1).any(1).float().mean()
    assert 0.4 < flipped < 0.6 and 0.13 < gray < 0.27 and 0.72 < jit < 0.88


# -- exact behaviour of each op


def test_flip():
    x = images(8)
    assert torch.equal(horizontal_flip(x, 1.0, gen(0)), torch.flip(x, [3]))
    assert torch.equal(horizontal_flip(x, 0.0, gen(0)), x)


def test_pad_crop_windows():
    x = images(64)
    assert torch.equal(pad_crop(x, 0, gen(0)), x)
    y = pad_crop(x, 4, gen(0))
    padded = F.pad(x, (4, 4, 4, 4))
    windows = padded.unfold(2, 32, 1).unfold(3, 32, 1)  # (N, C, 9, 9, 32, 32)
    offsets = set()
    for n in range(len(x)):
        match = (windows[n] == y[n][:, None, None]).flatten(-2).all(-1).all(0).nonzero()
        assert len(match) >= 1, f"sample {n} is not a window of the padded image"
        offsets.add(tuple(match[0].tolist()))
    assert len(offsets) > 30  # offsets are drawn per sample


def test_pad_crop_offsets_cover_full_range():
    # One-hot images: the output position of the hot pixel gives the offset.
    n = 4000
    x = torch.zeros(n, 3, 32, 32)
    x[:, :, 10, 10] = 1
    pos = pad_crop(x, 4, gen(0))[:, 0].flatten(1).argmax(1)
    dy, dx = 10 - pos // 32 + 4, 10 - pos % 32 + 4
    for d in (dy, dx):
        counts = torch.bincount(d, minlength=9)
        assert len(counts) == 9 and counts.min() > n / 9 * 0.75  # randint(0, 2p + 1), uniform


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_full_square_crop_is_identity(interpolation):
    x = images(8)
    y = random_resized_crop(x, 32, (1.0, 1.0), (1.0, 1.0), interpolation, gen(0))
    assert torch.allclose(y, x, atol=1e-5)


def test_resized_crop_matches_torchvision_bilinear():
    x = images(32)
    top, left, h, w = resized_crop_params(32, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), gen(0))
    y = random_resized_crop(x, 32, (0.08, 1.0), generator=gen(0))
    ref = torch.stack([TF.resized_crop(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [32, 32],
                                       T.InterpolationMode.BILINEAR, antialias=True) for i in range(32)])
    assert torch.allclose(y, ref, atol=1e-5)


def test_resized_crop_other_output_size():
    x = images(4, size=48)
    assert random_resized_crop(x, (24, 16), generator=gen(0)).shape == (4, 3, 24, 16)


def test_grayscale():
    x = images(8)
    y = random_grayscale(x, 1.0, gen(0))
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    assert torch.allclose(y[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2], atol=1e-6)
    assert torch.equal(random_grayscale(x, 0.0, gen(0)), x)


def test_jitter_zero_strength_is_identity():
    x = images(8)
    assert torch.equal(color_jitter(x, 0, 0, 0, 0, p=1.0, generator=gen(0)), x)
    assert torch.equal(color_jitter(x, p=0.0, generator=gen(0)), x)


def test_jitter_matches_torchvision_ops():
    # Same per-sample factors and order, applied image by image with torchvision's functions.
    x = images(64, size=16)
    x[0] = 0.5  # gray image
    x[1, :, :4] = x[1, 0, :4]  # gray pixels
    args = (0.4, 0.4, 0.4, 0.5, 0.8)
    y = color_jitter(x, *args, generator=gen(3))
    factors, order, apply = color_jitter_params(64, *args, generator=gen(3))
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(64):
        ref = x[i]
        if apply[i]:
            for op in order[i].tolist():
                ref = fns[op](ref, float(factors[i, op]))
        # torchvision's grayscale weight 0.2989 vs our 0.299: differences ~1e-4
        assert torch.allclose(y[i], ref, atol=1e-3), i


# -- parameter distributions against torchvision


@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.2, 1.0), (3 / 4, 4 / 3)),
                                         ((0.5, 1.0), (1 / 4, 4.0))])
def test_resized_crop_params_match_torchvision(scale, ratio):
    torch.manual_seed(0)
    img = torch.zeros(3, 32, 32)
    ref = torch.tensor([T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(3000)]).double()
    ours = torch.stack(resized_crop_params(20000, 32, 32, scale, ratio, gen(0)), 1).double()
    for params in (ref, ours):
        top, left, h, w = params.unbind(1)
        assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
        assert (top + h <= 32).all() and (left + w <= 32).all()

    def stats(p):
        top, left, h, w = p.unbind(1)
        area, aspect = h * w / 1024, w / h
        rel_top = top / (32 - h + 1)  # position within the free range, U[0, 1) for both
        return [area.mean(), area.std(), aspect.mean(), aspect.std(), rel_top.mean(), (h == 32).double().mean()]

    for name, a, b in zip(["area mean", "area std", "aspect mean", "aspect std", "top", "full height"],
                          stats(ours), stats(ref)):
        assert abs(a - b) < 0.015 + 0.02 * abs(b), (name, float(a), float(b))  # ~3 sigma at n = 3000


def test_resized_crop_fallback():
    # No try can be valid: ratio far outside what fits, so every sample takes the center fallback.
    top, left, h, w = resized_crop_params(100, 32, 32, (0.9, 1.0), (8.0, 9.0), gen(0))
    ref = T.RandomResizedCrop.get_params(torch.zeros(3, 32, 32), [0.9, 1.0], [8.0, 9.0])
    assert (top == ref[0]).all() and (left == ref[1]).all() and (h == ref[2]).all() and (w == ref[3]).all()


def test_jitter_param_distribution():
    n = 20000
    factors, order, apply = color_jitter_params(n, 0.4, 0.3, 0.6, 0.1, 0.8, gen(0))
    for i, (lo, hi) in enumerate([(0.6, 1.4), (0.7, 1.3), (0.4, 1.6), (-0.1, 0.1)]):
        f = factors[:, i]
        assert f.min() >= lo and f.max() <= hi
        assert abs(f.mean() - (lo + hi) / 2) < 0.01 and abs(f.std() - (hi - lo) / 12 ** 0.5) < 0.01
    assert color_jitter_params(10, 1.5, 0, 0, 0, generator=gen(0))[0][:, 0].min() >= 0  # max(0, 1 - b)
    assert (order.sort(1).values == torch.arange(4)).all()  # permutations
    position_freq = torch.stack([(order == op).double().mean(0) for op in range(4)])
    assert (position_freq - 0.25).abs().max() < 0.02  # each op equally likely at each position
    assert abs(apply.double().mean() - 0.8) < 0.01


# -- resize and recipes


def test_resize_stl_to_cifar():
    x = images(4, size=96)
    y = resize(x, 32)
    assert y.shape == (4, 3, 32, 32)
    ref = torch.stack([TF.resize(v, [32, 32], antialias=True) for v in x])
    assert torch.allclose(y, ref, atol=1e-5)


def test_recipes():
    assert SIMCLR_VIEW == ViewRecipe(crop_scale=(0.2, 1.0), crop_interpolation="bilinear", flip=True,
                                     jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2, pad_crop=0)
    assert ACL_VIEW.crop_scale == (0.1, 1.0) and ACL_VIEW.crop_interpolation == "bicubic"
    assert ROCL_VIEW.crop_scale == (0.08, 1.0) and ROCL_VIEW.jitter == SIMCLR_VIEW.jitter
    assert WEAK_VIEW.crop_scale is None and WEAK_VIEW.pad_crop == 4 and WEAK_VIEW.flip
    assert WEAK_VIEW.jitter is None and WEAK_VIEW.grayscale_p == 0
    assert hash(SIMCLR_VIEW) != hash(ACL_VIEW)
    with pytest.raises(dataclasses.FrozenInstanceError):
        SIMCLR_VIEW.flip = False
    assert ViewRecipe(crop_scale=[0.2, 1], jitter=[0.4, 0.4, 0.4, 0.1]) == SIMCLR_VIEW  # lists from a config
    with pytest.raises(ValueError):
        ViewRecipe(crop_scale=(0.2, 1.0), pad_crop=4)
    with pytest.raises(ValueError):
        ViewRecipe(crop_interpolation="nearest")


def test_rocl_view_runs_jitter_grayscale_flip_then_crop():
    """RoCL's official data_loader.py: RandomApply(ColorJitter) -> RandomGrayscale -> flip -> RandomResizedCrop(32)."""
    assert ROCL_VIEW.order == ("jitter", "grayscale", "flip", "crop")
    assert SIMCLR_VIEW.order == ACL_VIEW.order == WEAK_VIEW.order == ("crop", "flip", "jitter", "grayscale")
    x = images(16)
    x[:, :, :, :16] = 0.0  # half black: the contrast jitter blends with the mean of what it sees
    x[:, :, :, 16:] = torch.maximum(x[:, :, :, 16:], torch.tensor(0.7))

    def official(g):
        v = color_jitter(x, 0.4, 0.4, 0.4, 0.1, p=0.8, generator=g)
        v = random_grayscale(v, 0.2, generator=g)
        v = horizontal_flip(v, 0.5, generator=g)
        return random_resized_crop(v, 32, (0.08, 1.0), generator=g)

    def crop_first(g):
        v = random_resized_crop(x, 32, (0.08, 1.0), generator=g)
        v = horizontal_flip(v, 0.5, generator=g)
        v = color_jitter(v, 0.4, 0.4, 0.4, 0.1, p=0.8, generator=g)
        return random_grayscale(v, 0.2, generator=g)

    view = make_view(x, ROCL_VIEW, gen(3))
    assert torch.allclose(view, official(gen(3)), atol=1e-6)
    assert not torch.allclose(view, crop_first(gen(3)), atol=1e-3)
    assert torch.allclose(make_view(x, dataclasses.replace(ROCL_VIEW, order=("crop", "flip", "jitter", "grayscale")),
                                    gen(3)), crop_first(gen(3)), atol=1e-6)
    with pytest.raises(ValueError, match="order must list each of"):
        ViewRecipe(order=("crop", "flip", "jitter"))


def test_weak_view_keeps_colors_and_is_a_shifted_window():
    x = images(16)
    y = make_view(x, WEAK_VIEW, gen(0))
    padded = F.pad(x, (4, 4, 4, 4))
    for n in range(16):
        windows = padded[n].unfold(1, 32, 1).unfold(2, 32, 1)  # (C, 9, 9, 32, 32)
        cands = torch.cat([windows, windows.flip(-1)], 1)
        assert (cands == y[n][:, None, None]).flatten(-2).all(-1).all(0).any()


def test_make_view_order_matches_components():
    # make_view = the component ops in torchvision order, drawing from one generator in sequence.
    x = images(16)
    g = gen(9)
    ref = random_resized_crop(x, 32, (0.1, 1.0), interpolation="bicubic", generator=g)
    ref = horizontal_flip(ref, 0.5, g)
    ref = color_jitter(ref, 0.4, 0.4, 0.4, 0.1, p=0.8, generator=g)
    ref = random_grayscale(ref, 0.2, g)
    assert torch.equal(make_view(x, ACL_VIEW, gen(9)), ref)
