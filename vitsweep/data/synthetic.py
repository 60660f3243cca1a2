"""Synthetic images for tests: each class is a fixed random pattern plus noise, so a model can
learn it in a few steps, and any size or channel count is available instantly.

With `multi_label`, each image holds a random non-empty subset of the classes (each present with
probability 1/2): the image is the mean of their patterns plus noise, the label a (N, K) float
multi-hot vector.

For the other tasks (`targets`, the task's readers: {name: reader}; vitsweep/data/targets.py), each
target gets a planted signal of its own by its format, added to the image:
    class    the class's pattern (as above)
    values   a fixed random pattern of its own, scaled by the target, a value in [0, 100)
             (a "count": the image is brighter where the pattern is, the more there is)
    mask     1 or 2 rectangles of classes 1..K-1 on background 0, on a 4-pixel lattice, each
             class a colour of its own; the mask holds the class of every pixel
`missing` blanks that share of each target at random (-1, NaN, or an all-ignored mask), to test
that missing labels count in no loss and no metric.
"""

from __future__ import annotations

import torch

from vitsweep.data.splits import Split, Splits
from vitsweep.data.targets import TargetReader


def load_synthetic(image_size: int = 16, in_channels: int = 3, num_classes: int = 4,
                   num_train: int = 256, num_val: int = 64, num_test: int = 64,
                   noise: float = 0.35, split_seed: int = 0, multi_label: bool = False,
                   targets: dict | None = None, missing: float = 0.0) -> Splits:
    for key, value in (("data.source.num_train", num_train), ("data.source.num_val", num_val),
                       ("data.source.num_test", num_test), ("data.num_classes", num_classes),
                       ("data.image_size", image_size), ("data.in_channels", in_channels)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"data=synthetic: {key}={value} must be a whole number >= 1")
    generator = torch.Generator().manual_seed(split_seed)
    readers = dict(targets or {})
    if [reader.format for reader in readers.values()] in ([], ["class"]):  # one class label per image: the original generator
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
    return planted(readers, image_size, in_channels, num_classes, (num_train, num_val, num_test), noise,
                   generator, missing)


def planted(readers: dict[str, TargetReader], size: int, channels: int, num_classes: int, counts, noise: float,
            generator: torch.Generator, missing: float) -> Splits:
    """Images with one planted signal per target (see the module docstring)."""
    unknown = [reader.what for reader in readers.values() if reader.format not in ("class", "values", "mask")]
    if unknown:
        raise ValueError(f"data=synthetic cannot make {', '.join(unknown)} targets")
    kinds = {name: reader.format for name, reader in readers.items()}
    patterns = {name: torch.rand(num_classes if kind != "values" else 1, channels, size, size,
                                 generator=generator) for name, kind in kinds.items()}
    lattice = max(1, size // 4)  # rectangles' corners on a 4-pixel lattice

    def make(n: int) -> Split:
        images = noise * torch.randn(n, channels, size, size, generator=generator)
        labels = {}
        for name, kind in kinds.items():
            if kind == "class":
                classes = torch.randint(num_classes, (n,), generator=generator)
                images += 0.6 * patterns[name][classes]
                labels[name] = classes
            elif kind == "values":
                value = torch.rand(n, generator=generator) * 100
                images += (value / 100).view(n, 1, 1, 1) * patterns[name][0]
                labels[name] = value[:, None]
            else:
                masks = torch.zeros(n, size, size, dtype=torch.uint8)
                for _ in range(2):
                    top, left = (torch.randint(lattice - 1, (2, n), generator=generator) * 4)
                    height, width = (torch.randint(1, lattice, (2, n), generator=generator) * 4)
                    classes = torch.randint(1, num_classes, (n,), generator=generator)
                    rows, cols = torch.arange(size).view(1, -1, 1), torch.arange(size).view(1, 1, -1)
                    inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + height).view(-1, 1, 1))
                              & (cols >= left.view(-1, 1, 1)) & (cols < (left + width).view(-1, 1, 1)))
                    masks = torch.where(inside, classes.view(-1, 1, 1).to(torch.uint8), masks)
                colours = patterns[name][:, :, :1, :1]  # (K, C, 1, 1): one colour per class
                images += colours[masks.long()].squeeze(-1).squeeze(-1).permute(0, 3, 1, 2)
                labels[name] = masks
            readers[name].blank(labels[name], missing, generator)
        images = (images + 0.2).clamp(0, 1)
        return Split((images * 255).round().to(torch.uint8), labels if len(labels) > 1 else next(iter(labels.values())))

    class_names = {name: [f"class_{k}" for k in range(num_classes)]
                   for name, kind in kinds.items() if kind != "values"}
    if len(kinds) == 1:
        class_names = next(iter(class_names.values()), [])
    return Splits(make(counts[0]), make(counts[1]), make(counts[2]), class_names)
