"""A batch of model inputs beyond a bare image tensor: frames of a time series, metadata, dates.

The DataModule serves what the samples hold: a plain tensor for images (B, C, H, W) or time series
(B, T, C, H, W) and nothing else, else an `Inputs`:

    inputs.images       (B, C, H, W) or (B, T, C, H, W) floats: the frames of a sample, oldest first
    inputs.numeric      (B, M) float32 numeric metadata as read (NaN: a missing cell); the model
                        standardizes it with the training statistics it stores (vitsweep.model.metadata)
    inputs.categories   (B, K) int64 index of each categorical column's value (-1: a missing cell)
    inputs.dates        (B, T) float32 days since 1970-01-01 of each frame (NaN: unknown)

What reads a batch treats an `Inputs` like its image tensor where only the pixels matter: augmentation
(vitsweep.augment) and normalization (DataModule.normalize) change `images` and carry the rest along, and
`inputs.shape` is the images' shape, so a batch is counted as `batch.shape[0]` either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

Batch = torch.Tensor  # or Inputs: what DataModule batches give the model


@dataclass
class Inputs:
    images: torch.Tensor
    numeric: torch.Tensor | None = None
    categories: torch.Tensor | None = None
    dates: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.images.shape

    def __len__(self) -> int:
        return self.images.shape[0]

    def with_images(self, images: torch.Tensor) -> Inputs:
        return replace(self, images=images)

    def map_extras(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
        """fn applied to every per-sample tensor but the images (numeric, categories, dates)."""
        return replace(self, **{name: None if value is None else fn(value)
                                for name, value in (("numeric", self.numeric), ("categories", self.categories),
                                                    ("dates", self.dates))})

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
        """fn applied to every per-sample tensor, images included (an index, a slice, a move)."""
        return self.map_extras(fn).with_images(fn(self.images))


def images_of(batch) -> torch.Tensor:
    """The pixels of a batch: the tensor itself, or an Inputs' images."""
    return batch.images if isinstance(batch, Inputs) else batch


def map_batch(fn: Callable[[torch.Tensor], torch.Tensor], batch):
    """fn applied to a batch tensor, or to every per-sample tensor of an Inputs (a slice, an index)."""
    return batch.map_rows(fn) if isinstance(batch, Inputs) else fn(batch)
