"""Augmentation that runs batched on the training device: the augment config group.

Every op takes (images float (B, C, H, W) in [0, 1], targets) and returns the same, with its own
random parameters for each sample. `Compose` runs the ops listed by `augment=[...]`, in that order.
"""

from vitsweep.augment.compose import Compose

__all__ = ["Compose"]
