"""Pooling: the one vector (B, D) a head reads from a block's tokens (B, N, D), written once for the trunk's
final head (`VisionTransformer.forward_head`), the early-exit heads (early_exit.py) and the task heads that
read an intermediate block (vitsweep/task/heads.py, `PooledLinear`).

    cls     the cls token, tokens[:, 0]
    mean    the mean of the patch tokens; the prefix tokens (cls, prompts, the metadata token) left out
"""

from __future__ import annotations

import torch

POOLINGS = ("cls", "mean")


def pool_tokens(tokens: torch.Tensor, pooling: str, num_prefix_tokens: int) -> torch.Tensor:
    """(B, N, D) -> (B, D): the cls token, or the mean of the tokens after the `num_prefix_tokens` prefix ones."""
    if pooling == "cls":
        return tokens[:, 0]
    return tokens[:, num_prefix_tokens:].mean(dim=1)
