"""What a task (or a pretraining method) may read of the data besides batches: the data side of the task
contract (vitsweep/task/protocol.py).

Nothing here hands out a whole split: a source that streams its samples (or cannot hold them) answers each
call from a manifest or one pass, as the in-memory `DataModule` answers it from its tensors.

    data.class_names(target)       the class names of a target ([] when it has none)
    data.target_summary(target)    a split's targets summarized by the target's reader (vitsweep/data/targets.py):
                                   count, shape, dtype, class counts, the sums of values, the largest mask class
    data.image_size, data.in_channels, data.frames (T of a time series, None for images), data.eval_views
    data.balanced                  whether training draws are weighted (data.balance_ratio)
    data.metadata_spec()           the metadata columns the model reads, with their training statistics
    data.use_all_splits()          train on every split's images, unlabelled (pretraining's use_all_splits)
"""

from __future__ import annotations

from typing import Protocol


class DatasetInfo(Protocol):
    image_size: int
    in_channels: int
    frames: int | None
    eval_views: int
    balanced: bool

    def class_names(self, target: str | None = None) -> list[str]: ...

    def target_summary(self, target: str | None = None, split: str = "train") -> dict: ...

    def metadata_spec(self) -> dict: ...

    def use_all_splits(self) -> None: ...
