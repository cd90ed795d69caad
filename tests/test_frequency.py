import pytest
import torch

from bench.frequency import frequency_mask, hfc, lfc

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def ref_input() -> torch.Tensor:
    return (torch.arange(6144).reshape(2, 3, 32, 32) % 7).float() / 6


@pytest.mark.parametrize("r,count", [(0, 0), (1, 1), (2, 9), (4, 45), (8, 193), (16, 793), (23, 1024)])
def test_mask_counts(r, count):
    mask = frequency_mask(32, 32, r)
    assert mask.dtype == torch.bool and mask.shape == (32, 32)
    assert int(mask.sum()) == count


def test_mask_is_strict_and_centered():
    mask = frequency_mask(32, 32, 8)
    assert mask[16, 16] and mask[16 + 7, 16] and mask[16, 16 - 7]
    assert not mask[16 + 8, 16] and not mask[16, 16 - 8]  # distance exactly r is outside
    odd = frequency_mask(5, 7, 1.5)
    assert odd.shape == (5, 7) and int(odd.sum()) == 4  # centers at (2.5, 3.5): four bins at distance 0.71


def test_reference_vector():
    h = hfc(ref_input(), r=8)
    expect = torch.tensor([-0.436295, -0.279871, -0.077204, 0.101147])
    assert torch.allclose(h[0, 0, 0, :4], expect, atol=2e-6)
    assert h.abs().sum().item() == pytest.approx(1758.2017, rel=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_invariants(device):
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    assert torch.allclose(hfc(x) + lfc(x), x, atol=1e-6)
    assert torch.allclose(hfc(x, r=0), x, atol=1e-6) and lfc(x, r=0).abs().max() < 1e-6
    assert hfc(x, r=23).abs().max() < 1e-6  # every bin inside the disc
    const = torch.full((2, 3, 32, 32), 0.37, device=device)
    assert hfc(const).abs().max() < 1e-6
    assert torch.allclose(lfc(const), const, atol=1e-6)
    h = hfc(x)
    assert (h < 0).any(), "no clipping: HFC values may be negative"
    assert h.mean(dim=(2, 3)).abs().max() < 1e-6  # DC removed: zero mean per image and channel
    assert h.device == x.device and h.dtype == x.dtype and h.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtype_preserved(dtype):
    x = ref_input().to(dtype)
    h, low = hfc(x), lfc(x)
    assert h.dtype == dtype and low.dtype == dtype
    assert torch.allclose(h.float(), hfc(ref_input()), atol=0.05)


def test_non_square_and_unbatched_shapes():
    x = torch.rand(2, 3, 24, 40)
    assert torch.allclose(hfc(x, 5) + lfc(x, 5), x, atol=1e-6)
    assert torch.allclose(hfc(x[0]), hfc(x)[0], atol=1e-6)  # (C, H, W) works too: FFT is over the last two dims
