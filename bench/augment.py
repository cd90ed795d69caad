"""Batched, on-device view transforms with per-sample randomness (DESIGN.md "augment").

Every transform takes float NCHW images in [0, 1] and processes the whole batch at once, each
sample drawing its own parameters, with the distributions of the torchvision transform of the
same name (torchvision applies a transform per image, so per-sample randomness is the faithful
batched equivalent). All randomness comes from `generator` (None: torch's global RNG for the
input's device), so a seeded generator reproduces a view exactly. No op synchronizes with the
host (no .item(), no data-dependent shapes), so it runs fully asynchronously on a GPU.

Differences from torchvision, all deliberate and small:
- grayscale weights are (0.299, 0.587, 0.114) (PIL's and kornia's; torchvision's tensor path
  uses 0.2989), so a white image stays exactly 1;
- resized crop samples each crop box with one batched `grid_sample` (align_corners=False, sample
  points clamped into the box): bilinear equals torchvision's crop + resize when upsampling (all
  32x32 CIFAR views); bicubic (PyTorch's a = -0.75 kernel) differs slightly at the box edges
  (coordinate vs tap clamping) and from PIL's a = -0.5 kernel used by ACL's PIL pipeline;
  no antialiasing when a crop is larger than the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "ACL_VIEW", "ROCL_ORDER", "ROCL_VIEW", "SIMCLR_VIEW", "VIEW_OPS", "WEAK_VIEW", "ViewRecipe", "color_jitter",
    "color_jitter_params", "grayscale", "horizontal_flip", "make_view", "pad_crop", "random_grayscale", "random_resized_crop",
    "resize", "resized_crop_params",
]

GRAY_WEIGHTS = (0.299, 0.587, 0.114)

Size = int | tuple[int, int]


def _pair(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _rand(n: int, generator: torch.Generator | None, device: torch.device, *extra: int) -> torch.Tensor:
    return torch.rand(n, *extra, generator=generator, device=device)


def _per_sample(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, 1, 1, 1)


# -- geometry


def resized_crop_params(n: int, h: int, w: int, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), generator: torch.Generator | None = None,
                        device: torch.device | str | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, height, width) int64 tensors of shape (n,), like RandomResizedCrop.get_params.

    The 10 tries of torchvision are drawn at once for every sample; each sample keeps its first
    valid try, or torchvision's fallback (center crop, ratio clamped) when none is valid.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    tries = 10
    area = float(h * w)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    u = _rand(n, generator, device, tries, 4).double()  # area, log-ratio, top, left per try
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    cw = torch.round(torch.sqrt(target * aspect))  # round half to even, like Python's round
    ch = torch.round(torch.sqrt(target / aspect))
    valid = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = valid.to(torch.int8).argmax(dim=1, keepdim=True)  # index of the first valid try
    cw, ch, ut, ul = (t.gather(1, first).squeeze(1) for t in (cw, ch, u[..., 2], u[..., 3]))
    top = torch.floor(ut * (h - ch + 1))  # randint(0, h - ch + 1)
    left = torch.floor(ul * (w - cw + 1))

    # Fallback: whole image with the aspect ratio clamped into `ratio`, centered.
    in_ratio = w / h
    if in_ratio < min(ratio):
        fw, fh = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(h * max(ratio))), h
    else:
        fw, fh = w, h
    ok = valid.any(dim=1)
    fallback = ((h - fh) // 2, (w - fw) // 2, fh, fw)
    return tuple(torch.where(ok, t, torch.full_like(t, v)).long() for t, v in zip((top, left, ch, cw), fallback))


def _crop_resize(x: torch.Tensor, top, left, height, width, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Sample box (top, left, height, width) of each image onto a size grid with one grid_sample."""
    n, _, h, w = x.shape
    dt = x.dtype
    top, left, height, width = (t.to(dt) for t in (top, left, height, width))
    # Normalized coords (align_corners=False): pixel edge 0 -> -1, edge W -> +1.
    theta = torch.zeros(n, 2, 3, dtype=dt, device=x.device)
    theta[:, 0, 0] = width / w
    theta[:, 0, 2] = (2 * left + width) / w - 1
    theta[:, 1, 1] = height / h
    theta[:, 1, 2] = (2 * top + height) / h - 1
    grid = F.affine_grid(theta, [n, x.shape[1], *size], align_corners=False)
    # Clamp sample points to the box's outer pixel centers: pixels outside the crop are never
    # read, as if the crop were cut out first (bilinear then equals torchvision's crop + resize).
    lo = torch.stack(((2 * left + 1) / w - 1, (2 * top + 1) / h - 1), -1).view(n, 1, 1, 2)
    hi = torch.stack(((2 * (left + width) - 1) / w - 1, (2 * (top + height) - 1) / h - 1), -1).view(n, 1, 1, 2)
    grid = torch.maximum(torch.minimum(grid, hi), lo)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.clamp_(0, 1) if mode == "bicubic" else out  # bicubic overshoots


def random_resized_crop(x: torch.Tensor, size: Size, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), interpolation: str = "bilinear",
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomResizedCrop(size, scale, ratio, interpolation) with its own crop per sample."""
    if interpolation not in ("bilinear", "bicubic"):
        raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}")
    n, _, h, w = x.shape
    params = resized_crop_params(n, h, w, scale, ratio, generator, device=x.device)
    return _crop_resize(x, *params, size=_pair(size), mode=interpolation)


def horizontal_flip(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomHorizontalFlip(p), decided per sample."""
    flip = _rand(x.shape[0], generator, x.device) < p
    return torch.where(_per_sample(flip), x.flip(-1), x)


def pad_crop(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomCrop(H x W, padding, zero fill): a random H x W window of the padded image per sample."""
    n, c, h, w = x.shape
    if padding <= 0:
        return x.clone()
    u = _rand(n, generator, x.device, 2)
    off = torch.floor(u * (2 * padding + 1)).long().clamp_(max=2 * padding)  # randint(0, 2p + 1)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = (off[:, 0, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (off[:, 1, None] + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    out = padded.gather(2, rows.expand(n, c, h, w + 2 * padding))
    return out.gather(3, cols.expand(n, c, h, w))


def resize(x: torch.Tensor, size: Size) -> torch.Tensor:
    """Deterministic bilinear resize with antialiasing (e.g. STL-10 96 -> 32)."""
    return F.interpolate(x, size=_pair(size), mode="bilinear", align_corners=False, antialias=True)


# -- color


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luma with weights (0.299, 0.587, 0.114)."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def random_grayscale(x: torch.Tensor, p: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomGrayscale(p): luma replicated to 3 channels, decided per sample."""
    gray = _rand(x.shape[0], generator, x.device) < p
    return torch.where(_per_sample(gray), grayscale(x).expand_as(x), x)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped; factor 1 is an exact identity (on [0, 1])."""
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def _blend_op(x: torch.Tensor, op: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per sample op 0 brightness (blend with black), 1 contrast (with the mean grayscale value),
    2 saturation (with the grayscale image), as torchvision's adjust_* functions."""
    gray = grayscale(x)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    op = _per_sample(op)
    other = torch.where(op == 0, torch.zeros_like(mean), torch.where(op == 1, mean, gray))
    return _blend(x, other, factor)


def _adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Shift the HSV hue of each sample by factor (in turns), like torchvision's adjust_hue.

    Hue rotation keeps value (max) and chroma (max - min), so RGB -> HSV -> RGB reduces to the
    hue angle h in [0, 6) and the closed form channel = max - chroma * clamp(min(k, 4 - k), 0, 1),
    k = (n + h) mod 6 with n = 5, 3, 1 for R, G, B.
    """
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    cr = maxc - minc
    crd = torch.where(cr == 0, torch.ones_like(cr), cr)  # gray pixels: hue is irrelevant
    # Sector by which channel is the max (r first, then g), as torchvision does.
    h = torch.where(maxc == r, (g - b) / crd, torch.where(maxc == g, (b - r) / crd + 2, (r - g) / crd + 4))
    h = (h + 6 * factor.view(-1, 1, 1)).unsqueeze(1)
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + h, 6)
    a = torch.minimum(k, 4 - k).clamp_(0, 1)
    return (maxc.unsqueeze(1) - cr.unsqueeze(1) * a).clamp_(0, 1)


def color_jitter_params(n: int, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                        hue: float = 0.1, p: float = 0.8, generator: torch.Generator | None = None,
                        device: torch.device | str | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample ColorJitter parameters: factors (n, 4) for (brightness, contrast, saturation,
    hue), order (n, 4) a permutation of op ids 0..3 in that naming, apply (n,) bool (RandomApply p).

    brightness/contrast/saturation ~ U(max(0, 1 - s), 1 + s), hue ~ U(-h, h), as torchvision.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    u = _rand(n, generator, device, 9)  # 4 factors, 4 order keys, apply
    lo = torch.tensor([max(0.0, 1 - brightness), max(0.0, 1 - contrast), max(0.0, 1 - saturation), -hue],
                      device=device)
    hi = torch.tensor([1 + brightness, 1 + contrast, 1 + saturation, hue], device=device)
    factors = lo + (hi - lo) * u[:, :4]
    order = u[:, 4:8].argsort(dim=1)  # a uniform random permutation per sample
    return factors, order, u[:, 8] < p


def color_jitter(x: torch.Tensor, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 hue: float = 0.1, p: float = 0.8, generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p), all per sample.

    Each sample gets its own factors and its own random order of the four ops (torchvision draws
    one order per call, i.e. per image). Strength 0 gives factor 1 (hue 0), a no-op, like
    torchvision, which skips that op. Clamped to [0, 1] after each op.
    """
    n = x.shape[0]
    factors, order, apply = color_jitter_params(n, brightness, contrast, saturation, hue, p, generator, x.device)
    factors = factors.to(x.dtype)
    # Per-sample order without host sync: the three blend ops (0-2) in each sample's order; slot j
    # runs before the hue shift (op 3) if j < position of hue, after it otherwise. Six blend passes
    # (factor 1, a no-op, for samples whose slot is on the other side) and one hue pass.
    hue_pos = (order == 3).long().argmax(dim=1, keepdim=True)
    slots = torch.arange(3, device=x.device).expand(n, 3)
    blends = order.gather(1, slots + (slots >= hue_pos).long())  # order with the hue entry dropped
    blend_f = factors.gather(1, blends)
    out = x
    for before in (True, False):
        if (brightness, contrast, saturation) != (0, 0, 0):
            for j in range(3):
                run = (slots[:, j] < hue_pos[:, 0]) == before
                out = _blend_op(out, blends[:, j], torch.where(run, blend_f[:, j], torch.ones_like(blend_f[:, j])))
        if before and hue != 0:
            out = _adjust_hue(out, factors[:, 3])
    return torch.where(_per_sample(apply), out, x)


# -- recipes


VIEW_OPS = ("crop", "flip", "jitter", "grayscale")  # the default order (SimCLR's, most official pipelines)


@dataclass(frozen=True)
class ViewRecipe:
    """One augmentation pipeline, applied by `make_view` in `order`.

    crop_scale: RandomResizedCrop scale (None: no resized crop); pad_crop: RandomCrop padding
    (0: none; exclusive with crop_scale); jitter: ColorJitter (b, c, s, h) applied with
    probability jitter_p (None: no jitter); grayscale_p: RandomGrayscale probability.
    order: the four ops `crop` (resized or padded), `flip`, `jitter`, `grayscale` in the order they
    run; the default is the usual crop -> flip -> jitter -> grayscale (RoCL's official pipeline
    is jitter -> grayscale -> flip -> crop). The order changes the views: jitter's contrast blends
    with the mean of the image it sees (the crop or the whole image), and randomness is drawn
    op by op, so a seeded generator gives other views in another order.
    """

    crop_scale: tuple[float, float] | None = (0.08, 1.0)
    crop_interpolation: str = "bilinear"
    flip: bool = True
    jitter: tuple[float, float, float, float] | None = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    pad_crop: int = 0
    order: tuple[str, ...] = VIEW_OPS

    def __post_init__(self):
        # Lists (e.g. from a TOML config) become tuples so recipes stay hashable and comparable.
        for name in ("crop_scale", "jitter"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if self.crop_scale is not None and self.pad_crop > 0:
            raise ValueError("ViewRecipe: crop_scale and pad_crop are exclusive; set one of them")
        if self.crop_interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"ViewRecipe: crop_interpolation must be bilinear or bicubic, "
                             f"got {self.crop_interpolation!r}")
        object.__setattr__(self, "order", tuple(self.order))
        if sorted(self.order) != sorted(VIEW_OPS):
            raise ValueError(f"ViewRecipe: order must list each of {', '.join(VIEW_OPS)} once, got {list(self.order)}")


def make_view(x: torch.Tensor, recipe: ViewRecipe, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random view of each image of x (N, 3, H, W) in [0, 1]; output has x's shape."""
    for op in recipe.order:
        if op == "crop":
            if recipe.crop_scale is not None:
                x = random_resized_crop(x, x.shape[-2:], tuple(recipe.crop_scale),
                                        interpolation=recipe.crop_interpolation, generator=generator)
            elif recipe.pad_crop > 0:
                x = pad_crop(x, recipe.pad_crop, generator=generator)
        elif op == "flip":
            if recipe.flip:
                x = horizontal_flip(x, 0.5, generator=generator)
        elif op == "jitter":
            if recipe.jitter is not None and recipe.jitter_p > 0:
                x = color_jitter(x, *recipe.jitter, p=recipe.jitter_p, generator=generator)
        elif recipe.grayscale_p > 0:
            x = random_grayscale(x, recipe.grayscale_p, generator=generator)
    return x


# AdvCL's tau and SimCLR's views (docs/methods.md §1).
SIMCLR_VIEW = ViewRecipe(crop_scale=(0.2, 1.0))
# ACL (section 2): bicubic resized crop with scale (0.1, 1).
ACL_VIEW = ViewRecipe(crop_scale=(0.1, 1.0), crop_interpolation="bicubic")
# RoCL (section 3): torchvision's default scale (0.08, 1), in the official data_loader.py order.
ROCL_ORDER = ("jitter", "grayscale", "flip", "crop")
ROCL_VIEW = ViewRecipe(crop_scale=(0.08, 1.0), order=ROCL_ORDER)
# AdvCL's x_org and the finetuning augmentation: RandomCrop(32, padding 4) + HorizontalFlip.
WEAK_VIEW = ViewRecipe(crop_scale=None, jitter=None, grayscale_p=0.0, pad_crop=4)
