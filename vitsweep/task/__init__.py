"""What a run learns: the task config group (conf/task/). Every task answers the `Task` protocol
(protocol.py): the targets it reads, the heads it puts on the ViT trunk, the loss, the metrics, its figures
and its default monitor; the loop, the modes and the figures ask it for each and never which task it is.
One objective per module (classification, regression, segmentation, forecasting), composed into several
heads by multi_task; objective.py holds what they share (auxiliary heads, early exits)."""

from vitsweep.task.classification import Classification
from vitsweep.task.forecasting import Forecasting
from vitsweep.task.multi_task import MultiTask
from vitsweep.task.objective import Objective
from vitsweep.task.protocol import Evaluator, Task
from vitsweep.task.regression import Regression
from vitsweep.task.segmentation import Segmentation

__all__ = ["Classification", "Evaluator", "Forecasting", "MultiTask", "Objective", "Regression", "Segmentation", "Task"]
