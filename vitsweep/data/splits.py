"""The in-memory form every dataset is decoded into: uint8 image tensors plus labels, per split."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W), uint8 for photos; float32/uint16 for multispectral arrays
    labels: torch.Tensor  # (N,) int64 class indices, or (N, K) float multi-hot for multi-label
    metadata: torch.Tensor | None = None  # (N, M) float32 extra numeric inputs per sample (data=csv), or None

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: torch.Tensor) -> Split:
        metadata = None if self.metadata is None else self.metadata[index]
        return Split(self.images[index], self.labels[index], metadata)


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    class_names: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)  # unreadable files left out (data.on_bad_file=skip)


def carve_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Hold out a seeded, stratified `fraction` of train as validation. The split seed is separate
    from the training seed so that every run of a multi-seed sweep validates on the same images."""
    if not 0 < fraction < 1:
        raise ValueError(f"data.val_fraction={fraction} must be in (0, 1) when the data has no val split")
    generator = torch.Generator().manual_seed(seed)
    labels = train.labels if train.labels.dim() == 1 else train.labels.argmax(dim=1)
    val_index = []
    for cls in labels.unique():
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        val_index.append(members[: max(1, round(fraction * len(members)))])
    val_index = torch.cat(val_index).sort().values
    is_val = torch.zeros(len(train), dtype=torch.bool)
    is_val[val_index] = True
    return train.subset(~is_val), train.subset(is_val)
