"""Windows cut out of a batch, on the device and on any dtype (uint8 too): the random training crop of
`data.crop_size`, and the pad-and-crop augmentation (vitsweep.augment.geometric.RandomCrop). Masks among
the targets (vitsweep.data.splits.is_mask) are cut at the same windows."""

from __future__ import annotations

import torch

from vitsweep.data.splits import Targets, map_masks


def crop_windows(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """Cut a size x size window at (top[i], left[i]) out of image i (B, C, H, W), or out of every frame of
    sample i (B, T, C, H, W): the frames of a time series share their sample's window."""
    B = images.shape[0]
    planes = images.reshape(B, -1, *images.shape[-2:])  # (B, C, H, W); frames: (B, T * C, H, W)
    rows = (top[:, None] + torch.arange(size, device=images.device))[:, :, None]  # (B, size, 1)
    cols = (left[:, None] + torch.arange(size, device=images.device))[:, None, :]  # (B, 1, size)
    batch = torch.arange(B, device=images.device)[:, None, None]
    windows = planes.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, size, size, C) -> (B, C, ..)
    return windows.reshape(*images.shape[:-2], size, size)


def crop_offsets(images: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top, left) of a random size x size window per sample (B, ..., H, W), H and W >= size."""
    B, H, W = images.shape[0], *images.shape[-2:]
    top = torch.randint(0, H - size + 1, (B,), device=images.device)
    left = torch.randint(0, W - size + 1, (B,), device=images.device)
    return top, left


def random_crops(images: torch.Tensor, size: int, targets: Targets | None = None):
    """A size x size window at a random position of each image. With `targets`, returns (images,
    targets) and cuts the masks among them at the same windows."""
    top, left = crop_offsets(images, size)
    cropped = crop_windows(images, top, left, size)
    if targets is None:
        return cropped
    return cropped, map_masks(lambda m: crop_windows(m[:, None], top, left, size)[:, 0], targets, images)
