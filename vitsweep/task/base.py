"""What every task answers, so the loop and the modes never ask which task they run.

A task owns, for the run: the head(s) it puts on the trunk (`model_args`), the loss of a batch, the
figures of progress (`batch_scores`), the metrics of a whole split (`evaluator`), the default monitor,
and the statistics it fits on the training targets (`state_dict`, stored in checkpoints). Targets are
what the data gives (vitsweep.data.splits): a tensor, or a dict of them keyed by head name.

Missing labels never reach a loss or a metric: a class index of -1, a NaN regression value, a NaN
multi-hot row, a mask pixel of 255 (IGNORE_INDEX) is masked out, sample by sample (`valid`).
"""

from __future__ import annotations

import torch
from torch import nn


class Evaluator:
    """Accumulates a split batch by batch (`update`), then scores it whole (`compute`)."""

    def update(self, outputs, targets) -> None:
        raise NotImplementedError

    def compute(self, prefix: str) -> dict[str, float]:
        raise NotImplementedError


class Objective:
    """One head's objective: its head, loss, scores and metrics. A single task is one objective; a
    multi-task run composes one per head (vitsweep.task.multi_task)."""

    kind: str = ""
    monitor: str = "val/loss"
    monitor_mode: str = "min"

    def head(self, dim: int, **geometry) -> nn.Module:
        """The head module of this objective inside a multi-task head (reads `Features`)."""
        raise NotImplementedError

    def model_args(self) -> dict:
        """What the model factory needs for this objective as the model's only head."""
        return {}

    def setup(self, train_targets: torch.Tensor, class_names, model: nn.Module, data) -> None:
        """Check the targets fit, and fit statistics on the training split (before any training)."""

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def batch_scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Figures of a training batch for the progress bar and the epoch's train/* metrics, on the device."""
        return {}

    def evaluator(self) -> Evaluator:
        raise NotImplementedError

    def headline(self, key: str) -> bool:
        """Whether a metric key (without split and head) is a headline one, not a per-class value."""
        return "/" not in key

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `valid`; 0 (still in the graph) when nothing is valid."""
    valid = valid.to(values.dtype)
    return (values * valid).sum() / valid.sum().clamp_min(1)


def average_views(outputs, views: int):
    """(B * views, ...) outputs of each image's eval windows (data.eval_crop=tiled) -> (B, ...) means."""
    if views == 1:
        return outputs
    if isinstance(outputs, dict):
        return {name: average_views(value, views) for name, value in outputs.items()}
    return outputs.view(-1, views, *outputs.shape[1:]).mean(dim=1)


def main_output(outputs):
    """The main output of a model's forward: in training with auxiliary heads it is {"out": ..., <aux>: ...}."""
    return outputs["out"] if isinstance(outputs, dict) and "out" in outputs else outputs
