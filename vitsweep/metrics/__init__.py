"""Evaluation metrics over a whole split (torchmetrics, functional form, on collected logits) and the
training-batch accuracy: numbers only (figures, such as the confusion matrix, are vitsweep.viz's).
The metrics config group builds a `ClassificationMetrics`; the trainer calls it on val every epoch and
on test at the end.

Keys are `<split>/<key>` for the headline (macro-averaged) value and `<split>/<key>/<class name>`
per class (`metrics.per_class`):

    name       key        single-label                              multi_label=true
    accuracy   acc        top-1 (micro)                             exact match: all K labels right
    top5       acc_top5   top-5 (micro); only when K > 5            not defined; skipped
    auroc      auroc      one-vs-rest AUROC of the softmax          AUROC of each sigmoid
    precision  precision  macro + per class, argmax prediction      macro + per label, sigmoid > 0.5
    recall     recall     (same)                                    (same)
    f1         f1         (same)                                    (same)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.functional import classification as tmf

METRIC_KEYS = {"accuracy": "acc", "top5": "acc_top5", "auroc": "auroc", "precision": "precision",
               "recall": "recall", "f1": "f1"}
PER_CLASS = ("auroc", "precision", "recall", "f1")


class ClassificationMetrics:
    def __init__(self, names: Sequence[str] = ("accuracy", "top5"), multi_label: bool = False,
                 per_class: bool = True):
        unknown = [name for name in names if name not in METRIC_KEYS]
        if unknown:
            raise ValueError(f"metrics.names has unknown {', '.join(map(str, unknown))}: "
                             f"valid names are {', '.join(METRIC_KEYS)}")
        self.names, self.multi_label, self.per_class = list(names), multi_label, per_class

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, prefix: str,
                 class_names: Sequence[str] | None = None) -> dict[str, float]:
        """Metrics of (N, K) logits against (N,) class indices, or (N, K) multi-hot labels."""
        num_classes = logits.shape[1]
        class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        logits = logits.float()
        if self.multi_label:
            # probabilities, not logits: torchmetrics applies the sigmoid only when some value is outside [0, 1]
            probs, target = logits.sigmoid(), labels.long()
            common = {"num_labels": num_classes, "threshold": 0.5}
            headline = {
                "accuracy": lambda: tmf.multilabel_exact_match(probs, target, **common),
                "auroc": lambda average: tmf.multilabel_auroc(probs, target, num_labels=num_classes, average=average),
                "precision": lambda average: tmf.multilabel_precision(probs, target, average=average, **common),
                "recall": lambda average: tmf.multilabel_recall(probs, target, average=average, **common),
                "f1": lambda average: tmf.multilabel_f1_score(probs, target, average=average, **common),
            }
        else:
            probs, target, common = logits.softmax(dim=-1), labels, {"num_classes": num_classes}
            headline = {
                "accuracy": lambda: tmf.multiclass_accuracy(probs, target, average="micro", **common),
                "top5": lambda: tmf.multiclass_accuracy(probs, target, average="micro", top_k=5, **common),
                "auroc": lambda average: tmf.multiclass_auroc(probs, target, average=average, **common),
                "precision": lambda average: tmf.multiclass_precision(probs, target, average=average, **common),
                "recall": lambda average: tmf.multiclass_recall(probs, target, average=average, **common),
                "f1": lambda average: tmf.multiclass_f1_score(probs, target, average=average, **common),
            }
        out = {}
        for name in self.names:
            key = f"{prefix}/{METRIC_KEYS[name]}"
            if name == "top5" and (self.multi_label or num_classes <= 5):
                continue  # top-5 of 5 or fewer classes is always 1; multi-label has no ranking target
            if name not in PER_CLASS:
                out[key] = headline[name]().item()
                continue
            out[key] = headline[name]("macro").item()
            if self.per_class:
                for class_name, value in zip(class_names, headline[name](None).tolist()):
                    out[f"{key}/{class_name}"] = value
        return out

    def batch_accuracy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Accuracy of a training batch, as `acc` above; stays on the device (no sync per step).
        Single-label soft targets (mixup) count their largest class."""
        if self.multi_label:
            return ((logits > 0) == (targets > 0.5)).all(dim=1).float().mean()  # logit > 0 <=> sigmoid > 0.5
        if targets.dim() == 2:
            targets = targets.argmax(dim=1)
        return (logits.argmax(dim=1) == targets).float().mean()
