"""DINO's multi-crop, made on the device from the batch: per image, 2 global crops at the model's size
and a few small local crops, each its own random resized crop, flip, brightness, contrast and blur.

Every op works on any band count: the geometry is one `affine_grid` per view (a scale and a translation
per image), and the photometric ops are the band-agnostic ones of vitsweep.augment.functional (DINO's
colour ops, hue, saturation, grayscale and solarization, need RGB and are left out). Brightness and
contrast are applied to the pixel values the data stores (the inputs un-normalized with the data's mean
and std), without clipping, so reflectances outside [0, 1] keep their range.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vitsweep.augment.functional import chosen, gaussian_blur, per_image, select, uniform


def random_resized_crops(images: torch.Tensor, size: int, scale: tuple[float, float],
                         ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size): per image, a window covering a random share in `scale` of its
    area with a random aspect ratio in `ratio` (log-uniform), at a random position inside it, resized
    bilinearly, and mirrored with probability flip_p (torchvision's RandomResizedCrop, one draw per image)."""
    B, C = images.shape[:2]
    device = images.device
    area = uniform(scale[0], scale[1], B, device)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1]), B, device))
    width = torch.sqrt(area * aspect).clamp(max=1.0)  # as a share of the image's width
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    centre_x = (torch.rand(B, device=device) * 2 - 1) * (1 - width)  # in [-1, 1] coordinates, window inside
    centre_y = (torch.rand(B, device=device) * 2 - 1) * (1 - height)
    mirror = torch.where(chosen(flip_p, B, device), -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=device, dtype=images.dtype)  # output [-1, 1]^2 -> input coordinates
    theta[:, 0, 0], theta[:, 0, 2] = width * mirror, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    grid = F.affine_grid(theta, [B, C, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class MultiCrop:
    """The views of one batch: [global 1, global 2, local 1, ..., local n], each (B, C, size, size)."""

    def __init__(self, global_size: int, local_size: int, num_local_crops: int = 6,
                 global_scale: tuple[float, float] = (0.4, 1.0), local_scale: tuple[float, float] = (0.05, 0.4),
                 jitter: float = 0.4, jitter_p: float = 0.8, blur_p: float = 0.5):
        self.global_size, self.local_size, self.num_local_crops = global_size, local_size, num_local_crops
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.jitter, self.jitter_p, self.blur_p = jitter, jitter_p, blur_p

    def photometric(self, views: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Brightness and contrast (factors in [1 - jitter, 1 + jitter], with probability jitter_p), then a
        Gaussian blur (sigma 0.1 to 2 px at 224 px, scaled to the view, with probability blur_p)."""
        B, device = views.shape[0], views.device
        pixels = views * std + mean  # the stored values
        brightness = uniform(1 - self.jitter, 1 + self.jitter, B, device)
        contrast = uniform(1 - self.jitter, 1 + self.jitter, B, device)
        band_means = pixels.mean(dim=(2, 3), keepdim=True)
        jittered = band_means + per_image(contrast) * (pixels * per_image(brightness) - band_means)
        pixels = select(chosen(self.jitter_p, B, device), jittered, pixels)
        size = views.shape[-1]
        sigma = uniform(0.1, 2.0, B, device) * size / 224
        kernel_size = max(3, 2 * math.ceil(3 * 2.0 * size / 224) + 1)
        if kernel_size // 2 < size:  # the reflected border needs the kernel radius inside the view
            pixels = select(chosen(self.blur_p, B, device), gaussian_blur(pixels, sigma, kernel_size), pixels)
        return (pixels - mean) / std

    def __call__(self, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> list[torch.Tensor]:
        """Normalized model inputs (B, C, H, W) -> the normalized views."""
        views = [random_resized_crops(images, self.global_size, self.global_scale) for _ in range(2)]
        views += [random_resized_crops(images, self.local_size, self.local_scale) for _ in range(self.num_local_crops)]
        return [self.photometric(view, mean, std) for view in views]
