"""The augment list: `augment=[flips,rotation,mixup]` composes one op per config file, in that order.

Time series: every frame of a sample gets the same draw of each op (the same crop, flip, angle, mixing
partner and weight...), so a motion between frames is never an artefact of augmentation. Each op runs on
the frames one time step at a time, (B, C, H, W) each, with the random number generators rewound to the
same state before every step. A batch of `Inputs` (vitsweep.data.inputs) has its images augmented and its
metadata and dates carried along unchanged: mixup and cutmix mix images and targets, not metadata.
"""

from __future__ import annotations

import torch
from torch import nn

from vitsweep.data.inputs import Batch, Inputs


class Compose(nn.Module):
    """Runs its ops in the order given (the order of the `augment=[...]` list; `augment=none`: no ops).

    Every op maps (images (B, C, H, W) float in [0, 1], targets) -> (images, targets): pixel ops pass the
    targets through, mixup/cutmix turn them into soft (B, K) targets.
    """

    def __init__(self, **ops: nn.Module):
        super().__init__()
        self.ops = nn.ModuleDict(ops)

    def forward(self, images: Batch, targets: torch.Tensor) -> tuple[Batch, torch.Tensor]:
        if isinstance(images, Inputs):  # the pixels change, the metadata and dates stay with their samples
            augmented, targets = self(images.images, targets)
            return images.with_images(augmented), targets
        for op in self.ops.values():
            images, targets = op(images, targets) if images.dim() == 4 else same_draw_per_frame(op, images, targets)
        return images, targets

    def extra_repr(self) -> str:
        return "empty: no augmentation" if not self.ops else ""


def same_draw_per_frame(op: nn.Module, frames: torch.Tensor, targets):
    """op applied to each time step of frames (B, T, C, H, W), every step from the same RNG state, so each
    sample's frames get one draw; the targets come out of the first step (every step makes the same)."""
    devices = [frames.device] if frames.device.type == "cuda" else []
    cpu_state = torch.get_rng_state()
    device_states = [torch.cuda.get_rng_state(device) for device in devices]
    steps, step_targets = [], targets
    for t in range(frames.shape[1]):
        torch.set_rng_state(cpu_state)
        for device, state in zip(devices, device_states):
            torch.cuda.set_rng_state(state, device)
        step, out_targets = op(frames[:, t], targets)
        steps.append(step)
        if t == 0:
            step_targets = out_targets
    return torch.stack(steps, dim=1), step_targets  # the RNGs end where one draw leaves them
