"""The Vision Transformer and the components that the model/* config groups inject into it."""

from vitsweep.models.vit import VisionTransformer

__all__ = ["VisionTransformer"]
