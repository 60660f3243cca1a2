"""Random erasing (Zhong et al. 2017): blank out a random box of each sample.

torchvision's v2.RandomErasing on a batch erases the same box in every image; here each sample draws
its own box (and whether to be erased at all)."""

from __future__ import annotations

import math

import torch
from torch import nn

from vitsweep.augment.functional import box_masks, chosen, probability, uniform


class RandomErasing(nn.Module):
    """With probability p per sample, fill a box covering a fraction from `scale` of the image, with
    aspect ratio (h / w) from `ratio` (log-uniform), by uniform noise (`value: random`) or a constant.
    A box taller or wider than the image is clipped to it (torchvision redraws up to 10 times)."""

    def __init__(self, p: float = 0.25, scale: tuple[float, float] = (0.02, 0.33),
                 ratio: tuple[float, float] = (0.3, 3.3), value: float | str = "random"):
        super().__init__()
        if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"augment.random_erasing.scale={list(scale)} / ratio={list(ratio)}: need "
                             f"0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]")
        if value != "random" and not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise ValueError(f"augment.random_erasing.value={value!r} is not 'random' or a number in [0, 1]")
        self.p = probability("augment.random_erasing.p", p)
        self.scale, self.ratio, self.value = tuple(scale), tuple(ratio), value

    def forward(self, images: torch.Tensor, targets):
        B, _, H, W = images.shape
        device = images.device
        area = uniform(*self.scale, B, device) * H * W
        aspect = uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), B, device).exp()
        height = (area * aspect).sqrt().round().long().clamp(1, H)
        width = (area / aspect).sqrt().round().long().clamp(1, W)
        height = torch.where(chosen(self.p, B, device), height, torch.zeros_like(height))  # no box: not erased
        top = (torch.rand(B, device=device) * (H - height + 1)).long()
        left = (torch.rand(B, device=device) * (W - width + 1)).long()
        mask = box_masks(top, left, height, width, H, W)  # (B, 1, H, W)
        fill = torch.rand_like(images) if self.value == "random" else torch.full_like(images, float(self.value))
        return torch.where(mask, fill, images), targets
