"""Augmentation that runs batched on the training device: the augment config group."""
