"""Frequency views (docs/methods.md §1, AdvCL eq. 8): high/low-frequency components of an image.

Per image and per channel: centered 2-D FFT (fftshift of fft2 over H, W), keep the bins outside
(HFC) or inside (LFC) a centered disc of radius r, inverse (ifftshift, ifft2), real part. No
clipping: the HFC is zero-mean and may be negative. HFC + LFC = x exactly up to float error.
"""

from __future__ import annotations

import torch

__all__ = ["frequency_mask", "hfc", "lfc"]


def frequency_mask(h: int, w: int, r: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool (h, w) disc: mask[i, j] = sqrt((i - h/2)^2 + (j - w/2)^2) < r (strict).

    Squared distances are compared in float64 so points exactly on the circle are excluded
    reliably (e.g. (h/2 + 8, w/2) for r = 8).
    """
    i = torch.arange(h, dtype=torch.float64, device=device)[:, None] - h / 2
    j = torch.arange(w, dtype=torch.float64, device=device)[None, :] - w / 2
    return i * i + j * j < float(r) ** 2


def _band(x: torch.Tensor, r: float, high: bool) -> torch.Tensor:
    if x.dim() < 2:
        raise ValueError(f"frequency views need (..., H, W) images, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    keep = frequency_mask(h, w, r, device=x.device)
    if high:
        keep = ~keep
    # Half precision FFTs are restricted (powers of two, CUDA only): work in float32 at least.
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    spec = torch.fft.fftshift(torch.fft.fft2(work, dim=(-2, -1)), dim=(-2, -1))
    spec = spec * keep.to(work.dtype)
    out = torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1)), dim=(-2, -1)).real
    return out.to(x.dtype)


def hfc(x: torch.Tensor, r: float = 8) -> torch.Tensor:
    """High-frequency component of (N, C, H, W) images: spectrum outside the radius-r disc."""
    return _band(x, r, high=True)


def lfc(x: torch.Tensor, r: float = 8) -> torch.Tensor:
    """Low-frequency component of (N, C, H, W) images: spectrum inside the radius-r disc."""
    return _band(x, r, high=False)
