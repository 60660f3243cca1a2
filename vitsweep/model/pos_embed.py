"""Position embeddings, added to the token sequence after the cls token is prepended.

The embedding covers the prefix (cls) tokens too, as in timm's ViT (`no_embed_class=False`), so
timm weights port exactly. `weight` has shape (1, num_prefix_tokens + grid_h * grid_w, dim).

Images of another size than the model's (DINO's local crops) have another patch grid: `forward(x, grid)`
adds the embedding resampled to it (bicubic, timm's `resample_abs_pos_embed`, as timm does for other sizes).
"""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn


def on_grid(weight: torch.Tensor, grid_size: tuple[int, int], num_prefix_tokens: int,
            grid: tuple[int, int] | None) -> torch.Tensor:
    """An embedding `weight` (1, prefix + gh * gw, C) of `grid_size`, for tokens on `grid` (None: its own)."""
    if grid is None or tuple(grid) == tuple(grid_size):
        return weight
    return resample_abs_pos_embed(weight, new_size=list(grid), old_size=list(grid_size),
                                  num_prefix_tokens=num_prefix_tokens)  # (1, prefix + grid[0] * grid[1], C)


class LearnedPositionEmbedding(nn.Module):
    def __init__(self, grid_size: tuple[int, int], num_prefix_tokens: int, dim: int):
        super().__init__()
        self.grid_size, self.num_prefix_tokens = tuple(grid_size), num_prefix_tokens
        num_tokens = num_prefix_tokens + grid_size[0] * grid_size[1]
        self.weight = nn.Parameter(torch.zeros(1, num_tokens, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x, grid: tuple[int, int] | None = None):  # (B, N, C) on the patch grid `grid` (None: the model's)
        return x + on_grid(self.weight, self.grid_size, self.num_prefix_tokens, grid)


def sincos_2d(grid_size: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding (MAE / "simple ViT"): a quarter of the channels each for
    sin(y), cos(y), sin(x), cos(x). Returns (grid_h * grid_w, dim)."""
    if dim % 4 != 0:
        raise ValueError(f"model.embed_dim={dim} must be divisible by 4 for model/pos_embed=sincos")
    y, x = torch.meshgrid(torch.arange(grid_size[0]), torch.arange(grid_size[1]), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4) / (dim // 4 - 1 if dim > 4 else 1))
    y = y.flatten()[:, None] * omega[None, :]  # (P, dim/4)
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1).float()


class SinCosPositionEmbedding(nn.Module):
    """Not learned; the prefix tokens get a zero embedding. Another grid resamples it, as a learned one."""

    def __init__(self, grid_size: tuple[int, int], num_prefix_tokens: int, dim: int):
        super().__init__()
        self.grid_size, self.num_prefix_tokens = tuple(grid_size), num_prefix_tokens
        patches = sincos_2d(grid_size, dim)
        weight = torch.cat([torch.zeros(num_prefix_tokens, dim), patches])[None]  # (1, N, dim)
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, x, grid: tuple[int, int] | None = None):
        return x + on_grid(self.weight, self.grid_size, self.num_prefix_tokens, grid)


class NoPositionEmbedding(nn.Module):
    """No position information at all: the model sees a bag of patches."""

    def __init__(self, grid_size: tuple[int, int], num_prefix_tokens: int, dim: int):
        super().__init__()

    def forward(self, x, grid: tuple[int, int] | None = None):
        return x
