"""Evaluation metrics over a whole split (torchmetrics, functional form, on collected logits)."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_accuracy


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, prefix: str) -> dict[str, float]:
    """Top-1 and top-5 (micro) accuracy of (N, K) logits against (N,) labels."""
    num_classes = logits.shape[1]
    out = {f"{prefix}/acc": multiclass_accuracy(logits, labels, num_classes=num_classes, average="micro").item()}
    if num_classes > 5:
        out[f"{prefix}/acc_top5"] = multiclass_accuracy(
            logits, labels, num_classes=num_classes, top_k=5, average="micro").item()
    return out


def batch_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of a training batch; soft targets (mixup) count their largest class."""
    if targets.dim() == 2:
        targets = targets.argmax(dim=1)
    return (logits.argmax(dim=1) == targets).float().mean()
