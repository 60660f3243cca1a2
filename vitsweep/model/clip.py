"""What the trunk knows about a batch besides its pixels: the frames of each sample, their dates, its metadata.

A batch is images (B, C, H, W), frames (B, T, C, H, W), or an `Inputs` (vitsweep.data.inputs) with metadata
and dates beside them. The trunk embeds every frame as an image, the frames of a sample consecutive in the
batch, (B * T, C, H, W), and carries a `Clip` to the components that look across frames (model/temporal) or
at the metadata (model/metadata):

    clip.frames     T, frames per sample (1 for images)
    clip.dates      (B, T) days since 1970-01-01 of each frame (NaN: unknown), or None
    clip.metadata   (B, D) the metadata encoder's vector of each sample, or None (model/metadata=none)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitsweep.data.inputs import Inputs


@dataclass
class Clip:
    frames: int = 1
    dates: torch.Tensor | None = None
    metadata: torch.Tensor | None = None

    def per_frame(self, values: torch.Tensor) -> torch.Tensor:
        """(B, ...) per sample -> (B * T, ...) per frame, each sample's value repeated for its frames."""
        return values if self.frames == 1 else values.repeat_interleave(self.frames, dim=0)

    def frame_mean(self, values: torch.Tensor) -> torch.Tensor:
        """(B * T, ...) per frame -> (B, ...) per sample: the mean over its frames."""
        return values if self.frames == 1 else values.view(-1, self.frames, *values.shape[1:]).mean(dim=1)

    def by_sample(self, values: torch.Tensor) -> torch.Tensor:
        """(B * T, ...) per frame -> (B, T, ...)."""
        return values.view(-1, self.frames, *values.shape[1:])


def unpack(batch) -> tuple[torch.Tensor, Inputs]:
    """A batch -> (every frame as an image (B * T, C, H, W), the batch as an Inputs)."""
    inputs = batch if isinstance(batch, Inputs) else Inputs(batch)
    images = inputs.images
    if images.dim() == 5:
        return images.flatten(0, 1), inputs  # (B * T, C, H, W): the frames of a sample consecutive
    if images.dim() != 4:
        raise ValueError(f"the model takes images (B, C, H, W) or time series (B, T, C, H, W), got "
                         f"{tuple(images.shape)}")
    return images, inputs
