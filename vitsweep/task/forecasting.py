"""task=forecasting (the seed's output_mode=forecasting): from the frames 1..T of an image time series, predict
the target h steps after the last frame.

    predict: value    a number h steps ahead (crowd size at the next revisit): the regression objective,
                      targets standardized with the training statistics, MAE / RMSE / R² in the original units
    predict: class    the class h steps ahead (the next frame's land-cover class, riot at the next period): the
                      classification objective, with the `loss` and `metrics` groups

The data names the target and so the horizon: data=csv reads `task.column`, whose cell in each row is the
value (or class) h frames after that row's last frame; data=synthetic_series (signal=forecast) plants one
`horizon` frames ahead. Nothing in the code fixes h. The samples must be time series (N, T, C, H, W): the
task refuses single images in one line. How the frames are read is the model's (model/temporal); with
`none` the frames are averaged, blind to their order (the baseline).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from vitsweep.metrics import ClassificationMetrics
from vitsweep.task.classification import Classification
from vitsweep.task.objective import Objective
from vitsweep.task.regression import Regression

PREDICTIONS = ("value", "class")


class Forecast:
    """What forecasting adds to its objective: it reads time series only."""

    output_mode = "forecasting"

    def fit(self, summary, class_names, model, data) -> None:
        if data.frames is None:
            raise ValueError("task=forecasting predicts from a time series, but the data's samples are single "
                             "images: give each sample frames (data=csv: paths joined by ';' in the image cell, or "
                             "4-D arrays; data=synthetic_series)")
        super().fit(summary, class_names, model, data)


class ForecastRegression(Forecast, Regression):
    pass


class ForecastClassification(Forecast, Classification):
    pass


def Forecasting(predict: str = "value", column: str = "target", regression_loss: str = "mse",
                loss: Callable[..., nn.Module] | str = "cross_entropy", metrics: ClassificationMetrics | None = None,
                num_classes: int | None = None, monitor: str = "val/loss", monitor_mode: str = "min",
                granularity: str = "auto") -> Objective:
    """The forecasting task: its objective per `predict` (see the module docstring), reading `column`."""
    if predict not in PREDICTIONS:
        raise ValueError(f"task.predict={predict!r} is not one of: value (a number h steps ahead), class (the "
                         f"class h steps ahead)")
    if predict == "value":
        return ForecastRegression(targets=[column], loss=regression_loss, monitor=monitor, monitor_mode=monitor_mode,
                                  granularity=granularity)
    return ForecastClassification(loss=loss, metrics=metrics, num_classes=num_classes, monitor=monitor,
                                  monitor_mode=monitor_mode, column=column, granularity=granularity)
