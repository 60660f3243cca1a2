"""Multi-head self-attention and its sparsity patterns.

Every attention type is the same `MultiHeadAttention` with a different boolean pattern over the
token grid: `mask[i, j]` says whether token i may attend to token j. The mask is the definition of
each pattern (a token's output does not depend on tokens it cannot see). The fast path computes
each pattern block by block (`blocked_attention.py`: windows, halo blocks, rows and columns), so a
restricted pattern costs what it attends to; the dense masked product (`masked_attention`) is the
reference that the tests compare it with, and the path that records probabilities.

Attention probabilities are not returned: `forward` gives tokens, like every other module. To
look at them, `record_attention(model)` switches every attention module to the explicit path
(softmax(QK^T) @ V with the mask) and collects the (B, nh, N, N) probabilities of each call, in
call order:

    with record_attention(model) as attentions:
        logits = model(images)      # attentions: one (B, nh, N, N) tensor per attention call

Prefix tokens (the cls token, prompt tokens) are global in every pattern: they attend to every token and every
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

from vitsweep.model import blocked_attention as blocked
from vitsweep.model.blocked_attention import split_heads


class MultiHeadAttention(nn.Module):
    """Full (global) self-attention; subclasses restrict it by overriding `pattern` (the definition)
    and `attend` (the blocked computation of that pattern)."""

    supports_token_reduction = True  # EViT/ToMe drop tokens: only full attention does not need the grid

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

    def pattern(self, grid_h: int, grid_w: int) -> torch.Tensor | None:
        """Boolean (P, P) mask over the P = grid_h * grid_w patch tokens; None means attend to all."""
        return None

    @property
    def mask(self) -> torch.Tensor | None:
        """The pattern over every token, (N, N) bool, prefix tokens global; None for full attention.
        The definition that `attend` computes block by block; built on demand (it is N² booleans),
        for the recording path and the tests."""
        patch_mask = self.pattern(*self.grid_size)  # (P, P)
        if patch_mask is None:
            return None
        p = self.num_prefix_tokens
        mask = torch.ones(p + patch_mask.shape[0], p + patch_mask.shape[0], dtype=torch.bool)
        mask[p:, p:] = patch_mask
        return mask

    def check_num_tokens(self, num_tokens: int) -> None:
        expected = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        if num_tokens != expected:
            raise ValueError(f"{type(self).__name__} was built for {expected} tokens "
                             f"({self.num_prefix_tokens} prefix + grid {self.grid_size}), input has {num_tokens}")

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None, return_qkv: bool = False):
        """(B, N, C) -> (B, N, C). `size` (B, N): how many patches each token stands for after token
        merging (ToMe's proportional attention adds log(size) to the scores); None: one each.
        `return_qkv` also returns the fused projection (B, N, 3C), which token pruning reads."""
        qkv = self.qkv(x)  # (B, N, 3C): [q | k | v], heads inside each
        dropout_p = self.attn_drop if self.training else 0.0
        if self.recorder is not None:
            # slow path, only under record_attention(): materialize the (B, nh, N, N) probabilities
            out, attn = self.masked_attention(qkv, size, dropout_p)
            self.recorder.append(attn)
        else:
            out = self.attend(qkv, size, dropout_p)  # (B, N, C)
        out = self.proj_drop(self.proj(out))
        return (out, qkv) if return_qkv else out

    def attend(self, qkv: torch.Tensor, size: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
        """The fast path: (B, N, 3C) -> (B, N, C). Full attention: SDPA (flash / memory-efficient
        kernels where available); subclasses compute their pattern block by block."""
        q, k, v = split_heads(qkv, self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, N, hd)
        bias = None if size is None else size.log()[:, None, None, :].to(q.dtype)  # (B, 1, 1, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
        return out.transpose(1, 2).flatten(2)  # (B, N, C)

    def masked_attention(self, qkv: torch.Tensor, size: torch.Tensor | None = None,
                         dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference: dense scores with the pattern's (N, N) mask and an explicit softmax.
        Returns the attended values (B, N, C) and the probabilities (B, nh, N, N)."""
        q, k, v = split_heads(qkv, self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, N, hd)
        scores = (q * self.scale) @ k.transpose(-2, -1)  # (B, nh, N, N)
        mask = self.mask
        if mask is not None:
            self.check_num_tokens(scores.shape[-1])
            scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
        if size is not None:
            scores = scores + size.log()[:, None, None, :]
        attn = scores.softmax(dim=-1)
        out = F.dropout(attn, dropout_p) @ v if dropout_p else attn @ v  # (B, nh, N, hd)
        return out.transpose(1, 2).flatten(2), attn


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


class PatternAttention(MultiHeadAttention):
    """A restricted pattern over the patch grid: the input must be the whole grid (plus prefix)."""

    supports_token_reduction = False

    def attend(self, qkv, size, dropout_p):
        """The dense masked product (the fallback where no blocked form is cheaper)."""
        self.check_num_tokens(qkv.shape[1])
        q, k, v = split_heads(qkv, self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, N, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense_mask, dropout_p=dropout_p)
        return out.transpose(1, 2).flatten(2)  # (B, N, C)


class LocalAttention(PatternAttention):
    """Each patch attends to the `kernel_size` x `kernel_size` neighbourhood centred on it.

    Computed as Halo attention over blocks of HALO_BLOCK x HALO_BLOCK queries on long sequences, and
    as the dense masked product on short ones, where it is the faster: measured (fwd+bwd, kernel 3,
    dim 192, 1 thread) Halo runs at 0.23x the masked product's speed at 65 tokens, 0.56x at 401,
    1.15x at 785 and 1.47x at 1,025; so Halo from HALO_MIN_RATIO times the keys of a halo window.
    Both compute the same function (tests/test_blocked_attention.py)."""

    HALO_BLOCK = 8
    HALO_MIN_RATIO = 6  # sequence length / keys of one halo window, from the figures above

    def __init__(self, *args, kernel_size: int = 3, **kwargs):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"model.attention.kernel_size={kernel_size} must be odd and >= 1")
        self.kernel_size = kernel_size
        super().__init__(*args, **kwargs)
        radius, num_tokens = kernel_size // 2, self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        self.halo = num_tokens >= self.HALO_MIN_RATIO * (self.HALO_BLOCK + 2 * radius) ** 2
        mask = (blocked.halo_mask(self.grid_size, self.HALO_BLOCK, radius, self.num_prefix_tokens) if self.halo
                else self.mask)
        self.register_buffer("halo_mask" if self.halo else "dense_mask", mask, persistent=False)

    def pattern(self, grid_h, grid_w):
        rows, cols = _grid_coords(grid_h, grid_w)
        r = self.kernel_size // 2
        return ((rows[:, None] - rows[None, :]).abs() <= r) & ((cols[:, None] - cols[None, :]).abs() <= r)

    def attend(self, qkv, size, dropout_p):
        if not self.halo:
            return super().attend(qkv, size, dropout_p)
        self.check_num_tokens(qkv.shape[1])
        return blocked.local_attention(qkv, self.num_heads, self.grid_size, self.num_prefix_tokens,
                                       self.HALO_BLOCK, self.kernel_size // 2, self.halo_mask, dropout_p)


class WindowedAttention(PatternAttention):
    """Non-overlapping `window_size` x `window_size` windows (Swin). With `shift=True`, odd layers
    move the window grid by half a window so information crosses window borders: window borders
    fall at rows/columns `shift + k * window_size` with shift = window_size // 2, and the windows cut
    by the image border stay separate regions. That is Swin's cyclic shift with its mask. A grid
    that `window_size` does not divide gets a smaller last window.

    Computed per window (`blocked_attention.windowed_attention`): one SDPA over the windows of the
    whole batch, the shifted layers by a roll of the grid and Swin's border mask."""

    def __init__(self, *args, window_size: int = 4, shift: bool = True, **kwargs):
        if window_size < 1:
            raise ValueError(f"model.attention.window_size={window_size} must be >= 1")
        self.window_size, self.shift = window_size, shift
        super().__init__(*args, **kwargs)
        self.offset = self.window_size // 2 if (self.shift and self.layer_idx % 2 == 1) else 0
        self.register_buffer("region_mask", blocked.window_region_mask(
            self.grid_size, self.window_size, self.offset, self.num_prefix_tokens), persistent=False)

    def pattern(self, grid_h, grid_w):
        rows, cols = _grid_coords(grid_h, grid_w)
        offset = self.window_size // 2 if (self.shift and self.layer_idx % 2 == 1) else 0
        # rows before the first shifted border form their own region (floor division gives -1)
        win_r = torch.div(rows - offset, self.window_size, rounding_mode="floor")
        win_c = torch.div(cols - offset, self.window_size, rounding_mode="floor")
        return (win_r[:, None] == win_r[None, :]) & (win_c[:, None] == win_c[None, :])

    def attend(self, qkv, size, dropout_p):
        self.check_num_tokens(qkv.shape[1])
        return blocked.windowed_attention(qkv, self.num_heads, self.grid_size, self.num_prefix_tokens,
                                          self.window_size, self.offset, self.region_mask, dropout_p)


class SparseAttention(PatternAttention):
    """Fixed sparse patterns from the sparse-transformer literature.

    - `axial`: a patch attends to its own row and column of the grid (Axial / CCNet style):
      two layers connect every pair of patches.
    - `strided`: a patch attends to the patches less than `stride` positions from it in the flat
      (row-major) order, plus every patch whose flat index is congruent to its own modulo `stride`
      (Child et al., 2019, made bidirectional): two layers connect every pair of patches.

    `axial` is computed per row and column (`blocked_attention.axial_attention`); `strided` with the
    patches in rows of `stride`, as a band of three rows and a column (`strided_attention`).
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
        if pattern == "strided":
            band, lane = blocked.strided_masks(self.grid_size[0] * self.grid_size[1], self.lane_stride)
            self.register_buffer("band_mask", band, persistent=False)
            self.register_buffer("lane_mask", lane, persistent=False)

    @property
    def lane_stride(self) -> int:
        return self.stride or max(1, round((self.grid_size[0] * self.grid_size[1]) ** 0.5))

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

    def attend(self, qkv, size, dropout_p):
        self.check_num_tokens(qkv.shape[1])
        if self.sparse_pattern == "strided":
            return blocked.strided_attention(qkv, self.num_heads, self.num_prefix_tokens, self.lane_stride,
                                             self.band_mask, self.lane_mask, self.scale, dropout_p)
        return blocked.axial_attention(qkv, self.num_heads, self.grid_size, self.num_prefix_tokens, self.scale,
                                       dropout_p)
