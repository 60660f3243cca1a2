"""The interface between the ViT trunk and the heads that a task puts on it (vitsweep/task/heads.py).

The default head is timm's: one `nn.Linear` on the pooled vector (classification, regression). A task
that needs more (a segmentation decoder on the patch tokens, one head per target of a multi-task run,
deep supervision from an intermediate block) gives the model a `TaskHead`, which reads `Features`:

    features.pooled         (B, D)        the cls token or the mean of the patch tokens, normalized
    features.patch_tokens   (B, P, D)     the patch tokens after the last block (normalized with cls pooling)
    features.hidden[i]      (B, N, D)     block i's output tokens, for each i the head lists in `reads_blocks`
    features.attention[i]   (B, nh, N, N) block i's attention probabilities, for each i in `reads_attention`
    features.grid_size      (gh, gw)      the patch grid; features.image_size: the input's (H, W)

Block indices count from 0; negative ones from the end, as in a Python list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Features:
    pooled: torch.Tensor
    patch_tokens: torch.Tensor
    grid_size: tuple[int, int]
    image_size: tuple[int, int]
    num_prefix_tokens: int
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)

    def patch_grid(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens (B, P, D) -> a feature map (B, D, gh, gw), row-major like the token order."""
        tokens = self.patch_tokens if tokens is None else tokens
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.grid_size)


class TaskHead(nn.Module):
    """A head that reads `Features` rather than the pooled vector alone. `reads_blocks` and
    `reads_attention` list the blocks whose output tokens or attention maps it needs; the trunk keeps
    only those. `reads_patch_grid`: it reads the patch tokens as a grid (a decoder, per-patch labels)."""

    reads_blocks: tuple[int, ...] = ()
    reads_attention: tuple[int, ...] = ()
    reads_patch_grid: bool = False  # every patch token in place: refused with token pruning (model/token_pruning)

    def forward(self, features: Features):
        raise NotImplementedError
