"""Optimizers from timm: `create_optimizer_v2` puts norms, biases and the names the model lists in
`no_weight_decay()` (position embedding, cls token) in a group without weight decay."""

from __future__ import annotations

from omegaconf import ListConfig
from timm.optim import create_optimizer_v2
from torch import nn


def build_optimizer(model: nn.Module, name: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.05,
                    **kwargs):
    """`name` is any timm optimizer name (adamw, sgd, lamb, ...); `kwargs` go to it (betas, momentum...)."""
    if lr <= 0:
        raise ValueError(f"optimizer.lr={lr} must be > 0")
    if weight_decay < 0:
        raise ValueError(f"optimizer.weight_decay={weight_decay} must be >= 0")
    # config lists (betas) arrive as omegaconf ListConfig; some optimizers (timm's Lamb) keep them as
    # given, and the checkpoint's optimizer state must hold plain types to load with weights_only=True
    kwargs = {key: tuple(value) if isinstance(value, ListConfig | list) else value for key, value in kwargs.items()}
    return create_optimizer_v2(model, opt=name, lr=lr, weight_decay=weight_decay, **kwargs)
