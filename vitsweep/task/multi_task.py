"""task=multi_task: several heads on one trunk, each with its own target, loss and metrics.

    python run.py task=multi_task data=csv data.root=crops.csv \\
        'task.heads={riot: {type: classification, column: riot}, crowd: {type: regression, column: crowd_size}}'

Each head: `type` (classification | regression | segmentation), `column` (what it reads from the data),
and optionally `loss` (classification: cross_entropy | focal | bce; regression: mse | l1 | huber),
`weight`, `num_classes` (classification: else the column's distinct values), and a segmentation head's
`granularity` and `decoder`. Targets are a dict keyed by head name; metrics are `<split>/<head>/<metric>`
(`val/riot/acc`, `val/crowd/rmse`), and `<split>/loss` is the weighted total. A missing label (an empty
cell, NaN) masks that head's loss and metrics for that sample only.

Loss weighting (`task.weighting`):
    fixed         sum_i w_i L_i
    uncertainty   sum_i w_i exp(-s_i) L_i + s_i, with s_i = log sigma_i^2 learned per head (Kendall et al.
                  2018, in the form most implementations use); at a fixed L_i the optimum is s_i = log L_i.
                  The s_i live in the model (`head.log_vars`), in an optimizer group of their own without
                  weight decay (vitsweep.optimizer).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from vitsweep.data.targets import TargetReader
from vitsweep.metrics import ClassificationMetrics
from vitsweep.task.heads import MultiHead
from vitsweep.task.objective import Objective
from vitsweep.task.protocol import Evaluator, Task

WEIGHTINGS = ("fixed", "uncertainty")


def build_objective(name: str, spec: Mapping, metrics: ClassificationMetrics | None, granularity: str) -> Objective:
    """The objective of head `name`: its `type` looked up among the objectives (Objective.named: every
    vitsweep/task module's, or a dotted class path of your own), built from the head's other keys."""
    spec = dict(spec)
    objective_type = Objective.named(spec.pop("type", None), key=f"task.heads.{name}.type")
    if not spec.get("column"):
        raise ValueError(f"task.heads.{name} names no column: add column=<the data column it predicts>")
    objective = objective_type.as_head(name, spec, {"metrics": metrics, "granularity": granularity})
    objective.target_name = name  # its targets are the batch's targets[name]
    return objective


class MultiTaskEvaluator(Evaluator):
    def __init__(self, task: MultiTask):
        self.task = task
        self.evaluators = {name: objective.head_evaluator() for name, objective in task.objectives.items()}

    def update(self, outputs, targets) -> None:
        for name, evaluator in self.evaluators.items():
            evaluator.update(outputs[name], targets[name])

    def compute(self, prefix: str) -> dict[str, float]:
        out, total = {}, 0.0
        for name, evaluator in self.evaluators.items():
            metrics = evaluator.compute(prefix)  # {prefix/loss, prefix/acc, ...}, {} if no labelled sample
            total += self.task.objectives[name].weight * metrics.get(f"{prefix}/loss", 0.0)
            out.update({f"{prefix}/{name}/{key.split('/', 1)[1]}": value for key, value in metrics.items()})
        return {f"{prefix}/loss": total, **out}


class MultiTask(Task):
    name = "multi_task"

    def __init__(self, heads: Mapping[str, Mapping], weighting: str = "fixed",
                 metrics: ClassificationMetrics | None = None, granularity: str = "pixel",
                 monitor: str = "val/loss", monitor_mode: str = "min", aux_heads=(), aux=None):
        if not heads:
            raise ValueError("task=multi_task needs task.heads: {name: {type: ..., column: ...}, ...}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"task.weighting={weighting} is not one of: {', '.join(WEIGHTINGS)}")
        if aux_heads:
            raise ValueError("task.aux_heads are for single-objective tasks: with task=multi_task add the auxiliary "
                             "target as one more head in task.heads")
        self.objectives = {name: build_objective(name, spec, metrics, granularity) for name, spec in heads.items()}
        self.weighting, self.monitor, self.monitor_mode = weighting, monitor, monitor_mode
        self.log_vars = None

    def targets(self) -> dict[str, TargetReader]:
        return {name: objective.reader() for name, objective in self.objectives.items()}

    def heads_known(self) -> bool:
        """Whether every head's size is set in the config (else the model waits for the data)."""
        return all(getattr(objective, "num_classes", 0) is not None for objective in self.objectives.values())

    def count_classes(self, data) -> None:
        """Heads without num_classes get their column's class count (a mask head: its largest class + 1)."""
        for name, objective in self.objectives.items():
            if getattr(objective, "num_classes", 0) is None:
                classes = data.class_names(name)
                objective.num_classes = len(classes) or data.target_summary(name).get("max_class", -1) + 1

    def model_args(self) -> dict:
        def head(dim, **geometry) -> nn.Module:
            return MultiHead({name: objective.head(dim, **geometry) for name, objective in self.objectives.items()},
                             learn_log_vars=self.weighting == "uncertainty")
        return {"head": head}

    def setup(self, data, model) -> None:
        for objective in self.objectives.values():
            objective.fit(data.target_summary(objective.target_name), data.class_names(objective.target_name),
                          model, data)
        self.log_vars = model.head.log_vars

    def loss(self, outputs, targets) -> torch.Tensor:
        total = 0.0
        for i, (name, objective) in enumerate(self.objectives.items()):
            loss = objective.weight * objective.head_loss(outputs[name], targets[name])
            if self.log_vars is not None:
                loss = torch.exp(-self.log_vars[i]) * loss + self.log_vars[i]
            total = total + loss
        return total

    def batch_scores(self, outputs, targets) -> dict[str, torch.Tensor]:
        return {f"{name}/{key}": value for name, objective in self.objectives.items()
                for key, value in objective.head_scores(outputs[name], targets[name]).items()}

    def evaluator(self) -> Evaluator:
        return MultiTaskEvaluator(self)

    def is_headline(self, key: str) -> bool:
        parts = key.split("/")  # split / loss, or split / head / metric [/ class]
        return len(parts) == 2 or (len(parts) == 3 and parts[1] in self.objectives)

    def figures(self, evaluator: MultiTaskEvaluator, data) -> dict:
        """The figures of each head, prefixed with its name."""
        return {f"{name}_{key}": figure for name, objective in self.objectives.items()
                for key, figure in objective.head_figures(evaluator.evaluators[name]).items()}

    def title(self, output, target, class_names) -> str:
        return " | ".join(f"{name}: {objective.head_title(output[name], None if target is None else target[name], None)}"
                          for name, objective in self.objectives.items())

    def sample_figures(self, model, images, outputs, targets, titles, style) -> dict:
        return {f"{name}_{key}": figure for name, objective in self.objectives.items()
                for key, figure in objective.head_sample_figures(images, outputs[name], None if targets is None
                                                                 else targets[name], titles, style).items()}

    def state_dict(self) -> dict:
        return {"kind": self.name, "heads": {name: objective.state_dict() for name, objective in self.objectives.items()}}

    def load_state_dict(self, state: dict) -> None:
        for name, objective in self.objectives.items():
            objective.load_state_dict(state["heads"][name])
