"""task=regression: one or more continuous targets per image (a crowd size, a count, a reflectance).

Targets are standardized with the training split's mean and std per target (stored in the checkpoint
with the task's state), so the head learns numbers of order one whatever their unit; the model
predicts standardized values and every metric is reported in the original units. Loss: mse | l1 |
huber (on standardized values). Metrics (torchmetrics): MAE, RMSE, R², the mean over targets as the
headline and `<metric>/<target>` per target when there are several. A NaN target value counts in no
loss and no metric. Its figure: predicted against true values of a scored split, one panel per target;
its title: the predicted values (and the true ones).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional import mean_absolute_error, mean_squared_error, r2_score

from vitsweep.data.targets import Values
from vitsweep.task.heads import PooledLinear
from vitsweep.task.objective import Objective, masked_mean
from vitsweep.task.protocol import Evaluator
from vitsweep.viz.figures import regression_scatter

LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss}


class RegressionEvaluator(Evaluator):
    def __init__(self, objective: Regression):
        self.objective, self.outputs, self.targets = objective, [], []

    def update(self, outputs, targets) -> None:
        self.outputs.append(outputs.float())
        self.targets.append(targets.float().view(len(targets), -1))

    def compute(self, prefix: str) -> dict[str, float]:
        outputs, targets = torch.cat(self.outputs), torch.cat(self.targets)
        out = {f"{prefix}/loss": self.objective.head_loss(outputs, targets).item()}
        predictions = self.objective.predict(outputs)  # original units
        per_target = {"mae": [], "rmse": [], "r2": []}
        for j, name in enumerate(self.objective.names):
            valid = ~targets[:, j].isnan()
            if valid.sum() < 2:
                continue
            pred, true = predictions[valid, j], targets[valid, j]
            scores = {"mae": mean_absolute_error(pred, true).item(),
                      "rmse": mean_squared_error(pred, true, squared=False).item(),
                      "r2": r2_score(pred, true).item()}
            for metric, value in scores.items():
                per_target[metric].append(value)
                if len(self.objective.names) > 1:
                    out[f"{prefix}/{metric}/{name}"] = value
        for metric, values in per_target.items():
            if values:
                out[f"{prefix}/{metric}"] = sum(values) / len(values)
        return out


class Regression(Objective):
    name = "regression"
    target_name = "target"
    explains = "output"  # the first target

    def __init__(self, targets: Sequence[str] = ("target",), loss: str = "mse", huber_delta: float = 1.0,
                 standardize: bool = True, monitor: str = "val/rmse", monitor_mode: str = "min",
                 column: str | None = None, weight: float = 1.0, aux_heads: Sequence[str] = (),
                 aux: dict | None = None, granularity: str = "auto"):
        if loss not in LOSSES:
            raise ValueError(f"task.loss={loss} is not one of: {', '.join(LOSSES)}")
        if huber_delta <= 0:
            raise ValueError(f"task.huber_delta={huber_delta} must be > 0")
        # a multi-task head names one `column`; task=regression lists its `targets` (columns)
        self.names = [column] if column is not None else list(targets)
        if not self.names:
            raise ValueError("task.targets is empty: name the target columns, e.g. task.targets=[crowd_size]")
        self.loss_name, self.huber_delta, self.standardize = loss, huber_delta, standardize
        self.monitor, self.monitor_mode = monitor, monitor_mode
        self.mean = torch.zeros(len(self.names))
        self.std = torch.ones(len(self.names))
        self.configure(aux_heads, aux, granularity, column, weight)

    @property
    def num_outputs(self) -> int:
        return len(self.names)

    def reader(self) -> Values:
        return Values(self.target_name, self.names)

    def head_args(self) -> dict:
        return {"num_classes": self.num_outputs}  # the trunk's linear head: one output per target

    def head(self, dim: int, **geometry) -> nn.Module:
        return PooledLinear(dim, self.num_outputs)

    def fit(self, summary, class_names, model, data) -> None:
        present = summary.get("present")
        if present is None or len(summary["shape"]) > 1:
            raise ValueError(f"task=regression needs numeric targets (N, {self.num_outputs}), but the data gives "
                             f"{(summary['count'], *summary['shape'])} {summary['dtype']}: class labels go with "
                             f"task=classification; data=csv or data=synthetic give numeric targets")
        if len(present) != self.num_outputs:
            raise ValueError(f"task.targets names {self.num_outputs} target(s) ({', '.join(self.names)}) but the data "
                             f"gives {len(present)}")
        if self.standardize:
            count = torch.tensor(present, dtype=torch.float64)
            if (count < 2).any():
                empty = [name for name, n in zip(self.names, present) if n < 2]
                raise ValueError(f"regression target(s) {', '.join(empty)} have fewer than 2 values in the training "
                                 f"split: nothing to learn")
            total, squares = torch.tensor(summary["sum"]), torch.tensor(summary["sum_sq"])
            mean = total / count
            var = ((squares - count * mean.square()) / (count - 1)).clamp_min(0)  # the unbiased variance
            self.mean, self.std = mean.float(), var.sqrt().clamp_min(1e-8).float()

    def standardized(self, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.view(len(targets), -1).float()
        return (targets - self.mean.to(targets.device)) / self.std.to(targets.device)

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """Model outputs (B, T) -> predictions in the targets' original units."""
        return outputs.float() * self.std.to(outputs.device) + self.mean.to(outputs.device)

    def head_loss(self, outputs, targets):
        target = self.standardized(targets)
        valid = ~target.isnan()
        kwargs = {"delta": self.huber_delta} if self.loss_name == "huber" else {}
        per_value = LOSSES[self.loss_name](outputs.float(), torch.where(valid, target, 0.0), reduction="none", **kwargs)
        return masked_mean(per_value, valid)

    def head_scores(self, outputs, targets):
        targets = targets.view(len(targets), -1).float()
        valid = ~targets.isnan()
        error = (self.predict(outputs.detach()) - torch.where(valid, targets, 0.0)).abs()
        return {"mae": masked_mean(error, valid)}

    def head_evaluator(self) -> Evaluator:
        return RegressionEvaluator(self)

    def head_figures(self, evaluator: RegressionEvaluator):
        predictions = self.predict(torch.cat(evaluator.outputs))
        return {"regression_scatter": regression_scatter(predictions, torch.cat(evaluator.targets), self.names)}

    def head_title(self, output, target, class_names):
        text = "pred " + ", ".join(f"{v:.3g}" for v in self.predict(output[None])[0].tolist())
        if target is not None:
            text += " | true " + ", ".join(f"{v:.3g}" for v in target.float().view(-1).tolist())
        return text

    def state_dict(self) -> dict:
        return {"kind": self.name, "names": list(self.names), "mean": self.mean.tolist(), "std": self.std.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.std = torch.tensor(state["mean"]), torch.tensor(state["std"])
