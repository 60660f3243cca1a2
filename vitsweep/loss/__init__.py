"""Classification losses: the loss config group (cross_entropy, focal, bce).

Every loss takes the same label set-up keys:
- `multi_label` (the root key): targets are multi-hot (B, K) floats and every class is an
  independent sigmoid; otherwise targets are class indices (B,) or soft targets (B, K) (mixup).
- `class_weights`: null, an explicit list of num_classes weights, or `balanced`, which is
  n_samples / (num_classes * count_c) over the training labels (scikit-learn's "balanced").

The task builds the loss with the summary of the training labels (`train_summary=`: their shape and the
images per class, `vitsweep.data.targets.ClassLabels.summarize`; no labels are held) rather than calling
a fit method afterwards: a loss is complete once constructed, and a forgotten second call cannot leave
`balanced` silently unweighted. The summary also lets the loss check that `multi_label` matches the data
before any training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy as TimmBinaryCrossEntropy
from torch import nn
from torchvision.ops import sigmoid_focal_loss


def check_label_setup(multi_label: bool, train_summary: dict | None) -> None:
    """Fail before training when the data's labels do not match `multi_label`."""
    if train_summary is None:
        return
    label_dims = 1 + len(train_summary["shape"])  # (N,) class indices, (N, K) multi-hot
    if multi_label and label_dims != 2:
        raise ValueError("multi_label=true but the training labels are one class index per image: this dataset is "
                         "single-label; set multi_label=false, or use multi-hot data (data=synthetic makes it)")
    if not multi_label and label_dims != 1:
        raise ValueError(f"multi_label=false but the training labels are multi-hot "
                         f"{(train_summary['count'], *train_summary['shape'])}: set multi_label=true")


def resolve_class_weights(class_weights: str | Sequence[float] | None, num_classes: int,
                          train_summary: dict | None) -> torch.Tensor | None:
    """The (num_classes,) weight tensor for `class_weights`, or None for unweighted."""
    if class_weights is None:
        return None
    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise ValueError(f"loss.class_weights={class_weights!r} is not one of: null, balanced, "
                             f"or a list of {num_classes} numbers")
        if train_summary is None:
            raise ValueError("loss.class_weights=balanced needs the training labels: build the loss with "
                             "train_summary=data.target_summary()")
        # images per class: index labels are counted, multi-hot labels count their positives
        counts = torch.zeros(num_classes)
        known = torch.tensor(train_summary["class_counts"][:num_classes], dtype=torch.float32)
        counts[:len(known)] = known
        if (counts == 0).any():
            missing = (counts == 0).nonzero().flatten().tolist()
            raise ValueError(f"loss.class_weights=balanced: classes {missing} have no training images, so their "
                             f"weight is infinite: give an explicit list instead")
        return train_summary["labelled"] / (num_classes * counts)
    weights = torch.as_tensor(list(class_weights), dtype=torch.float32)
    if weights.shape != (num_classes,):
        raise ValueError(f"loss.class_weights has {weights.numel()} values but data.num_classes={num_classes}: "
                         f"give one weight per class")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"loss.class_weights={weights.tolist()} must be finite and >= 0")
    return weights


class CrossEntropy(nn.CrossEntropyLoss):
    """Softmax cross entropy with label smoothing and class weights; accepts class indices (B,) or
    soft targets (B, K) (mixup). Single-label only."""

    def __init__(self, label_smoothing: float = 0.0, class_weights: str | Sequence[float] | None = None,
                 num_classes: int | None = None, multi_label: bool = False,
                 train_summary: dict | None = None):
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"loss.label_smoothing={label_smoothing} must be in [0, 1)")
        if multi_label:
            raise ValueError("loss=cross_entropy is a softmax over exclusive classes: with multi_label=true "
                             "use loss=bce or loss=focal")
        check_label_setup(multi_label, train_summary)
        super().__init__(weight=resolve_class_weights(class_weights, num_classes, train_summary),
                         label_smoothing=label_smoothing)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return super().forward(logits.float(), targets)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017): cross entropy scaled by (1 - p_t) ** gamma, so confidently
    right examples count less. gamma = 0 is exactly the cross entropy.

    Single-label: softmax focal loss, written here (timm and torchvision only have the sigmoid
    form); class weights average as in torch's cross entropy. `alpha` is the sigmoid form's
    positive/negative balance, so it applies to multi_label only; single-label runs weigh classes
    with `class_weights`. Multi-label: torchvision's `sigmoid_focal_loss` per class, mean over
    batch and classes.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = None,
                 class_weights: str | Sequence[float] | None = None, num_classes: int | None = None,
                 multi_label: bool = False, train_summary: dict | None = None):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"loss.gamma={gamma} must be >= 0")
        if alpha is not None and not 0 <= alpha <= 1:
            raise ValueError(f"loss.alpha={alpha} must be in [0, 1] or null")
        if alpha is not None and not multi_label:
            raise ValueError(f"loss.alpha={alpha} balances positives against negatives of each sigmoid, so it "
                             f"applies with multi_label=true only: weigh classes with loss.class_weights instead")
        check_label_setup(multi_label, train_summary)
        self.gamma, self.alpha, self.multi_label = gamma, alpha, multi_label
        self.register_buffer("weight", resolve_class_weights(class_weights, num_classes, train_summary))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.multi_label:
            per_label = sigmoid_focal_loss(logits, targets.to(logits.dtype), gamma=self.gamma,
                                           alpha=-1 if self.alpha is None else self.alpha, reduction="none")
            return (per_label * self.weight if self.weight is not None else per_label).mean()
        log_probs = logits.log_softmax(dim=-1)  # (B, K)
        focal_log_probs = (1 - log_probs.exp()) ** self.gamma * log_probs
        if targets.dim() == 1:  # class indices: the weighted mean over the batch, as F.cross_entropy
            return F.nll_loss(focal_log_probs, targets, weight=self.weight)
        weighted = targets * self.weight if self.weight is not None else targets  # soft targets (mixup)
        return -(weighted * focal_log_probs).sum(dim=-1).mean()


class BinaryCrossEntropy(TimmBinaryCrossEntropy):
    """Sigmoid + binary cross entropy per class (timm's). Multi-hot targets (multi_label=true) are
    used as they are; class-index targets become one-hot (one-vs-rest, "BCE is all you need" style),
    smoothed by `label_smoothing`. `class_weights` scale each class's term."""

    def __init__(self, label_smoothing: float = 0.0, class_weights: str | Sequence[float] | None = None,
                 num_classes: int | None = None, multi_label: bool = False,
                 train_summary: dict | None = None):
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"loss.label_smoothing={label_smoothing} must be in [0, 1)")
        check_label_setup(multi_label, train_summary)
        super().__init__(smoothing=label_smoothing, smooth_dense=multi_label,
                         weight=resolve_class_weights(class_weights, num_classes, train_summary))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return super().forward(logits.float(), targets)
