"""The contract between what a run learns and what drives it: the training loop, the modes, the figures
and `vitsweep compare` ask a task these things and nothing else. The objectives of vitsweep/task/
(classification, regression, segmentation, forecasting, multi_task) and the self-supervised methods of
vitsweep/pretrain/ (MAE, DINO) implement it; a new objective is one module that does, plus one YAML
(docs/architecture.md, "Adding an objective").

Outputs are what the model returns for a batch (a tensor, or a dict of them); targets what the data gives
(a tensor, or a dict keyed by target name: vitsweep/data/splits.py).
"""

from __future__ import annotations

from typing import Protocol

import torch
from matplotlib.figure import Figure
from torch import nn

from vitsweep.data.dataset_info import DatasetInfo
from vitsweep.data.targets import TargetReader


class Evaluator(Protocol):
    """Scores a whole split: the loop runs `forward` on each batch (the model's outputs, plus whatever the
    metrics need of the forward, e.g. every early exit's logits), averages views and gathers ranks, then
    `update`s; `compute` gives {"<split>/<metric>": value}. Subclass it for the default `forward`."""

    def forward(self, model: nn.Module, inputs):
        return model(inputs)

    def update(self, outputs, targets) -> None: ...

    def compute(self, prefix: str) -> dict[str, float]: ...


class Task(Protocol):
    """Subclass it for the defaults below (no targets, the trunk's own head, the model as it is, nothing
    after a step, every metric a headline one, no figures, no state)."""

    name: str  # what it is, in summary.json: classification, regression, ..., mae, dino
    explains: str | None = None  # what captum's explanations attribute: "class" (the predicted class), "output"
    #                              (output 0), or None (not one number per image: attention rollout only)
    monitor: str  # the default trainer.monitor, e.g. val/acc
    monitor_mode: str  # max | min

    # -- what it needs, before anything is built
    def targets(self) -> dict[str, TargetReader]:
        """What the data must give: {target name: reader} ({} for none)."""
        return {}

    def model_args(self) -> dict:
        """The model factory's arguments for this task's heads (the trunk's linear head: {})."""
        return {}

    def heads_known(self) -> bool:
        """Whether its head sizes are known from the config (else the model is built after the data)."""
        return True

    def count_classes(self, data: DatasetInfo) -> None:
        """Take the head sizes the config left open from the data (a multi-task head's class count)."""
        return

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop trains around the model (the model itself; a pretraining method's around it)."""
        return model

    # -- before training
    def setup(self, data: DatasetInfo, model: nn.Module) -> None:
        """Check the data's targets against the task and fit its statistics (no training data is held)."""

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        """Work after every optimizer step, outside the gradient (DINO's teacher); nothing by default."""
        return

    # -- the loop's calls
    def loss(self, outputs, targets) -> torch.Tensor:
        """The training loss of a batch (auxiliary heads and early exits included)."""

    def batch_scores(self, outputs, targets) -> dict[str, torch.Tensor]:
        """Figures of a training batch on the device (train/acc, train/mae, ...), averaged over the epoch."""

    def evaluator(self) -> Evaluator:
        """A fresh evaluator for one split."""

    def is_headline(self, key: str) -> bool:
        """Whether a metric key is printed in the epoch line (per-class and per-target values are not)."""
        return True

    # -- after training, and in checkpoints
    def figures(self, evaluator: Evaluator, data: DatasetInfo) -> dict[str, Figure]:
        """Figures of a scored split (confusion matrix, scatter of predictions), from what its evaluator kept."""
        return {}

    # -- a few images, drawn at the end of training and by mode=visualize (vitsweep/viz/report.py)
    def title(self, output, target, class_names: list[str] | None) -> str:
        """One image's prediction (and truth, when known) in a line."""
        return ""

    def sample_figures(self, model: nn.Module, images: torch.Tensor, outputs, targets, titles: list[str],
                       style: dict) -> dict[str, Figure]:
        """Figures of a few images beyond attention and explanations (segmentation: the masks); `style`: how
        the images are drawn (rgb_bands, mean, std)."""
        return {}

    def state_dict(self) -> dict:
        """What it fitted (regression's target statistics) and its name, for checkpoints."""
        return {"kind": self.name}

    def load_state_dict(self, state: dict) -> None:
        return None
