"""The augment list: `augment=[flips,rotation,mixup]` composes one op per config file, in that order."""

from __future__ import annotations

import torch
from torch import nn


class Compose(nn.Module):
    """Runs its ops in the order given (the order of the `augment=[...]` list; `augment=none`: no ops).

    Every op maps (images (B, C, H, W) float in [0, 1], targets) -> (images, targets): pixel ops pass the
    targets through, mixup/cutmix turn them into soft (B, K) targets.
    """

    def __init__(self, **ops: nn.Module):
        super().__init__()
        self.ops = nn.ModuleDict(ops)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for op in self.ops.values():
            images, targets = op(images, targets)
        return images, targets

    def extra_repr(self) -> str:
        return "empty: no augmentation" if not self.ops else ""
