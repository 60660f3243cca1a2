"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019), batched, with one mixing weight per sample.

Each sample i is mixed with sample B-1-i of the (already shuffled) batch, timm's pairing. Labels
become soft targets (B, K): target = lam * own + (1 - lam) * partner, where lam is the share of the
image that is the sample's own (mixup: the blend weight; cutmix: the area outside the pasted box).
Single-label targets are one-hot encoded first, so each row sums to 1 and the cross-entropy loss takes
them as they are. Multi-label targets (B, K) multi-hot are mixed by the same rule: a label present in
both images stays 1, a label of one image gets that image's share, which is what BCE expects.

Segmentation masks (B, H, W): CutMix pastes the partner's mask with the same box, so every pixel keeps
its own label; Mixup refuses them (a blended pixel has no class). A multi-task batch (one target per
head) is refused by both.

Why not timm's Mixup: in its per-sample mode ('elem') it loops over the batch in Python, its 'batch'
mode draws one weight for the whole batch, and its target mixing one-hot encodes class indices, so it
cannot mix multi-hot targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitsweep.augment.functional import box_masks, chosen, per_image, probability
from vitsweep.data.splits import is_mask


def soft_targets(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B,) class indices -> (B, K) one-hot; (B, K) soft or multi-hot targets stay as they are."""
    return targets.float() if targets.dim() == 2 else F.one_hot(targets, num_classes).float()


def beta_weights(alpha: float, p: float, B: int, device) -> torch.Tensor:
    """(B,) mixing weights from Beta(alpha, alpha); 1 (no mixing) for the samples not chosen (prob 1 - p)."""
    concentration = torch.full((B,), float(alpha), device=device)
    lam = torch.distributions.Beta(concentration, concentration).sample()
    return torch.where(chosen(p, B, device), lam, torch.ones_like(lam))


def check_targets(name: str, targets, images: torch.Tensor) -> None:
    """What mixing cannot do: blend segmentation masks (mixup), or mix the heads of a multi-task batch."""
    if isinstance(targets, dict):
        raise ValueError(f"augment={name} mixes one target per sample, but task=multi_task has one per head: drop "  # noqa: TRY004
                         f"{name} from the augment list for multi-task runs")
    if name == "mixup" and is_mask(targets, images):
        raise ValueError("augment=mixup blends two images, but a segmentation mask cannot be blended: use cutmix "
                         "(which pastes the mask with the same box) or drop mixup from the augment list")


def check(name: str, alpha: float, p: float) -> None:
    if alpha <= 0:
        raise ValueError(f"augment.{name}.alpha={alpha} must be > 0 (lam ~ Beta(alpha, alpha)); "
                         f"to switch {name} off, drop it from the augment list or set augment.{name}.p=0")
    probability(f"augment.{name}.p", p)


class Mixup(nn.Module):
    """image_i <- lam_i * image_i + (1 - lam_i) * image_partner, for a fraction p of the samples."""

    def __init__(self, num_classes: int, alpha: float = 0.8, p: float = 1.0):
        super().__init__()
        check("mixup", alpha, p)
        self.num_classes, self.alpha, self.p = num_classes, alpha, p

    def forward(self, images: torch.Tensor, targets: torch.Tensor):
        check_targets("mixup", targets, images)
        targets = soft_targets(targets, self.num_classes)
        lam = beta_weights(self.alpha, self.p, images.shape[0], images.device)  # (B,)
        mixed = per_image(lam) * images + (1 - per_image(lam)) * images.flip(0)
        return mixed, lam[:, None] * targets + (1 - lam[:, None]) * targets.flip(0)


class CutMix(nn.Module):
    """Paste a box of the partner into each chosen sample; the box covers about 1 - lam of the image
    (lam ~ Beta(alpha, alpha)), centred at a random point and clipped at the border, and the targets
    use the exact share the box leaves."""

    def __init__(self, num_classes: int, alpha: float = 1.0, p: float = 1.0):
        super().__init__()
        check("cutmix", alpha, p)
        self.num_classes, self.alpha, self.p = num_classes, alpha, p

    def forward(self, images: torch.Tensor, targets: torch.Tensor):
        check_targets("cutmix", targets, images)
        B, _, H, W = images.shape
        device = images.device
        masks = targets if is_mask(targets, images) else None
        targets = None if masks is not None else soft_targets(targets, self.num_classes)
        cut = (1 - beta_weights(self.alpha, self.p, B, device)).sqrt()  # side of the box / side of the image
        half_h, half_w = (cut * H / 2).long(), (cut * W / 2).long()
        centre_y, centre_x = torch.randint(0, H, (B,), device=device), torch.randint(0, W, (B,), device=device)
        top, bottom = (centre_y - half_h).clamp(0, H), (centre_y + half_h).clamp(0, H)
        left, right = (centre_x - half_w).clamp(0, W), (centre_x + half_w).clamp(0, W)
        mask = box_masks(top, left, bottom - top, right - left, H, W)  # (B, 1, H, W)
        lam = 1 - mask.flatten(1).float().mean(1)  # the share of its own image each sample keeps
        mixed = torch.where(mask, images.flip(0), images)
        if masks is not None:  # segmentation: the partner's labels come with its pixels, box for box
            return mixed, torch.where(mask[:, 0], masks.flip(0), masks)
        return mixed, lam[:, None] * targets + (1 - lam[:, None]) * targets.flip(0)
