"""scikit-learn's bundled 8x8 handwritten digits (1,797 images): real data that needs no network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits as sklearn_digits
from sklearn.model_selection import train_test_split

from vitsweep.data.splits import Split, Splits, carve_validation
from vitsweep.data.targets import class_labels_only


def load_digits(image_size: int = 16, test_fraction: float = 0.2, val_fraction: float = 0.1,
                split_seed: int = 0, targets: dict | None = None) -> Splits:
    class_labels_only(targets, "digits")
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    if image_size != 8:  # upsample once at load so a patch-4 model sees a 4x4 grid
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images_uint8 = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=test_fraction, stratify=labels.numpy(), random_state=split_seed
    )
    train, test = Split(images_uint8[train_idx], labels[train_idx]), Split(images_uint8[test_idx], labels[test_idx])
    train, val = carve_validation(train, val_fraction, split_seed)
    return Splits(train, val, test, class_names=[str(d) for d in range(10)])
