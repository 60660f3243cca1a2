"""Images as rows of patch pixels and back: what MAE predicts and its figures show."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patchify(images: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, P, C * p * p): the pixels of each patch in the patch embedding's order
    (row-major patches; each patch channel-major, as the convolution's kernel reads it)."""
    return F.unfold(images, kernel_size=patch_size, stride=stride).transpose(1, 2)


def unpatchify(patches: torch.Tensor, patch_size: int, stride: int, image_size: tuple[int, int]) -> torch.Tensor:
    """(B, P, C * p * p) -> (B, C, H, W); pixels covered by overlapping patches get their mean."""
    columns = patches.transpose(1, 2)  # (B, C * p * p, P)
    summed = F.fold(columns, output_size=image_size, kernel_size=patch_size, stride=stride)
    coverage = F.fold(torch.ones_like(columns), output_size=image_size, kernel_size=patch_size, stride=stride)
    return summed / coverage.clamp_min(1)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch (.., C * p * p) minus its mean, over sqrt(its variance + eps) (variance over the patch's
    pixels, not bias-corrected, so the normalized pixels have a mean square of var / (var + eps) ~ 1)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, correction=0)
    return (patches - mean) / (var + eps).sqrt()
