"""RandAugment (Cubuk et al. 2020) with torchvision's op list and magnitude scale, drawn per sample.

torchvision's v2.RandAugment draws one op (and one sign) per call, so on a batch tensor every image
gets the same op. Here each sample draws its own `num_ops` ops and signs; each op then runs once, on
the samples that drew it. Ops with a per-sample parameter (shear, translate, rotate, the enhance
family) use the batched functions of vitsweep.augment.functional; the parameter-free ones call
torchvision's functional op on the subset. Unlike torchvision's, every op works on any channel count.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from vitsweep.augment.functional import (
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    adjust_sharpness,
    affine,
    autocontrast,
    chosen,
    identity_matrices,
    probability,
    rotation_matrices,
    warp_masks,
)
from vitsweep.data.splits import map_masks


def _warp(row: int, col: int, scale_by: str | None = None):
    """The (B, 2, 3) output -> input pixel maps that set one entry to the (per-sample) value."""
    def matrices(images, value):
        matrix = identity_matrices(images.shape[0], images.device)
        side = {"W": images.shape[-1], "H": images.shape[-2], None: 1}[scale_by]
        matrix[:, row, col] = value * side
        return matrix
    return matrices


def _rotation(images, value):
    return rotation_matrices(torch.as_tensor(value, device=images.device, dtype=images.dtype).expand(images.shape[0]))


# the ops that move pixels: segmentation masks follow them (nearest neighbour)
GEOMETRIC = {"shear_x": _warp(0, 1), "shear_y": _warp(1, 0), "translate_x": _warp(0, 2, "W"),
             "translate_y": _warp(1, 2, "H"), "rotate": _rotation}


def _geometric(name: str):
    return lambda images, value: affine(images, GEOMETRIC[name](images, value))


# name: (value at the top magnitude, signed, op(images, value)) -- torchvision's _AUGMENTATION_SPACE
OPS = {
    "identity": (0.0, False, lambda images, value: images),
    "shear_x": (0.3, True, _geometric("shear_x")),
    "shear_y": (0.3, True, _geometric("shear_y")),
    "translate_x": (150.0 / 331.0, True, _geometric("translate_x")),  # a fraction of the width
    "translate_y": (150.0 / 331.0, True, _geometric("translate_y")),
    "rotate": (30.0, True, _geometric("rotate")),
    "brightness": (0.9, True, lambda images, value: adjust_brightness(images, 1 + value)),
    "color": (0.9, True, lambda images, value: adjust_saturation(images, 1 + value)),
    "contrast": (0.9, True, lambda images, value: adjust_contrast(images, 1 + value)),
    "sharpness": (0.9, True, lambda images, value: adjust_sharpness(images, 1 + value)),
    "posterize": (4.0, False, lambda images, value: TF.posterize(images, 8 - round(value))),
    "solarize": (1.0, False, lambda images, value: TF.solarize(images, 1.0 - value)),
    "autocontrast": (0.0, False, lambda images, value: autocontrast(images)),
    "equalize": (0.0, False, lambda images, value: TF.equalize(images)),
}


class RandAugment(nn.Module):
    """`num_ops` random ops per sample at `magnitude` (0 .. num_magnitude_bins - 1; torchvision's
    defaults 2, 9, 31), applied to a sample with probability p."""

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31, p: float = 1.0):
        super().__init__()
        if num_ops < 0:
            raise ValueError(f"augment.randaugment.num_ops={num_ops} must be >= 0")
        if not 0 <= magnitude < num_magnitude_bins:
            raise ValueError(f"augment.randaugment.magnitude={magnitude} must be in "
                             f"[0, num_magnitude_bins - 1 = {num_magnitude_bins - 1}]")
        self.num_ops, self.p = num_ops, probability("augment.randaugment.p", p)
        self.fraction = magnitude / (num_magnitude_bins - 1)

    def forward(self, images: torch.Tensor, targets):
        B, device = images.shape[0], images.device
        applies = chosen(self.p, B, device)
        for _ in range(self.num_ops):
            op_index = torch.randint(len(OPS), (B,), device=device).masked_fill(~applies, 0)  # 0: identity
            sign = torch.randint(0, 2, (B,), device=device) * 2 - 1
            out = images.clone()
            for k, (name, (top_value, signed, op)) in enumerate(OPS.items()):
                members = (op_index == k).nonzero().squeeze(1)
                if k == 0 or len(members) == 0:
                    continue
                value = top_value * self.fraction
                value = value * sign[members] if signed else value
                out[members] = op(images[members], value)
                if name in GEOMETRIC:  # masks follow: the same matrices, nearest neighbour
                    matrices = GEOMETRIC[name](images[members], value)
                    targets = map_masks(lambda m, i=members, mt=matrices: m.index_put((i,), warp_masks(m[i], mt)),
                                        targets, images)
            images = out
        return images, targets
