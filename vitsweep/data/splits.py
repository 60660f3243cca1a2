"""The in-memory form every dataset is decoded into: uint8 image tensors plus labels, per split.

Labels (the targets of the task, vitsweep/task/) are one tensor per split, or a dict of them for a
multi-task run, first axis the sample:

    (N,) int64          class indices (classification)
    (N, K) float        multi-hot (multi-label classification)
    (N, T) float        continuous targets (regression); NaN where a value is missing
    (N, H, W) uint8     class index per pixel (segmentation masks); 255 = ignore
    {"riot": (N,), "crowd": (N, 1)}   one entry per head (task=multi_task)

Images are (N, C, H, W), or (N, T, C, H, W) for time series (T frames per sample, oldest first). Besides
its images and labels a sample may carry metadata (numeric and categorical columns) and the date of each
frame; the DataModule serves them to the model with the images (vitsweep.data.inputs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Targets = torch.Tensor | dict[str, torch.Tensor]
IGNORE_INDEX = 255  # a mask pixel that carries no label (segmentation)


def map_targets(fn: Callable[[torch.Tensor], torch.Tensor], targets: Targets) -> Targets:
    """fn applied to the tensor, or to every tensor of a dict of them."""
    return {name: fn(value) for name, value in targets.items()} if isinstance(targets, dict) else fn(targets)


def concat_targets(parts: list[Targets]) -> Targets:
    """Batches of targets (tensors, or dicts of tensors) joined along the sample axis."""
    if isinstance(parts[0], dict):
        return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
    return torch.cat(parts)


def is_mask(target: torch.Tensor, images: torch.Tensor) -> bool:
    """A target (B, H, W) with the images' height and width is a segmentation mask: geometric ops move
    it with its image (nearest neighbour), photometric ops leave it alone."""
    return target.dim() == 3 and tuple(target.shape[-2:]) == tuple(images.shape[-2:])


def map_masks(fn: Callable[[torch.Tensor], torch.Tensor], targets: Targets, images: torch.Tensor) -> Targets:
    """fn applied to every mask among the targets; class, multi-hot and regression targets pass through."""
    return map_targets(lambda t: fn(t) if is_mask(t, images) else t, targets)


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W) or (N, T, C, H, W), uint8 for photos; float32/uint16 for multispectral arrays
    labels: Targets  # see the module docstring
    metadata: torch.Tensor | None = None  # (N, M) float32 numeric metadata per sample (NaN: missing), or None
    categories: torch.Tensor | None = None  # (N, K) int64 categorical metadata, value indices (-1: missing)
    dates: torch.Tensor | None = None  # (N, T) float32 days since 1970-01-01 of each frame (NaN: unknown)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def frames(self) -> int | None:
        """T for a time series (N, T, C, H, W); None for images."""
        return self.images.shape[1] if self.images.dim() == 5 else None

    def subset(self, index: torch.Tensor) -> Split:
        return self.map_rows(lambda t: t[index])

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Split:
        """fn applied to every per-sample tensor (images, labels, metadata, categories, dates)."""
        def apply(t):
            return None if t is None else fn(t)

        return Split(fn(self.images), map_targets(fn, self.labels), apply(self.metadata), apply(self.categories),
                     apply(self.dates))


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    class_names: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)  # unreadable files left out (data.on_bad_file=skip)
    metadata_columns: list[str] = field(default_factory=list)  # the names of Split.metadata's columns
    category_values: dict[str, list[str]] = field(default_factory=dict)  # per categorical column, index -> value


def carve_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Hold out a seeded, stratified `fraction` of train as validation. The split seed is separate
    from the training seed so that every run of a multi-seed sweep validates on the same images."""
    if not 0 < fraction < 1:
        raise ValueError(f"data.val_fraction={fraction} must be in (0, 1) when the data has no val split")
    generator = torch.Generator().manual_seed(seed)
    labels = strata(train.labels)
    val_index = []
    for cls in labels.unique():
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        val_index.append(members[: max(1, round(fraction * len(members)))])
    val_index = torch.cat(val_index).sort().values
    is_val = torch.zeros(len(train), dtype=torch.bool)
    is_val[val_index] = True
    return train.subset(~is_val), train.subset(is_val)


def strata(labels: Targets) -> torch.Tensor:
    """(N,) int64 groups to stratify a split by: the class (the first classification head of a dict, the
    largest of a multi-hot row); one group for targets that are not classes (regression, masks)."""
    if isinstance(labels, dict):
        classes = [value for value in labels.values() if value.dim() == 1 and not value.is_floating_point()]
        return strata(classes[0]) if classes else torch.zeros(len(next(iter(labels.values()))), dtype=torch.int64)
    if labels.dim() == 1 and not labels.is_floating_point():
        return labels  # class indices (-1: missing, a group of its own)
    if labels.dim() == 2 and not labels.isnan().any() and labels.shape[1] > 1 and ((labels == 0) | (labels == 1)).all():
        return labels.argmax(dim=1)  # multi-hot
    return torch.zeros(len(labels), dtype=torch.int64)
