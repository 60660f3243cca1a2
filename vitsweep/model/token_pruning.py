"""Token pruning and merging: fewer tokens in later layers, in training and at inference.

Both methods act inside a block, between its attention (whose projections they read, so they cost
no extra matmul) and its MLP, as in both papers:

    x = x + attn(norm1(x))
    x, size = reduce(x, qkv, size)      # fewer tokens from here on
    x = x + mlp(norm2(x))

- EViT (Liang et al., 2022, "Not All Patches are What You Need"): at the chosen layers, keep the
  ceil(n * keep_rate) patch tokens that the cls token attends to most (its attention averaged over
  heads) and fuse the others into one token, their sum weighted by that attention.
- ToMe (Bolya et al., 2023, "Token Merging: Your ViT but Faster"): in every layer, merge r tokens
  into others by bipartite soft matching on the keys (averaged over heads, cosine similarity):
  alternate tokens form sets A and B, each A token picks its most similar B token, and the r most
  similar pairs are merged, a size-weighted average. `size` counts the patches each token stands
  for, and attention becomes proportional: softmax(q k^T / sqrt(d) + log size).

Prefix tokens (cls, prompt tokens) are never pruned or merged. Written from the papers.

Both plug into the trunk inside each block (`Block.reduce`, vit.py), not at the loop's hooks (hooks.py).
Both need every layer's attention to run over whatever tokens are left (compat.ANY_TOKENS), so they compose
only with `model/attention=full` (the other patterns need the whole patch grid), and they take the patch grid
away from what reads it (compat.PATCH_GRID: segmentation heads, temporal=divided): compat.py refuses the rest.
Both rank or weigh tokens with the cls token, so each refuses model.pooling=mean when built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitsweep.model.compat import ANY_TOKENS


class NoTokenPruning:
    """model/token_pruning=none: every token goes through every layer."""

    name = "none"
    needs: frozenset[str] = frozenset()

    def __init__(self, depth: int, num_heads: int, num_prefix_tokens: int, has_cls_token: bool):
        self.depth, self.num_heads, self.num_prefix_tokens = depth, num_heads, num_prefix_tokens

    def reducer(self, layer: int) -> nn.Module | None:
        """The module that reduces the tokens after layer `layer`'s attention, or None."""
        return None

    def tokens_after(self, layer: int, num_tokens: int) -> int:
        """How many tokens leave layer `layer` when `num_tokens` enter it."""
        return num_tokens

    def tokens_per_layer(self, num_tokens: int) -> list[int]:
        """[tokens entering layer 0, entering layer 1, ..., leaving the last layer]."""
        counts = [num_tokens]
        for layer in range(self.depth):
            counts.append(self.tokens_after(layer, counts[-1]))
        return counts


class EViT(NoTokenPruning):
    """model/token_pruning=evit: keep the most attended `keep_rate` of the patch tokens at `layers`
    (0-based; null = EViT's 4th, 7th and 10th layer of 12 scaled to the depth), fuse the rest."""

    name = "evit"
    needs = frozenset({ANY_TOKENS})

    def __init__(self, keep_rate: float = 0.7, layers: Sequence[int] | None = None, *, depth: int, num_heads: int,
                 num_prefix_tokens: int, has_cls_token: bool):
        super().__init__(depth, num_heads, num_prefix_tokens, has_cls_token)
        if not 0 < keep_rate <= 1:
            raise ValueError(f"model.token_pruning.keep_rate={keep_rate} must be in (0, 1], e.g. 0.7")
        if not has_cls_token:
            raise ValueError("model/token_pruning=evit ranks tokens by the cls token's attention, and "
                             "model.pooling=mean has no cls token: use model.pooling=cls")
        layers = sorted({depth // 4, depth // 2, 3 * depth // 4}) if layers is None else sorted(set(layers))
        if any(not 0 <= layer < depth for layer in layers):
            raise ValueError(f"model.token_pruning.layers={list(layers)} must be layer indices in 0..{depth - 1}")
        self.keep_rate, self.layers = keep_rate, layers

    def reducer(self, layer):
        return FuseInattentiveTokens(self.keep_rate, self.num_heads, self.num_prefix_tokens) if layer in self.layers \
            else None

    def tokens_after(self, layer, num_tokens):
        if layer not in self.layers:
            return num_tokens
        patches = num_tokens - self.num_prefix_tokens
        kept = math.ceil(patches * self.keep_rate)
        return num_tokens if kept >= patches else self.num_prefix_tokens + kept + 1


class ToMe(NoTokenPruning):
    """model/token_pruning=tome: merge `r` tokens in every layer (fewer when fewer than 2r are left)."""

    name = "tome"
    needs = frozenset({ANY_TOKENS})

    def __init__(self, r: int = 4, *, depth: int, num_heads: int, num_prefix_tokens: int, has_cls_token: bool):
        super().__init__(depth, num_heads, num_prefix_tokens, has_cls_token)
        if r < 0:
            raise ValueError(f"model.token_pruning.r={r} must be >= 0 (tokens merged per layer)")
        if not has_cls_token:
            raise ValueError("model/token_pruning=tome with model.pooling=mean: the mean of merged tokens would weigh "
                             "each merged group as one patch; use model.pooling=cls")
        self.r = r

    def reducer(self, layer):
        return MergeTokens(self.r, self.num_heads, self.num_prefix_tokens) if self.r else None

    def tokens_after(self, layer, num_tokens):
        return num_tokens - min(self.r, (num_tokens - self.num_prefix_tokens) // 2)


def _heads(qkv: torch.Tensor, which: int, num_heads: int) -> torch.Tensor:
    """q (0), k (1) or v (2) of the fused projection (B, N, 3C), as (B, nh, N, hd)."""
    return qkv.unflatten(-1, (3, num_heads, -1))[:, :, which].transpose(1, 2)


def _take(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens (B, n, ...) at index (B, m) -> (B, m, ...)."""
    return tokens.gather(1, index.view(*index.shape, *(1,) * (tokens.dim() - 2)).expand(-1, -1, *tokens.shape[2:]))


class FuseInattentiveTokens(nn.Module):
    """EViT's token reorganization for one layer."""

    def __init__(self, keep_rate: float, num_heads: int, num_prefix_tokens: int):
        super().__init__()
        self.keep_rate, self.num_heads, self.num_prefix_tokens = keep_rate, num_heads, num_prefix_tokens

    def forward(self, x: torch.Tensor, qkv: torch.Tensor, size: torch.Tensor | None):
        p = self.num_prefix_tokens
        patches = x[:, p:]  # (B, n, C)
        kept = math.ceil(patches.shape[1] * self.keep_rate)
        if kept >= patches.shape[1]:
            return x, size
        q_cls, k = _heads(qkv[:, :1], 0, self.num_heads), _heads(qkv, 1, self.num_heads)  # (B, nh, 1|N, hd)
        cls_attention = F.softmax(q_cls @ k.transpose(-2, -1) * q_cls.shape[-1] ** -0.5, dim=-1)  # (B, nh, 1, N)
        attentiveness = cls_attention.mean(dim=1)[:, 0, p:]  # (B, n): the cls token's attention to each patch token
        order = attentiveness.argsort(dim=-1, descending=True)
        attentive, inattentive = order[:, :kept], order[:, kept:]
        weights = attentiveness.gather(1, inattentive)[..., None]  # (B, n - kept, 1)
        fused = (_take(patches, inattentive) * weights).sum(dim=1, keepdim=True)  # (B, 1, C): EViT's x_fused
        return torch.cat([x[:, :p], _take(patches, attentive), fused], dim=1), size  # (B, p + kept + 1, C)


class MergeTokens(nn.Module):
    """ToMe's bipartite soft matching for one layer."""

    def __init__(self, r: int, num_heads: int, num_prefix_tokens: int):
        super().__init__()
        self.r, self.num_heads, self.num_prefix_tokens = r, num_heads, num_prefix_tokens

    def forward(self, x: torch.Tensor, qkv: torch.Tensor, size: torch.Tensor | None):
        B, N, C = x.shape
        p = self.num_prefix_tokens
        r = min(self.r, (N - p) // 2)
        if r <= 0:
            return x, size
        size = x.new_ones(B, N) if size is None else size  # (B, N) patches per token
        keys = qkv[:, p:, C:2 * C].unflatten(-1, (self.num_heads, -1)).mean(dim=2)  # (B, n, hd): mean over heads
        keys = F.normalize(keys, dim=-1)
        similarity = keys[:, ::2] @ keys[:, 1::2].transpose(-2, -1)  # (B, |A|, |B|): cosine of keys
        best, partner = similarity.max(dim=-1)  # (B, |A|): each A token's most similar B token
        order = best.argsort(dim=-1, descending=True)
        merged, unmerged = order[:, :r], order[:, r:]  # the r most similar edges merge
        x_a, x_b = x[:, p::2], x[:, p + 1::2]  # (B, |A|, C), (B, |B|, C)
        size_a, size_b = size[:, p::2], size[:, p + 1::2]
        into = partner.gather(1, merged)  # (B, r): the B token each merged A token joins
        # size-weighted average: B gathers sum(size * x) and sum(size) of the A tokens merged into it
        merged_size = _take(size_a, merged)  # (B, r)
        weighted_b = (x_b * size_b[..., None]).scatter_add(
            1, into[..., None].expand(-1, -1, C), _take(x_a, merged) * merged_size[..., None])
        size_b = size_b.scatter_add(1, into, merged_size)
        x = torch.cat([x[:, :p], _take(x_a, unmerged), weighted_b / size_b[..., None]], dim=1)  # (B, N - r, C)
        size = torch.cat([size[:, :p], _take(size_a, unmerged), size_b], dim=1)  # (B, N - r)
        return x, size
