"""A deterministic, class-structured synthetic dataset: works anywhere, offline, at any size.

Each class is a fixed colored grating (orientation, frequency, palette); an image is its
class's pattern at a random phase and contrast, shifted, with pixel noise. A small CNN learns
it in seconds, and augmentations keep it recognizable, so every pipeline can be exercised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.config import param
from bench.datasets import Dataset
from bench.registry import DATASETS


@DATASETS.register("synthetic")
class Synthetic(Dataset):
    """Deterministic class-structured images of any size and class count (offline)."""

    @dataclass
    class Config:
        n_train: int = param(2000, min=2)
        n_test: int = param(500, min=1)
        num_classes: int = param(10, min=2)
        image_size: int = param(32, min=8)
        noise: float = param(0.15, min=0.0, max=1.0)
        signal: float = param(1.0, min=0.0, max=1.0,
                              help="scale of each pattern's deviation from mid-gray (1 = full-range patterns); "
                                   "near the attack's eps a non-robust classifier breaks while adversarial "
                                   "training still holds")
        grating: float = param(1.0, min=0.0, max=1.0,
                               help="amplitude of the grating around its class's mean color (1 = the full "
                                    "palette range): small, the grating is a feature an eps-attack can erase "
                                    "while the color stays one it cannot")
        color: str = param("class", choices=("class", "random"),
                           help="class: each class has its own palette (color alone tells the classes apart); "
                                "random: each image gets a random background color, so only the grating's "
                                "orientation and frequency do")
        seed: int = 0

    generated = True

    def __init__(self, cfg=None):
        super().__init__(cfg or self.Config())
        self.image_size = self.raw_size = self.cfg.image_size
        self.classes = [f"class_{i}" for i in range(self.cfg.num_classes)]
        self.val_size = max(1, self.cfg.n_train // 10)

    def raw(self, split, data_dir, download):
        x, y = self.generate(split)
        return x, y, list(self.classes)

    def available(self, split, data_dir):
        return True  # generated on the fly, never downloaded

    def generate(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        c = self.cfg
        n = c.n_train if split == "train" else c.n_test
        class_rng = np.random.default_rng(c.seed)  # class patterns: shared by both splits
        angle = class_rng.uniform(0, np.pi, c.num_classes)
        freq = class_rng.uniform(1.5, 4.0, c.num_classes)
        palette = class_rng.uniform(0.1, 0.9, (c.num_classes, 2, 3))
        rng = np.random.default_rng([c.seed, 0 if split == "train" else 1])
        y = np.arange(n) % c.num_classes
        rng.shuffle(y)
        s = c.image_size
        grid = np.arange(s) / s
        yy, xx = np.meshgrid(grid, grid, indexing="ij")
        direction = np.cos(angle)[y, None, None] * xx + np.sin(angle)[y, None, None] * yy
        phase = rng.uniform(0, 2 * np.pi, n)[:, None, None]
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq[y, None, None] * direction + phase)
        contrast = rng.uniform(0.6, 1.0, n)[:, None, None, None]
        if c.color == "random":  # a luminance grating of amplitude `signal` on a random color
            base = rng.uniform(0.25, 0.75, (n, 1, 1, 3))
            img = base + c.signal * contrast * (wave[..., None] - 0.5)
            img = img + c.noise * rng.standard_normal(img.shape)
            return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), y.astype(np.int64)
        lo, hi = palette[y, 0][:, None, None, :], palette[y, 1][:, None, None, :]
        shade = contrast * wave[..., None] + (1 - contrast) * 0.5
        if c.grating != 1.0:
            shade = 0.5 + c.grating * (shade - 0.5)
        img = lo + (hi - lo) * shade
        if c.signal != 1.0:
            img = 0.5 + c.signal * (img - 0.5)
        img = img + c.noise * rng.standard_normal(img.shape)
        return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), y.astype(np.int64)
