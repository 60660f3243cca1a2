"""Geometric ops: random crop with padding, flips, rotation. One random draw per sample; segmentation
masks among the targets (vitsweep.augment.functional.is_mask) move with their images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitsweep.augment.functional import (
    chosen,
    probability,
    random_flip,
    rotate,
    rotation_matrices,
    select,
    uniform,
    warp_masks,
)
from vitsweep.data.crops import random_crops
from vitsweep.data.splits import IGNORE_INDEX, map_masks


class RandomCrop(nn.Module):
    """Zero-pad by `padding` pixels, then cut a window of the original size at a random position per
    sample (the CIFAR recipe). padding 0: unchanged."""

    def __init__(self, padding: int = 4):
        super().__init__()
        if padding < 0:
            raise ValueError(f"augment.random_crop.padding={padding} must be >= 0")
        self.padding = padding

    def forward(self, images, targets):
        if self.padding == 0:
            return images, targets
        size = images.shape[-1]
        padded = F.pad(images, (self.padding,) * 4)
        padded_targets = map_masks(lambda m: F.pad(m, (self.padding,) * 4, value=IGNORE_INDEX), targets, images)
        return random_crops(padded, size, padded_targets)


class Flips(nn.Module):
    """Mirror each sample left-right with probability `horizontal`, and upside-down with `vertical`
    (aerial and microscopy images have no "up")."""

    def __init__(self, horizontal: float = 0.5, vertical: float = 0.0):
        super().__init__()
        self.horizontal = probability("augment.flips.horizontal", horizontal)
        self.vertical = probability("augment.flips.vertical", vertical)

    def forward(self, images, targets):
        if self.horizontal > 0:
            images, targets = random_flip(images, self.horizontal, dim=-1, targets=targets)
        if self.vertical > 0:
            images, targets = random_flip(images, self.vertical, dim=-2, targets=targets)
        return images, targets


class Rotation(nn.Module):
    """Rotate each sample (with probability p) by its own angle drawn from [-degrees, degrees], about
    the centre, bilinear, corners filled with `fill`."""

    def __init__(self, degrees: float = 15.0, p: float = 1.0, fill: float = 0.0):
        super().__init__()
        if degrees < 0:
            raise ValueError(f"augment.rotation.degrees={degrees} must be >= 0 (angles are drawn from ±degrees)")
        self.degrees, self.p, self.fill = degrees, probability("augment.rotation.p", p), fill

    def forward(self, images: torch.Tensor, targets):
        B = images.shape[0]
        angles = uniform(-self.degrees, self.degrees, B, images.device)
        rotated = rotate(images, angles, self.fill)
        applies = chosen(self.p, B, images.device)
        targets = map_masks(lambda m: select(applies, warp_masks(m, rotation_matrices(angles)), m), targets, images)
        return select(applies, rotated, images), targets
