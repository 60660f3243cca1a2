"""Optimizers from timm: `create_optimizer_v2` puts norms, biases and the names the model lists in
`no_weight_decay()` (position embedding, cls token) in a group without weight decay. Loss-weighting
parameters (`*.log_vars`: task=multi_task with task.weighting=uncertainty) get a group of their own,
without weight decay: they weigh the losses, they are not weights of the network."""

from __future__ import annotations

from omegaconf import ListConfig
from timm.optim import create_optimizer_v2, param_groups_weight_decay
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
    loss_weights = [p for n, p in model.named_parameters() if n.endswith("log_vars") and p.requires_grad]
    if not loss_weights:
        return create_optimizer_v2(model, opt=name, lr=lr, weight_decay=weight_decay, **kwargs)
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=getattr(model, "no_weight_decay",
                                                                                          set)())
    own = {id(p) for p in loss_weights}
    groups = [{**group, "params": [p for p in group["params"] if id(p) not in own]} for group in groups]
    return create_optimizer_v2([*groups, {"params": loss_weights, "weight_decay": 0.0}], opt=name, lr=lr,
                               weight_decay=weight_decay, **kwargs)
