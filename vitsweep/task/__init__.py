"""What a run learns: the task config group (conf/task/). A task owns the head(s) on the ViT trunk, the
loss, the metrics, the target format it asks of the data, and its default monitor; the loop asks it
for each (`Task` in task.py lists the calls)."""

from vitsweep.task.classification import Classification
from vitsweep.task.forecasting import Forecasting
from vitsweep.task.multi_task import MultiTask
from vitsweep.task.regression import Regression
from vitsweep.task.segmentation import Segmentation
from vitsweep.task.task import Task

__all__ = ["Classification", "Forecasting", "MultiTask", "Regression", "Segmentation", "Task"]
