"""Heads that tasks put on the ViT trunk; each reads `vitsweep.model.heads.Features`.

    PooledLinear          (B, out)       a linear map of the pooled vector; from block `block` with its own
                                         norm for deep supervision
    SegmentationDecoder   (B, K, H, W)   SETR (Zheng et al. 2021): `linear` = one 1x1 conv on the patch grid,
                                         bilinear upsampling to the image ("SETR-Naive"); `pup` = progressive
                                         upsampling, x2 per stage with a 3x3 conv, norm and ReLU ("SETR-PUP")
    PatchHead             (B, K, gh, gw) one label per patch token
    AttentionMap          (B, gh, gw)    block `block`'s attention of the cls token (mean over heads) on the patches
    MultiHead             {name: output} one head per objective of a multi-task run, plus the learned
                                         log-variances of uncertainty weighting (`log_vars`)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitsweep.model.heads import Features, TaskHead
from vitsweep.model.pooling import pool_tokens


class PooledLinear(TaskHead):
    def __init__(self, dim: int, out_features: int, block: int | None = None, pooling: str = "cls",
                 num_prefix_tokens: int = 1, **geometry):
        super().__init__()
        self.block, self.pooling, self.num_prefix_tokens = block, pooling, num_prefix_tokens
        self.reads_blocks = () if block is None else (block,)
        # an intermediate block's tokens are not normalized yet: the exit brings its own norm
        self.norm = nn.LayerNorm(dim, eps=1e-6) if block is not None else nn.Identity()
        self.fc = nn.Linear(dim, out_features)

    def forward(self, features: Features) -> torch.Tensor:
        if self.block is None:
            return self.fc(features.pooled)
        tokens = self.norm(features.hidden[self.block])  # (B, N, D)
        return self.fc(pool_tokens(tokens, self.pooling, self.num_prefix_tokens))  # (B, out)


class SegmentationDecoder(TaskHead):
    reads_patch_grid = True

    def __init__(self, dim: int, num_classes: int, grid_size, image_size, decoder: str = "linear",
                 channels: int = 64, **geometry):
        super().__init__()
        if decoder not in ("linear", "pup"):
            raise ValueError(f"task.decoder={decoder!r} is not one of: linear (SETR-Naive), pup (progressive "
                             f"upsampling)")
        self.image_size = tuple(image_size)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        if decoder == "linear":
            self.decode = nn.Conv2d(dim, num_classes, kernel_size=1)
        else:
            # x2 per stage until the grid reaches the image side, then a 1x1 classifier
            stages = max(1, math.ceil(math.log2(max(self.image_size[0] / grid_size[0], self.image_size[1] / grid_size[1]))))
            layers, width = [], dim
            for _ in range(stages):
                layers += [nn.Conv2d(width, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                           nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)]
                width = channels
            self.decode = nn.Sequential(*layers, nn.Conv2d(channels, num_classes, kernel_size=1))

    def forward(self, features: Features) -> torch.Tensor:
        grid = features.patch_grid(self.norm(features.patch_tokens))  # (B, D, gh, gw)
        logits = self.decode(grid)  # (B, K, gh, gw), or larger after progressive upsampling
        return F.interpolate(logits, size=self.image_size, mode="bilinear", align_corners=False)  # (B, K, H, W)


class PatchHead(TaskHead):
    reads_patch_grid = True

    def __init__(self, dim: int, num_classes: int, **geometry):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, features: Features) -> torch.Tensor:
        logits = self.fc(self.norm(features.patch_tokens))  # (B, P, K)
        return features.patch_grid(logits)  # (B, K, gh, gw)


class AttentionMap(TaskHead):
    """Not a layer of its own: block `block`'s attention of the cls token, read as an output so a loss
    can shape it and a figure can show it. Needs a cls token."""

    def __init__(self, dim: int, grid_size, num_prefix_tokens: int, block: int = -1, **geometry):
        super().__init__()
        if num_prefix_tokens < 1:
            raise ValueError("task.aux_heads=[attention] reads the cls token's attention: set model.pooling=cls")
        self.block, self.num_prefix_tokens, self.grid_size = block, num_prefix_tokens, tuple(grid_size)
        self.reads_attention = (block,)
        self.reads_patch_grid = True

    def forward(self, features: Features) -> torch.Tensor:
        cls_row = features.attention[self.block][:, :, 0, self.num_prefix_tokens:].mean(dim=1)  # (B, P)
        return cls_row.reshape(-1, *self.grid_size)  # (B, gh, gw), sums to <= 1 (the rest went to cls)


class MultiHead(TaskHead):
    def __init__(self, heads: dict[str, nn.Module], learn_log_vars: bool = False):
        super().__init__()
        self.heads = nn.ModuleDict(heads)
        self.reads_blocks = tuple(b for head in heads.values() for b in getattr(head, "reads_blocks", ()))
        self.reads_attention = tuple(b for head in heads.values() for b in getattr(head, "reads_attention", ()))
        self.reads_patch_grid = any(getattr(head, "reads_patch_grid", False) for head in heads.values())
        # s_i = log sigma_i^2 of each head (Kendall et al. 2018), trained with the model (see multi_task.py)
        self.log_vars = nn.Parameter(torch.zeros(len(heads))) if learn_log_vars else None

    def forward(self, features: Features) -> dict[str, torch.Tensor]:
        return {name: head(features) for name, head in self.heads.items()}
