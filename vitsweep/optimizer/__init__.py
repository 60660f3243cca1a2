"""Optimizers from timm: `create_optimizer_v2` puts norms, biases and the names the model lists in
`no_weight_decay()` (position embedding, cls token) in a group without weight decay."""

from __future__ import annotations

from timm.optim import create_optimizer_v2
from torch import nn


def build_optimizer(model: nn.Module, name: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.05,
                    **kwargs):
    """`name` is any timm optimizer name (adamw, sgd, lamb, ...); `kwargs` go to it (betas, momentum...)."""
    if lr <= 0:
        raise ValueError(f"optimizer.lr={lr} must be > 0")
    return create_optimizer_v2(model, opt=name, lr=lr, weight_decay=weight_decay, **kwargs)
