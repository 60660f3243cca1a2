"""Classification losses: the loss config group."""

from __future__ import annotations

import torch
from torch import nn


class CrossEntropy(nn.CrossEntropyLoss):
    """Cross entropy with label smoothing; accepts class indices (B,) or soft targets (B, K)."""

    def __init__(self, label_smoothing: float = 0.0):
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"loss.label_smoothing={label_smoothing} must be in [0, 1)")
        super().__init__(label_smoothing=label_smoothing)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return super().forward(logits.float(), targets)
