"""The `_target_` of conf/model/*: build the model, then start it from weights and choose what trains.

As timm's `build_model_with_cfg`: the model class only builds modules, and the factory does the I/O
afterwards, so a model can be built in tests, copied, wrapped and restored from a checkpoint without
touching a file.

    model = create_vit(embed_dim=192, depth=12, ..., pretrained="timm:vit_tiny_patch16_224", trainable="head")
    model.load_report      # what the weights did: loaded, resampled, re-initialised, dropped (None: from scratch)

A job that restores the model from its own checkpoint (eval, resume) passes `pretrained=None`: the
checkpoint holds every weight, so downloading the pretrained ones first would be wasted.
"""

from __future__ import annotations

from torch import nn

from vitsweep.model.compat import check_compatible
from vitsweep.model.pretrained import freeze, load_pretrained
from vitsweep.model.vit import VisionTransformer


def create_vit(pretrained: str | None = None, trainable: str = "all", **architecture) -> VisionTransformer:
    """A `VisionTransformer(**architecture)`, its weights loaded from `pretrained` (a run's best.pt, a
    timm .pth/.safetensors, or timm:NAME; adapted to this shape) and only the `trainable` parameters
    left trainable (all | head | head+norm | head+norm+last_block | prompt+head)."""
    model = VisionTransformer(**architecture)
    return start_from(model, pretrained, trainable)


def start_from(model: nn.Module, pretrained: str | None, trainable: str) -> nn.Module:
    """Load `pretrained` into `model` (recording the report as `model.load_report`), then freeze."""
    if pretrained:
        check_compatible(model, pretrained=pretrained)  # model/sharing: one set of weights for several layers
    model.load_report = load_pretrained(model, pretrained) if pretrained else None
    freeze(model, trainable)
    return model
