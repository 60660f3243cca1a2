"""Visual Prompt Tuning (Jia et al., 2022): learned prompt tokens that a frozen backbone reads.

    shallow   `length` prompt tokens inserted once, after the cls token, before the first block
    deep      a separate set of `length` prompt tokens for every layer: each block's input prompts
              are replaced by its own (the previous block's outputs at those positions are dropped)

The sequence is [cls, prompts, patches]; prompts get no position embedding (the embedding keeps its
shape, so pretrained weights load as they are). Prompt tokens are prefix tokens: global under
every attention pattern, never pruned or merged, left out of mean pooling and of attention maps.
With `model.trainable=prompt+head` only the prompts and the head train.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class NoPrompt(nn.Module):
    """model/prompt=none."""

    length = 0

    def __init__(self, depth: int, dim: int, patch_dim: int):
        super().__init__()

    def insert(self, x: torch.Tensor, after: int) -> torch.Tensor:
        """Insert the first layer's prompts after the first `after` tokens (the cls token)."""
        return x

    def at_layer(self, x: torch.Tensor, layer: int, after: int) -> torch.Tensor:
        """The input of block `layer` (> 0) with that layer's prompts in place (deep prompts)."""
        return x


class ShallowPrompt(NoPrompt):
    """model/prompt=shallow: `length` learned tokens at the input."""

    def __init__(self, length: int = 10, *, depth: int, dim: int, patch_dim: int):
        super().__init__(depth, dim, patch_dim)
        if length < 1:
            raise ValueError(f"model.prompt.length={length} must be >= 1 (or model/prompt=none)")
        self.length = length
        self.tokens = nn.Parameter(torch.empty(self.layers(depth), length, dim))  # (layers, L, D)
        # VPT's init: Xavier uniform over (patch dim -> dim), as for the patch embedding
        bound = math.sqrt(6.0 / (patch_dim + dim))
        nn.init.uniform_(self.tokens, -bound, bound)

    def layers(self, depth: int) -> int:
        return 1

    def insert(self, x, after):
        prompts = self.tokens[0].expand(x.shape[0], -1, -1)  # (B, L, D)
        return torch.cat([x[:, :after], prompts, x[:, after:]], dim=1)


class DeepPrompt(ShallowPrompt):
    """model/prompt=deep: `length` learned tokens per layer, replacing the previous layer's."""

    def layers(self, depth):
        return depth

    def at_layer(self, x, layer, after):
        if layer == 0:
            return x
        prompts = self.tokens[layer].expand(x.shape[0], -1, -1)  # (B, L, D)
        return torch.cat([x[:, :after], prompts, x[:, after + self.length:]], dim=1)
