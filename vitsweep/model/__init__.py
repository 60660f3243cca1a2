"""The Vision Transformer, the components that the model/* config groups inject into it, and the
factory that the model configs target."""

from vitsweep.model.attention import record_attention
from vitsweep.model.factory import create_vit
from vitsweep.model.vit import VisionTransformer

__all__ = ["VisionTransformer", "create_vit", "record_attention"]
