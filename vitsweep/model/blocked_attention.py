"""The restricted attention patterns computed block by block, so they cost what they attend to.

`attention.py` defines each pattern as a boolean mask over the token grid; a dense (N, N) product
with that mask gives the exact semantics but costs as much as full attention. Here each pattern is
computed on the blocks of tokens it actually relates, with the same result (to float rounding;
`tests/test_blocked_attention.py` compares each with the masked reference):

    windowed   partition the patch grid into windows, one batched SDPA over all windows; shifted
               layers roll the grid by half a window first and mask the regions that the roll
               brought together (Swin's cyclic shift and border mask)
    local      Halo attention: query blocks of `block` x `block` patches attend to their block plus
               a halo of kernel_size // 2 patches, masked to each query's own neighbourhood
    axial      criss-cross: every patch scores its row and its column (and the prefix tokens) in
               one softmax, from per-row and per-column products
    strided    the patches in rows of `stride`: a band of three rows and the patch's column, in
               one softmax

Prefix tokens (cls, prompts) stay global as in the masked form: their queries attend to every token
in one small SDPA, and every patch query also scores the prefix keys, in the same softmax as its
block.

Every function takes the fused projection `qkv` (B, N, 3 * C) = [q | k | v], heads inside each,
and returns the attended values (B, N, C) before the output projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split_heads(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(..., 3 * C) -> (..., 3, nh, hd)."""
    return qkv.unflatten(-1, (3, num_heads, -1))


def prefix_attention(qkv: torch.Tensor, num_prefix: int, num_heads: int, dropout_p: float) -> torch.Tensor:
    """The prefix tokens' outputs: their queries attend to every token. (B, N, 3C) -> (B, p, C)."""
    heads = split_heads(qkv, num_heads)  # (B, N, 3, nh, hd)
    q = heads[:, :num_prefix, 0].transpose(1, 2)  # (B, nh, p, hd)
    k, v = heads[:, :, 1].transpose(1, 2), heads[:, :, 2].transpose(1, 2)  # (B, nh, N, hd)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, nh, p, hd)
    return out.transpose(1, 2).flatten(2)  # (B, p, C)


# ------------------------------------------------------------------------------------- windows

def padded_size(grid_size: tuple[int, int], window: int) -> tuple[int, int]:
    return tuple(-(-side // window) * window for side in grid_size)


def to_windows(grid: torch.Tensor, window: int, offset: int) -> torch.Tensor:
    """(B, H, W, D) -> (B * nW, window * window, D): pad H and W up to multiples of `window` (bottom,
    right), roll by -offset (Swin's cyclic shift), cut into non-overlapping windows, row-major."""
    B, H, W, D = grid.shape
    Hp, Wp = padded_size((H, W), window)
    grid = F.pad(grid, (0, 0, 0, Wp - W, 0, Hp - H))
    if offset:
        grid = grid.roll((-offset, -offset), dims=(1, 2))
    windows = grid.view(B, Hp // window, window, Wp // window, window, D).transpose(2, 3)
    return windows.reshape(B * (Hp // window) * (Wp // window), window * window, D)


def from_windows(windows: torch.Tensor, batch: int, grid_size: tuple[int, int], window: int, offset: int):
    """The inverse of `to_windows`: (B * nW, window * window, D) -> (B, H, W, D)."""
    H, W = grid_size
    Hp, Wp = padded_size(grid_size, window)
    grid = windows.view(batch, Hp // window, Wp // window, window, window, -1).transpose(2, 3)
    grid = grid.reshape(batch, Hp, Wp, -1)
    if offset:
        grid = grid.roll((offset, offset), dims=(1, 2))
    return grid[:, :H, :W]


def window_region_mask(grid_size: tuple[int, int], window: int, offset: int, num_prefix: int) -> torch.Tensor | None:
    """(nW, 1, T, p + T) bool, or None when every window is one region and has no padding.

    The masked pattern puts window borders at rows and columns offset + k * window, with the strip
    before the first border a region of its own (and a smaller last window where the grid is not a
    multiple). Padding to a multiple, then rolling by -offset, brings each such region inside one
    window; a window may also hold padding and, after the roll, the strip that wrapped around. Label
    every position with its region (padding: -1) and let a query see the keys of its own region and
    the prefix keys. Padding queries see the padding and the prefix (never empty), and are dropped."""
    H, W = grid_size
    Hp, Wp = padded_size(grid_size, window)
    rows = torch.div(torch.arange(Hp) - offset, window, rounding_mode="floor")
    cols = torch.div(torch.arange(Wp) - offset, window, rounding_mode="floor")
    rows[H:] = cols[W:] = -2  # padding
    labels = (rows[:, None] + 1) * (Wp // window + 1) + (cols[None, :] + 1)  # (Hp, Wp), one per region
    labels[(rows[:, None] == -2) | (cols[None, :] == -2)] = -1
    windows = to_windows(labels[None, :, :, None], window, offset)[..., 0]  # (nW, T)
    same_region = windows[:, :, None] == windows[:, None, :]  # (nW, T, T)
    if same_region.all():
        return None
    prefix = torch.ones(*same_region.shape[:2], num_prefix, dtype=torch.bool)
    return torch.cat([prefix, same_region], dim=-1)[:, None]  # (nW, 1, T, p + T)


def windowed_attention(qkv: torch.Tensor, num_heads: int, grid_size: tuple[int, int], num_prefix: int,
                       window: int, offset: int, region_mask: torch.Tensor | None,
                       dropout_p: float = 0.0) -> torch.Tensor:
    """Attention within windows of `window` x `window` patches (shifted by `offset`), plus global
    prefix tokens: one SDPA over all windows of the batch. (B, N, 3C) -> (B, N, C)."""
    B, _, C3 = qkv.shape
    H, W = grid_size
    grid = qkv[:, num_prefix:].reshape(B, H, W, C3)
    windows = split_heads(to_windows(grid, window, offset), num_heads)  # (B*nW, T, 3, nh, hd)
    q, k, v = windows.permute(2, 0, 3, 1, 4).unbind(0)  # (B*nW, nh, T, hd)
    num_windows = q.shape[0] // B
    mask = None if region_mask is None else region_mask.repeat(B, 1, 1, 1)  # (B*nW, 1, T, p+T)
    if num_prefix:
        prefix = split_heads(qkv[:, :num_prefix], num_heads).permute(2, 0, 3, 1, 4)[1:]  # (2, B, nh, p, hd)
        prefix = prefix.repeat_interleave(num_windows, dim=1)  # (2, B*nW, nh, p, hd)
        k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)  # (B*nW, nh, p+T, hd)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B*nW, nh, T, hd)
    out = from_windows(out.transpose(1, 2).flatten(2), B, grid_size, window, offset)  # (B, H, W, C)
    out = out.reshape(B, H * W, -1)
    if num_prefix:
        out = torch.cat([prefix_attention(qkv, num_prefix, num_heads, dropout_p), out], dim=1)
    return out  # (B, N, C)


# --------------------------------------------------------------------------------- neighbourhoods

def halo_mask(grid_size: tuple[int, int], block: int, radius: int, num_prefix: int) -> torch.Tensor:
    """(nB, 1, T, p + K) bool for Halo attention: query (r, c) of a block sees key (r', c') of the
    block's halo window when |r - r'| <= radius and |c - c'| <= radius and the key is inside the
    grid. T = block², K = (block + 2 radius)²."""
    H, W = grid_size
    Hp, Wp = padded_size(grid_size, block)
    span = block + 2 * radius
    # absolute coordinates of each block's queries and of its halo keys
    q_r = torch.arange(Hp).view(Hp // block, block)  # (nBh, block)
    q_c = torch.arange(Wp).view(Wp // block, block)
    k_r = q_r[:, :1] - radius + torch.arange(span)  # (nBh, span)
    k_c = q_c[:, :1] - radius + torch.arange(span)
    near_r = (q_r[:, :, None] - k_r[:, None, :]).abs() <= radius  # (nBh, block, span)
    near_c = (q_c[:, :, None] - k_c[:, None, :]).abs() <= radius  # (nBw, block, span)
    inside_r, inside_c = (k_r >= 0) & (k_r < H), (k_c >= 0) & (k_c < W)  # (nBh, span), (nBw, span)
    near_r, near_c = near_r & inside_r[:, None, :], near_c & inside_c[:, None, :]
    # (nBh, nBw, block_r, block_c, span_r, span_c) -> (nB, T, K)
    mask = near_r[:, None, :, None, :, None] & near_c[None, :, None, :, None, :]
    mask = mask.reshape((Hp // block) * (Wp // block), block * block, span * span)
    mask[:, :, 0] |= ~mask.any(dim=-1)  # padding queries (dropped later) need one key when there is no prefix
    prefix = torch.ones(*mask.shape[:2], num_prefix, dtype=torch.bool)
    return torch.cat([prefix, mask], dim=-1)[:, None]  # (nB, 1, T, p + K)


def local_attention(qkv: torch.Tensor, num_heads: int, grid_size: tuple[int, int], num_prefix: int,
                    block: int, radius: int, mask: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Each patch attends to the (2 radius + 1)² patches centred on it, plus global prefix tokens,
    computed as Halo attention (Vaswani et al., 2021): blocks of queries with their keys unfolded
    from the block grown by `radius` on every side. (B, N, 3C) -> (B, N, C)."""
    B, _, C3 = qkv.shape
    H, W = grid_size
    C = C3 // 3
    Hp, Wp = padded_size(grid_size, block)
    span = block + 2 * radius
    grid = qkv[:, num_prefix:].reshape(B, H, W, C3)
    q = to_windows(grid[..., :C], block, 0).unflatten(-1, (num_heads, -1)).transpose(1, 2)  # (B*nB, nh, T, hd)
    # keys and values of each block's halo window: unfold the padded (B, 2C, H, W) map
    kv = grid[..., C:].permute(0, 3, 1, 2)  # (B, 2C, H, W)
    kv = F.pad(kv, (radius, Wp - W + radius, radius, Hp - H + radius))
    kv = F.unfold(kv, kernel_size=span, stride=block)  # (B, 2C * span², nB)
    kv = kv.view(B, 2, num_heads, C // num_heads, span * span, -1).permute(1, 0, 5, 2, 4, 3)
    k, v = kv.reshape(2, -1, num_heads, span * span, C // num_heads).unbind(0)  # (B*nB, nh, K, hd)
    if num_prefix:
        prefix = split_heads(qkv[:, :num_prefix], num_heads).permute(2, 0, 3, 1, 4)[1:]  # (2, B, nh, p, hd)
        prefix = prefix.repeat_interleave(q.shape[0] // B, dim=1)
        k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)  # (B*nB, nh, p+K, hd)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(B, 1, 1, 1), dropout_p=dropout_p)
    out = from_windows(out.transpose(1, 2).flatten(2), B, grid_size, block, 0).reshape(B, H * W, C)
    if num_prefix:
        out = torch.cat([prefix_attention(qkv, num_prefix, num_heads, dropout_p), out], dim=1)
    return out  # (B, N, C)


# ------------------------------------------------------------------------------------------ axial

def axial_attention(qkv: torch.Tensor, num_heads: int, grid_size: tuple[int, int], num_prefix: int,
                    scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Each patch attends to its grid row and column (itself once) and the prefix tokens, in one
    softmax (criss-cross attention, Huang et al., 2019). Scores per row (B, nh, H, W, W) and per
    column (B, nh, H, W, H) replace the (N, N) product: O(N (H + W)) instead of O(N²).
    (B, N, 3C) -> (B, N, C)."""
    B, _, C3 = qkv.shape
    H, W = grid_size
    heads = split_heads(qkv[:, num_prefix:].reshape(B, H, W, C3), num_heads)  # (B, H, W, 3, nh, hd)
    # contiguous operands: batched matmuls on strided views (and their gradients) fall back to a
    # loop over the batch, 100x slower on CPU
    q, k, v = (t.contiguous() for t in heads.permute(3, 0, 4, 1, 2, 5).unbind(0))  # (B, nh, H, W, hd)
    q = q * scale
    row = q @ k.transpose(-2, -1)  # (B, nh, H, W, W): key (h, v)
    q_t, k_t, v_t = (t.transpose(2, 3).contiguous() for t in (q, k, v))  # (B, nh, W, H, hd)
    col = (q_t @ k_t.transpose(-2, -1)).transpose(2, 3)  # (B, nh, H, W, H): key (u, w)
    # the patch itself is in its row and its column: count it once (in the row)
    col = col.masked_fill(torch.eye(H, dtype=torch.bool, device=q.device)[:, None, :], float("-inf"))
    scores = [row, col]
    if num_prefix:
        prefix = split_heads(qkv[:, :num_prefix], num_heads).permute(2, 0, 3, 1, 4)  # (3, B, nh, p, hd)
        scores.insert(0, (q.flatten(2, 3) @ prefix[1].transpose(-2, -1)).unflatten(2, (H, W)))  # (B, nh, H, W, p)
    probs = torch.cat(scores, dim=-1).softmax(dim=-1)  # (B, nh, H, W, p + W + H)
    probs = F.dropout(probs, dropout_p) if dropout_p else probs
    p_prefix, p_row, p_col = (t.contiguous() for t in probs.split([num_prefix, W, H], dim=-1))
    out = p_row @ v  # (B, nh, H, W, hd)
    out = out + (p_col.transpose(2, 3) @ v_t).transpose(2, 3)
    if num_prefix:
        out = out + (p_prefix.flatten(2, 3) @ prefix[2]).unflatten(2, (H, W))
    out = out.permute(0, 2, 3, 1, 4).reshape(B, H * W, -1)  # (B, P, C)
    if num_prefix:
        out = torch.cat([prefix_attention(qkv, num_prefix, num_heads, dropout_p), out], dim=1)
    return out  # (B, N, C)


# ---------------------------------------------------------------------------------------- strided

def strided_masks(num_patches: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For `strided_attention`, with the patches in rows of `stride` (R rows, the last one padded):
    band (R, s, 3s) bool, query (a, b) sees key c of rows a-1, a, a+1 when their flat distance is
    below the stride; lane (R, s, R) bool, query (a, b) sees key (a', b) of its column, itself left
    out (it is in the band). Padding keys are masked in both."""
    s = stride
    rows = -(-num_patches // s)
    query = torch.arange(rows * s).view(rows, s)  # flat index of each query
    band_key = query[:, :1, None] - s + torch.arange(3 * s)  # (R, 1, 3s): flat index of each band key
    band = ((query[..., None] - band_key).abs() < s) & (band_key >= 0) & (band_key < num_patches)  # (R, s, 3s)
    lane_key = torch.arange(rows)[None, None, :] * s + torch.arange(s)[None, :, None]  # (1, s, R)
    lane = (lane_key < num_patches) & (torch.arange(rows)[:, None, None] != torch.arange(rows)[None, None, :])
    return band, lane  # (R, s, 3s), (R, s, R)


def strided_attention(qkv: torch.Tensor, num_heads: int, num_prefix: int, stride: int, band_mask: torch.Tensor,
                      lane_mask: torch.Tensor, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Each patch attends to the patches less than `stride` apart in row-major order and to those
    congruent to it modulo `stride` (Child et al., 2019, both ways), plus the prefix tokens, in one
    softmax. With the patches in rows of `stride`, the first is a band of three rows, the second a
    column: O(N (3 s + N / s)) instead of O(N²). (B, N, 3C) -> (B, N, C)."""
    B, N, C3 = qkv.shape
    P, s = N - num_prefix, stride
    rows = band_mask.shape[0]
    patches = F.pad(qkv[:, num_prefix:], (0, 0, 0, rows * s - P))  # (B, R*s, 3C)
    heads = split_heads(patches.view(B, rows, s, C3), num_heads)  # (B, R, s, 3, nh, hd)
    q, k, v = (t.contiguous() for t in heads.permute(3, 0, 4, 1, 2, 5).unbind(0))  # (B, nh, R, s, hd)
    q = q * scale
    k_pad, v_pad = F.pad(k, (0, 0, 0, 0, 1, 1)), F.pad(v, (0, 0, 0, 0, 1, 1))  # a zero row above and below
    k_band = torch.cat([k_pad[:, :, :-2], k_pad[:, :, 1:-1], k_pad[:, :, 2:]], dim=3)  # (B, nh, R, 3s, hd)
    v_band = torch.cat([v_pad[:, :, :-2], v_pad[:, :, 1:-1], v_pad[:, :, 2:]], dim=3)
    band = (q @ k_band.transpose(-2, -1)).masked_fill(~band_mask, float("-inf"))  # (B, nh, R, s, 3s)
    q_t, k_t, v_t = (t.transpose(2, 3).contiguous() for t in (q, k, v))  # (B, nh, s, R, hd)
    lane = (q_t @ k_t.transpose(-2, -1)).transpose(2, 3)  # (B, nh, R, s, R): key (a', b)
    lane = lane.masked_fill(~lane_mask, float("-inf"))
    scores = [band, lane]
    if num_prefix:
        prefix = split_heads(qkv[:, :num_prefix], num_heads).permute(2, 0, 3, 1, 4)  # (3, B, nh, p, hd)
        scores.insert(0, (q.flatten(2, 3) @ prefix[1].transpose(-2, -1)).unflatten(2, (rows, s)))  # (B, nh, R, s, p)
    probs = torch.cat(scores, dim=-1).softmax(dim=-1)  # (B, nh, R, s, p + 3s + R)
    probs = F.dropout(probs, dropout_p) if dropout_p else probs
    p_prefix, p_band, p_lane = (t.contiguous() for t in probs.split([num_prefix, 3 * s, rows], dim=-1))
    out = p_band @ v_band  # (B, nh, R, s, hd)
    out = out + (p_lane.transpose(2, 3) @ v_t).transpose(2, 3)
    if num_prefix:
        out = out + (p_prefix.flatten(2, 3) @ prefix[2]).unflatten(2, (rows, s))
    out = out.permute(0, 2, 3, 1, 4).reshape(B, rows * s, -1)[:, :P]  # (B, P, C)
    if num_prefix:
        out = torch.cat([prefix_attention(qkv, num_prefix, num_heads, dropout_p), out], dim=1)
    return out  # (B, N, C)
