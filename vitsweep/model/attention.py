"""Multi-head self-attention and its sparsity patterns.

Every attention type is the same `MultiHeadAttention` with a different boolean mask over the
token grid, built once at construction: `mask[i, j]` says whether token i may attend to token j.
The mask gives the exact semantics of each pattern (a token's output does not depend on tokens it
cannot see); the compute stays a dense (N, N) product run by `scaled_dot_product_attention`, which
is right for the ablation sizes this harness targets (N <= a few hundred tokens).

Attention probabilities are not returned: `forward` gives tokens, like every other module. To
look at them, `record_attention(model)` switches every attention module to the explicit path
(softmax(QK^T) @ V) and collects the (B, nh, N, N) probabilities of each call, in call order:

    with record_attention(model) as attentions:
        logits = model(images)      # attentions: one (B, nh, N, N) tensor per attention call

Prefix tokens (the cls token) are global in every pattern: they attend to every token and every
token attends to them, as in Longformer's global tokens. That keeps the cls summary meaningful
when patch tokens only see their neighbourhood. Per pattern, a patch token attends to:

    full       every token
    local      the kernel_size x kernel_size patches centred on it, and cls
    windowed   the patches of its window (shifted by half a window on odd layers), and cls
    sparse     axial: its grid row and column; strided: see SparseAttention; and cls

So within one layer a patch's output depends only on its pattern and the cls token's input; from
the second layer on, information that cls gathered globally reaches every patch. With
model.pooling=mean there is no prefix token and the masks hold over patches alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadAttention(nn.Module):
    """Full (global) self-attention; subclasses restrict it by overriding `pattern`."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: tuple[int, int],
        num_prefix_tokens: int = 1,
        layer_idx: int = 0,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"model.embed_dim={dim} is not divisible by model.num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.grid_size, self.num_prefix_tokens, self.layer_idx = tuple(grid_size), num_prefix_tokens, layer_idx
        self.recorder: list[torch.Tensor] | None = None  # set by record_attention()
        patch_mask = self.pattern(*self.grid_size)  # (P, P) over patch tokens, or None for full
        if patch_mask is None:
            self.register_buffer("mask", None, persistent=False)
        else:
            n = num_prefix_tokens + patch_mask.shape[0]
            mask = torch.ones(n, n, dtype=torch.bool)  # prefix tokens stay global
            mask[num_prefix_tokens:, num_prefix_tokens:] = patch_mask
            self.register_buffer("mask", mask, persistent=False)

    def pattern(self, grid_h: int, grid_w: int) -> torch.Tensor | None:
        """Boolean (P, P) mask over the P = grid_h * grid_w patch tokens; None means attend to all."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, nh, N, hd)
        mask = self.mask
        if mask is not None and mask.shape[0] != N:
            raise ValueError(f"attention mask was built for {mask.shape[0]} tokens, input has {N}")
        if self.recorder is not None:
            # slow path, only under record_attention(): materialize the (B, nh, N, N) probabilities
            scores = (q * self.scale) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            attn = scores.softmax(dim=-1)
            self.recorder.append(attn)
            out = F.dropout(attn, self.attn_drop, self.training) @ v
        else:
            # fast path: flash / memory-efficient kernels where available
            dropout_p = self.attn_drop if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(out))


@contextmanager
def record_attention(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the attention probabilities (B, nh, N, N) of every `MultiHeadAttention` call that runs
    inside the `with` block, in call order (one per layer for a plain ViT). Outside it the model runs
    its fast path again. A module called twice (shared weights) records twice."""
    attentions: list[torch.Tensor] = []
    modules = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    for module in modules:
        module.recorder = attentions
    try:
        yield attentions
    finally:
        for module in modules:
            module.recorder = None


def _grid_coords(grid_h: int, grid_w: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(grid_h).repeat_interleave(grid_w)  # (P,)
    cols = torch.arange(grid_w).repeat(grid_h)  # (P,)
    return rows, cols


class LocalAttention(MultiHeadAttention):
    """Each patch attends to the `kernel_size` x `kernel_size` neighbourhood centred on it."""

    def __init__(self, *args, kernel_size: int = 3, **kwargs):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"model.attention.kernel_size={kernel_size} must be odd and >= 1")
        self.kernel_size = kernel_size
        super().__init__(*args, **kwargs)

    def pattern(self, grid_h, grid_w):
        rows, cols = _grid_coords(grid_h, grid_w)
        r = self.kernel_size // 2
        return ((rows[:, None] - rows[None, :]).abs() <= r) & ((cols[:, None] - cols[None, :]).abs() <= r)


class WindowedAttention(MultiHeadAttention):
    """Non-overlapping `window_size` x `window_size` windows (Swin). With `shift=True`, odd layers
    move the window grid by half a window so information crosses window borders: window borders
    fall at rows/columns `shift + k * window_size` with shift = window_size // 2, and the windows cut
    by the image border stay separate regions. That is exactly Swin's cyclic shift with its mask,
    written as a mask instead of a roll. A grid that `window_size` does not divide gets a smaller
    last window."""

    def __init__(self, *args, window_size: int = 4, shift: bool = True, **kwargs):
        if window_size < 1:
            raise ValueError(f"model.attention.window_size={window_size} must be >= 1")
        self.window_size, self.shift = window_size, shift
        super().__init__(*args, **kwargs)

    def pattern(self, grid_h, grid_w):
        rows, cols = _grid_coords(grid_h, grid_w)
        offset = self.window_size // 2 if (self.shift and self.layer_idx % 2 == 1) else 0
        # rows before the first shifted border form their own region (floor division gives -1)
        win_r = torch.div(rows - offset, self.window_size, rounding_mode="floor")
        win_c = torch.div(cols - offset, self.window_size, rounding_mode="floor")
        return (win_r[:, None] == win_r[None, :]) & (win_c[:, None] == win_c[None, :])


class SparseAttention(MultiHeadAttention):
    """Fixed sparse patterns from the sparse-transformer literature.

    - `axial`: a patch attends to its own row and column of the grid (Axial / CCNet style):
      two layers connect every pair of patches.
    - `strided`: a patch attends to the patches less than `stride` positions from it in the flat
      (row-major) order, plus every patch whose flat index is congruent to its own modulo `stride`
      (Child et al., 2019, made bidirectional): two layers connect every pair of patches.
    """

    def __init__(self, *args, pattern: str = "axial", stride: int | None = None, **kwargs):
        if pattern not in ("axial", "strided"):
            raise ValueError(f"model.attention.pattern={pattern!r} is not one of: axial, strided")
        if pattern == "axial" and stride is not None:
            raise ValueError(f"model.attention.stride={stride} applies to pattern=strided only: "
                             f"drop it or set model.attention.pattern=strided")
        if stride is not None and stride < 1:
            raise ValueError(f"model.attention.stride={stride} must be >= 1")
        self.sparse_pattern, self.stride = pattern, stride
        super().__init__(*args, **kwargs)

    def pattern(self, grid_h, grid_w):
        if self.sparse_pattern == "axial":
            rows, cols = _grid_coords(grid_h, grid_w)
            return (rows[:, None] == rows[None, :]) | (cols[:, None] == cols[None, :])
        num_patches = grid_h * grid_w
        stride = self.stride or max(1, round(num_patches**0.5))  # sqrt(n): O(n sqrt n) attended pairs
        idx = torch.arange(num_patches)
        near = (idx[:, None] - idx[None, :]).abs() < stride
        same_lane = (idx[:, None] % stride) == (idx[None, :] % stride)
        return near | same_lane
