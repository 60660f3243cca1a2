"""task=classification (the default): one class per image, or several with multi_label=true.

The loss is the `loss` config group (cross_entropy, focal, bce; label smoothing, class weights) and the
metrics the `metrics` group (vitsweep.metrics.ClassificationMetrics); this objective joins them to the
model's linear head. As a head of a multi-task run its loss is picked by name (`loss: cross_entropy`).
Missing labels (-1, or a NaN multi-hot row) count in no loss and no metric. Its figure: the confusion
matrix of a scored split (single-label); its title: the predicted class (and the true one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from vitsweep.data.targets import ClassLabels, RequiredClassLabels
from vitsweep.loss import BinaryCrossEntropy, CrossEntropy, FocalLoss
from vitsweep.metrics import ClassificationMetrics
from vitsweep.task.heads import PooledLinear
from vitsweep.task.objective import Objective
from vitsweep.task.protocol import Evaluator
from vitsweep.viz.figures import confusion_matrix_figure, prediction_title

LOSSES = {"cross_entropy": CrossEntropy, "focal": FocalLoss, "bce": BinaryCrossEntropy}


def valid_labels(targets: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the samples that carry a label (class index >= 0, or a multi-hot row without NaN)."""
    if targets.dim() == 1:
        return targets >= 0
    return ~targets.isnan().any(dim=1)


class ClassificationEvaluator(Evaluator):
    def __init__(self, objective: Classification):
        self.objective, self.logits, self.labels = objective, [], []

    def update(self, outputs, targets) -> None:
        self.logits.append(outputs.float())
        self.labels.append(targets)

    def compute(self, prefix: str) -> dict[str, float]:
        logits, labels = torch.cat(self.logits), torch.cat(self.labels)
        valid = valid_labels(labels)
        if not valid.any():
            return {}
        logits, labels = logits[valid], labels[valid]
        return {f"{prefix}/loss": self.objective.loss_fn(logits, labels).item(),
                **self.objective.metrics(logits, labels, prefix, class_names=self.objective.class_names)}


class Classification(Objective):
    name = "classification"
    explains = "class"  # the predicted class

    def __init__(self, loss: Callable[..., nn.Module] | nn.Module | str = "cross_entropy",
                 metrics: ClassificationMetrics | None = None, num_classes: int | None = None,
                 multi_label: bool = False, monitor: str = "val/acc", monitor_mode: str = "max",
                 column: str | None = None, weight: float = 1.0, aux_heads: Sequence[str] = (),
                 aux: dict | None = None, granularity: str = "auto"):
        if isinstance(loss, str):  # a head of a multi-task run names its loss
            if loss not in LOSSES:
                raise ValueError(f"task.heads.<name>.loss={loss} is not one of {', '.join(LOSSES)} for a "
                                 f"classification head")
            loss = LOSSES[loss]
        self.make_loss, self.metrics = loss, metrics or ClassificationMetrics(multi_label=multi_label)
        self.num_classes, self.multi_label = num_classes, multi_label
        self.monitor, self.monitor_mode = monitor, monitor_mode
        self.loss_fn, self.class_names, self.has_missing = None, None, False
        self.configure(aux_heads, aux, granularity, column, weight)

    @classmethod
    def as_head(cls, name, settings, run):
        metrics = run.get("metrics")  # the run's metrics group, per head
        settings.setdefault("metrics", ClassificationMetrics(names=metrics.names, per_class=metrics.per_class)
                            if metrics else None)
        return super().as_head(name, settings, run)

    @property
    def num_outputs(self) -> int:
        return self.num_classes

    @property
    def class_logits(self) -> bool:  # model/early_exit leaves at a confident class: single-label only
        return not self.multi_label

    def reader(self) -> ClassLabels:
        # without a column of its own: the loader's label column(s), every row labelled
        return ClassLabels(self.target_name, [self.column]) if self.column else RequiredClassLabels(self.target_name)

    def head(self, dim: int, **geometry) -> nn.Module:
        return PooledLinear(dim, self.num_classes)

    def fit(self, summary, class_names, model, data) -> None:
        label_dims = 1 + len(summary["shape"])
        floating = summary["dtype"].startswith(("float", "bfloat"))
        if (floating and label_dims == 1) or label_dims > 2 or "class_counts" not in summary:
            raise ValueError(f"task=classification needs class labels, but the data gives targets of shape "
                             f"{(summary['count'], *summary['shape'])} ({summary['dtype']}): pick the task that fits "
                             f"them (task=regression for numbers, task=segmentation for masks)")
        if self.num_classes is None:
            self.num_classes = len(class_names)
        self.class_names = list(class_names) if class_names else None
        self.has_missing = summary["labelled"] < summary["count"]  # else the loss takes the fast path, no host sync
        present = [k for k, count in enumerate(summary["class_counts"]) if count > 0]
        if label_dims == 1 and len(present) < 2:
            raise ValueError(f"the training split has {len(present)} class(es) ({present}): classification "
                             f"needs at least two; check the labels (data.num_classes={self.num_classes})")
        if isinstance(self.make_loss, nn.Module):  # a loss built already (in Python: Classification(loss=CrossEntropy()))
            self.loss_fn = self.make_loss
        else:  # the training labels' summary: for loss.class_weights=balanced, and to check multi_label against the data
            self.loss_fn = self.make_loss(train_summary=summary, **self.loss_args())

    def loss_args(self) -> dict:
        """A loss named by a multi-task head is built here with its head's class count."""
        return {"num_classes": self.num_classes, "multi_label": self.multi_label} if isinstance(
            self.make_loss, type) else {}

    def head_loss(self, outputs, targets):
        self.loss_fn.to(outputs.device)  # its class weights follow the outputs (a no-op once there)
        if not self.has_missing:
            return self.loss_fn(outputs, targets)
        valid = valid_labels(targets)
        return self.loss_fn(outputs[valid], targets[valid]) if valid.any() else outputs.sum() * 0

    def head_scores(self, outputs, targets):
        if self.has_missing:
            valid = valid_labels(targets)
            outputs, targets = outputs[valid], targets[valid]
        return {"acc": self.metrics.batch_accuracy(outputs, targets)}

    def head_evaluator(self) -> Evaluator:
        return ClassificationEvaluator(self)

    def head_figures(self, evaluator: ClassificationEvaluator):
        labels = torch.cat(evaluator.labels)
        if labels.dim() != 1:
            return {}  # multi-label: no confusion matrix
        logits, valid = torch.cat(evaluator.logits), labels >= 0
        return {"confusion_matrix": confusion_matrix_figure(logits[valid], labels[valid], self.class_names)}

    def head_title(self, output, target, class_names):
        label = None if target is None or target.dim() != 0 else int(target)
        return prediction_title(output, label, class_names if isinstance(class_names, list) else None)
