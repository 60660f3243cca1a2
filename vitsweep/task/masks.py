"""Per-pixel labels: what segmentation and the `region` auxiliary head share. Masks (B, H, W) hold a
class index per pixel and IGNORE_INDEX (255) where there is no label."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitsweep.data.splits import IGNORE_INDEX
from vitsweep.model.vit import patch_pixels


def patch_labels(masks: torch.Tensor, num_classes: int, kernel: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """Masks (B, H, W) -> (B, gh, gw): the majority class of each patch window, IGNORE_INDEX where the
    window holds no labelled pixel."""
    labels = masks.long()
    labelled = labels != IGNORE_INDEX
    one_hot = F.one_hot(torch.where(labelled, labels, 0), num_classes).permute(0, 3, 1, 2).float()  # (B, K, H, W)
    votes = F.avg_pool2d(one_hot * labelled[:, None], kernel_size=kernel, stride=stride)  # (B, K, gh, gw)
    return torch.where(votes.sum(dim=1) > 0, votes.argmax(dim=1), IGNORE_INDEX)


class MaskLabels:
    """The labels an output (B, K, h, w) is scored on: the masks themselves (granularity pixel) or each
    patch's majority (patch). The patch geometry is the model's (`fit_to`)."""

    def __init__(self, num_classes: int | None, granularity: str = "pixel"):
        self.num_classes, self.granularity = num_classes, granularity
        self.kernel, self.stride = None, None

    def fit_to(self, model) -> None:
        self.kernel, self.stride = patch_pixels(model.patch_embed)  # the pixels each patch token stands for

    def __call__(self, masks: torch.Tensor) -> torch.Tensor:
        if self.granularity == "patch":
            return patch_labels(masks, self.num_classes, self.kernel, self.stride)
        return masks.long()


def mask_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
                       reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of (B, K, h, w) logits over the labelled pixels of (B, h, w), weighted by class as
    torch's; 0, not NaN, when no pixel is labelled. reduction="sum": the sum and no normalization."""
    per_pixel = F.cross_entropy(logits.float(), labels, weight=weights, ignore_index=IGNORE_INDEX,
                                reduction="none")  # (B, h, w), 0 where ignored
    if reduction == "sum":
        return per_pixel.sum()
    labelled = labels != IGNORE_INDEX
    norm = labelled.sum() if weights is None else (weights[labels.clamp_max(len(weights) - 1)] * labelled).sum()
    return per_pixel.sum() / norm.clamp_min(1e-12)
