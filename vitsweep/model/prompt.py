"""Visual Prompt Tuning (Jia et al., 2022): learned prompt tokens that a frozen backbone reads.

    shallow   `length` prompt tokens inserted once, after the cls token, before the first block
    deep      a separate set of `length` prompt tokens for every layer: each block's input prompts
              are replaced by its own (the previous block's outputs at those positions are dropped)

The sequence is [cls, prompts, patches]; prompts get no position embedding (the embedding keeps its
shape, so pretrained weights load as they are). Prompt tokens are prefix tokens: global under
every attention pattern, never pruned or merged, left out of mean pooling and of attention maps.
With `model.trainable=prompt+head` only the prompts and the head train.

The prompts plug into the trunk's loop (hooks.py) at `prefix_tokens` (the first layer's, after cls) and,
deep, at `before_block` (each later layer's own, in place of the previous layer's outputs there).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vitsweep.model.hooks import TrunkOption, TrunkPass


class NoPrompt(TrunkOption):
    """model/prompt=none."""

    length = 0

    def __init__(self, depth: int, dim: int, patch_dim: int, start: int = 1):
        super().__init__()
        self.start = start  # the index of the first prompt token: after the cls token (0 without one)


class ShallowPrompt(NoPrompt):
    """model/prompt=shallow: `length` learned tokens at the input."""

    name = "shallow"

    def __init__(self, length: int = 10, *, depth: int, dim: int, patch_dim: int, start: int = 1):
        super().__init__(depth, dim, patch_dim, start)
        if length < 1:
            raise ValueError(f"model.prompt.length={length} must be >= 1 (or model/prompt=none)")
        self.length = self.num_tokens = length
        self.tokens = nn.Parameter(torch.empty(self.layers(depth), length, dim))  # (layers, L, D)
        # VPT's init: Xavier uniform over (patch dim -> dim), as for the patch embedding
        bound = math.sqrt(6.0 / (patch_dim + dim))
        nn.init.uniform_(self.tokens, -bound, bound)

    def layers(self, depth: int) -> int:
        return 1

    def prefix_tokens(self, batch: int, run: TrunkPass) -> torch.Tensor:
        return self.tokens[0].expand(batch, -1, -1)  # (B, L, D): the first layer's prompts


class DeepPrompt(ShallowPrompt):
    """model/prompt=deep: `length` learned tokens per layer, replacing the previous layer's."""

    name = "deep"

    def layers(self, depth):
        return depth

    def before_block(self, layer, tokens, run):
        if layer == 0:
            return tokens  # the first layer's prompts were inserted at the input
        prompts = self.tokens[layer].expand(tokens.shape[0], -1, -1)  # (B, L, D)
        return torch.cat([tokens[:, :self.start], prompts, tokens[:, self.start + self.length:]], dim=1)
