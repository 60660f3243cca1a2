"""Batched augmentation on the device: every sample gets its own random parameters, with no
per-sample Python loop. Inputs and outputs are float images in [0, 1], shape (B, C, H, W)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def random_crop(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad by `padding`, then cut a random H x W window per sample (the CIFAR recipe)."""
    B, C, H, W = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (B,), device=images.device)
    left = torch.randint(0, 2 * padding + 1, (B,), device=images.device)
    rows = (top[:, None] + torch.arange(H, device=images.device))[:, :, None]  # (B, H, 1)
    cols = (left[:, None] + torch.arange(W, device=images.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(B, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


def random_flip(images: torch.Tensor, p: float = 0.5, dim: int = -1) -> torch.Tensor:
    flip = torch.rand(images.shape[0], device=images.device) < p
    return torch.where(flip[:, None, None, None], images.flip(dim), images)


class BasicAugment(nn.Module):
    """Random crop with padding and horizontal flips, the standard CIFAR augmentation."""

    def __init__(self, crop_padding: int = 4, hflip: float = 0.5):
        super().__init__()
        self.crop_padding, self.hflip = crop_padding, hflip

    def forward(self, images: torch.Tensor, targets: torch.Tensor):
        if self.crop_padding > 0:
            images = random_crop(images, self.crop_padding)
        if self.hflip > 0:
            images = random_flip(images, self.hflip)
        return images, targets


class NoAugment(nn.Module):
    def forward(self, images: torch.Tensor, targets: torch.Tensor):
        return images, targets
