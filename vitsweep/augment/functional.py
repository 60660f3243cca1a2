"""Batched image operations with one parameter per sample: the building blocks of the augment ops.

torchvision's functional ops take one parameter for the whole batch (one angle, one brightness
factor); these take a tensor of B parameters and do the whole batch in a few kernels, with no
per-sample Python loop. Images are float (B, C, H, W) in [0, 1]; any channel count works unless
a function says otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vitsweep.data.splits import IGNORE_INDEX, Targets, map_masks

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL and torchvision use for RGB -> gray


def uniform(low: float, high: float, n: int, device) -> torch.Tensor:
    """n samples from U(low, high): one random parameter per image."""
    return torch.empty(n, device=device).uniform_(low, high)


def probability(key: str, p: float) -> float:
    """`p` if it is a probability, else the one-line error naming the config key."""
    if not 0 <= p <= 1:
        raise ValueError(f"{key}={p} is a probability per sample: use a value in [0, 1]")
    return p


def chosen(p: float, n: int, device) -> torch.Tensor:
    """(n,) bool: which images an op with probability p applies to."""
    return torch.rand(n, device=device) < p


def select(mask: torch.Tensor, transformed: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per sample: `transformed` where mask (B,) is true, `images` elsewhere."""
    return torch.where(mask.view(-1, *[1] * (images.dim() - 1)), transformed, images)


def per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1), to broadcast over (B, C, H, W)


# ---- flips (crops: vitsweep.data.crops) ---------------------------------------------------------------------


def random_flip(images: torch.Tensor, p: float, dim: int = -1, targets: Targets | None = None):
    """Flip each image along `dim` with probability p; with `targets`, returns (images, targets) and
    flips the masks among them with the same draw."""
    flipped = chosen(p, images.shape[0], images.device)
    out = select(flipped, images.flip(dim), images)
    if targets is None:
        return out
    return out, map_masks(lambda m: select(flipped, m.flip(dim), m), targets, images)


# ---- geometry: one affine warp per sample ------------------------------------------------------------------


def sampling_grid(matrix: torch.Tensor, shape, dtype) -> torch.Tensor:
    """The grid_sample grid of (B, 2, 3) pixel-space matrices (see `affine`) for images of `shape`."""
    B, C, H, W = shape
    # affine_grid wants the same map in normalized coordinates (-1..1 across each side)
    to_normalized = torch.tensor([2.0 / W, 2.0 / H], device=matrix.device, dtype=dtype)
    theta = matrix.to(dtype).clone()
    theta[:, :, :2] = theta[:, :, :2] * to_normalized[:, None] / to_normalized[None, :]
    theta[:, :, 2] = theta[:, :, 2] * to_normalized
    return F.affine_grid(theta, [B, C, H, W], align_corners=False)


def warp_masks(masks: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Masks (B, H, W) warped like `affine` warps their images, by nearest neighbour (a label is never
    interpolated); pixels that come from outside the mask get IGNORE_INDEX."""
    B, H, W = masks.shape
    grid = sampling_grid(matrix, (B, 1, H, W), torch.float32)
    shifted = masks.float()[:, None] + 1  # 0 after sampling = outside
    warped = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0]
    return torch.where(warped == 0, IGNORE_INDEX, warped - 1).to(masks.dtype)


def affine(images: torch.Tensor, matrix: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Warp each image by its own (B, 2, 3) matrix, which maps an output pixel (x, y), measured in pixels
    from the image centre, to the input pixel it samples. Bilinear; `fill` outside the image."""
    grid = sampling_grid(matrix, images.shape, images.dtype)
    if fill == 0:
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # sample a ones channel too, to know which output pixels came from outside the image
    warped = F.grid_sample(torch.cat([images, torch.ones_like(images[:, :1])], 1), grid, mode="bilinear",
                           padding_mode="zeros", align_corners=False)
    inside = warped[:, -1:]
    return warped[:, :-1] + (1 - inside) * fill


def identity_matrices(n: int, device) -> torch.Tensor:
    return torch.eye(2, 3, device=device).repeat(n, 1, 1)  # (n, 2, 3)


def rotation_matrices(degrees: torch.Tensor) -> torch.Tensor:
    """(B,) angles -> (B, 2, 3): rotate each image counter-clockwise about its centre."""
    angle = torch.deg2rad(degrees)
    cos, sin = angle.cos(), angle.sin()
    matrix = identity_matrices(len(degrees), degrees.device)
    # output -> input is the inverse rotation
    matrix[:, 0, 0], matrix[:, 0, 1], matrix[:, 1, 0], matrix[:, 1, 1] = cos, -sin, sin, cos
    return matrix


def rotate(images: torch.Tensor, degrees: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    return affine(images, rotation_matrices(degrees), fill)


# ---- photometry --------------------------------------------------------------------------------------------


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W): luma for RGB, the channel mean for any other channel count."""
    if images.shape[1] == 3:
        weights = torch.tensor(LUMA_WEIGHTS, device=images.device, dtype=images.dtype)
        return (images * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)
    return images.mean(1, keepdim=True)


def blend(images: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance rule: factor 1 keeps the image, 0 gives `degenerate`, > 1 extrapolates."""
    return (degenerate + per_image(factor) * (images - degenerate)).clamp(0, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(images, torch.zeros_like(images), factor)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(images, grayscale(images).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(images, grayscale(images), factor)


def adjust_sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with PIL's SMOOTH-filtered image (border pixels kept), per sample."""
    C = images.shape[1]
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=images.device) / 13
    smooth = F.conv2d(images, kernel.to(images.dtype).expand(C, 1, 3, 3), groups=C)
    degenerate = images.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return blend(images, degenerate, factor)


# YIQ: Y is luma, (I, Q) the chroma plane; a hue shift is a rotation of the chroma plane.
RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each RGB image's hue by shift[i] turns (-0.5..0.5), as a 3x3 colour matrix per sample.
    (torchvision goes through HSV; the YIQ rotation is the linear, batchable equivalent.)"""
    if images.shape[1] != 3:
        raise ValueError(f"a hue shift needs RGB images, these have {images.shape[1]} channels: "
                         f"set augment.color_jitter.hue=0 for non-RGB data")
    to_yiq = torch.tensor(RGB_TO_YIQ, device=images.device, dtype=images.dtype)
    angle = 2 * math.pi * shift.to(images.dtype)
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.zeros(len(shift), 3, 3, device=images.device, dtype=images.dtype)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = cos, -sin, sin, cos
    color_matrix = torch.linalg.inv(to_yiq) @ rotation @ to_yiq  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", color_matrix, images).clamp(0, 1)


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image to span [0, 1] (torchvision's allows 1 or 3 channels only)."""
    low = images.amin(dim=(2, 3), keepdim=True)
    high = images.amax(dim=(2, 3), keepdim=True)
    flat = high <= low  # a constant channel stays as it is
    scale = torch.where(flat, torch.ones_like(high), 1 / (high - low).clamp_min(1e-12))
    return torch.where(flat, images, (images - low) * scale).clamp(0, 1)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur image i with a Gaussian of std sigma[i] pixels (sigma 0: unchanged), separably, with
    reflected borders. All B * C planes go through one grouped convolution per axis."""
    B, C, H, W = images.shape
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (offsets / sigma.to(images.dtype).clamp_min(1e-6)[:, None]) ** 2)  # (B, K)
    kernels = (kernels / kernels.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B * C, K)
    planes = F.pad(images.reshape(1, B * C, H, W), (radius, radius, radius, radius), mode="reflect")
    planes = F.conv2d(planes, kernels[:, None, None, :], groups=B * C)  # along W
    planes = F.conv2d(planes, kernels[:, None, :, None], groups=B * C)  # along H
    return planes.view(B, C, H, W)


# ---- boxes (cutmix, random erasing) ------------------------------------------------------------------------


def box_masks(top: torch.Tensor, left: torch.Tensor, height: torch.Tensor, width: torch.Tensor,
              H: int, W: int) -> torch.Tensor:
    """(B, 1, H, W) bool, true inside box i = rows [top, top + height), cols [left, left + width)."""
    rows = torch.arange(H, device=top.device)[None, :]
    cols = torch.arange(W, device=top.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + height)[:, None])  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])  # (B, W)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
