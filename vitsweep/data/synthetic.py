"""Synthetic images for tests: each class is a fixed random pattern plus noise, so a model can
learn it in a few steps, and any size or channel count is available instantly.

With `multi_label`, each image holds a random non-empty subset of the classes (each present with
probability 1/2): the image is the mean of their patterns plus noise, the label a (N, K) float
multi-hot vector."""

from __future__ import annotations

import torch

from vitsweep.data.splits import Split, Splits


def load_synthetic(image_size: int = 16, in_channels: int = 3, num_classes: int = 4,
                   num_train: int = 256, num_val: int = 64, num_test: int = 64,
                   noise: float = 0.35, split_seed: int = 0, multi_label: bool = False) -> Splits:
    for key, value in (("data.source.num_train", num_train), ("data.source.num_val", num_val),
                       ("data.source.num_test", num_test), ("data.num_classes", num_classes),
                       ("data.image_size", image_size), ("data.in_channels", in_channels)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"data=synthetic: {key}={value} must be a whole number >= 1")
    generator = torch.Generator().manual_seed(split_seed)
    templates = torch.rand(num_classes, in_channels, image_size, image_size, generator=generator)

    def make(n: int) -> Split:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=generator)]
        if multi_label:
            multi_hot = (torch.rand(n, num_classes, generator=generator) < 0.5).float()
            multi_hot[torch.arange(n), labels] = 1.0  # every image holds at least one class
            clean = torch.einsum("nk,kchw->nchw", multi_hot, templates) / multi_hot.sum(dim=1).view(n, 1, 1, 1)
            labels = multi_hot
        else:
            clean = templates[labels]
        noisy = clean + noise * torch.randn(n, in_channels, image_size, image_size, generator=generator)
        return Split((noisy.clamp(0, 1) * 255).round().to(torch.uint8), labels)

    return Splits(make(num_train), make(num_val), make(num_test), [f"class_{i}" for i in range(num_classes)])
