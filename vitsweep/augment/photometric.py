"""Photometric ops: brightness, contrast, colour jitter, blur. One random factor per sample; the
output is clamped to [0, 1]. (Float arrays stored outside [0, 1] would be clipped: scale them first.)"""

from __future__ import annotations

import math

import torch
from torch import nn

from vitsweep.augment.functional import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    chosen,
    gaussian_blur,
    probability,
    select,
    uniform,
)


def factor_range(name: str, strength: float) -> tuple[float, float]:
    """torchvision's ColorJitter rule: strength s draws factors from [max(0, 1 - s), 1 + s]."""
    if strength < 0:
        raise ValueError(f"augment.{name}={strength} must be >= 0 (factors are drawn from [1 - s, 1 + s])")
    return max(0.0, 1 - strength), 1 + strength


class Brightness(nn.Module):
    """Scale each sample's intensities by its own factor from [1 - strength, 1 + strength] (any channels)."""

    def __init__(self, strength: float = 0.2, p: float = 1.0):
        super().__init__()
        self.low, self.high = factor_range("brightness.strength", strength)
        self.p = probability("augment.brightness.p", p)

    def forward(self, images, targets):
        B = images.shape[0]
        out = adjust_brightness(images, uniform(self.low, self.high, B, images.device))
        return select(chosen(self.p, B, images.device), out, images), targets


class Contrast(nn.Module):
    """Blend each sample with its mean gray level by its own factor from [1 - strength, 1 + strength]."""

    def __init__(self, strength: float = 0.2, p: float = 1.0):
        super().__init__()
        self.low, self.high = factor_range("contrast.strength", strength)
        self.p = probability("augment.contrast.p", p)

    def forward(self, images, targets):
        B = images.shape[0]
        out = adjust_contrast(images, uniform(self.low, self.high, B, images.device))
        return select(chosen(self.p, B, images.device), out, images), targets


class ColorJitter(nn.Module):
    """torchvision's ColorJitter, batched: brightness, contrast, saturation, then hue, each with its own
    random factor per sample; the whole jitter applies to a sample with probability p. Hue needs RGB;
    saturation on other channel counts blends with the channel mean."""

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 hue: float = 0.1, p: float = 0.8):
        super().__init__()
        self.brightness = factor_range("color_jitter.brightness", brightness)
        self.contrast = factor_range("color_jitter.contrast", contrast)
        self.saturation = factor_range("color_jitter.saturation", saturation)
        if not 0 <= hue <= 0.5:
            raise ValueError(f"augment.color_jitter.hue={hue} is a fraction of the colour wheel: use [0, 0.5]")
        self.hue, self.p = hue, probability("augment.color_jitter.p", p)

    def forward(self, images, targets):
        B, device = images.shape[0], images.device
        out = adjust_brightness(images, uniform(*self.brightness, B, device))
        out = adjust_contrast(out, uniform(*self.contrast, B, device))
        out = adjust_saturation(out, uniform(*self.saturation, B, device))
        if self.hue > 0:
            out = adjust_hue(out, uniform(-self.hue, self.hue, B, device))
        return select(chosen(self.p, B, device), out, images), targets


class Blur(nn.Module):
    """Gaussian blur with a per-sample std drawn from [sigma_min, sigma_max] pixels, with probability p.
    The kernel spans 3 std of sigma_max on each side (capped by the image size)."""

    def __init__(self, sigma_min: float = 0.1, sigma_max: float = 1.0, p: float = 0.5):
        super().__init__()
        if not 0 <= sigma_min <= sigma_max:
            raise ValueError(f"augment.blur.sigma_min={sigma_min}, sigma_max={sigma_max}: "
                             f"need 0 <= sigma_min <= sigma_max")
        self.sigma_min, self.sigma_max, self.p = sigma_min, sigma_max, probability("augment.blur.p", p)

    def forward(self, images: torch.Tensor, targets):
        B, _, H, W = images.shape
        radius = min(math.ceil(3 * self.sigma_max), min(H, W) - 1)  # reflect padding needs radius < side
        sigma = uniform(self.sigma_min, self.sigma_max, B, images.device)
        out = gaussian_blur(images, sigma, 2 * radius + 1)
        return select(chosen(self.p, B, images.device), out, images), targets
