"""Synthetic images for tests: each class is a fixed random pattern plus noise, so a model can
learn it in a few steps, and any size or channel count is available instantly."""

from __future__ import annotations

import torch

from vitsweep.data.splits import Split, Splits


def load_synthetic(image_size: int = 16, in_channels: int = 3, num_classes: int = 4,
                   num_train: int = 256, num_val: int = 64, num_test: int = 64,
                   noise: float = 0.35, split_seed: int = 0) -> Splits:
    generator = torch.Generator().manual_seed(split_seed)
    templates = torch.rand(num_classes, in_channels, image_size, image_size, generator=generator)

    def make(n: int) -> Split:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=generator)]
        noisy = templates[labels] + noise * torch.randn(n, in_channels, image_size, image_size, generator=generator)
        return Split((noisy.clamp(0, 1) * 255).round().to(torch.uint8), labels)

    return Splits(make(num_train), make(num_val), make(num_test), [f"class_{i}" for i in range(num_classes)])
